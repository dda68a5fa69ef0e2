"""Sub-command ``stability``: edge IoU, shared edges and keep frequency across runs of several seeds."""

from __future__ import annotations

import json
from pathlib import Path

from ..stability import bootstrap, format_report, stability


def _run(args) -> int:
    report = stability(args.run_dirs, top=args.top)
    if args.bootstrap:
        if args.bootstrap < 2:
            raise ValueError(f"--bootstrap: needs at least 2 resamples, got {args.bootstrap}")
        report["bootstrap"] = bootstrap(args.run_dirs, args.bootstrap, args.split, args.batch_size, args.seed,
                                        progress=not args.no_progress)
    print(format_report(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"written: {args.output}")
    return 0


def add_stability_parser(sub) -> None:
    p = sub.add_parser("stability", help="edge IoU, shared edges and keep frequency across runs of several seeds")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="re-evaluate each run's circuit on N resamples of the evaluation split")
    p.add_argument("--split", default="validation", help="evaluation split for --bootstrap (default validation)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0, help="seed of the --bootstrap resamples")
    p.add_argument("--top", type=int, default=20, help="most frequent edges to print (default 20)")
    p.add_argument("-o", "--output", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
