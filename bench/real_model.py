"""A real checkpoint end to end: graph size, step time and memory against HF, time to a circuit at
the config's target, and that circuit's held-out faithfulness -- cold start and EAP-IG warm start.

    ../shared/models/get_smollm2.sh                      # once: SmolLM2-135M as an HF directory
    python bench/real_model.py                           # that directory, configs/smollm2_ioi.yaml
    python bench/real_model.py --model DIR --config CONFIG --steps 150 --warm-steps 100
    python bench/real_model.py --no-runs                 # graph, step and memory only (a minute)

Printed, in order:
1. the graph: writers, readers, edges;
2. one pruning step vs HF's own forward+backward of the same batch (``bench/step.py``'s timers,
   interleaved in one process, median of ``--repeats``; the checkpoint's shape, random weights: time
   does not depend on the values), and its FLOP ratio;
3. peak memory above the loaded model of the step and of HF (fresh subprocesses, as ``bench/step.py``)
   beside ``edgeprune estimate``'s traced figure for the same step;
4. the runs, each through the CLI as a user types it: EAP-IG scores (``attribute``); the config as
   shipped (``prune``, ``--warm-steps``: its ``prune.init_from: auto`` computes its own attribution
   first, inside the run's wall time); a warm start from the EAP-IG scores (``--warm-steps``); a
   cold start (``prune.init_from: null``, ``--steps``, ``--cold-warmup``); for each run the wall time
   (EAP-IG's added where the run used it), the step and second at which the expected sparsity
   reached the target (``timing.json``), and ``compare`` on the test split against EAP-IG's own
   circuit at the run's edge count: KL, the generic faithfulness and the task's own (IOI:
   logit(IO) - logit(S)).

Nothing here is asserted; the figures go to docs/scale.md. On 2 CPU cores the runs take ~20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import step as stepbench  # noqa: E402  (bench/step.py)

from edgeprune import buffers  # noqa: E402
from edgeprune.cli import main as cli  # noqa: E402

SMOLLM2 = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeprune-fixtures" / "smollm2" / "hf"


def timed(argv: list) -> float:
    t0 = time.perf_counter()
    argv = [str(a) for a in argv]
    if cli(argv) != 0:
        raise SystemExit(f"failed: edgeprune {' '.join(argv)}")
    return time.perf_counter() - t0


def graph_size(model_dir: Path) -> str:
    from edgeprune import EdgeModel

    model = EdgeModel.from_pretrained(str(model_dir), dtype=torch.float32)
    g = model.graph
    return f"{g.num_writers} writers, {g.num_readers} readers, {g.num_edges:,} edges"


def step_and_memory(model_dir: Path, shape: tuple[int, int], args) -> dict:
    """bench/step.py's figures for the checkpoint's shape."""
    opts = stepbench.options(repeats=args.repeats)
    kind = str(model_dir)
    r = stepbench.time_one(kind, shape, opts, torch.device("cpu"))
    if not args.no_memory:
        r["hf"]["peak_bytes"] = stepbench.memory_in_subprocess(kind, shape, "hf", opts)
        r["prune"]["peak_bytes"] = stepbench.memory_in_subprocess(kind, shape, "prune", opts)
        r["prune"]["estimate_bytes"], r["hf"]["estimate_bytes"] = stepbench.estimate_peaks(kind, shape, opts)
    return r


def compare_row(run: Path, scores: Path, out: Path, model_dir: Path, split: str) -> dict:
    timed(["compare", run, scores, "-o", out, "--split", split, "--no-progress",
           "--set", f"model.name_or_path={model_dir}"])
    return json.loads((out / "compare.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SMOLLM2, help=f"HF checkpoint directory (default {SMOLLM2})")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2_ioi.yaml")
    ap.add_argument("--steps", type=int, default=150, help="cold-start steps")
    ap.add_argument("--cold-warmup", type=int, default=100, help="cold-start warm-up steps")
    ap.add_argument("--warm-steps", type=int, default=100, help="steps of the default path and the EAP-IG warm start")
    ap.add_argument("--paths", default="default,warm_eap_ig,cold", help="which runs: default, warm_eap_ig, cold")
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--shape", default="8x32", help="B x T of the step timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-runs", action="store_true", help="only the graph, step and memory figures")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_real_model")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    buffers.tune_cpu_allocator()  # as the CLI: huge pages, glibc keeping its freed heap
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no config.json; fetch SmolLM2 with ../shared/models/get_smollm2.sh or "
                         "pass --model DIR")
    report: dict = {"model": str(args.model), "config": str(args.config), "threads": torch.get_num_threads()}
    print(f"{args.model} ({torch.get_num_threads()} threads, torch {torch.__version__})")
    report["graph"] = graph_size(args.model)
    print(f"graph: {report['graph']}")

    shape = stepbench.parse_shape(args.shape)
    r = step_and_memory(args.model, shape, args)
    report["step"] = r
    f = r["flops"]
    step_flops = f["reference"] + f["masked_fwd"] + f["backward"]
    print(f"step {args.shape}: {r['prune']['median_s']:.3f} s vs HF fwd+bwd {r['hf']['median_s']:.3f} s: "
          f"ratio {r['ratio']:.2f}x (FLOP ratio {step_flops / f['hf']:.2f}x); parts "
          + ", ".join(f"{k} {v:.3f}" for k, v in r["prune"]["parts"].items()))
    if not args.no_memory:
        gib = stepbench.gib
        print(f"peak memory above the model: step {gib(r['prune']['peak_bytes'])} GiB (edgeprune estimate "
              f"{gib(r['prune']['estimate_bytes'])} GiB), HF fwd+bwd {gib(r['hf']['peak_bytes'])} GiB")

    if not args.no_runs:
        out = args.out
        model_set = ["--set", f"model.name_or_path={args.model}"]
        scores = out / "scores_eap-ig.safetensors"
        t_attr = timed(["attribute", args.config, "--method", "eap-ig", "--ig-steps", args.ig_steps, "-o", scores,
                        "--no-progress", *model_set])
        print(f"EAP-IG ({args.ig_steps} steps) on the training split: {t_attr:.0f} s")
        rows = []
        paths = {  # label -> (run dir, steps, extra arguments, attribution seconds outside the run)
            "default (prune.init_from: auto)": ("default", args.warm_steps, []),
            "warm start from EAP-IG": ("warm_eap_ig", args.warm_steps, ["--set", f"prune.init_from={scores}"]),
            "cold start": ("cold", args.steps, ["--set", "prune.init_from=null",
                                                "--set", f"prune.warmup_steps={args.cold_warmup}"]),
        }
        for label, (name, steps, more) in paths.items():
            if name not in args.paths.split(","):
                continue
            run = out / name
            wall = timed(["prune", args.config, "--steps", steps, "--output-dir", run, "--overwrite", "--no-progress",
                          *model_set, *more])
            timing = json.loads((run / "timing.json").read_text())
            result = compare_row(run, scores, run / "compare", args.model, args.split)
            rows.append({"label": label, "steps": steps, "wall_s": wall, "attr_s": t_attr if "EAP-IG" in label else 0,
                         "timing": timing, "compare": result})
        report["runs"] = rows
        print(f"\n| path | steps | target reached (step, s) | wall s | edges | {args.split} KL | faithfulness | "
              "task faithfulness |")
        print("|---|---|---|---|---|---|---|---|")
        task_f = None
        for row in rows:
            c = row["compare"]
            task_f = c.get("task_metric", "").split("/")[0] + "/faithfulness" if c.get("task_metric") else None
            for entry in c["rows"]:
                ours = entry["method"] == "edge-pruning"
                t = row["timing"]
                reached = f"{t['target_reached_step']}, {t['target_reached_s']:.0f}" if ours and \
                    t.get("target_reached_s") is not None else "-"
                label = row["label"] if ours else f"EAP-IG alone (at the {row['label']}'s size)"
                wall = row["wall_s"] + row["attr_s"] if ours else t_attr
                tf = f"{entry[task_f]:.3f}" if task_f in entry else "-"
                print(f"| {label} | {row['steps'] if ours else '-'} | {reached} | {wall:.0f} | {entry['edges']} | "
                      f"{entry['kl']:.4f} | {entry['faithfulness']:.3f} | {tf} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
