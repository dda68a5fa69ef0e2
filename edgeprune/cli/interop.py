"""Sub-commands ``convert`` and ``mib-export`` (registered by ``edgeprune.cli``).

    edgeprune convert RUN_DIR|SCORES|edges.json --to eap-ig -o graph.json [--d-model N]
    edgeprune convert graph.json --from eap-ig -o OUT_DIR (--config CONFIG | --model M) [--method eap-ig]
    edgeprune convert REF_RUN --from ep-reference -o OUT_DIR [--config CONFIG | --model M]
    edgeprune mib-export RUN_DIR...|SCORES -o DIR [--budgets 0.1,...,100] [--selection topn] [--count mib]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..baselines.curve import DEFAULT_BUDGETS, parse_budgets
from ..baselines.selection import ORDERINGS
from ..interop.common import InteropError
from ..interop.convert import convert_from_eap_ig, convert_from_reference, convert_to_eap_ig, target_for
from ..interop.mib import COUNTS, mib_export

FORMATS = ("eap-ig", "ep-reference")


def _convert(args) -> int:

    if bool(args.to) == bool(args.from_):
        raise InteropError("give exactly one of --to eap-ig (ours -> foreign) or --from {eap-ig,ep-reference}")
    if args.to:
        if args.to != "eap-ig":
            raise InteropError(f"--to {args.to}: edgeprune writes only eap-ig (reference runs are read, not written)")
        r = convert_to_eap_ig(args.input, args.output, d_model=args.d_model, overwrite=args.overwrite)
        print(f"{r['source'].kind} {args.input} -> {r['edges']} MIB edges ({r['in_graph']} in the graph)")
        print(f"written: {args.output}")
        return 0
    if args.from_ == "eap-ig":
        target = target_for(args.config, args.model)
        r = convert_from_eap_ig(args.input, args.output, target, method=args.method, overwrite=args.overwrite)
        if r["missing"]:
            print(f"note: {r['missing']} of our edges have no entry in {args.input} (score 0, not in the circuit)")
        print(f"{args.input} -> {r['edges']} edges in the circuit of {target.graph.num_edges}")
    else:
        target = target_for(args.config, args.model, weights=bool(args.config)) if (args.config or args.model) else None
        r = convert_from_reference(args.input, args.output, target, overwrite=args.overwrite)
        ref = r["reference"]
        print(f"reference {ref.family} run ({ref.graph.describe()}, embedding nodes: "
              f"{'yes' if ref.embedding_nodes else 'no, kept always'}) from {ref.source}")
        if r["edges"] is not None:
            print(f"its own circuit (edges.json, {len(r['edges'])} edges) in our names: "
                  f"edgeprune eval {args.output} --edges {Path(args.output) / 'edges.json'}")
    print("written: " + ", ".join(str(p) for p in r["written"]))
    return 0


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="EAP-IG / MIB graph JSON in and out, reference Edge Pruning runs in")
    p.add_argument("input", help="--to: a run directory, a scores file or an edges.json; --from: the foreign "
                   "file or run directory")
    p.add_argument("--to", choices=["eap-ig"], help="write the EAP-IG / MIB graph JSON")
    p.add_argument("--from", dest="from_", choices=FORMATS, help="read a foreign format")
    p.add_argument("-o", "--output", required=True, help="--to: the JSON file; --from: the output directory")
    p.add_argument("--config", help="--from: the experiment config of the target model (also copied to "
                   "OUT_DIR/config.yaml so `edgeprune eval OUT_DIR` runs)")
    p.add_argument("--model", help="--from: the target model (directory, config.json or hub id) without a config")
    p.add_argument("--method", default="eap-ig", choices=["eap", "eap-ig", "acdc"],
                   help="--from eap-ig: what the scores are (default eap-ig; sets ranking by |score| or score)")
    p.add_argument("--d-model", type=int, help="--to: residual width for cfg.d_model (default: from the model's config)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_convert)


def _budgets(text: str):
    try:
        return parse_budgets(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _mib_export(args) -> int:

    m = mib_export(args.inputs, args.output, budgets=args.budgets, selection=args.selection, count=args.count,
                   d_model=args.d_model, overwrite=args.overwrite)
    for e in m["circuits"]:
        print(f"{e['budget_percent']:>6g}%  {e['edges']:>7d} edges (limit {e['limit']})  "
              f"{e['mib_edges']:>7d} MIB edges (limit {e['mib_limit']})  {e['file']}")
    print(f"written: {len(m['circuits'])} circuits, manifest.json and README.md in {args.output}")
    return 0


def add_mib_export_parser(sub) -> None:

    p = sub.add_parser("mib-export", help="a MIB submission: one circuit per edge budget (+ manifest)")
    p.add_argument("inputs", nargs="+", metavar="RUN_DIR|SCORES",
                   help="one scores file, one Edge Pruning run, or several runs (one per budget)")
    p.add_argument("-o", "--output", required=True, help="the submission folder (name it {task}_{model})")
    p.add_argument("--budgets", type=_budgets, default=list(DEFAULT_BUDGETS),
                   help="percents of edges (default " + ",".join(f"{b:g}" for b in DEFAULT_BUDGETS) + ")")
    p.add_argument("--selection", choices=ORDERINGS, default="topn", help="ordering of edges (default topn)")
    p.add_argument("--count", choices=COUNTS, default="mib", help="mib (default): within the budget in MIB's "
                   "edge count and ours; edgeprune: ours alone (exactly `edgeprune curve`'s circuits)")
    p.add_argument("--d-model", type=int, help="residual width for cfg.d_model (default: from the model's config)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in the folder")
    p.set_defaults(func=_mib_export)
