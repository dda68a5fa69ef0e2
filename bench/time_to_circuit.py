"""Time to a faithful circuit: cold-start Edge Pruning, warm start from EAP-IG, EAP-IG alone.

    python bench/time_to_circuit.py                       # stories260K names + both Tracr programs
    python bench/time_to_circuit.py --steps 60 --seeds 0  # quicker
    python bench/time_to_circuit.py --model DIR           # also any model directory (on the names task)

Per task and seed: EAP-IG scores (wall time); cold start (``--steps`` steps) under the paper's
Lagrangian and under the projected control (``prune.sparsity_control``); warm start from the
EAP-IG scores with a third of the steps (projected); then ``edgeprune compare`` of each run against EAP-IG's
circuit at the run's own edge count on the test split. Printed: steps and wall time until the
expected sparsity is within 0.005 of the target (``-`` = never), wall time of the whole run, edges,
KL and normalised logit-difference faithfulness (``mse`` for Tracr xproportion).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeprune import buffers  # noqa: E402
from edgeprune.cli import main as cli  # noqa: E402

TASKS = {"stories_names": ROOT / "configs" / "stories_names.yaml",
         "tracr_reverse": ROOT / "configs" / "tracr_reverse.yaml",
         "tracr_xproportion": ROOT / "configs" / "tracr_xproportion.yaml"}


def reached_at(run: Path, tol: float = 0.005) -> tuple[int | None, int]:
    """(first step whose expected sparsity is within ``tol`` of the final target, last step)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "edges_sparsity" in r]
    final = steps[-1]["edges_target"] if steps else None
    first = next((r["step"] for r in steps if r["edges_target"] == final and abs(r["edges_gap"]) <= tol), None)
    return first, steps[-1]["step"] if steps else 0


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    code = cli(argv)
    if code != 0:
        raise SystemExit(f"failed: edgeprune {' '.join(argv)}")
    return time.perf_counter() - t0


def bench_task(name: str, config: Path, out: Path, steps: int, seed: int, extra: list[str]) -> list[dict]:
    base = out / f"{name}_s{seed}"
    common = ["--seed", str(seed), "--no-progress", "--overwrite", "--set", "run.log_every=1", *extra]
    tracr = name.startswith("tracr")
    scores = base / "scores_eap-ig.safetensors"
    split = "train" if tracr else "test"
    t_attr = timed(["attribute", str(config), "--method", "eap-ig", "-o", str(scores), "--no-progress",
                    *([] if not tracr else ["--metric", "kl" if "reverse" in name else "mse"]), *extra])
    rows = []
    control = "prune.sparsity_control="
    for label, run_steps, more in (("cold, lagrangian", steps, ["--set", control + "lagrangian"]),
                                   ("cold, project", steps, ["--set", control + "project"]),
                                   ("warm (EAP-IG), project", max(3, steps // 3),
                                    ["--set", f"prune.init_from={scores}", "--set", control + "project"])):
        run = base / label.replace(" (EAP-IG)", "").replace(", ", "_")
        wall = timed(["prune", str(config), "--steps", str(run_steps), "--output-dir", str(run), *common, *more])
        first, last = reached_at(run)
        cmp_dir = run / "compare"
        if tracr and "xproportion" in name:  # compare needs a logit difference; numerical task: the run's own eval
            timed(["eval", str(run), "--split", split, "--no-progress"])
            m = json.loads((run / "metrics.json").read_text())
            result = {"rows": [{"method": "edge-pruning", "edges": m["counts"]["edges"], **m["metrics"]}]}
        else:
            timed(["compare", str(run), str(scores), "-o", str(cmp_dir), "--split", split, "--no-progress"])
            result = json.loads((cmp_dir / "compare.json").read_text())
        rows.append({"task": name, "seed": seed, "method": label, "steps": last, "reached_at": first,
                     "wall_s": wall, "attr_s": t_attr if label.startswith("warm") else 0.0, "compare": result})
    return rows


def _metric(entry: dict, key: str):
    for k in (key, f"metrics/{key}"):
        if k in entry:
            return entry[k]
    return entry.get("metrics", {}).get(key)


def table(rows: list[dict]) -> str:
    lines = ["| task | seed | method | steps | reached target at | wall s | edges | KL / MSE | faithfulness |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for entry in r["compare"].get("rows", r["compare"].get("methods", [])):
            method = entry.get("method", entry.get("name", "?"))
            is_run = method not in ("eap-ig", "eap", "acdc")
            label = r["method"] if is_run else "EAP-IG alone"
            steps = r["steps"] if is_run else "-"
            reached = (r["reached_at"] or "-") if is_run else "-"
            wall = r["wall_s"] + r["attr_s"] if is_run else r["attr_s"] or "-"
            fit = _metric(entry, "kl")
            if fit is None:
                fit = _metric(entry, "mse")
            faith = _metric(entry, "faithfulness")
            edges = entry.get("edges", entry.get("n_edges", "?"))
            fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
            lines.append(f"| {r['task']} | {r['seed']} | {label} | {steps} | {reached} | {fmt(wall)} | {edges} | "
                         f"{fmt(fit)} | {fmt(faith)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    ap.add_argument("--model", action="append", default=[], help="also this model directory, on the names task")
    ap.add_argument("--steps", type=int, default=300, help="cold-start steps (warm start: a third)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--out", default="runs/bench_time_to_circuit")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    buffers.tune_cpu_allocator()  # as the CLI: huge pages, glibc keeping its freed heap
    out = Path(args.out)
    rows = []
    jobs = [(t, TASKS[t], []) for t in args.tasks.split(",") if t]
    jobs += [(f"model{i}", TASKS["stories_names"], ["--set", f"model.name_or_path={m}"])
             for i, m in enumerate(args.model)]
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, config, extra in jobs:
            rows += bench_task(name, config, out, args.steps, seed, extra)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
