"""Sub-commands ``prune``, ``eval``, ``export``, ``draw``, ``demo`` and ``estimate`` (registered by
``edgeprune.cli``): parse, call the library, print.

    edgeprune prune CONFIG [--set key=value ...] [--model M] [--steps N] [--resume] [--wandb]
    edgeprune eval RUN_DIR [--split test] [--edges edges.json]
    edgeprune export RUN_DIR -o edges.json
    edgeprune draw edges.json -o circuit.pdf
    edgeprune data {ioi,gt,gp,boolean} --tokenizer gpt2 -o DIR
    edgeprune demo
    edgeprune estimate CONFIG [--gpus 1,2,4,8] [--seq-len T]
    edgeprune generate RUN_DIR --prompt "..." [--max-new-tokens N]
    edgeprune eval RUN_DIR --text FILE|DATASET_DIR [--max-length N]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..circuit import load_edges
from ..config import apply_overrides, load_config
from ..demo import run_demo
from ..draw import draw_circuit, heads_per_group_of
from ..estimate import estimate, format_report
from ..eval import evaluate, format_table
from ..experiment import load_model, load_split, load_tokenizer, prepare_ablation, task_metric
from ..export import circuit_json_path, export_run
from ..hub import check_exists, quiet_progress
from ..prune import prune, target_warning
from ..rundir import circuit_to_evaluate, load_circuit_model, load_run_config, run_dir_plan
from ..tasks.jsonl import batches
from ..text_eval import read_documents, text_metrics, windows


def _positive(flag: str, value, minimum: int = 1):
    """Refuse a numeric command-line value below ``minimum`` (None passes: the default applies)."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag}: must be at least {minimum}, got {value}")
    return value


def _prune(args) -> int:

    quiet_progress(not args.no_progress)
    cfg = load_config(args.config)
    shortcuts = {"--model": ("model.name_or_path", args.model), "--steps": ("prune.steps", args.steps),
                 "--output-dir": ("run.output_dir", args.output_dir), "--seed": ("run.seed", args.seed),
                 "--device": ("model.device", args.device), "--data": ("data.path", args.data)}
    for flag, (key, value) in shortcuts.items():
        if value is not None:
            apply_overrides(cfg, [f"{key}={value}"], source=f"command line ({flag})")
    apply_overrides(cfg, args.set or [], source="command line (--set)")
    if args.wandb:
        cfg.run.wandb = True
    if args.steps is not None and args.steps >= 1 and cfg.prune.warmup_steps > cfg.prune.steps:
        cfg.prune.warmup_steps = cfg.prune.steps  # a short run still reaches its target
    cfg.validate(args.config)
    if args.check:
        check_exists(cfg.model.name_or_path, "model")
        if cfg.data.path != "tracr" and not Path(cfg.data.path).exists():
            raise FileNotFoundError(f"data.path {cfg.data.path}: no such file or directory")
        run_dir_plan(Path(cfg.run.output_dir), resume=args.resume, overwrite=args.overwrite,
                     resume_or_start=args.resume_or_start)
        print(f"ok: {args.config} is valid and {cfg.run.output_dir} can be written")
        return 0
    result = prune(cfg, resume=args.resume, overwrite=args.overwrite, resume_or_start=args.resume_or_start,
                   progress=not args.no_progress)
    if not result.main_process:  # torchrun: rank 0 reports
        return 0
    print(f"run directory: {result.output_dir}")
    print(f"next: edgeprune eval {result.output_dir} --split test && "
          f"edgeprune export {result.output_dir} -o {result.output_dir / 'edges.json'}")
    return 0


def _eval(args) -> int:
    _positive("--batch-size", args.batch_size)
    if args.text:
        return _eval_text(args)
    quiet_progress(not args.no_progress)
    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir, _overrides(args))
    model = load_model(cfg.model)
    edges, info = circuit_to_evaluate(run_dir, model, args.edges, args.allow_other_model)
    model.set_edges(edges)
    info["ablation"] = prepare_ablation(model, cfg, run_dir, progress=not args.no_progress)
    data = load_split(cfg.data, model, args.split)
    bs = args.batch_size or cfg.prune.batch_size
    metrics = evaluate(model, batches(data.examples, bs, data.pad_token_id), loss=cfg.data.loss,
                       task_metric=task_metric(cfg.data, model), progress=not args.no_progress,
                       output_scale=cfg.data.output_scale, total=-(-len(data.examples) // bs))
    result = {"split": args.split, "data": data.source, "model_id": model.model_id, **info, "metrics": metrics}
    missed = None if args.edges or cfg.prune.mode == "faithful" else target_warning(
        info["counts"]["expected_edge_sparsity"], cfg.prune.edge_target, cfg.prune.early_stop_tolerance)
    if missed:
        result["warnings"] = [missed]
    out = Path(args.output) if args.output else (
        run_dir / "metrics.json" if not args.edges else run_dir / f"metrics_{Path(args.edges).stem}.json")
    out.write_text(json.dumps(result, indent=2))
    print(format_table({**{k: v for k, v in info["counts"].items()}, **metrics},
                       f"circuit ({info['source']}) vs full model on {args.split}; {info['ablation']['ablation']} "
                       f"ablation ({info['ablation']['source']})"))
    if missed:
        print(f"warning: {missed}")
    print(f"written: {out}")
    return 0


def _eval_text(args) -> int:
    """``edgeprune eval RUN_DIR --text ...``: print the metrics and write them to RUN_DIR/metrics_text.json."""
    if args.max_length < 2:
        raise ValueError(f"--max-length: must be at least 2, got {args.max_length}")
    docs = read_documents(args.text)  # a bad --text fails before any model is loaded
    quiet_progress(not args.no_progress)
    model, info, _ = load_circuit_model(args.run_dir, _overrides(args), args.edges, args.allow_other_model,
                                        ablation_states=False)  # mean: over the evaluated text (docs/generate.md)
    tok = load_tokenizer(model)
    if model.ablation == "interchange":
        raise ValueError("--text: interchange ablation has no corrupted text; pass --ablation zero or --ablation mean")
    toks = [tok(d)["input_ids"] for d in docs]
    metrics = {**text_metrics(model, windows(toks, args.max_length, args.stride), args.batch_size or 8),
               "documents": len(docs)}
    result = {"text": str(args.text), "model_id": model.model_id, "ablation": model.ablation, **info,
              "max_length": args.max_length, "stride": args.stride, "metrics": metrics}
    out = Path(args.output) if args.output else Path(args.run_dir) / "metrics_text.json"
    out.write_text(json.dumps(result, indent=2))
    print(format_table(metrics, f"circuit ({info['source']}) vs full model on {args.text}"))
    print(f"written: {out}")
    return 0


def _overrides(args) -> list[str]:
    """``--set``, ``--device`` and ``--ablation`` of a command on a run, as config overrides."""
    out = list(args.set or []) + ([f"model.device={args.device}"] if args.device else [])
    return out + ([f"model.ablation={args.ablation}"] if getattr(args, "ablation", None) else [])


def _export(args) -> int:

    out = Path(args.output)
    circuit, _ = export_run(args.run_dir, out)
    c = circuit.counts
    print(f"{c['edges']} edges of {c['total_edges']} (sparsity {c['edge_sparsity']:.4f}; "
          f"{c['edges_before_dangling']} before dangling-edge removal)")
    print(f"written: {out} and {circuit_json_path(out)}")
    return 0


def _draw(args) -> int:

    _positive("--heads-per-group", args.heads_per_group)
    group = args.heads_per_group or heads_per_group_of(args.edges)
    edges = load_edges(args.edges)
    if len(edges) > 500:  # graphviz lays out a large circuit for seconds to minutes: say what is running
        print(f"drawing {len(edges)} edges with graphviz dot ...", flush=True)
    t0 = time.perf_counter()
    path = draw_circuit(edges, args.output, title=args.title, heads_per_group=group)
    print(f"written: {path} ({Path(path).stat().st_size / 1024:.0f} KiB, {time.perf_counter() - t0:.1f} s)")
    return 0


def _demo(args) -> int:

    return run_demo(args.output_dir, program=args.program, steps=args.steps, seed=args.seed,
                    restarts=args.restarts, progress=not args.no_progress)


def _estimate(args) -> int:

    for flag, value in (("--seq-len", args.seq_len), ("--loss-positions", args.loss_positions),
                        ("--examples", args.examples)):
        _positive(flag, value)
    cfg = load_config(args.config)
    if args.model:
        apply_overrides(cfg, [f"model.name_or_path={args.model}"], source="command line (--model)")
    apply_overrides(cfg, args.set or [], source="command line (--set)")
    cfg.validate(args.config)
    try:
        gpus = [int(n) for n in args.gpus.split(",")]
        if any(n < 1 for n in gpus):
            raise ValueError
    except ValueError:
        raise ValueError(f"--gpus: expected comma-separated GPU counts like 1,2,8, got {args.gpus!r}") from None
    report = estimate(cfg, gpus, seq_len=args.seq_len, loss_positions=args.loss_positions, examples=args.examples,
                      progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
        print(f"written: {args.json}")
    return 0


def add_parsers(sub) -> None:
    """prune, eval, export, draw, demo, estimate."""
    _add_prune_parser(sub)
    _add_eval_parser(sub)
    _add_export_parser(sub)
    _add_draw_parser(sub)
    _add_demo_parser(sub)
    _add_estimate_parser(sub)


def _add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="learn edge masks for a config")
    p.add_argument("config", help="YAML experiment config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. prune.steps=100")
    p.add_argument("--model", help="shortcut for --set model.name_or_path=...")
    p.add_argument("--data", help="shortcut for --set data.path=...")
    p.add_argument("--steps", type=int, help="shortcut for --set prune.steps=N (warm-up capped at N)")
    p.add_argument("--output-dir", help="shortcut for --set run.output_dir=...")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_API_KEY is set)")
    p.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its checkpoint "
                   "(an error when there is none)")
    p.add_argument("--resume-or-start", action="store_true", help="continue the checkpoint if there is one, else "
                   "start afresh (for requeued jobs)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in run.output_dir (its old outputs "
                   "are removed first)")
    p.add_argument("--check", action="store_true", help="validate the config and the run directory, then exit "
                   "(what the torchrun launcher runs first)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_prune)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="faithfulness of a run's circuit vs the full model")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--edges", help="evaluate this edges.json instead of the run's masks")
    p.add_argument("-o", "--output", help="metrics file (default RUN_DIR/metrics.json)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply masks learned on another model (its config or weights differ) with a warning")
    p.add_argument("--text", help="free-text loss instead of the task: a text file (one document per line) or a "
                   "datasets directory with a 'text' column (docs/generate.md)")
    p.add_argument("--max-length", type=int, default=512, help="--text: tokens per sliding window")
    p.add_argument("--stride", type=int, help="--text: window start every N tokens (default: disjoint windows)")
    p.add_argument("--ablation", choices=("interchange", "zero", "mean"), help="override the run's ablation "
                   "(--text needs zero or mean)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write the circuit as edges.json + circuit.json")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="edges file, e.g. RUN_DIR/edges.json")
    p.set_defaults(func=_export)


def _add_draw_parser(sub) -> None:
    p = sub.add_parser("draw", help="draw an edges.json with graphviz (.pdf/.png/.svg/.dot)")
    p.add_argument("edges")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--title")
    p.add_argument("--heads-per-group", type=int, help="query heads per KV head (grouped-query attention); "
                   "default: from the circuit.json beside the edges file")
    p.set_defaults(func=_draw)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: prune a compiled Tracr model and draw its circuit")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--program", default="reverse",
                   help="a shipped program (data/tracr_models/NAME) or a compiled artifact folder (default reverse)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restarts", type=int, default=3, help="seeds seed..seed+N-1; the sparsest faithful circuit wins")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)


def _add_estimate_parser(sub) -> None:
    p = sub.add_parser("estimate", help="memory per GPU of a pruning run, from its config (no weights loaded)")
    p.add_argument("config", help="YAML experiment config")
    p.add_argument("--gpus", default="1,2,4,8", help="comma-separated numbers of GPUs (processes) (default 1,2,4,8)")
    p.add_argument("--seq-len", type=int, help="tokens per example (default data.max_length)")
    p.add_argument("--loss-positions", type=int, help="loss positions per example (default 1; Tracr: the task's)")
    p.add_argument("--examples", type=int, help="training examples, for prune.cache_corrupted (default: count data.path)")
    p.add_argument("--model", help="shortcut for --set model.name_or_path=... (hub id, directory or config.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", help="also write the estimate to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_estimate)
