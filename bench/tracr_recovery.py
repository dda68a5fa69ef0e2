"""Ground-truth recovery on the compiled Tracr models: prune each program with its shipped config
(configs/tracr_*.yaml; 3 restarts, the sparsest circuit that reproduces every output is kept) and
print, per program and base seed, the edges of the full graph, of the ground truth (derived from
the compiled weights), found, precision, recall, the edges of each restart, steps and wall time.

    python bench/tracr_recovery.py [--seeds 0 1 2]
"""

import argparse
import tempfile

import torch
from pathlib import Path

from edgeprune.demo import PROGRAMS, recover_tracr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models
    header = f"{'program':<12} {'seed':>4} {'graph':>6} {'truth':>6} {'found':>6} {'precision':>9} {'recall':>7} " \
             f"{'outputs ok':>10} {'steps':>6} {'wall s':>7}  restarts (seed:edges, * = outputs all correct)"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for program in args.programs:
            for seed in args.seeds:
                r = recover_tracr(program, Path(tmp) / f"{program}_{seed}", overrides=[f"run.seed={seed}"])
                print(f"{program:<12} {seed:>4} {r.total_edges:>6} {len(r.ground_truth):>6} {len(r.found):>6} "
                      f"{r.precision:>9.3f} {r.recall:>7.3f} {str(r.outputs_correct):>10} {r.steps:>6} "
                      f"{r.seconds:>7.1f}  " + " ".join(f"{a['seed']}:{a['edges']}{'*' if a['outputs_correct'] else ''}"
                                                         for a in r.attempts), flush=True)


if __name__ == "__main__":
    main()
