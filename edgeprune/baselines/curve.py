"""Faithfulness of circuits across sizes, and the MIB summaries CPR and CMD.

For a circuit C, with m the logit difference (``edgeprune.eval``: target logit minus the full
model's top alternative, averaged over the loss positions of the evaluation split):

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

where ``empty`` ablates every edge (under interchange: the model run on the corrupted input) and
``full`` keeps every edge; so f(empty) = 0 and f(full) = 1 by definition.

The x-axis is the fraction of the graph's edges that are in the circuit *after* dangling-edge
removal (x in [0, 1], linear). Each method's points are joined piecewise linearly, with the
anchors (0, 0) (the empty circuit) and (1, 1) (the full model) added where not measured, and

    CPR = integral_0^1 f(x) dx          (circuit performance ratio: higher is better)
    CMD = integral_0^1 |1 - f(x)| dx    (circuit-model difference: lower is better)

computed exactly for the piecewise-linear curve (trapezoids; a segment where 1 - f changes sign
is split at the crossing). This follows MIB (Mueller et al. 2025), which integrates over the edge
fraction on a linear scale with the budgets 0.1 .. 100 %; the plot uses a log x-axis so the small
circuits are visible, the areas do not. Because every method is integrated over the same [0, 1]
with the same anchors, methods whose points sit at different sizes (Edge Pruning runs) are
comparable with budget-based ones.

Score-based methods get one circuit per budget b (percent of all edges): the largest circuit from
their ordering with at most b% of the edges after dangling removal (``selection.circuit_of_size``).
Edge Pruning gets one point per run directory (its circuit as ``edgeprune eval`` extracts it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cache import ReferenceCache, batches_nbytes, fits
from ..circuit import extract_circuit
from ..estimate import free_bytes
from ..eval import evaluate, normalized_faithfulness
from ..model import EdgeModel
from ..rundir import load_masks
from .scores import Scores, check_graph
from .selection import circuit_of_size, edge_order

MIN_POINTS = 3  # fewer measured points than this: CPR/CMD are mostly the anchors, and say so
DEFAULT_BUDGETS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
EDGE_PRUNING = "edge-pruning"


def check_budgets(budgets) -> list[float]:
    """Budgets in percent of edges, each in (0, 100]; returned sorted and without repeats."""
    out = []
    for b in budgets:
        try:
            value = float(b)
        except (TypeError, ValueError):
            raise ValueError(f"edge budget {b!r} is not a number (budgets are percents of edges in (0, 100])") from None
        if not (math.isfinite(value) and 0.0 < value <= 100.0):
            raise ValueError(f"edge budget {b!r} is outside (0, 100] (budgets are percents of all edges)")
        out.append(value)
    if not out:
        raise ValueError("no edge budgets given")
    return sorted(set(out))


def parse_budgets(text: str) -> list[float]:
    """'0.1,1,10' -> [0.1, 1.0, 10.0] (checked)."""
    return check_budgets([t for t in text.replace(" ", "").split(",") if t])


def areas(xs, fs) -> tuple[float, float]:
    """(CPR, CMD) of the piecewise-linear curve through (x, f), anchored at (0, 0) and (1, 1).

    Points at the same x are averaged. xs in [0, 1].
    """
    by_x: dict[float, list[float]] = {}
    for x, f in zip(xs, fs):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"edge fraction {x} is outside [0, 1]")
        if not math.isfinite(f):
            raise ValueError(f"faithfulness at edge fraction {x} is {f}: m(full) = m(empty) on this data, so "
                             "no circuit can be scored against them (choose a split where the corruption matters)")
        by_x.setdefault(float(x), []).append(float(f))
    by_x.setdefault(0.0, [0.0])
    by_x.setdefault(1.0, [1.0])
    pts = sorted((x, sum(v) / len(v)) for x, v in by_x.items())
    cpr = cmd = 0.0
    for (x0, f0), (x1, f1) in zip(pts, pts[1:]):
        w = x1 - x0
        cpr += w * (f0 + f1) / 2
        g0, g1 = 1.0 - f0, 1.0 - f1
        if g0 * g1 >= 0:
            cmd += w * (abs(g0) + abs(g1)) / 2
        else:  # 1 - f crosses zero inside the segment: two triangles
            t = g0 / (g0 - g1)
            cmd += w * (t * abs(g0) + (1 - t) * abs(g1)) / 2
    return cpr, cmd


class CircuitEvaluator:
    """Evaluates circuits (E,) bool on fixed batches, caching repeated circuits.

    ``point(kept)`` gives the edge count and fraction, m (logit difference), f (normalised),
    KL and the plain ratio m(C) / m(full) (``edgeprune eval``'s ``logit_diff_ratio``).
    """

    def __init__(self, model: EdgeModel, batches, loss: str = "kl", progress: bool = False, task_metric=None):
        if loss == "mse":
            raise ValueError("faithfulness curves use the logit difference; this task is numerical (data.loss: mse)")
        self.model, self.batches, self.loss, self.progress = model, list(batches), loss, progress
        self.task_metric = task_metric  # tasks.common.TaskMetric: its own faithfulness beside the generic one
        self._cache: dict[bytes, dict] = {}
        # the full model's pass over these batches (reference logits, corrupted states) is the same for every
        # circuit: made once when it fits (``cache.fits``), else once per circuit
        self.reference = ReferenceCache(enabled=fits(batches_nbytes(model, self.batches), free_bytes(model.device)))
        self.names = model.edge_names  # (writer, reader[, span]) per mask
        empty = self.metrics(torch.zeros(len(self.names), dtype=torch.bool))
        self.m_full = empty["logit_diff_full"]
        self.m_empty = empty["logit_diff_circuit"]
        self.task_full = self.task_empty = None
        if task_metric is not None:
            self.task_full, self.task_empty = empty[self.task_key + "_full"], empty[self.task_key + "_circuit"]
        self.n_examples, self.n_positions = empty["n_examples"], empty["n_positions"]

    @property
    def task_key(self) -> str | None:
        """The task's main metric as ``edgeprune eval`` names it (``ioi/logit_diff``), or None."""
        t = self.task_metric
        return None if t is None else f"{t.name}/{t.main}"

    def metrics(self, kept: torch.Tensor) -> dict:
        key = kept.bool().cpu().numpy().tobytes()
        if key not in self._cache:
            self.model.set_edges([e for e, k in zip(self.names, kept.tolist()) if k])
            try:
                self._cache[key] = evaluate(self.model, self.batches, loss=self.loss, empty=False,
                                            task_metric=self.task_metric, reference=self.reference)
            finally:
                self.model.reset_masks()
        return self._cache[key]

    def point(self, kept: torch.Tensor) -> dict:
        m = self.metrics(kept)
        n = int(kept.sum())
        return {"edges": n, "edge_fraction": n / len(self.names),
                "logit_diff": m["logit_diff_circuit"],
                "faithfulness": normalized_faithfulness(m["logit_diff_circuit"], self.m_full, self.m_empty),
                "kl": m["kl"], "logit_diff_ratio": m["logit_diff_ratio"], "exact_match": m["exact_match"],
                **self._task_point(m)}

    def _task_point(self, m: dict) -> dict:
        """The task's own metric of the circuit and its normalised faithfulness (``ioi/logit_diff``,
        ``ioi/faithfulness``: logit(IO) - logit(S) for IOI), when the task has one."""
        if self.task_metric is None:
            return {}
        key, circ = self.task_key, m[self.task_key + "_circuit"]
        return {key: circ, f"{self.task_metric.name}/faithfulness":
                normalized_faithfulness(circ, self.task_full, self.task_empty)}


@dataclass
class RunCircuit:
    run_dir: Path
    kept: torch.Tensor  # (E,) bool after dangling removal
    counts: dict


def load_run_circuit(run_dir: str | Path, model: EdgeModel, allow_other_model: bool = False) -> RunCircuit:
    """An Edge Pruning run's circuit, extracted as ``edgeprune eval`` does (threshold + dangling removal)."""
    run_dir = Path(run_dir)
    masks = load_masks(run_dir)
    masks.check_model(model, allow_other_model)
    c = extract_circuit(model.graph, masks.edge_log_alpha, masks.node_log_alpha, spans=masks.spans)
    return RunCircuit(run_dir, c.kept, c.counts)


def label_scores(scores: list[Scores]) -> list[str]:
    """Method names as labels; a method given twice gets its file name added."""
    labels = [s.method for s in scores]
    return [f"{lab} ({Path(s.source).stem})" if labels.count(lab) > 1 and s.source else lab
            for lab, s in zip(labels, scores)]


def faithfulness_curve(model: EdgeModel, batches, *, runs=(), scores=(), budgets=DEFAULT_BUDGETS,
                       selection: str = "topn", loss: str = "kl", progress: bool = False, task_metric=None) -> dict:
    """Curve points, CPR and CMD per method (the structure written to ``curve.json``)."""
    budgets = check_budgets(budgets)
    for s in scores:
        check_graph(s, model)
    ev = CircuitEvaluator(model, batches, loss=loss, progress=progress, task_metric=task_metric)
    graph, S = model.graph, model.n_spans
    E = graph.num_edges * (S or 1)  # position-aware: every (edge, span) is one edge of the curve
    methods: dict[str, dict] = {}
    total = len(runs) + len(scores) * len(budgets)
    bar = tqdm(total=total, desc="curve", disable=not progress, leave=False)
    if runs:
        points = []
        for run in runs:
            rc = load_run_circuit(run, model)
            points.append({"run": str(rc.run_dir), **ev.point(rc.kept),
                           "edges_before_dangling": rc.counts["edges_before_dangling"]})
            bar.update(1)
        points.sort(key=lambda p: p["edge_fraction"])
        methods[EDGE_PRUNING] = {"sources": [str(r) for r in runs], "points": points}
    for label, s in zip(label_scores(list(scores)), scores):
        key = s.ranking_key()
        order = edge_order(graph, key, selection, S)
        points = []
        for b in budgets:
            kept = circuit_of_size(graph, key, int(math.floor(E * b / 100.0 + 1e-9)), selection, order=order,
                                   n_spans=S)
            points.append({"budget_percent": b, **ev.point(kept)})
            bar.update(1)
        methods[label] = {"sources": [s.source], "method": s.method, "settings": s.settings,
                          "rank_by": s.rank_by, "points": points}
    bar.close()
    for label, entry in methods.items():
        measured = [p for p in entry["points"] if 0.0 < p["edge_fraction"] < 1.0]
        xs = {p["edge_fraction"] for p in entry["points"]}
        entry["anchors"] = [a for a in ((0.0, 0.0), (1.0, 1.0)) if a[0] not in xs]  # added, not measured
        entry["measured_points"] = len(measured)
        if len(measured) < MIN_POINTS:
            entry["warning"] = (f"{label}: only {len(measured)} measured point(s) strictly between the empty and "
                                f"the full circuit; its CPR/CMD come mostly from the (0,0)/(1,1) anchors and "
                                f"are not comparable with methods measured at more sizes (give at least "
                                f"{MIN_POINTS} runs or budgets)")
            warnings.warn(entry["warning"], stacklevel=2)
        cpr, cmd = areas([p["edge_fraction"] for p in entry["points"]], [p["faithfulness"] for p in entry["points"]])
        entry["cpr"], entry["cmd"] = cpr, cmd
    return {
        "metric": "logit_diff",
        "faithfulness": "(m(C) - m(empty)) / (m(full) - m(empty))",
        "x_axis": "edge fraction after dangling-edge removal, linear; anchors (0,0) and (1,1); trapezoids",
        "selection": selection,
        "budgets_percent": budgets,
        "total_edges": E,
        "m_full": ev.m_full,
        "m_empty": ev.m_empty,
        **_task_fields(ev),
        "n_examples": ev.n_examples,
        "n_positions": ev.n_positions,
        "methods": methods,
    }


def _task_fields(ev: CircuitEvaluator) -> dict:
    """The task's metric name and its full / empty values (each point then carries ``TASK/faithfulness``)."""
    if ev.task_metric is None:
        return {}
    return {"task_metric": ev.task_key, "task_full": ev.task_full, "task_empty": ev.task_empty}


def plot_curve(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Faithfulness vs edge fraction (log x), one line per method, CPR/CMD in the legend."""
    import matplotlib  # heavy: only plotting pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: after choosing the Agg backend above

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, entry in result["methods"].items():
        pts = [(p["edge_fraction"], p["faithfulness"]) for p in entry["points"] if p["edge_fraction"] > 0]
        if not pts:
            continue
        xs, fs = zip(*pts)
        ax.plot(xs, fs, marker="o", markersize=4,
                label=f"{label}  (CPR {entry['cpr']:.3f}, CMD {entry['cmd']:.3f})")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of edges in the circuit")
    ax.set_ylabel("faithfulness  (m(C) - m(empty)) / (m(full) - m(empty))")
    ax.set_title(title or f"faithfulness vs circuit size ({result['total_edges']} edges)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
