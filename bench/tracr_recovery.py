"""Ground-truth recovery on the compiled Tracr models, target-free (prune.mode: faithful).

Each program (default: every folder in data/tracr_models; or any compiled artifact folder) is
pruned with its default config (configs/tracr_faithful.yaml, or tracr_faithful_numerical.yaml for
numerical outputs) once per seed, with no restarts: the figures are per seed. Printed per program
and seed: edges of the graph, of the ground truth (derived from the compiled weights), found,
precision, recall, whether the circuit alone reproduces every output, steps, wall time; then the
success rate per seed (circuit == ground truth and outputs reproduced). Nothing in the pruning or
the selection looks at the ground truth: it is read only to score the result.

    python bench/tracr_recovery.py [--seeds 0 1 2] [--programs reverse sort_unique path/to/artifact]
    python bench/tracr_recovery.py --programs reverse --config configs/tracr_reverse.yaml   # target mode
"""

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import torch

from edgeprune.demo import PROGRAMS, prune_and_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), help="shipped names or artifact folders")
    parser.add_argument("--steps", type=int, default=None, help="override prune.steps")
    parser.add_argument("--config", default=None,
                        help="a config for every program instead of the target-free default (e.g. the old "
                             "target-mode configs/tracr_reverse.yaml, to compare)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models
    extra = [f"prune.steps={args.steps}", f"run.save_every={args.steps}"] if args.steps else []
    header = (f"{'program':<13} {'seed':>4} {'graph':>6} {'truth':>6} {'found':>6} {'precision':>9} {'recall':>7} "
              f"{'outputs ok':>10} {'removable':>9} {'exact':>5} {'steps':>6} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    wins, total, left_out = 0, 0, {}
    with tempfile.TemporaryDirectory() as tmp:
        for program in args.programs:
            for seed in args.seeds:
                name = Path(program).name
                with contextlib.redirect_stdout(io.StringIO()):  # prune's own progress lines
                    r = prune_and_check(program, Path(tmp) / f"{name}_{seed}", [f"run.seed={seed}"] + extra,
                                        config=args.config)
                ok = r.exact and r.outputs_correct
                wins, total = wins + ok, total + 1
                removable = "-" if r.removable is None else len(r.removable)
                print(f"{name:<13} {seed:>4} {r.total_edges:>6} {len(r.ground_truth):>6} {len(r.found):>6} "
                      f"{r.precision:>9.3f} {r.recall:>7.3f} {'yes' if r.outputs_correct else 'NO':>10} "
                      f"{removable:>9} {'yes' if ok else 'NO':>5} {r.steps:>6} {r.seconds:>7.1f}", flush=True)
                if r.ground_truth - r.found:
                    left_out.setdefault(name, set()).update(r.ground_truth - r.found)
    print(f"\nsuccess rate per seed (exact ground truth and every output reproduced): {wins}/{total}")
    print("removable: kept edges whose removal alone keeps the fit within the tolerance (0 = 1-minimal)")
    for name, edges in left_out.items():
        print(f"{name}: ground-truth edges left out by some seed ({len(edges)}): "
              + ", ".join(f"{w}->{r}" for w, r in sorted(edges, key=lambda e: (e[1], e[0]))))


if __name__ == "__main__":
    main()
