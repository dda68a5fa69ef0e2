"""Two processes under torchrun (gloo, CPU, FSDP2) prune exactly like one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import STORIES, require_shared
from edgeprune.config import from_dict
from edgeprune.distributed import Dist
from edgeprune.prune import prune

TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "stories_names.jsonl"
STEPS = 6


def _config(out: Path, **prune_kw) -> dict:
    prune_cfg = dict(edge_target=0.8, steps=STEPS, warmup_steps=4, batch_size=8, lr_masks=1.0, lr_lambdas=1.0)
    prune_cfg.update(prune_kw)
    return {"model": {"name_or_path": str(STORIES), "device": "cpu"},
            "data": {"path": str(TASK), "max_length": 64},
            "prune": prune_cfg,
            "run": {"output_dir": str(out), "seed": 7, "eval_every": 3, "save_every": 2, "log_every": 1,
                    "eval_batches": 2}}


def _torchrun(config: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the single-process runs here use 1 thread too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgeprune", "prune", str(path), "--no-progress", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _masks(run: Path) -> torch.Tensor:
    return load_file(str(run / "masks.safetensors"))["edge_log_alpha"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    require_shared(STORIES)
    out = tmp_path_factory.mktemp("single") / "run"
    prune(from_dict(_config(out)).validate(), progress=False)
    return out


def test_two_process_torchrun_matches_single_process(single_run, tmp_path):
    out = tmp_path / "dist"
    proc = _torchrun(_config(out), tmp_path)
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone reports (and writes)
    ours, ref = _log(out), _log(single_run)
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    for a, b in zip(ours, ref):
        for key in ("loss", "kl", "val_kl"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (key, a, b)
    assert (_masks(out) - _masks(single_run)).abs().max() <= 1e-6
    assert not list(out.glob("*.tmp")) and (out / "checkpoint" / "state.json").is_file()


def test_single_process_checkpoint_resumes_under_torchrun(single_run, tmp_path):
    """A run killed after 3 steps resumes on 2 processes and ends where the uninterrupted run did."""
    out = tmp_path / "resumed"
    config = _config(out)
    first = prune(from_dict(config).validate(), progress=False, stop_after=3)
    assert not first.finished
    _torchrun(config, tmp_path, "--resume")
    assert (_masks(out) - _masks(single_run)).abs().max() <= 1e-6
    assert [r["step"] for r in _log(out)] == [r["step"] for r in _log(single_run)]


def test_each_rank_takes_its_contiguous_share_of_the_batch():
    shares = [Dist(rank=r, world=3).rows(8) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 6), (6, 8)]
    assert Dist(rank=1, world=2).rows(1) == slice(1, 1)  # an empty share is allowed (evaluation)
