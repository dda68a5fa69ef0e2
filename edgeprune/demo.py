"""The offline demo: prune a compiled Tracr model and compare the circuit with its known ground truth.

``recover_tracr`` is also what the Tracr recovery tests and ``bench/tracr_recovery.py`` run: prune a
program (a name under data/tracr_models or any artifact folder) in the target-free mode
(``prune.mode: faithful``, configs/tracr_faithful*.yaml), binarise, then report precision and
recall of the circuit's edges against ``ground_truth.json`` (derived from the compiled weights,
never from a pruning result) and check the circuit's outputs on every input of the task.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .circuit import remove_dangling
from .config import apply_overrides, load_config
from .draw import draw_circuit
from .eval import evaluate
from .experiment import load_model, load_split
from .faithful import circuit_fit, reference_batches
from .export import export_run
from .graph import edges_to_mask
from .prune import prune
from .tasks.jsonl import batches, collate
from .viewer import build_payload, load_source, write_html

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "data" / "tracr_models"
NUMERICAL_TOLERANCE = 1e-5  # numerical outputs: "reproduced" means max |circuit - full| <= this


def shipped_programs() -> tuple[str, ...]:
    """The compiled programs shipped in data/tracr_models (folders with a config.json)."""
    return tuple(sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file())) if MODELS.is_dir() else ()


PROGRAMS = shipped_programs()


def artifact_dir(program: str | Path) -> Path:
    """A program name (data/tracr_models/NAME) or an artifact folder -> the folder; errors name both."""
    path = Path(program)
    if (path / "config.json").is_file():
        return path.resolve()
    if (MODELS / str(program) / "config.json").is_file():
        return MODELS / str(program)
    raise FileNotFoundError(f"Tracr program {str(program)!r}: neither a shipped name ({', '.join(PROGRAMS)}) nor "
                            "a folder holding config.json (run_scripts/compile_tracr.py writes them)")


@dataclass
class Recovery:
    program: str
    run_dir: Path
    total_edges: int
    ground_truth: set
    found: set
    steps: int
    seconds: float
    outputs_correct: bool  # the circuit alone gives the compiled model's outputs on every input
    max_output_error: float  # numerical programs: max |circuit - full| over every output
    seed: int = 0
    removable: list | None = None  # faithful mode: kept edges whose removal alone keeps the fit within the
    # tolerance (checked on the test split, independently of the selection; [] = every kept edge is needed)
    attempts: list | None = None  # every restart: seed, edges, outputs_correct (recover_tracr)
    runs: list | None = None  # every restart's Recovery (recover_tracr)

    @property
    def precision(self) -> float:
        return len(self.found & self.ground_truth) / len(self.found) if self.found else 0.0

    @property
    def recall(self) -> float:
        return len(self.found & self.ground_truth) / len(self.ground_truth) if self.ground_truth else float("nan")

    @property
    def exact(self) -> bool:
        """The circuit is the ground truth, edge for edge."""
        return bool(self.ground_truth) and self.found == self.ground_truth

    def table(self) -> str:
        rows = sorted(self.found | self.ground_truth, key=lambda e: (e[1], e[0]))
        lines = [f"{'writer':<12} {'reader':<12} circuit  ground truth"]
        for w, r in rows:
            lines.append(f"{w:<12} {r:<12} {'yes' if (w, r) in self.found else '-':<8} "
                         f"{'yes' if (w, r) in self.ground_truth else '-'}")
        return "\n".join(lines)


def default_config(artifact: Path) -> Path:
    """The target-free config for an artifact: by its output kind (KL for categorical, MSE for numerical)."""
    kind = json.loads((artifact / "config.json").read_text()).get("output_kind")
    return ROOT / "configs" / ("tracr_faithful_numerical.yaml" if kind == "numerical" else "tracr_faithful.yaml")


def tracr_config(program: str | Path, output_dir: str | Path, overrides: list[str] | None = None,
                 config: str | Path | None = None):
    """The resolved experiment config of a program: ``config`` (default: ``default_config``) with
    the artifact and the output folder set, then ``overrides``."""
    artifact = artifact_dir(program)
    path = Path(config) if config is not None else default_config(artifact)
    cfg = load_config(path)
    apply_overrides(cfg, [f"model.name_or_path={artifact}", f"run.output_dir={output_dir}"] + (overrides or []))
    return cfg.validate(path.name)


def recover_tracr(program: str | Path, output_dir: str | Path, *, restarts: int = 3,
                  overrides: list[str] | None = None, config: str | Path | None = None,
                  progress: bool = False) -> Recovery:
    """Prune ``program`` from ``restarts`` seeds and keep the sparsest circuit that still gives the
    compiled model's outputs on every input; compare it with the ground truth.

    The selection looks at faithfulness only (never at the ground truth). Each restart lives in
    ``output_dir/seed{N}``; the chosen circuit's files are copied to ``output_dir`` and
    ``restarts.json`` lists every restart. ``best.runs`` holds every restart's Recovery.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    out = Path(output_dir)
    base = tracr_config(program, out, overrides, config).run.seed
    runs = [prune_and_check(program, out / f"seed{base + k}", (overrides or []) + [f"run.seed={base + k}"],
                            progress, config) for k in range(restarts)]
    faithful = [a for a in runs if a.outputs_correct]
    best = min(faithful, key=lambda a: len(a.found)) if faithful else runs[0]
    for name in ("edges.json", "circuit.json", "metrics.json", "config.yaml", "masks.safetensors", "log.jsonl",
                 "circuit_selection.json"):
        if (best.run_dir / name).is_file():
            shutil.copy(best.run_dir / name, out / name)
    summary = [{"seed": a.seed, "edges": len(a.found), "outputs_correct": a.outputs_correct,
                "steps": a.steps, "seconds": round(a.seconds, 2), "chosen": a is best} for a in runs]
    (out / "restarts.json").write_text(json.dumps(summary, indent=2))
    return Recovery(**{**best.__dict__, "attempts": summary, "runs": runs, "steps": sum(a.steps for a in runs),
                       "seconds": sum(a.seconds for a in runs)})


def prune_and_check(program: str | Path, run_dir: Path, overrides: list[str], progress: bool = False,
                    config: str | Path | None = None) -> Recovery:
    """One pruning run, its circuit (binarised, dangling edges removed) and the check of its outputs."""
    cfg = tracr_config(program, run_dir, overrides, config)
    start = time.perf_counter()
    result = prune(cfg, progress=progress, overwrite=True)  # replaces an earlier run there, refuses other files
    seconds = time.perf_counter() - start
    circuit, _ = export_run(result.output_dir, Path(result.output_dir) / "edges.json")

    model = load_model(cfg.model)
    truth = {tuple(e) for e in model.hf.ground_truth or ()}
    model.set_edges(circuit.edges)
    data = load_split(cfg.data, model, "test")
    metrics = evaluate(model, batches(data.examples, len(data.examples), data.pad_token_id), loss=cfg.data.loss)
    if cfg.data.loss == "mse":
        err = _max_numerical_error(model, data)
        correct = err <= NUMERICAL_TOLERANCE
    else:
        err, correct = float("nan"), metrics["exact_match"] == 1.0
    (Path(result.output_dir) / "metrics.json").write_text(json.dumps(
        {"split": "test", "source": "masks", "counts": circuit.counts, "metrics": metrics}, indent=2))
    removable = removable_edges(model, circuit.edges, data, cfg) if cfg.prune.mode == "faithful" else None
    return Recovery(model.hf.program, Path(result.output_dir), model.graph.num_edges, truth, set(circuit.edges),
                    result.step, seconds, correct, err, seed=cfg.run.seed, removable=removable)


def removable_edges(model, edges, data, cfg) -> list:
    """The circuit's edges whose removal alone (then what dangles) keeps its fit on ``data`` within
    ``prune.faithful_tolerance``, by the selection's statistic: [] when every kept edge is needed."""
    p = cfg.prune
    kept = set(map(tuple, edges))
    model.reset_masks()
    refs = reference_batches(model, batches(data.examples, len(data.examples), data.pad_token_id))
    out = []
    try:
        for edge in sorted(kept):
            trial = remove_dangling(model.graph, edges_to_mask(model.graph, sorted(kept - {edge}), model.spans),
                                    model.n_spans)
            model.edge_masks.set_values(trial.float())
            mean, worst = circuit_fit(model, refs, cfg.data.loss, cfg.data.output_scale)
            if (worst if p.faithful_per_position else mean) <= p.faithful_tolerance:
                out.append(edge)
    finally:
        model.set_edges(sorted(kept))
    return out


@torch.no_grad()
def _max_numerical_error(model, data) -> float:
    batch = collate(data.examples, data.pad_token_id).to(model.device)
    full = model.full_forward(batch.input_ids).logits[batch.loss_mask]
    circ = model(batch.input_ids).logits[batch.loss_mask]
    return float((full - circ).abs().max())


def run_demo(output_dir: str | Path = "runs/demo", *, program: str | Path = "reverse", steps: int | None = None,
             seed: int = 0, restarts: int = 3, progress: bool = True) -> int:
    """``edgeprune demo``: prune a Tracr program (a shipped name or an artifact folder) in the
    target-free mode, write edges.json + circuit.json + drawings, compare with the ground truth."""
    out = Path(output_dir)
    torch.set_num_threads(1)  # the Tracr models are tiny: threads cost more than they save
    overrides = [f"run.seed={seed}"] + ([f"prune.steps={steps}", f"run.save_every={steps}"] if steps else [])
    artifact = artifact_dir(program)
    meta = json.loads((artifact / "config.json").read_text())
    print(f"edgeprune demo: pruning the Tracr-compiled `{meta.get('program', artifact.name)}` program "
          f"(vocab {meta.get('vocab')}, length {meta.get('task_length')}), zero ablation, no sparsity target: "
          f"the sparsest circuit that reproduces every output ({default_config(artifact).name})")
    rec = recover_tracr(artifact, out, restarts=restarts, overrides=overrides, progress=progress)
    title = f"{rec.program}: {len(rec.found)} of {rec.total_edges} edges"
    paths = [draw_circuit(sorted(rec.found), out / f"circuit.{ext}", title=title) for ext in ("pdf", "png")]
    paths.append(write_html(build_payload([load_source(out)], title=title), out / "circuit.html"))
    print()
    for a in rec.attempts:
        print(f"restart seed {a['seed']}: {a['edges']} edges, outputs {'all correct' if a['outputs_correct'] else 'WRONG'}"
              f"{'  <- sparsest faithful: chosen' if a['chosen'] else ''}")
    print()
    if rec.ground_truth:
        print(rec.table())
        print()
        print(f"edges: {rec.total_edges} in the graph, {len(rec.ground_truth)} in the ground truth, "
              f"{len(rec.found)} found; precision {rec.precision:.3f}, recall {rec.recall:.3f}")
    else:
        print(f"edges: {rec.total_edges} in the graph, {len(rec.found)} found (no ground_truth.json to compare)")
    print(f"the circuit alone reproduces every output: {'yes' if rec.outputs_correct else 'NO'}; "
          f"{rec.steps} steps in {rec.seconds:.1f} s over {len(rec.attempts)} restarts")
    within = rec.ground_truth and rec.found < rec.ground_truth and rec.outputs_correct and rec.removable == []
    if within:  # a faithful, 1-minimal circuit inside the weight-level truth (docs/tracr.md, deeper programs)
        left = sorted(rec.ground_truth - rec.found, key=lambda e: (e[1], e[0]))
        print(f"inside the ground truth, every kept edge needed; the {len(left)} ground-truth edges left out are "
              "not needed for these outputs: " + ", ".join(f"{w}->{r}" for w, r in left))
    print(f"written: {out / 'edges.json'}, {out / 'circuit.json'}, " + ", ".join(str(p) for p in paths))
    ok = rec.outputs_correct and (not rec.ground_truth or rec.exact or within)
    return 0 if ok else 1
