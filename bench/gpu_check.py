"""GPU readiness in one command: every CUDA path of edgeprune checked in a few minutes (issue 18).

    python bench/gpu_check.py                        # one CUDA GPU, nothing downloaded: <= 8 min on an H200
    bench/gpu_check.sh                               # the same, offline env set, from any directory
    python bench/gpu_check.py --device cpu           # dry run of every check at tiny shapes (tests/test_gpu_check.py)
    python bench/gpu_check.py --only numerics,prune --json runs/gpu_check/part.json

The checks, most important first (a budget cut loses the least):

1. ``numerics``: for every family of ``bench/faithfulness.py`` (random weights, its configs), max
   |dlogit| of our fp32 forward (all masks 1) against HF's fp32 forward on the same device, TF32
   off; our bf16 forward against HF fp32 beside HF's own bf16 forward (the bf16 noise floor), and
   HF eager vs sdpa (the fp32 floor). Bars (DESIGN.md section 4): fp32 max <= ``--fp32-tol``;
   bf16 mean <= ``--bf16-mean-factor`` x HF bf16 mean (1.0) and bf16 max <= ``--bf16-max-factor`` x HF
   bf16 max (1.1). The CPU dry run uses 1.1 and 1.25: its figures come from 2x8 tokens through CPU
   bf16 kernels that differ between instruction sets (one machine measured at most 0.96x of the
   max bar, another CI machine failed one at 1.0/1.1), so they check the plumbing, not the floor.
2. ``step``: ``bench/step.py``'s pruning step against HF forward+backward, GPT-2 small and a
   Llama-GQA of the same size at 32x64, fp32 and bf16, with and without activation checkpointing:
   median times (CUDA-synchronised), their ratio, ``torch.cuda.max_memory_allocated`` above the
   loaded model for both, against ``edgeprune estimate``'s traced peak for the same step.
3. ``prune``: ``edgeprune prune`` (stories260K, bf16, 50 steps) then ``edgeprune eval --split test``,
   through the CLI's own ``main``; bar: the losses and metrics are finite.
4. ``torchrun``: the same run under ``torchrun --nproc_per_node 1`` with the nccl backend (gloo on
   CPU). At world size 1 ``edgeprune.distributed.setup`` starts no process group, so the worker
   starts it and runs the pruning loop with the distributed code switched on (FSDP2 over a 1-rank
   mesh, dL/dz and the logged sums all-reduced): the nccl path, on one GPU. Bar: its first step's
   loss equals the single-process run's (relative ``--dist-tol``); the final masks' difference is
   reported.
5. ``compile``: ``torch.compile`` of the masked forward (all masks 1, no grad; GPT-2 small's width,
   2 layers, 8x32; inductor on CUDA, the ``eager`` backend on the CPU dry run): compile time, eager
   and compiled medians, speed-up, max |dlogit| compiled vs eager, graph breaks. Never fatal, never
   a default of edgeprune.

Every check runs under its own time limit (``--check-timeout NAME=SECONDS``; on CUDA 120-180 s, on
CPU 300 s) inside the total ``--budget`` (450 s on CUDA, so that the command stays under 8
minutes): a check that runs over is stopped (SIGALRM in this process; subprocesses are killed with
their process group), reported as ``timeout`` with what it had measured, and the next check starts.
On CUDA, TF32 is off for the whole run (numerics and fp32 timings alike). The JSON (``--json``,
default ``OUTPUT_DIR/gpu_check.json``) holds every figure.

Exit status: 0 when every bar is met; 1 when a numerical bar fails; 3 when a required check
(all but ``compile``) errored or ran out of time and no bar failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

CHECKS = ("numerics", "step", "prune", "torchrun", "compile")
OPTIONAL = {"compile"}  # reported, never fatal
# Per-check limits in seconds; their sum is over the total budget on purpose: a check that finishes early
# leaves its time to the later ones, and the budget cuts the last (compile) first.
TIMEOUTS = {"numerics": 120, "step": 180, "prune": 90, "torchrun": 90, "compile": 120}
# The CPU dry run is ~1 minute on 2 idle cores; shared CI machines can be 3-5x slower: generous limits
CPU_TIMEOUT, CPU_BUDGET = 300.0, 1200.0
STORIES_CONFIG = ROOT / "configs" / "stories_names.yaml"


class CheckTimeout(BaseException):
    """A check over its limit. A BaseException, like KeyboardInterrupt: a library's ``except Exception``
    (transformers has several on its loading paths) must not swallow it and let the check run on."""


@dataclass
class Check:
    """One check's outcome: rows of figures, bars (numerical pass/fail), status and time."""

    name: str
    status: str = "not run"  # ok | failed (a bar) | error | timeout | skipped | not run
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)
    bars: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def bar(self, case: str, figure: str, value: float, limit: float, text: str) -> bool:
        ok = math.isfinite(value) and value <= limit
        self.bars.append({"case": case, "figure": figure, "value": value, "limit": limit, "bar": text, "ok": ok})
        return ok


# ---------------------------------------------------------------------------- guards
@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CheckTimeout in this (main) thread after ``seconds``, and again every second until the
    block is left (should one be swallowed anyway); Python-level code is interrupted at the next
    bytecode, so a long loop of kernels stops within one kernel."""
    def handler(signum, frame):
        raise CheckTimeout(f"over its limit of {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01), 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_process(cmd: list[str], deadline: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; killed with all its children at ``deadline`` (or on any
    exception here, e.g. the check's alarm), then CheckTimeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise CheckTimeout(f"{' '.join(cmd[:6])} ... ran past the check's limit") from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()``: CUDA events on GPU (after a synchronise), perf_counter on CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- 1. numerics
def check_numerics(c: Check, args, device: torch.device, deadline: float) -> None:
    import faithfulness

    small = device.type == "cpu"
    B, T = (2, 8) if small else (4, 32)
    c.notes.append(f"batch {B} x seq {T}; configs of bench/faithfulness.py ({'--small' if small else 'full size'}); "
                   "reference: HF fp32 on the same device, TF32 off")
    families = [f for f in faithfulness.configs(small) if not args.families or f[0] in args.families.split(",")]
    if not families:
        raise ValueError(f"--families {args.families}: none of bench/faithfulness.py's "
                         f"({', '.join(f[0] for f in faithfulness.configs(small))})")
    for name, cls, cfg in families:
        got = {(fwd, dtype): (mx, mean) for _, fwd, dtype, mx, mean in
               faithfulness.measure(name, cls, cfg, B, T, device)}
        row = {"model": name, "fp32_max": got[("edgeprune", "fp32")][0], "fp32_mean": got[("edgeprune", "fp32")][1],
               "bf16_max": got[("edgeprune", "bf16")][0], "bf16_mean": got[("edgeprune", "bf16")][1],
               "hf_bf16_max": got[("HF", "bf16")][0], "hf_bf16_mean": got[("HF", "bf16")][1]}
        if ("HF eager vs sdpa", "fp32") in got:
            row["hf_eager_vs_sdpa_max"] = got[("HF eager vs sdpa", "fp32")][0]
        c.rows.append(row)
        c.bar(name, "fp32 max |dlogit|", row["fp32_max"], args.fp32_tol, f"<= {args.fp32_tol:g}")
        c.bar(name, "bf16 mean |dlogit|", row["bf16_mean"], args.bf16_mean_factor * row["hf_bf16_mean"],
              f"<= {args.bf16_mean_factor:g} x HF bf16 {row['hf_bf16_mean']:.3e}")
        c.bar(name, "bf16 max |dlogit|", row["bf16_max"], args.bf16_max_factor * row["hf_bf16_max"],
              f"<= {args.bf16_max_factor:g} x HF bf16 {row['hf_bf16_max']:.3e}")
        free(device)


# ---------------------------------------------------------------------------- 2. step
def check_step(c: Check, args, device: torch.device, deadline: float) -> None:
    import step as step_bench
    from edgeprune import EdgeModel

    small = device.type == "cpu"
    shape = (2, 8) if small else (32, 64)
    layers = 1 if small else None
    c.notes.append(f"B x T {shape[0]}x{shape[1]}" + (", 1 layer, bench/step.py --tiny (dry run)" if small else "")
                   + "; memory: peak above the loaded model"
                   + (" (in-process RSS on CPU: a dry run only, not a figure)" if small else
                      ", torch.cuda.max_memory_allocated"))
    for kind in ("gpt2", "llama"):
        for dtype in ("float32", "bfloat16"):
            opts = SimpleNamespace(layers=layers, tiny=small, dtype=dtype, cache=False, checkpointing=False,
                                   device=str(device), warmup=1, repeats=2 if small else 3)
            hf, batch = step_bench.setup(kind, shape, opts, device)
            model = EdgeModel.from_hf(hf)
            g = model.graph
            writers = g.num_writers * shape[0] * shape[1] * hf.config.hidden_size * torch.finfo(hf.dtype).bits // 8
            for ckpt in (False, True):
                opts.checkpointing = ckpt
                prune_step = step_bench.PruneStep(model, batch, False, ckpt)
                hf_step = step_bench.HFStep(hf, batch)
                t = step_bench.time_steps(prune_step, hf_step, opts, device)
                hf_peak = step_bench.peak_above_now(hf_step, device)
                step_peak = step_bench.peak_above_now(prune_step, device)
                est_step, est_hf = step_bench.estimate_peaks(kind, shape, opts)
                c.rows.append({"model": kind, "shape": f"{shape[0]}x{shape[1]}", "dtype": dtype, "checkpointing": ckpt,
                               "graph": g.describe(), "step_s": t["prune"]["median_s"], "hf_s": t["hf"]["median_s"],
                               "ratio": t["ratio"], "step_parts_s": t["prune"]["parts"],
                               "step_peak_bytes": step_peak, "hf_peak_bytes": hf_peak,
                               "estimate_step_bytes": est_step, "estimate_hf_bytes": est_hf,
                               "step_peak_over_estimate": step_peak / est_step if est_step else None,
                               "writers_bytes": writers})
            del model, hf, batch, prune_step, hf_step
            free(device)


# ---------------------------------------------------------------------------- 3. prune + eval
def run_config(args, device: torch.device, out: Path) -> Path:
    """The resolved config of the prune check (and of the torchrun check, which must run the same):
    stories260K in bf16, ``--prune-steps`` steps, one validation and checkpoint at the end, every step logged."""
    from edgeprune.config import apply_overrides, load_config, save_config

    steps = args.prune_steps
    cfg = load_config(STORIES_CONFIG)
    apply_overrides(cfg, [f"prune.steps={steps}", "model.dtype=bfloat16", f"model.device={device}",
                          f"run.eval_every={steps}", f"run.save_every={steps}", "run.log_every=1",
                          f"run.output_dir={out / 'prune'}"]
                    + ([f"run.eval_batches={args.eval_batches}"] if args.eval_batches else []),
                    source="bench/gpu_check.py")
    cfg.prune.warmup_steps = min(cfg.prune.warmup_steps, steps)  # as `prune --steps` does: reach the target
    cfg.validate(str(STORIES_CONFIG))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prune_config.yaml"
    save_config(cfg, path)
    return path


def cli(argv: list[str], log: Path) -> tuple[int, str]:
    """``edgeprune`` in this process, its output appended to ``log``; (exit status, its stderr)."""
    from edgeprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    with open(log, "a") as fh:
        fh.write(f"$ edgeprune {' '.join(argv)}\n{out.getvalue()}{err.getvalue()}(exit {code})\n")
    return code, err.getvalue()


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def check_prune(c: Check, args, device: torch.device, deadline: float) -> None:
    out = Path(args.output_dir)
    config = run_config(args, device, out)
    run, log = out / "prune", out / "prune_cli.log"
    log.write_text("")
    t0 = time.perf_counter()
    code, err = cli(["prune", str(config), "--overwrite", "--no-progress"], log)
    prune_s = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"edgeprune prune exited {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    t0 = time.perf_counter()
    code, err = cli(["eval", str(run), "--split", "test", "--no-progress"], log)
    eval_s = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"edgeprune eval exited {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    train = [r for r in _log(run) if "loss" in r]
    val = [r for r in _log(run) if "val_kl" in r]
    metrics = json.loads((run / "metrics.json").read_text())
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for part in ("counts", "metrics"):
        flat.update({k: v for k, v in metrics.get(part, {}).items() if isinstance(v, (int, float))})
    row = {"model": "stories260K", "dtype": "bfloat16", "steps": len(train), "prune_s": prune_s, "eval_s": eval_s,
           "first_loss": train[0]["loss"], "final_loss": train[-1]["loss"], "final_kl": train[-1]["kl"],
           "val_kl": val[-1]["val_kl"] if val else None}
    for key in ("kl", "faithfulness", "logit_diff_ratio", "edges", "total_edges", "edge_sparsity"):
        if key in flat:
            row[f"eval_{key}"] = flat[key]
    c.rows.append(row)
    c.notes.append(f"run directory {run}, the commands' output in {log}; wall times include loading the model")
    worst = max(0.0 if math.isfinite(r["loss"]) else math.inf for r in train)
    c.bar("stories260K bf16", "non-finite training losses", worst, 0.0, "all finite")
    ev = [flat.get("kl", math.nan), flat.get("faithfulness", math.nan)]
    c.bar("stories260K bf16", "eval kl, faithfulness finite", 0.0 if all(map(math.isfinite, ev)) else math.inf,
          0.0, "finite")


# ---------------------------------------------------------------------------- 4. torchrun (nccl at world 1)
def check_torchrun(c: Check, args, device: torch.device, deadline: float) -> None:
    from safetensors.torch import load_file

    out = Path(args.output_dir)
    config = out / "prune_config.yaml"
    if not config.is_file():
        config = run_config(args, device, out)
    run = out / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as this process: comparable runs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(Path(__file__).resolve()), "--_dist-worker", str(config), "--output-dir", str(run),
           "--device", str(device)]
    t0 = time.perf_counter()
    proc = run_process(cmd, deadline, env)
    wall = time.perf_counter() - t0
    report = [json.loads(line[len("GPU_CHECK_WORKER "):]) for line in proc.stdout.splitlines()
              if line.startswith("GPU_CHECK_WORKER ")]
    if proc.returncode != 0 or not report:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"torchrun exited {proc.returncode}: {tail}")
    w = report[-1]
    row = {"backend": w["backend"], "world_size": w["world_size"], "fsdp_layers": w["fsdp_layers"],
           "all_reduce_calls": w["all_reduce_calls"], "steps": w["steps"], "wall_s": wall}
    single = out / "prune"
    if (single / "masks.safetensors").is_file():
        ours, ref = [r for r in _log(run) if "loss" in r], [r for r in _log(single) if "loss" in r]
        rel = [abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12) for a, b in zip(ours, ref)]
        diff = (load_file(str(run / "masks.safetensors"))["edge_log_alpha"]
                - load_file(str(single / "masks.safetensors"))["edge_log_alpha"]).abs().max().item()
        row.update(step1_loss_rel_diff=rel[0], max_loss_rel_diff=max(rel), final_log_alpha_max_diff=diff)
        c.bar("world 1 vs one process", "step-1 loss relative difference", rel[0], args.dist_tol,
              f"<= {args.dist_tol:g}")
    else:
        c.notes.append("no single-process run of the prune check to compare with (run it too: --only prune,torchrun)")
    c.rows.append(row)
    want = "nccl" if device.type == "cuda" else "gloo"
    c.bar(f"backend {w['backend']}", f"process group is {want} and collectives ran",
          0.0 if w["backend"] == want and w["all_reduce_calls"] > 0 and w["fsdp_layers"] > 0 else math.inf, 0.0,
          f"{want}, all_reduce > 0, FSDP2 layers > 0")


def dist_worker(config: str, output_dir: str, device_name: str) -> int:
    """Under torchrun (world size 1): start the process group, switch the distributed code on and
    run the pruning loop; print one ``GPU_CHECK_WORKER {json}`` line."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    from edgeprune import distributed, prune as prune_mod
    from edgeprune.config import load_config

    class WorldOne(distributed.Dist):  # at world 1 the loop would skip every collective
        @property
        def enabled(self) -> bool:
            return True

    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    calls = [0]
    all_reduce = dist.all_reduce

    def counting_all_reduce(*a, **kw):
        calls[0] += 1
        return all_reduce(*a, **kw)

    dist.all_reduce = counting_all_reduce
    sharded = [0]  # modules FSDP2 wraps (distributed.shard_model imports fully_shard when it runs)
    fully_shard = fsdp.fully_shard

    def counting_fully_shard(module, *a, **kw):
        sharded[0] += 1
        return fully_shard(module, *a, **kw)

    fsdp.fully_shard = counting_fully_shard
    d = WorldOne(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=0, owns_group=True)
    cfg = load_config(config, [f"run.output_dir={output_dir}", f"model.device={device}"])
    try:
        result = prune_mod.PruneRecipe(cfg, d, device, resume=False, overwrite=True, resume_or_start=False,
                                       progress=False).setup().run()
    except BaseException:
        d.close(clean=False)
        raise
    report = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce_calls": calls[0],
              "steps": result.step, "fsdp_layers": sharded[0]}
    d.close()
    print("GPU_CHECK_WORKER " + json.dumps(report), flush=True)
    return 0


# ---------------------------------------------------------------------------- 5. torch.compile
def check_compile(c: Check, args, device: torch.device, deadline: float) -> None:
    import faithfulness
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgeprune import EdgeModel

    small = device.type == "cpu"
    backend = args.compile_backend or ("eager" if small else "inductor")
    # GPT-2 small's width, 2 of its 12 layers: the masked forward breaks into ~12 graphs per layer, and
    # inductor compiling all of them would take the check's whole limit; the speed-up per layer is the figure
    cfg = GPT2Config(n_layer=1, n_head=4, n_embd=64, vocab_size=512) if small else GPT2Config(n_layer=2)
    B, T = (2, 8) if small else (8, 32)
    torch.manual_seed(0)
    hf = faithfulness.randomize(GPT2LMHeadModel(cfg)).to(device)
    model = EdgeModel.from_hf(hf).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
    corrupted = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
    row = {"model": "gpt2 (1 layer, d 64)" if small else "gpt2-small width, 2 layers", "shape": f"{B}x{T}",
           "backend": backend}
    c.rows.append(row)

    def eager():
        return model(ids, corrupted_input_ids=corrupted).logits

    with torch.no_grad():
        ref = eager()
        row["eager_s"] = median_time(eager, device, 3 if small else 10)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend=backend)

        def run():
            return compiled(ids, corrupted_input_ids=corrupted).logits

        t0 = time.perf_counter()
        out = run()
        sync(device)
        row["compile_s"] = time.perf_counter() - t0
        row["compiled_s"] = median_time(run, device, 3 if small else 10)
        row["speedup"] = row["eager_s"] / row["compiled_s"]
        row["max_abs_diff_vs_eager"] = (out.float() - ref.float()).abs().max().item()
    counters = torch._dynamo.utils.counters
    row["graphs"] = counters["stats"].get("unique_graphs", 0)
    row["graph_breaks"] = sum(counters["graph_break"].values())
    row["graph_break_reasons"] = sorted({k.splitlines()[0][:120] for k in counters["graph_break"]})
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- report
def fmt(x, unit="") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.3e}{unit}" if (x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5)) else f"{x:.3f}{unit}"
    return f"{x}{unit}"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.3f} GiB"


def table(checks: list[Check]) -> list[str]:
    """One markdown table: check | case | figure | value | bar | status."""
    lines = ["| check | case | figure | value | bar | status |", "|---|---|---|---|---|---|"]

    def add(check, case, figure, value, bar="", status=""):
        lines.append(f"| {check} | {case} | {figure} | {value} | {bar} | {status} |")

    for c in checks:
        bars = {(b["case"], b["figure"]): b for b in c.bars}

        def barred(case, figure, value):
            b = bars.pop((case, figure), None)
            add(c.name, case, figure, fmt(value), b["bar"] if b else "", ("ok" if b["ok"] else "FAIL") if b else "")

        if c.name == "numerics":
            for r in c.rows:
                barred(r["model"], "fp32 max |dlogit|", r["fp32_max"])
                barred(r["model"], "bf16 mean |dlogit|", r["bf16_mean"])
                barred(r["model"], "bf16 max |dlogit|", r["bf16_max"])
                if "hf_eager_vs_sdpa_max" in r:
                    add(c.name, r["model"], "HF eager vs sdpa fp32 max (floor)", fmt(r["hf_eager_vs_sdpa_max"]))
        elif c.name == "step":
            for r in c.rows:
                case = f"{r['model']} {r['shape']} {r['dtype']}" + (" ckpt" if r["checkpointing"] else "")
                add(c.name, case, "step / HF fwd+bwd", f"{r['step_s']:.4f} s / {r['hf_s']:.4f} s = {r['ratio']:.2f}x")
                add(c.name, case, "peak: step, HF (estimate)",
                    f"{gib(r['step_peak_bytes'])} ({gib(r['estimate_step_bytes'])}), "
                    f"{gib(r['hf_peak_bytes'])} ({gib(r['estimate_hf_bytes'])})",
                    f"step/estimate {fmt(r['step_peak_over_estimate'])}")
        elif c.name == "prune":
            for r in c.rows:
                case = f"{r['model']} {r['dtype']} {r['steps']} steps"
                add(c.name, case, "prune, eval wall", f"{r['prune_s']:.1f} s, {r['eval_s']:.1f} s")
                add(c.name, case, "loss first -> final; val kl",
                    f"{fmt(r['first_loss'])} -> {fmt(r['final_loss'])}; {fmt(r['val_kl'])}")
                add(c.name, case, "eval kl, faithfulness, edges",
                    f"{fmt(r.get('eval_kl'))}, {fmt(r.get('eval_faithfulness'))}, {r.get('eval_edges', '-')}")
        elif c.name == "torchrun":
            for r in c.rows:
                case = f"{r['backend']}, world {r['world_size']}"
                add(c.name, case, "FSDP2 modules, all_reduce calls, steps",
                    f"{r['fsdp_layers']}, {r['all_reduce_calls']}, {r['steps']} ({r['wall_s']:.1f} s)")
                if "step1_loss_rel_diff" in r:
                    barred("world 1 vs one process", "step-1 loss relative difference", r["step1_loss_rel_diff"])
                    add(c.name, "world 1 vs one process", "max loss rel. diff; final log_alpha max diff",
                        f"{fmt(r['max_loss_rel_diff'])}; {fmt(r['final_log_alpha_max_diff'])}")
        elif c.name == "compile":
            for r in c.rows:
                case = f"{r['model']} {r['shape']} {r['backend']}"
                if "speedup" in r:
                    add(c.name, case, "compile; eager -> compiled; speed-up",
                        f"{r['compile_s']:.1f} s; {r['eager_s'] * 1e3:.2f} -> {r['compiled_s'] * 1e3:.2f} ms; "
                        f"{r['speedup']:.2f}x", "never fatal")
                    add(c.name, case, "max |dlogit| vs eager; graphs, breaks",
                        f"{fmt(r['max_abs_diff_vs_eager'])}; {r['graphs']}, {r['graph_breaks']}")
        for b in bars.values():  # bars not shown with a row above
            add(c.name, b["case"], b["figure"], fmt(b["value"]), b["bar"], "ok" if b["ok"] else "FAIL")
        status = c.status + (f": {c.error}" if c.error else "")
        add(c.name, "(check)", "status, seconds", f"{status}, {c.seconds:.1f} s")
    return lines


def environment(device: torch.device) -> dict:
    import transformers

    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": str(device),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    return env


def outcome(checks: list[Check]) -> tuple[int, str]:
    """(exit status, verdict): 1 when a bar failed, else 3 when a required check errored or timed out, else 0."""
    failed = [b for c in checks for b in c.bars if not b["ok"]]
    broken = [c.name for c in checks if c.name not in OPTIONAL and c.status in ("error", "timeout")]
    if failed:
        return 1, f"{len(failed)} numerical bar(s) failed"
    if broken:
        return 3, f"required check(s) did not finish: {', '.join(broken)}"
    return 0, "every bar met"


RUNNERS = {"numerics": check_numerics, "step": check_step, "prune": check_prune, "torchrun": check_torchrun,
           "compile": check_compile}


def parse_timeouts(items: list[str], device: torch.device) -> dict[str, float]:
    out = dict(TIMEOUTS) if device.type == "cuda" else {name: CPU_TIMEOUT for name in CHECKS}
    for item in items:
        name, _, value = item.partition("=")
        if name not in CHECKS or not value:
            raise ValueError(f"--check-timeout {item!r}: expected NAME=SECONDS with NAME one of {', '.join(CHECKS)}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="exit status: 0 every bar met, 1 a numerical bar failed, "
                                        "3 a required check errored or timed out")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu: a dry run at tiny shapes")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks ({', '.join(CHECKS)})")
    ap.add_argument("--output-dir", default=str(ROOT / "runs" / "gpu_check"), help="run directories and the JSON")
    ap.add_argument("--json", help="results file (default OUTPUT_DIR/gpu_check.json)")
    ap.add_argument("--budget", type=float, default=None,
                    help="total seconds for all checks (default 450: with start-up, under 8 minutes; CPU 1200)")
    ap.add_argument("--check-timeout", action="append", default=[], metavar="NAME=SECONDS",
                    help=f"one check's limit (defaults {TIMEOUTS}; CPU {CPU_TIMEOUT:.0f} each)")
    ap.add_argument("--families", help="numerics: only these of bench/faithfulness.py's configs (comma-separated)")
    ap.add_argument("--fp32-tol", type=float, default=1e-5, help="bar: fp32 max |dlogit| vs HF (default 1e-5)")
    ap.add_argument("--bf16-mean-factor", type=float, default=None,
                    help="bar: bf16 mean <= F x HF bf16 mean (default 1.0; CPU dry run 1.1)")
    ap.add_argument("--bf16-max-factor", type=float, default=None,
                    help="bar: bf16 max <= F x HF bf16 max (default 1.1; CPU dry run 1.25: a max over 2x8 tokens "
                         "on CPU bf16 kernels, which differ between instruction sets, is one sample's tail)")
    ap.add_argument("--dist-tol", type=float, default=1e-4,
                    help="bar: torchrun step-1 loss vs one process, relative (default 1e-4)")
    ap.add_argument("--prune-steps", type=int, default=None, help="prune check steps (default 50; CPU dry run 2)")
    ap.add_argument("--eval-batches", type=int, default=None, help="run.eval_batches of the prune run")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; CPU: eager)")
    ap.add_argument("--_dist-worker", dest="dist_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.dist_worker:
        return dist_worker(args.dist_worker, args.output_dir, args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but CUDA is not available here (use --device cpu for the dry run)",
              file=sys.stderr)
        return 2
    only = [x for x in args.only.split(",") if x]
    unknown = [x for x in only if x not in CHECKS]
    if unknown:
        print(f"gpu_check: error: --only: unknown check(s) {', '.join(unknown)} (choose from {', '.join(CHECKS)})",
              file=sys.stderr)
        return 2
    try:
        timeouts = parse_timeouts(args.check_timeout, device)
    except ValueError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    if args.budget is None:
        args.budget = 450.0 if device.type == "cuda" else CPU_BUDGET
    if args.bf16_mean_factor is None:
        args.bf16_mean_factor = 1.0 if device.type == "cuda" else 1.1
    if args.bf16_max_factor is None:
        args.bf16_max_factor = 1.1 if device.type == "cuda" else 1.25
    if args.prune_steps is None:
        args.prune_steps = 2 if device.type == "cpu" else 50
        if device.type == "cpu" and args.eval_batches is None:
            args.eval_batches = 1
    # fp32 means fp32: no TF32 in matmuls or convolutions, for the numerics and the fp32 timings alike
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "gpu_check.json"
    env = environment(device)
    print(f"gpu_check on {env.get('gpu', 'cpu (dry run)')}, torch {env['torch']}, {env['date_utc']} UTC; "
          f"checks {', '.join(only)}; budget {args.budget:.0f} s", flush=True)
    start = time.monotonic()
    end_all = start + args.budget
    checks = []
    for name in CHECKS:
        c = Check(name)
        checks.append(c)
        if name not in only:
            c.status = "skipped"
            continue
        left = end_all - time.monotonic()
        if left < 5:
            c.status, c.error = "timeout", "the total budget was spent before it started"
            continue
        limit = min(timeouts[name], left)
        t0 = time.monotonic()
        print(f"[{time.monotonic() - start:6.1f} s] {name} (limit {limit:.0f} s) ...", flush=True)
        try:
            with time_limit(limit):
                RUNNERS[name](c, args, device, t0 + limit)
            c.status = "ok" if all(b["ok"] for b in c.bars) else "failed"
        except CheckTimeout as err:
            c.status, c.error = "timeout", str(err)
        except Exception as err:  # reported, and the next check runs
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            c.status, c.error = "error", f"{type(err).__name__}: {first}"
            c.notes.append(traceback.format_exc(limit=-4))
        if c.status == "timeout" and any(not b["ok"] for b in c.bars):
            c.status = "failed"
        c.seconds = time.monotonic() - t0
        free(device)

    code, verdict = outcome(checks)
    lines = table(checks)
    print("\n" + "\n".join(lines))
    total = time.monotonic() - start
    print(f"\n{verdict}; {total:.1f} s in all; figures in {json_path}")
    result = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "dist_worker"},
              "total_seconds": total, "exit_code": code, "verdict": verdict, "table": lines,
              "checks": {c.name: c.__dict__ for c in checks}}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
