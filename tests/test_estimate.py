"""`edgeprune estimate`: the meta-device trace against real runs, the per-GPU arithmetic, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from edgeprune import EdgeModel
from edgeprune.cli import main
from edgeprune.config import load_config
from edgeprune.estimate import estimate, hf_config, load_architecture, trace_step
from edgeprune.memtrace import LiveTensors

from conftest import gpt2_config, llama_config

ROOT = Path(__file__).resolve().parents[1]


def test_live_tensors_counts_allocations_not_views():
    with LiveTensors() as mem:
        a = torch.empty(1000)  # 4000 bytes
        view = a[:10]
        a.add_(1.0)  # in place: nothing new
        b = a * 2  # 4000 more
        peak_with_b = mem.live
        del b
        after_del = mem.live
    assert peak_with_b == 8000 and after_del == 4000 and mem.peak == 8000
    del a, view
    assert mem.live == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_meta_trace_matches_the_real_step(arch):
    """The same step traced on meta tensors and run on real CPU tensors allocate alike, up to the
    attention: on meta it is the math attention, CPU runs a fused kernel that keeps other tensors."""
    cls, cfg = (GPT2LMHeadModel, gpt2_config()) if arch == "gpt2" else (LlamaForCausalLM, llama_config())
    peaks = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            hf = cls(cfg)
        peaks[device] = trace_step(EdgeModel.from_hf(hf.eval()), 4, 16, loss_positions=2)
    assert 0.85 * peaks["cpu"] <= peaks["meta"] <= 1.15 * peaks["cpu"], peaks


def test_trace_follows_the_writer_states():
    """Doubling the batch doubles what depends on it: the step's peak grows ~2x."""
    with torch.device("meta"):
        hf = GPT2LMHeadModel(gpt2_config(n_embd=256, vocab_size=64))
    model = EdgeModel.from_hf(hf.eval())
    small, large = trace_step(model, 8, 32), trace_step(model, 16, 32)
    assert 1.8 < large / small < 2.1


def test_estimate_matches_the_measured_peak_of_bench_step():
    """The bench's own measurement (peak RSS above the loaded model, fresh process) of a 4-layer
    GPT-2-small-width model at 16 x 64, against the estimate's traced step peak."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--_memory", "gpt2:16x64:prune",
                           "--layers", "4", "--threads", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = int(proc.stdout.strip().splitlines()[-1])
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=12, n_embd=768, vocab_size=50257))
    traced = trace_step(EdgeModel.from_hf(hf.eval()), 16, 64)
    writer_states = (2 + 4 * 13) * 16 * 64 * 768 * 4
    # RSS also holds a few tens of MB that are not tensors (thread pools, kernels' scratch)
    assert 0.95 * traced <= measured <= 1.2 * traced, (measured, traced, writer_states)


def _config(tmp_path: Path, **sections) -> Path:
    data = {"model": {"name_or_path": "gpt2"}, "data": {"path": str(tmp_path / "none"), "max_length": 16},
            "prune": {"batch_size": 8}}
    for key, values in sections.items():
        data[key].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_estimate_rows_split_batch_and_shard_weights(tmp_path):
    cfg = load_config(_config(tmp_path, prune={"batch_size": 6}))
    report = estimate(cfg, [1, 4])
    one, four = report.rows
    assert (one.batch, four.batch) == (6, 2)  # ceil(6 / 4): the largest rank's share
    assert report.params == 124_439_808  # GPT-2 small, tied embeddings counted once
    assert one.weights == report.params * 4
    arch = load_architecture(cfg)
    expected = -(-arch.params // 4) * 4 + (arch.root_params + 2 * arch.layer_params) * 4
    assert four.weights == expected
    assert report.masks == 32_936 and one.masks == 32_936 * 12
    assert one.writer_states == 158 * 6 * 16 * 768 * 4
    assert one.step > one.writer_states and four.step < one.step
    assert one.total == one.weights + one.masks + one.step


def test_known_codellama_13b_config_has_its_published_size():
    config, source = hf_config("codellama/CodeLlama-13b-hf")
    assert "known" in source
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    assert sum(p.numel() for p in hf.parameters()) == 13_016_028_160


def test_cli_estimate_prints_table_and_json(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    assert main(["estimate", str(_config(tmp_path)), "--gpus", "1,2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| GPUs | batch / GPU |" in text and "32936 edges" in text
    data = json.loads(out.read_text())
    assert [r["gpus"] for r in data["rows"]] == [1, 2] and data["masks"] == 32_936


def test_cli_estimate_from_a_local_config_json_and_cache(tmp_path, capsys):
    cfg_json = tmp_path / "tiny.json"
    cfg_json.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "vocab_size": 128}))
    config = _config(tmp_path, model={"name_or_path": str(cfg_json)}, prune={"cache_corrupted": True})
    assert main(["estimate", str(config), "--gpus", "1", "--examples", "10"]) == 0
    text = capsys.readouterr().out
    assert "corrupted cache" in text and "11 writers" in text and str(cfg_json) in text
    # the cache: 10 examples x (11 writers x 16 tokens x d 64 + 1 loss position x vocab 128) x 4 bytes
    report = estimate(load_config(config), [1], examples=10)
    assert report.rows[0].cache == 10 * (11 * 16 * 64 + 128) * 4


def test_estimate_of_a_tracr_task_uses_its_shape(tmp_path):
    """data.path: tracr has no max_length: the task's own length and loss positions are used."""
    config = _config(tmp_path, model={"name_or_path": str(ROOT / "data" / "tracr_models" / "reverse"),
                                      "ablation": "zero"},
                     data={"path": "tracr", "max_length": None}, prune={"batch_size": 81})
    report = estimate(load_config(config), [1])
    assert (report.seq, report.loss_positions, report.ablation) == (5, 4, "zero")
    assert report.masks == 94


def test_cli_estimate_errors(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["estimate", str(config), "--gpus", "1,x"]) == 2
    assert "--gpus" in capsys.readouterr().err
    missing = tmp_path / "no-such-model"
    assert main(["estimate", str(config), "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no-such-model: no such file or directory" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["estimate", str(config), "--model", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["estimate", str(config), "--gpus", "0"]) == 2


def test_cache_counts_only_the_training_split_of_a_single_jsonl(tmp_path):
    from edgeprune.estimate import _train_examples

    data = tmp_path / "task.jsonl"
    lines = [{"clean": "a b", "corrupted": "c d"}, {"clean": "a b", "corrupted": "c d", "split": "train"},
             {"clean": "a b", "corrupted": "c d", "split": "test"}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    config = _config(tmp_path, data={"path": str(data)})
    assert _train_examples(load_config(config)) == 2  # no "split" field means train
    assert _train_examples(load_config(_config(tmp_path, data={"path": str(tmp_path / "missing")}))) is None


def _stories_run(tmp_path, *extra):
    from conftest import STORIES, require_shared
    require_shared(STORIES)
    return ["prune", str(ROOT / "configs" / "stories_names.yaml"), "--steps", "2", "--output-dir",
            str(tmp_path / "run"), "--no-progress", *extra]


def test_prune_refuses_a_step_that_will_not_fit_naming_the_knobs(tmp_path, capsys, monkeypatch):
    import edgeprune.estimate
    monkeypatch.setattr(edgeprune.estimate, "free_bytes", lambda device: 2**20)  # 1 MiB free
    assert main(_stories_run(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "GiB are free" in err and "prune.batch_size (now 16)" in err and "activation_checkpointing" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_out_of_memory_during_a_step_is_one_line_with_the_knobs(tmp_path, capsys, monkeypatch):
    import edgeprune.prune

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(edgeprune.prune, "kl_divergence", oom)
    assert main(_stories_run(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "prune.batch_size" in err and "Traceback" not in err


def test_trace_counts_the_inputs_a_step_keeps():
    """``keep_inputs``: the Q/K/V inputs kept for the backward (rather than rebuilt) are live at the
    peak, so the traced peak grows with the share (on meta, as on CPU)."""
    with torch.device("meta"):
        hf = GPT2LMHeadModel(gpt2_config(n_layer=4))
    model = EdgeModel.from_hf(hf.eval())
    assert model._kept_inputs == frozenset()  # meta: a GPU's default, nothing kept
    rebuilt = trace_step(model, 4, 16)
    model.keep_inputs = 10.0  # every layer's inputs
    assert model._kept_inputs == frozenset(range(4))
    kept = trace_step(model, 4, 16)
    per_layer = 3 * hf.config.n_head * 4 * 16 * hf.config.n_embd * 4  # Q, K, V readers x B x T x D fp32
    assert kept - rebuilt >= 2 * per_layer
