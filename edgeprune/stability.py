"""How stable is a circuit across seeds? ``edgeprune stability RUN_DIR...``

The runs are of one config with different ``run.seed`` (any runs on one graph work). Printed and
written (``-o``, JSON):

- each run's circuit (threshold at its learned sparsity, dangling edges removed) and its size;
- pairwise edge IoU at equal size: every run's top ``k`` edges by log_alpha, ``k`` the smallest
  circuit of the runs (so a larger circuit is not penalised for being larger), ``|A & B| / |A | B|``;
- the edges kept by every run (in every top-``k`` set);
- per-edge keep frequency over the runs' own circuits (a histogram: edges kept by exactly j runs),
  and the most frequent edges (all of them in the JSON).

``--bootstrap N`` resamples the evaluation split with replacement N times (seeded) and, for every
resample, re-evaluates each run's circuit (re-extracted from its masks) against the full model:
the mean, standard deviation and 2.5-97.5 percentiles of KL and faithfulness per run tell whether
differences between seeds exceed the noise of the evaluation data.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import torch

from .ablation import kind_of
from .circuit import extract_circuit
from .eval import evaluate
from .experiment import load_model, load_split, prepare_ablation, task_metric
from .graph import Graph, span_edges
from .rundir import load_masks, load_run_config
from .tasks.jsonl import batches


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Edge IoU of two (E,) bool sets (1.0 for two empty sets)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def top_k(log_alpha: torch.Tensor, k: int) -> torch.Tensor:
    """(E,) bool: the k edges of largest log_alpha (ties: graph order)."""
    kept = torch.zeros(log_alpha.numel(), dtype=torch.bool)
    kept[torch.argsort(log_alpha.float(), descending=True, stable=True)[:k]] = True
    return kept


def stability(run_dirs: list[str | Path], top: int = 20) -> dict:
    """The report of the module docstring for runs on one graph (ValueError when they differ)."""
    if len(run_dirs) < 2:
        raise ValueError("stability needs at least 2 run directories (runs of one config with different seeds)")
    runs = [load_masks(r) for r in run_dirs]
    first = runs[0]
    for r, d in zip(runs[1:], run_dirs[1:]):
        if r.graph != first.graph:
            raise ValueError(f"{d}: masks are for another graph than {run_dirs[0]} ({r.graph} vs {first.graph})")
    graph = Graph.from_fingerprint(first.graph, str(run_dirs[0]))
    spans = first.spans  # position-aware runs: every (edge, span) is one edge here
    names = span_edges(graph, spans)
    circuits = [extract_circuit(graph, r.edge_log_alpha, r.node_log_alpha, spans=spans) for r in runs]
    sizes = [int(c.kept.sum()) for c in circuits]
    k = min(sizes)
    sets = [top_k(r.edge_log_alpha, k) for r in runs]
    pairs = {f"{i},{j}": iou(sets[i], sets[j]) for i, j in combinations(range(len(runs)), 2)}
    every = torch.stack(sets).all(0)
    kept = torch.stack([c.kept for c in circuits])  # (R, E)
    counts = kept.sum(0)
    n = len(runs)
    freq_order = torch.argsort(counts, descending=True, stable=True)
    frequent = [{"edge": list(names[i]), "runs": int(counts[i]), "frequency": int(counts[i]) / n}
                for i in freq_order.tolist() if counts[i] > 0]
    values = list(pairs.values())
    return {
        "runs": [str(d) for d in run_dirs],
        "circuit_edges": sizes,
        "total_edges": len(names),
        "equal_size": k,
        "pairwise_iou": pairs,
        "mean_iou": sum(values) / len(values),
        "min_iou": min(values),
        "kept_by_every_run": [list(names[i]) for i in every.nonzero().flatten().tolist()],
        "histogram": {str(j): int((counts == j).sum()) for j in range(1, n + 1)},
        "keep_frequency": frequent,
        "top": top,
    }


def bootstrap(run_dirs: list[str | Path], n: int, split: str = "validation", batch_size: int | None = None,
              seed: int = 0, progress: bool = False) -> dict:
    """KL and faithfulness of each run's circuit on ``n`` resamples (with replacement) of ``split``."""
    cfg = load_run_config(run_dirs[0])
    model = load_model(cfg.model)
    load_masks(run_dirs[0]).apply_spans(model)  # position-aware runs: the split gets the run's span ids
    data = load_split(cfg.data, model, split)
    metric = task_metric(cfg.data, model)
    bs = batch_size or cfg.prune.batch_size
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randint(len(data.examples), (len(data.examples),), generator=gen).tolist() for _ in range(n)]
    out = {}
    for d in run_dirs:
        masks = load_masks(d)
        masks.check_model(model)
        run_cfg = load_run_config(d)  # each run is measured under its own ablation and states
        model.ablation = kind_of(run_cfg, model)
        record = prepare_ablation(model, run_cfg, d)
        circuit = extract_circuit(model.graph, masks.edge_log_alpha, masks.node_log_alpha, spans=masks.spans)
        model.set_edges(circuit.edges)
        per = {"kl": [], "faithfulness": []} if cfg.data.loss == "kl" else {"mse": []}
        for idx in samples:
            examples = [data.examples[i] for i in idx]
            m = evaluate(model, batches(examples, bs, data.pad_token_id), loss=cfg.data.loss, task_metric=metric,
                         output_scale=cfg.data.output_scale, progress=progress)
            for key in per:
                per[key].append(float(m.get(key, float("nan"))))
        out[str(d)] = {**{key: _summary(v) for key, v in per.items()}, "ablation": record}
        model.reset_masks()
    return {"split": split, "resamples": n, "seed": seed, "per_run": out}


def _summary(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0,
            "p2.5": float(t.quantile(0.025)), "p97.5": float(t.quantile(0.975))}


def format_report(report: dict) -> str:
    lines = [f"{len(report['runs'])} runs on a graph of {report['total_edges']} edges; circuit sizes "
             f"{report['circuit_edges']}; compared at equal size k = {report['equal_size']}"]
    lines.append("pairwise edge IoU at equal size:")
    for pair, value in report["pairwise_iou"].items():
        i, j = (int(x) for x in pair.split(","))
        lines.append(f"  {report['runs'][i]}  vs  {report['runs'][j]}: {value:.3f}")
    lines.append(f"  mean {report['mean_iou']:.3f}, min {report['min_iou']:.3f}")
    lines.append(f"edges kept by every run: {len(report['kept_by_every_run'])} of {report['equal_size']}")
    lines.append("edges kept by exactly j runs: " + ", ".join(f"j={j}: {c}" for j, c in report["histogram"].items()))
    lines.append(f"most frequent edges (of {len(report['keep_frequency'])} kept by any run):")
    for row in report["keep_frequency"][:report["top"]]:
        lines.append(f"  {row['edge'][0]} -> {row['edge'][1]}: {row['runs']}/{len(report['runs'])}")
    boot = report.get("bootstrap")
    if boot:
        lines.append(f"bootstrap ({boot['resamples']} resamples of {boot['split']}, seed {boot['seed']}):")
        for run, metrics in boot["per_run"].items():
            text = "; ".join(f"{k} {v['mean']:.4g} +- {v['std']:.2g} [{v['p2.5']:.4g}, {v['p97.5']:.4g}]"
                             for k, v in metrics.items() if k != "ablation")
            lines.append(f"  {run}: {text} ({metrics['ablation']['ablation']} ablation)")
    return "\n".join(lines)
