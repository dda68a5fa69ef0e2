"""Sub-commands ``attribute``, ``curve`` and ``compare`` (registered by ``edgeprune.cli``).

    edgeprune attribute CONFIG --method {eap,eap-ig,acdc} [--metric M] [--ig-steps 5] [--ig-variant inputs] [--tau 0.01]
                        [--split train] [--batches N] [-o scores.safetensors]
    edgeprune curve RUN_DIR... SCORES... -o OUT_DIR [--budgets 0.1,1,10,100] [--split test]
    edgeprune compare RUN_DIR SCORES... -o OUT_DIR [--edges N] [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..artifacts import expect
from ..baselines.acdc import DEFAULT_TAU
from ..baselines.attribution import IG_RULES, METRICS, VARIANTS
from ..baselines.compare import compare, format_markdown
from ..baselines.curve import DEFAULT_BUDGETS, faithfulness_curve, parse_budgets, plot_curve
from ..baselines.methods import attribute
from ..baselines.scores import METHODS, load_scores, save_scores
from ..baselines.selection import ORDERINGS
from ..config import apply_overrides, from_dict, load_config
from ..experiment import prepare, task_metric
from ..hub import quiet_progress



# ---------------------------------------------------------------------------- shared
def _device_overrides(args) -> list[str]:
    return (args.set or []) + ([f"model.device={args.device}"] if args.device else [])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _budgets(text: str) -> list[float]:
    try:
        return parse_budgets(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _split_inputs(paths: list[str]):
    """Run directories and scores files, each loaded; the config to rebuild model and data from."""

    runs, scores = [], []
    for p in map(Path, paths):
        if expect(p, ("run", "scores", "masks"), "curve and compare take run directories and scores files") == "run":
            runs.append(p)
        else:
            scores.append(load_scores(p))  # a masks file: load_scores says to pass its run directory
    return runs, scores


def _config_for(args, runs, scores):

    if args.config:
        return load_config(args.config, _device_overrides(args))
    if runs:
        path = runs[0] / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{runs[0]}: no config.yaml (is this a run directory written by "
                                    "`edgeprune prune`?); pass --config")
        return load_config(path, _device_overrides(args))
    for s in scores:
        if s.config:
            cfg = from_dict(s.config, s.source)
            apply_overrides(cfg, _device_overrides(args))
            return cfg.validate(s.source)
    raise ValueError("no config: the scores files carry none; pass --config CONFIG")


def _add_inputs(p, inputs_help: str, output_help: str) -> None:
    """The inputs, output, selection and config of ``curve`` and ``compare``."""
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_SCORES", help=inputs_help)
    p.add_argument("-o", "--output", required=True, help=output_help)
    p.add_argument("--selection", choices=ORDERINGS, default="topn", help="circuits from scores (default topn)")
    p.add_argument("--config", help="experiment config (default: the first run's, else the scores file's)")


def _add_common(p, split: str) -> None:
    p.add_argument("--split", default=split, help=f"data split to use (default {split})")
    p.add_argument("--batches", type=_positive, help="use only the first N batches of the split")
    p.add_argument("--batch-size", type=_positive, help="examples per batch (default prune.batch_size)")
    p.add_argument("--device")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------------------- attribute
def _attribute(args) -> int:
    quiet_progress(not args.no_progress)

    cfg = load_config(args.config, _device_overrides(args))
    model, batches, source, _ = prepare(cfg, args.split, batch_size=args.batch_size, n_batches=args.batches,
                                       run_dir=Path(cfg.run.output_dir))
    scores = attribute(model, batches, args.method, metric=args.metric, ig_steps=args.ig_steps, ig_rule=args.ig_rule,
                       ig_variant=args.ig_variant, tau=args.tau, progress=not args.no_progress,
                       settings={"split": args.split, "data": source,
                                 "batch_size": args.batch_size or cfg.prune.batch_size},
                       config=cfg.to_dict())
    out = Path(args.output) if args.output else Path(cfg.run.output_dir) / f"scores_{args.method}.safetensors"
    save_scores(scores, out)
    s = scores.settings
    how = f"{s['metric']}, {s['ig_variant']} variant, {s['ig_steps']} steps" if "ig_variant" in s else s["metric"]
    print(f"{args.method} ({how}) on {s['n_examples']} examples of {args.split}: "
          f"{len(scores.edges)} edges scored in {scores.wall_time_s:.1f} s")
    if scores.kept is not None:
        print(f"ACDC circuit (tau={args.tau}): {s['edges_kept']} edges kept, {s['edges_tested']} tested")
    print("top edges (score = change of the metric when the edge is ablated):")
    for edge, v in scores.top(10):
        at = f" @ {edge[2]}" if len(edge) > 2 else ""  # position-aware: (writer, reader, span)
        print(f"  {edge[0]:>12} -> {edge[1]:<14}{at} {v:+.5g}")
    print(f"written: {out}")
    return 0


def add_attribute_parser(sub) -> None:
    p = sub.add_parser("attribute", help="per-edge scores with a baseline method (EAP, EAP-IG, ACDC)")
    p.add_argument("config", help="YAML experiment config (model and task)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--metric", choices=METRICS,
                   help="metric to attribute: logit_diff (default for eap, eap-ig) or kl (default for acdc)")
    p.add_argument("--ig-steps", type=_positive, default=5, help="EAP-IG integration steps (default 5)")
    p.add_argument("--ig-rule", choices=IG_RULES, default="midpoint", help="EAP-IG Riemann rule (default midpoint)")
    p.add_argument("--ig-variant", choices=VARIANTS,
                   help="EAP-IG path: inputs (interpolate clean and corrupted embeddings; one plain forward+backward "
                        "per step; interchange ablation) or masks (every edge mask together; one plain "
                        "forward+backward per step reading the uniform mix, and a contraction; any ablation) "
                        "(default: inputs under interchange ablation, else masks)")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU,
                   help=f"ACDC: remove an edge if its effect on the metric is below tau (default {DEFAULT_TAU})")
    p.add_argument("-o", "--output", help="scores file (default RUN_OUTPUT_DIR/scores_METHOD.safetensors)")
    _add_common(p, "train")
    p.set_defaults(func=_attribute)


# ---------------------------------------------------------------------------- curve
def _evaluation_inputs(args):
    """What ``curve`` and ``compare`` both start from: (runs, scores, cfg, model, batches, header), the
    model and batches prepared as every command prepares them (the first run's ablation states)."""
    quiet_progress(not args.no_progress)
    runs, scores = _split_inputs(args.inputs)
    cfg = _config_for(args, runs, scores)
    model, batches, source, record = prepare(cfg, args.split, batch_size=args.batch_size, n_batches=args.batches,
                                            run_dir=runs[0] if runs else None)
    header = {"model_id": model.model_id, "data": source, "split": args.split, "ablation": record}
    return runs, scores, cfg, model, batches, header


def _curve(args) -> int:
    runs, scores, cfg, model, batches, header = _evaluation_inputs(args)
    result = faithfulness_curve(model, batches, runs=runs, scores=scores, budgets=args.budgets or list(DEFAULT_BUDGETS),
                                selection=args.selection, loss=cfg.data.loss, progress=not args.no_progress,
                                task_metric=task_metric(cfg.data, model))
    result = {**header, **result}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(result, indent=2))
    plot_curve(result, out / "curve.png", title=args.title)
    task = f"; edges:generic/{result['task_metric'].split('/')[0]} faithfulness" if "task_metric" in result else ""
    print(f"faithfulness on {result['n_examples']} examples of {args.split} "
          f"(m(full) = {result['m_full']:.4g}, m(empty) = {result['m_empty']:.4g}{task}):")
    for label, entry in result["methods"].items():
        tf = result.get("task_metric", "").split("/")[0] + "/faithfulness"  # the task's own, when it has one
        pts = "  ".join(f"{p['edges']}:{p['faithfulness']:.3f}" + (f"/{p[tf]:.3f}" if tf in p else "")
                        for p in entry["points"])
        anchors = " + anchors " + ", ".join(f"({x:g},{f:g})" for x, f in entry["anchors"]) if entry["anchors"] else ""
        flag = "  (few points: see warning)" if "warning" in entry else ""
        print(f"  {label:<14} CPR {entry['cpr']:.4f}  CMD {entry['cmd']:.4f}   edges:f  {pts}{anchors}{flag}")
    print(f"written: {out / 'curve.json'} and {out / 'curve.png'}")
    return 0


def add_curve_parser(sub) -> None:
    p = sub.add_parser("curve", help="faithfulness vs circuit size for runs and score files; CPR and CMD")
    _add_inputs(p, "Edge Pruning run directories (one point each) and scores files (one line each)",
                "output directory (curve.json, curve.png)")
    p.add_argument("--budgets", type=_budgets,
                   help="edge budgets in percent of all edges, each in (0, 100] (default "
                        f"{','.join(f'{b:g}' for b in DEFAULT_BUDGETS)})")
    p.add_argument("--title")
    _add_common(p, "test")
    p.set_defaults(func=_curve)


# ---------------------------------------------------------------------------- compare
def _compare(args) -> int:
    runs, scores, cfg, model, batches, header = _evaluation_inputs(args)
    result = compare(model, batches, runs=runs, scores=scores, n_edges=args.edges, selection=args.selection,
                     loss=cfg.data.loss, progress=not args.no_progress, task_metric=task_metric(cfg.data, model))
    result = {**header, **result}
    table = format_markdown(result)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.md").write_text(table)
    sys.stdout.write(table)
    print(f"written: {out / 'compare.json'} and {out / 'compare.md'}")
    return 0


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="one table of circuits of equal size: runs vs score files")
    _add_inputs(p, "Edge Pruning run directories and scores files; the first run sets the size",
                "output directory (compare.json, compare.md)")
    p.add_argument("--edges", type=int, help="circuit size (default: the first run's edge count)")
    _add_common(p, "test")
    p.set_defaults(func=_compare)
