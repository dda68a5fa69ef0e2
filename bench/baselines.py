"""Edge Pruning vs EAP vs EAP-IG on the real stories260K model: a faithfulness curve and a table.

    python bench/baselines.py            # real settings (a few minutes on 2 CPU cores)
    python bench/baselines.py --tiny     # seconds: the CI smoke test (tests/test_baselines.py)
    python bench/baselines.py --acdc     # also ACDC (one forward per edge: slow)

Everything goes through the public commands, in this order (printed as they run):
  edgeprune prune CONFIG (once per sparsity target)  ->  OUT/ep_TARGET/
  edgeprune attribute CONFIG --method eap / eap-ig    ->  OUT/scores_METHOD.safetensors
  edgeprune curve OUT/ep_* OUT/scores_*               ->  OUT/curve/curve.{json,png}
  edgeprune compare OUT/ep_REF OUT/scores_*           ->  OUT/compare/compare.{json,md}
The task is data/tasks/stories_names.jsonl (repeat a name introduced earlier in the story);
attribution uses the train split, curve and table the test split.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    # targets: edge sparsity of the Edge Pruning runs; compare_target: the run whose size sets the table's
    "real": {"targets": [0.5, 0.8, 0.9, 0.95, 0.98], "compare_target": 0.95, "steps": 300, "warmup": 200,
             "batch_size": 16, "attr_batches": None, "ig_steps": 5, "eval_batches": None, "budgets": None,
             "tau": 0.005, "acdc_batches": 1},
    "tiny": {"targets": [0.5, 0.9], "compare_target": 0.9, "steps": 6, "warmup": 4, "batch_size": 8,
             "attr_batches": 2, "ig_steps": 2, "eval_batches": 1, "budgets": "1,10,100", "tau": 0.05,
             "acdc_batches": 1},
}


def write_config(out: Path, s: dict, device: str) -> Path:
    """The shipped stories config with paths made absolute and the bench's settings."""
    cfg = yaml.safe_load((ROOT / "configs" / "stories_names.yaml").read_text())
    configs = ROOT / "configs"  # its relative paths are from its own directory
    cfg["model"]["name_or_path"] = str((configs / cfg["model"]["name_or_path"]).resolve())
    cfg["model"]["device"] = device
    cfg["data"]["path"] = str((configs / cfg["data"]["path"]).resolve())
    cfg["prune"].update(steps=s["steps"], warmup_steps=s["warmup"], batch_size=s["batch_size"])
    cfg["run"].update(eval_every=0, save_every=0, eval_batches=s["eval_batches"], output_dir=str(out / "ep"))
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(argv: list[str]) -> None:
    from edgeprune.cli import main

    print("$ edgeprune " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"edgeprune {argv[0]} failed with status {rc}")


def prune_run(config: Path, target: float, run_dir: Path, reuse: bool, progress: bool) -> Path:
    """One Edge Pruning run, timed (RUN_DIR/timing.json is what `compare` reports)."""
    from edgeprune.config import load_config
    from edgeprune.prune import prune

    if reuse and (run_dir / "masks.safetensors").is_file():
        print(f"reusing {run_dir}")
        return run_dir
    print(f"$ edgeprune prune {config} --set prune.edge_target={target} --output-dir {run_dir}", flush=True)
    cfg = load_config(config, [f"prune.edge_target={target}", f"run.output_dir={run_dir}"])
    start = time.perf_counter()
    prune(cfg, progress=progress)
    (run_dir / "timing.json").write_text(json.dumps({"wall_time_s": time.perf_counter() - start}))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke settings (CI)")
    parser.add_argument("--acdc", action="store_true", help="also run ACDC (slow: one forward per edge)")
    parser.add_argument("--out", help="output directory (default runs/bench_baselines[_tiny])")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs and score files in --out")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    s = SETTINGS["tiny" if args.tiny else "real"]
    out = Path(args.out or ROOT / "runs" / ("bench_baselines_tiny" if args.tiny else "bench_baselines"))
    out.mkdir(parents=True, exist_ok=True)
    quiet = ["--no-progress"] if args.no_progress else []
    config = write_config(out, s, args.device)
    start = time.perf_counter()

    runs = [prune_run(config, t, out / f"ep_{t:g}", args.reuse, not args.no_progress) for t in s["targets"]]
    attr = ["--batch-size", str(s["batch_size"])] + (["--batches", str(s["attr_batches"])] if s["attr_batches"] else [])
    methods = [("eap", []), ("eap-ig", ["--ig-steps", str(s["ig_steps"])])]
    if args.acdc:
        methods.append(("acdc", ["--tau", str(s["tau"]), "--batches", str(s["acdc_batches"])]))
    scores = []
    for method, extra in methods:
        path = out / f"scores_{method}.safetensors"
        if not (args.reuse and path.is_file()):
            cli(["attribute", str(config), "--method", method, "-o", str(path)] + attr + extra + quiet)
        scores.append(str(path))

    evaluation = ["--batch-size", str(s["batch_size"])] + (
        ["--batches", str(s["eval_batches"])] if s["eval_batches"] else [])
    budgets = ["--budgets", s["budgets"]] if s["budgets"] else []
    cli(["curve", *map(str, runs), *scores, "-o", str(out / "curve")] + evaluation + budgets + quiet)
    ref = runs[s["targets"].index(s["compare_target"])]
    cli(["compare", str(ref), *scores, "-o", str(out / "compare")] + evaluation + quiet)

    curve = json.loads((out / "curve" / "curve.json").read_text())
    print(f"\nsettings ({'tiny' if args.tiny else 'real'}): {json.dumps(s)}")
    print(f"{'method':<14} {'CPR':>8} {'CMD':>8}")
    for label, entry in curve["methods"].items():
        print(f"{label:<14} {entry['cpr']:8.4f} {entry['cmd']:8.4f}")
    print((out / "compare" / "compare.md").read_text())
    print(f"total {time.perf_counter() - start:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
