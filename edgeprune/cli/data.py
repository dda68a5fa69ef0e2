"""``edgeprune data TASK --tokenizer ID_OR_PATH -o DIR``: generate a task's dataset for a tokenizer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..hub import LoadError, loading
from ..tasks.boolean_expressions import FORMATS
from ..tasks.registry import GENERATORS, generate



def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the ``data`` arguments to ``parser`` (a new one when None), for the main CLI to reuse."""
    parser = parser or argparse.ArgumentParser(
        prog="edgeprune data", description="Generate clean/corrupted pairs for a built-in task.")
    parser.add_argument("task", choices=sorted(GENERATORS),
                        help="ioi (indirect object), gt (greater-than), gp (gendered pronoun), "
                             "boolean (boolean expressions)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer id or local path (AutoTokenizer.from_pretrained); examples "
                             "are filtered to what is single-token for it")
    parser.add_argument("-o", "--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in the directory")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="boolean only: fewshot (three solved examples first, the default) or "
                             "instruct (an instruction line first)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Exit status 0, or 2 with one line naming what is wrong (bad values, an existing dataset, a
    tokenizer that cannot be loaded or has too few usable words)."""
    from transformers import AutoTokenizer  # heavy: the CLI starts transformers-free

    def fail(message: str) -> int:
        print(f"edgeprune data {args.task}: error: {message}", file=sys.stderr)
        return 2

    options = {}
    if args.format is not None:
        if args.task != "boolean":
            return fail(f"--format applies to the boolean task only, not {args.task!r}")
        options["format"] = args.format
    for flag, value in (("--n-train", args.n_train), ("--n-val", args.n_val), ("--n-test", args.n_test)):
        if value < 0:
            return fail(f"{flag} must be >= 0, got {value}")
    out = Path(args.out)
    existing = [out / f"{s}.jsonl" for s in ("train", "validation", "test")] + [out / "meta.json"]
    if not getattr(args, "overwrite", False) and any(p.exists() for p in existing):
        return fail(f"{out} already holds a dataset ({', '.join(p.name for p in existing if p.exists())}); "
                    "pass --overwrite to replace it, or choose another -o")
    try:
        with loading(args.tokenizer, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        paths = generate(args.task, tokenizer, args.out, n_train=args.n_train, n_val=args.n_val,
                         n_test=args.n_test, seed=args.seed, **options)
    except (LoadError, ValueError) as err:
        return fail(str(err))
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        print(f"{split:<10} {n:>6} examples -> {path}")
    print(f"{'meta':<10} {'':>6}          -> {paths['train'].parent / 'meta.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


def add_parser(sub) -> None:
    """``edgeprune data``: the task generators."""
    p = build_parser(sub.add_parser("data", help="generate a task dataset (ioi, gt, gp, boolean)"))
    p.set_defaults(func=run)
