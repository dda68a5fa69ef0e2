"""``edgeprune view``: one self-contained HTML page of a circuit (or two, compared)."""

from __future__ import annotations

from pathlib import Path

from ..baselines.scores import load_scores
from ..config import from_dict
from ..rundir import load_run_config
from ..viewer import DEFAULT_CAP, build_payload, load_source, serve, write_html
from ..viewer.measure import measure, span_tokens
from ..viewer.sources import _read_json


def add_view_parser(sub) -> None:
    p = sub.add_parser("view", help="write a circuit as one self-contained HTML page (open it from disk)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a run directory, an edges.json / circuit.json or a scores .safetensors file; two "
                        "inputs: the two circuits compared")
    p.add_argument("-o", "--output", help="HTML file (default RUN_DIR/circuit.html, else circuit.html beside the input)")
    p.add_argument("--max-edges", type=int, default=None, help="edges of each ranking shipped in the page (default 5000)")
    p.add_argument("--edges", type=int, action="append", metavar="N",
                   help="open at the top N ranked edges (once per input; default: the run's own circuit)")
    p.add_argument("--curve", help="a curve.json whose points for these inputs the page shows")
    p.add_argument("--no-eval", action="store_true",
                   help="do not measure the figures along the slider (the page then says 'not evaluated')")
    p.add_argument("--split", help="split the slider's figures are measured on (default: the config's data.eval_split)")
    p.add_argument("--eval-batches", type=int, help="measure on the first N batches of the split only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--title")
    p.add_argument("--serve", action="store_true", help="also serve the page on 127.0.0.1 and print its URL")
    p.add_argument("--port", type=int, default=0, help="port for --serve (default: any free port)")
    p.set_defaults(func=run_view)


def _config_of(path: Path, src):
    """(config, run directory) to measure a view source with: a run's own config, a scores file's
    stored config; (None, None) for an edges file or scores without a config."""

    if src.kind == "run":
        return load_run_config(path), path
    if src.kind == "scores":
        stored = load_scores(path).config
        if stored:
            return from_dict(stored, str(path)).validate(str(path)), None
    return None, None


def run_view(args) -> int:

    if len(args.inputs) > 2:
        raise ValueError(f"view takes one or two inputs, got {len(args.inputs)}")
    curve = _read_json(Path(args.curve)) if args.curve else None
    if curve is not None and not isinstance(curve, dict):
        raise ValueError(f"{args.curve}: not a curve.json (expected a JSON object with 'methods')")
    sources = [load_source(p, curve) for p in args.inputs]
    cap = args.max_edges or DEFAULT_CAP
    if not args.no_eval:
        for path, src in zip(args.inputs, sources):
            cfg, run_dir = _config_of(Path(path), src)
            if cfg is None:
                print(f"{path}: no config to evaluate with (an edges file, or scores without one): its figures are "
                      "those of its own files only")
                continue
            src.points.extend(measure(src, cfg, cap, run_dir=run_dir, split=args.split, n_batches=args.eval_batches,
                                      progress=not args.no_progress))
            src.points.sort(key=lambda q: q["edges"])
    first = Path(args.inputs[0])
    out = Path(args.output) if args.output else (first / "circuit.html" if first.is_dir()
                                                 else first.with_name(f"{first.stem}.html"))
    edges = args.edges or []
    if len(edges) > len(sources):
        raise ValueError(f"--edges: given {len(edges)} times for {len(sources)} inputs")
    initial = edges + [None] * (len(sources) - len(edges))
    tokens = None
    if sources[0].spans is not None:  # an example prompt's tokens under the span columns
        cfg, _ = _config_of(Path(args.inputs[0]), sources[0])
        tokens = span_tokens(cfg, sources[0].spans, args.split) if cfg is not None else None
    payload = build_payload(sources, cap=cap, title=args.title, initial=initial, span_tokens=tokens)
    path = write_html(payload, out)
    counts = ", ".join(f"{s['label']}: top {s['shipped']} of {s['candidates']} edges" for s in payload["sources"])
    print(f"written: {path} ({path.stat().st_size / 1024:.0f} KiB; {counts})")
    if args.serve:
        try:
            serve(path, args.port)
        except KeyboardInterrupt:
            pass
    return 0
