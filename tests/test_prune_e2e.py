"""End to end on the real trained stories260K Llama (GQA): prune, resume, eval, export, draw."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, require_shared
from edgeprune.checkpoint import CheckpointError
from edgeprune.cli import main
from edgeprune.config import ExperimentConfig, from_dict
from edgeprune.prune import PruneError, prune
from edgeprune.rundir import load_masks

TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "stories_names.jsonl"
STEPS = 24


def stories_config(out: Path, **prune_kw) -> ExperimentConfig:
    prune_cfg = dict(edge_target=0.8, steps=STEPS, warmup_steps=16, batch_size=8, lr_masks=1.0, lr_lambdas=1.0)
    prune_cfg.update(prune_kw)
    return from_dict({
        "model": {"name_or_path": str(STORIES), "device": "cpu"},
        "data": {"path": str(TASK), "max_length": 64},
        "prune": prune_cfg,
        "run": {"output_dir": str(out), "seed": 7, "eval_every": 12, "save_every": 8, "log_every": 1,
                "eval_batches": 2},
    }).validate()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    require_shared(STORIES)
    out = tmp_path_factory.mktemp("runs") / "full"
    result = prune(stories_config(out), progress=False)
    return out, result


def test_prune_moves_expected_sparsity_toward_target(full_run):
    out, result = full_run
    assert result.finished and result.step == STEPS
    sparsity = [r["edges_sparsity"] for r in result.history]
    assert sparsity[-1] > sparsity[0] + 0.3, sparsity
    assert abs(sparsity[-1] - 0.8) < abs(sparsity[0] - 0.8)
    for name in ("config.yaml", "log.jsonl", "masks.safetensors", "checkpoint/state.json",
                 "checkpoint/state.safetensors"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("val_kl" in r for r in records) and records[-1]["step"] == STEPS


def test_same_seed_gives_identical_masks(full_run, tmp_path):
    out, _ = full_run
    prune(stories_config(tmp_path / "again"), progress=False)
    a = load_file(str(out / "masks.safetensors"))["edge_log_alpha"]
    b = load_file(str(tmp_path / "again" / "masks.safetensors"))["edge_log_alpha"]
    assert torch.equal(a, b)


def test_killed_and_resumed_run_equals_uninterrupted(full_run, tmp_path):
    out, full = full_run
    cfg = stories_config(tmp_path / "resumed")
    first = prune(cfg, progress=False, stop_after=10)
    assert not first.finished and not (tmp_path / "resumed" / "masks.safetensors").exists()
    with pytest.raises(PruneError, match="--resume"):
        prune(cfg, progress=False)
    second = prune(cfg, resume=True, progress=False)
    assert second.finished
    a = load_file(str(out / "masks.safetensors"))["edge_log_alpha"]
    b = load_file(str(tmp_path / "resumed" / "masks.safetensors"))["edge_log_alpha"]
    assert torch.equal(a, b)
    assert [r["loss"] for r in first.history + second.history] == [r["loss"] for r in full.history]


def test_eval_export_draw_cli(full_run, tmp_path, capsys):
    out, _ = full_run
    run = tmp_path / "run"
    import shutil
    shutil.copytree(out, run)
    assert main(["eval", str(run), "--split", "test", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("kl", "logit_diff_full", "logit_diff_circuit", "faithfulness", "accuracy_full",
                "accuracy_circuit", "exact_match"):
        assert key in metrics["metrics"], key
    assert metrics["counts"]["edges"] <= metrics["counts"]["edges_before_dangling"]
    assert "metric" in capsys.readouterr().out

    assert main(["export", str(run), "-o", str(run / "edges.json")]) == 0
    edges = json.loads((run / "edges.json").read_text())
    circuit = json.loads((run / "circuit.json").read_text())
    assert circuit["counts"]["edges"] == len(edges) > 0
    assert all(isinstance(e, list) and len(e) == 2 for e in edges)
    assert circuit["metrics"]["kl"] == metrics["metrics"]["kl"]

    # reading the edges back and evaluating reproduces the metrics
    assert main(["eval", str(run), "--split", "test", "--edges", str(run / "edges.json"), "--no-progress"]) == 0
    again = json.loads((run / "metrics_edges.json").read_text())
    assert again["metrics"] == metrics["metrics"]

    assert main(["draw", str(run / "edges.json"), "-o", str(run / "circuit.pdf")]) == 0
    assert (run / "circuit.dot").is_file()


def test_resume_with_checkpoint_of_other_graph_is_refused(full_run, tmp_path):
    out, _ = full_run
    import shutil
    from conftest import build
    other = tmp_path / "other_model"
    build("llama").save_pretrained(other)
    run = tmp_path / "run"
    shutil.copytree(out, run)
    cfg = stories_config(run)
    cfg.model.name_or_path = str(other)
    with pytest.raises(CheckpointError, match="another graph"):
        prune(cfg, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    require_shared(STORIES)
    import edgeprune.prune as prune_module
    real = prune_module.kl_divergence
    calls = {"n": 0}

    def flaky(ref, cur):
        calls["n"] += 1
        out = real(ref, cur)
        return out * float("nan") if calls["n"] > 9 else out

    monkeypatch.setattr(prune_module, "kl_divergence", flaky)
    cfg = stories_config(tmp_path / "nan")
    with pytest.raises(PruneError, match="non-finite loss at step 10.*checkpoint"):
        prune(cfg, progress=False)
    edge, _, _ = load_masks(tmp_path / "nan")  # the step-8 checkpoint is intact
    assert edge.shape[0] > 0
    from edgeprune.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "nan" / "checkpoint")["step"] == 8


def test_wandb_logging_works_offline(tmp_path, monkeypatch):
    """--wandb with no network: an offline run is written inside the run directory."""
    pytest.importorskip("wandb")
    from edgeprune.demo import tracr_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tracr_config("xproportion", tmp_path / "wb", ["prune.steps=4", "prune.warmup_steps=2", "run.wandb=true"])
    result = prune(cfg, progress=False)
    assert result.finished and list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
