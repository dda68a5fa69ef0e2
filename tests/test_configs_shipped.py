"""The configs in configs/ load, and the GPT-2 task configs run end to end on a local random-init GPT-2."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2LMHeadModel

from conftest import GPT2_TOKENIZER, gpt2_config, randomize, require_shared
from edgeprune.cli import main
from edgeprune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.prune.steps >= cfg.prune.warmup_steps


@pytest.fixture(scope="module")
def local_gpt2(tmp_path_factory):
    """A random-init GPT-2 with the real GPT-2 tokenizer, saved like a hub checkpoint."""
    require_shared(GPT2_TOKENIZER)
    path = tmp_path_factory.mktemp("gpt2")
    randomize(GPT2LMHeadModel(gpt2_config(vocab_size=50257, n_positions=128))).save_pretrained(path)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(path)
    return path


@pytest.mark.parametrize("task", ["ioi", "gt", "gp"])
def test_gpt2_task_config_prunes_evaluates_with_task_metric(task, local_gpt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs resolve their data/ paths from their own directory
    out = tmp_path / "run"
    assert main(["prune", str(ROOT / "configs" / f"gpt2_{task}.yaml"), "--model", str(local_gpt2), "--steps", "5",
                 "--output-dir", str(out), "--set", "prune.batch_size=4", "--set", "run.eval_batches=1",
                 "--no-progress"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = [r for r in log if "val_kl" in r][-1]
    metric = {"ioi": "logit_diff", "gt": "prob_diff", "gp": "logit_diff"}[task]
    for which in ("full", "circuit", "empty"):  # namespaced: never overwriting the generic metrics
        assert f"val_{task}/{metric}_{which}" in final and f"val_logit_diff_{which}" in final
    assert main(["eval", str(out), "--split", "validation", "--batch-size", "20", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["n_examples"] == 100 and f"{task}/{metric}_circuit" in metrics
    # the printed ratios are computed from the printed numbers
    m = lambda w: metrics[f"{task}/{metric}_{w}"]  # noqa: E731
    assert metrics[f"{task}/faithfulness"] == pytest.approx((m("circuit") - m("empty")) / (m("full") - m("empty")))
    g = lambda w: metrics[f"logit_diff_{w}"]  # noqa: E731
    assert metrics["faithfulness"] == pytest.approx((g("circuit") - g("empty")) / (g("full") - g("empty")))
    assert metrics["logit_diff_ratio"] == pytest.approx(g("circuit") / g("full"))


@pytest.mark.parametrize("task,named", [("ioi", {"IO", "S1", "S2", "END"}), ("gt", {"YY", "END"}),
                                        ("gp", {"NAME", "END"})])
def test_gpt2_spans_config_prunes_position_aware_out_of_the_box(task, named, local_gpt2, tmp_path, monkeypatch):
    from edgeprune.rundir import load_masks

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["prune", str(ROOT / "configs" / f"gpt2_{task}_spans.yaml"), "--model", str(local_gpt2),
                 "--steps", "2", "--output-dir", str(out), "--set", "prune.batch_size=4", "--set",
                 "run.eval_batches=1", "--no-progress"]) == 0
    masks = load_masks(out)
    assert set(masks.spans) == named | {"other", "predict"}
    assert masks.edge_log_alpha.numel() == len(masks.spans) * masks.graph["num_edges"]
    assert main(["export", str(out), "-o", str(out / "edges.json")]) == 0
    assert [s["name"] for s in json.loads((out / "circuit.json").read_text())["spans"]] == masks.spans
