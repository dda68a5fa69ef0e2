"""The ``edgeprune`` command line (also ``python -m edgeprune``): one thin module per command group
(parse, call the library, print); the library never imports it.

    edgeprune prune CONFIG [--set key=value ...] [--model M] [--steps N] [--resume] [--wandb]
    edgeprune eval RUN_DIR [--split test] [--edges edges.json] [--text FILE]
    edgeprune export RUN_DIR -o edges.json
    edgeprune draw edges.json -o circuit.pdf
    edgeprune data {ioi,gt,gp,boolean} --tokenizer gpt2 -o DIR
    edgeprune demo
    edgeprune estimate CONFIG [--gpus 1,2,4,8] [--seq-len T]
    edgeprune attribute | curve | compare ...        (cli/baselines.py)
    edgeprune generate RUN_DIR --prompt "..."         (cli/generate.py)
    edgeprune view INPUT [INPUT]                      (cli/view.py)
    edgeprune convert | mib-export ...                (cli/interop.py)
    edgeprune stability RUN_DIR...                    (cli/stability.py)
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import buffers
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..rundir import RunDirError
from . import baselines, data, generate, interop, run, stability, view


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeprune", description="Edge Pruning: find circuits in transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    data.add_parser(sub)
    baselines.add_attribute_parser(sub)
    baselines.add_curve_parser(sub)
    baselines.add_compare_parser(sub)
    generate.add_generate_parser(sub)
    view.add_view_parser(sub)
    interop.add_convert_parser(sub)
    interop.add_mib_export_parser(sub)
    stability.add_stability_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    buffers.tune_cpu_allocator()  # before any model is loaded: PyTorch reads the huge-page switch once
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, RunDirError, FileNotFoundError, ValueError, OSError) as err:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 alone says it
            print(f"edgeprune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
