"""Edge Pruning and the attribution baselines side by side, at equal circuit size.

The size is the edge count of the (first) Edge Pruning run's circuit after dangling-edge removal,
or a given number. Each scores file gives the largest dangling-free circuit from its top-n
ordering with at most that many edges (``selection.circuit_of_size``), so every row counts the
edges that really are in its circuit. Columns:

- ``edges``: edges in the circuit; ``kl``: mean KL(p_full || p_circuit) over the loss positions;
- ``faithfulness``: (m(C) - m(empty)) / (m(full) - m(empty)), m the logit difference (as ``curve``);
- ``logit_diff_ratio``: m(C) / m(full) (``edgeprune eval``'s ``logit_diff_ratio``);
- with a task metric (``data.task``): the task's own metric and its normalised faithfulness, named
  as ``edgeprune eval`` names them (IOI: ``ioi/logit_diff`` = logit(IO) - logit(S), ``ioi/faithfulness``);
- ``wall_time_s``: time to find the circuit: the attribution run (stored in the scores file), or
  the pruning run (``RUN_DIR/timing.json`` when present, else the time between the run's
  ``config.yaml`` and ``masks.safetensors`` were written: approximate, marked ``~``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..model import EdgeModel
from .curve import EDGE_PRUNING, CircuitEvaluator, _task_fields, label_scores, load_run_circuit
from .scores import check_graph
from .selection import circuit_of_size

COLUMNS = ("method", "edges", "kl", "faithfulness", "logit_diff_ratio", "wall_time_s")


def run_wall_time(run_dir: str | Path) -> tuple[float | None, bool]:
    """(seconds, exact?) of a pruning run: timing.json if written, else from file times."""
    run_dir = Path(run_dir)
    timing = run_dir / "timing.json"
    if timing.is_file():
        try:
            return float(json.loads(timing.read_text())["wall_time_s"]), True
        except (KeyError, ValueError, TypeError):
            pass
    cfg, masks = run_dir / "config.yaml", run_dir / "masks.safetensors"
    if cfg.is_file() and masks.is_file():
        return max(0.0, masks.stat().st_mtime - cfg.stat().st_mtime), False
    return None, False


def compare(model: EdgeModel, batches, *, runs=(), scores=(), n_edges: int | None = None,
            selection: str = "topn", loss: str = "kl", progress: bool = False, task_metric=None) -> dict:
    """Rows of the comparison table (see the module docstring) and the shared settings."""
    for s in scores:
        check_graph(s, model)
    run_circuits = [load_run_circuit(r, model) for r in runs]
    if n_edges is None:
        if not run_circuits:
            raise ValueError("compare needs an Edge Pruning run directory (its circuit size sets the size) "
                             "or an explicit number of edges (--edges N)")
        n_edges = int(run_circuits[0].kept.sum())
    total = model.edge_masks.n  # position-aware: (edge, span) pairs
    if n_edges < 0 or n_edges > total:
        raise ValueError(f"--edges must be in [0, {total}], got {n_edges}")
    bar = tqdm(total=1 + len(run_circuits) + len(scores), desc="compare", disable=not progress, leave=False)
    ev = CircuitEvaluator(model, batches, loss=loss, progress=progress, task_metric=task_metric)  # + empty circuit
    bar.update(1)
    rows = []
    for rc in run_circuits:
        wall, exact = run_wall_time(rc.run_dir)
        rows.append({"method": EDGE_PRUNING, "source": str(rc.run_dir), **ev.point(rc.kept),
                     "wall_time_s": wall, "wall_time_exact": exact})
        bar.update(1)
    for label, s in zip(label_scores(list(scores)), scores):
        kept = circuit_of_size(model.graph, s.ranking_key(), n_edges, selection, n_spans=model.n_spans)
        rows.append({"method": label, "source": s.source, **ev.point(kept), "wall_time_s": s.wall_time_s,
                     "wall_time_exact": s.wall_time_s is not None})
        bar.update(1)
    bar.close()
    return {"n_edges": n_edges, "total_edges": total, "selection": selection,
            "m_full": ev.m_full, "m_empty": ev.m_empty, **_task_fields(ev), "n_examples": ev.n_examples,
            "n_positions": ev.n_positions, "rows": rows}


def format_markdown(result: dict) -> str:
    """The table as GitHub markdown; a task's own metric and faithfulness get two more columns."""
    task = result.get("task_metric")  # e.g. "ioi/logit_diff"
    tf = task and task.split("/")[0] + "/faithfulness"
    head = f" | {task} | {tf}" if task else ""
    lines = [f"Circuits of at most {result['n_edges']} edges of {result['total_edges']} "
             f"(m(full) = {result['m_full']:.4g}, m(empty) = {result['m_empty']:.4g}, "
             f"{result['n_examples']} examples; faithfulness: generic logit difference"
             + (f"; {tf}: the task's own, on {task}" if task else "") + ")", "",
             f"| method | edges | KL | faithfulness{head} | logit-diff ratio | wall time (s) |",
             "|---|---:|---:|---:|" + ("---:|---:|" if task else "") + "---:|---:|"]
    for r in result["rows"]:
        wall = "n/a" if r["wall_time_s"] is None else f"{'' if r['wall_time_exact'] else '~'}{r['wall_time_s']:.1f}"
        cells = f" {r[task]:.4f} | {r[tf]:.4f} |" if task else ""
        lines.append(f"| {r['method']} | {r['edges']} | {r['kl']:.4f} | {r['faithfulness']:.4f} |{cells} "
                     f"{r['logit_diff_ratio']:.4f} | {wall} |")
    return "\n".join(lines) + "\n"
