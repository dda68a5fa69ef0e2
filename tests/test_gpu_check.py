"""bench/gpu_check.py's CPU dry run: every check runs end to end at tiny shapes, the JSON holds its
figures, and a failed numerical bar (or a check over its time limit) is a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STORIES, require_shared

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _run(tmp_path: Path, *args: str, timeout: int = 1200) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")  # tiny models
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--output-dir", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    path = out / "gpu_check.json"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


@pytest.mark.slow
def test_cpu_dry_run_runs_every_check_and_meets_every_bar(tmp_path):
    require_shared(STORIES)
    proc, result = _run(tmp_path)
    failed = [b for c in result["checks"].values() for b in c.get("bars", []) if not b["ok"]]
    assert proc.returncode == 0, (failed, proc.stdout[-4000:] + proc.stderr[-3000:])
    checks = result["checks"]
    assert [checks[name]["status"] for name in ("numerics", "step", "prune", "torchrun")] == ["ok"] * 4, \
        {k: (v["status"], v["error"]) for k, v in checks.items()}
    assert checks["compile"]["status"] in ("ok", "error", "timeout")  # reported, never fatal

    numerics = checks["numerics"]["rows"]
    assert {"gpt2", "llama-gqa", "qwen2", "gemma2", "pythia", "phi3", "qwen3"} <= {r["model"] for r in numerics}
    assert all(r["fp32_max"] <= 1e-5 and r["bf16_mean"] <= 1.1 * r["hf_bf16_mean"] for r in numerics)

    steps = checks["step"]["rows"]
    assert {(r["model"], r["dtype"], r["checkpointing"]) for r in steps} == \
        {(m, d, c) for m in ("gpt2", "llama") for d in ("float32", "bfloat16") for c in (False, True)}
    assert all(r["step_s"] > 0 and r["hf_s"] > 0 and r["estimate_step_bytes"] > 0 for r in steps)

    (prune,) = checks["prune"]["rows"]
    assert prune["steps"] == 2 and prune["eval_edges"] <= prune["eval_total_edges"]
    assert (tmp_path / "gpu_check" / "prune" / "metrics.json").is_file()

    (dist,) = checks["torchrun"]["rows"]
    assert dist["backend"] == "gloo" and dist["world_size"] == 1
    assert dist["fsdp_layers"] > 0 and dist["all_reduce_calls"] > 0
    assert dist["step1_loss_rel_diff"] <= 1e-6  # the distributed path at world 1 is the single-process step

    assert "| check | case | figure | value | bar | status |" in proc.stdout
    assert result["exit_code"] == 0 and result["environment"]["device"] == "cpu"


def test_failed_bar_and_time_limit_give_nonzero_exit(tmp_path):
    """An impossible fp32 bar fails (exit 1) and a check over its limit is reported as a timeout."""
    proc, result = _run(tmp_path, "--only", "numerics,step", "--families", "gpt2,llama-gqa", "--fp32-tol", "-1",
                        "--check-timeout", "step=0.5")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    numerics, step = result["checks"]["numerics"], result["checks"]["step"]
    assert numerics["status"] == "failed"
    assert all(not b["ok"] for b in numerics["bars"] if b["figure"] == "fp32 max |dlogit|")
    assert all(b["ok"] for b in numerics["bars"] if b["figure"] != "fp32 max |dlogit|")
    assert [r["model"] for r in numerics["rows"]] == ["gpt2", "llama-gqa"]
    assert step["status"] == "timeout" and result["checks"]["prune"]["status"] == "skipped"
    assert "FAIL" in proc.stdout and "numerical bar(s) failed" in proc.stdout


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_exit_status_names_failed_bars_before_broken_checks_and_ignores_compile():
    g = _module()
    ok, broken, compile_error = g.Check("numerics", "ok"), g.Check("prune", "error"), g.Check("compile", "error")
    ok.bar("gpt2", "fp32 max |dlogit|", 2e-6, 1e-5, "<= 1e-05")
    assert g.outcome([ok, compile_error]) == (0, "every bar met")
    assert g.outcome([ok, broken, compile_error])[0] == 3
    failing = g.Check("numerics", "failed")
    failing.bar("gpt2", "fp32 max |dlogit|", float("nan"), 1e-5, "<= 1e-05")  # NaN never meets a bar
    assert g.outcome([failing, broken]) == (1, "1 numerical bar(s) failed")


def test_time_limit_is_not_swallowed_by_a_library_except_exception():
    """A check's alarm that lands inside a library's ``try: ... except Exception`` still stops the check
    (CI once saw a 0.5 s step limit land in such a block and the check run on to "ok")."""
    import time

    g = _module()
    swallowed = 0
    with pytest.raises(g.CheckTimeout):
        with g.time_limit(0.05):
            end = time.monotonic() + 5
            while time.monotonic() < end:
                try:
                    time.sleep(0.01)
                except Exception:  # what transformers does around optional imports and probes
                    swallowed += 1
    assert swallowed == 0
