"""prune.cache_corrupted: reference logits and corrupted states computed once per example, reused across epochs."""

from pathlib import Path

import torch

import edgeprune.cache as cache_module
from conftest import STORIES, require_shared
from edgeprune.baselines.scores import load_scores
from edgeprune.cache import ReferenceCache
from edgeprune.config import from_dict
from edgeprune.eval import reference_and_corrupted
from edgeprune.experiment import load_model, load_split
from edgeprune.prune import prune
from edgeprune.tasks.jsonl import collate

TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "stories_names.jsonl"


def _small_task(tmp_path: Path, n: int = 8) -> Path:
    lines = [ln for ln in TASK.read_text().splitlines() if '"train"' in ln or '"split"' not in ln][:n]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cached_values_equal_a_fresh_pass_in_another_batch(tmp_path, monkeypatch):
    require_shared(STORIES)
    cfg = from_dict({"model": {"name_or_path": str(STORIES), "device": "cpu"}, "data": {"path": str(TASK)}})
    model = load_model(cfg.model)
    examples = load_split(cfg.data, model, "train").examples[:6]
    cache = ReferenceCache()
    first = collate(examples[:4], 0)
    cache(model, first, first.loss_mask)
    cache(model, collate(examples[4:], 0), collate(examples[4:], 0).loss_mask)
    assert len(cache) == 6

    calls = []
    monkeypatch.setattr(cache_module, "reference_and_corrupted",
                        lambda *a, **k: calls.append(1) or reference_and_corrupted(*a, **k))
    mixed = collate([examples[5], examples[0], examples[3]], 0)  # other order, other padding
    ref, states = cache(model, mixed, mixed.loss_mask)
    assert not calls  # served from the cache
    fresh_ref, fresh_states = reference_and_corrupted(model, mixed, select=mixed.loss_mask)
    real = mixed.attention_mask.bool()
    assert (ref - fresh_ref).abs().max() <= 1e-5
    assert (states - fresh_states)[:, real].abs().max() <= 1e-5


def test_prune_with_cache_follows_the_uncached_run(tmp_path):
    require_shared(STORIES)
    task = _small_task(tmp_path)

    def run(name, cache):
        return prune(from_dict({
            "model": {"name_or_path": str(STORIES), "device": "cpu"},
            "data": {"path": str(task), "eval_split": "train"},
            "prune": {"edge_target": 0.8, "steps": 6, "warmup_steps": 4, "batch_size": 4, "lr_masks": 1.0,
                      "cache_corrupted": cache},
            "run": {"output_dir": str(tmp_path / name), "eval_every": 0, "log_every": 1, "seed": 3},
        }).validate(), progress=False)  # 8 examples, 4 a batch: 3 epochs

    plain, cached = run("plain", False), run("cached", True)
    for a, b in zip(plain.history, cached.history):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (a, b)


def test_a_resumed_cached_run_equals_the_uninterrupted_one(tmp_path):
    """The resumed run refills its cache from the batches that filled it before the kill, so every
    later step reuses the very values the uninterrupted run reuses: masks equal bit for bit."""
    require_shared(STORIES)
    task = _small_task(tmp_path)

    def cfg(name, cache="auto"):
        return from_dict({
            "model": {"name_or_path": str(STORIES), "device": "cpu"},
            "data": {"path": str(task), "eval_split": "train"},
            "prune": {"edge_target": 0.8, "steps": 9, "warmup_steps": 4, "batch_size": 3, "lr_masks": 1.0,
                      "cache_corrupted": cache},
            "run": {"output_dir": str(tmp_path / name), "eval_every": 0, "save_every": 1, "log_every": 1, "seed": 3},
        }).validate()  # 8 examples, 3 a batch: 2 batches an epoch (drop-last), 4.5 epochs

    full = prune(cfg("full"), progress=False)
    for kill_at in (1, 5):  # inside the first epoch, and after it
        name = f"killed{kill_at}"
        first = prune(cfg(name), progress=False, stop_after=kill_at)
        second = prune(cfg(name), resume=True, progress=False)
        assert [r["loss"] for r in first.history + second.history] == [r["loss"] for r in full.history], kill_at


def _cfg(tmp_path, task, name, steps, cache="auto", **prune_settings):
    return from_dict({
        "model": {"name_or_path": str(STORIES), "device": "cpu"},
        "data": {"path": str(task), "eval_split": "train"},
        "prune": {"edge_target": 0.8, "steps": steps, "warmup_steps": 2, "batch_size": 4, "lr_masks": 1.0,
                  "cache_corrupted": cache, "init_from": "eap-ig", **prune_settings},
        "run": {"output_dir": str(tmp_path / name), "eval_every": 0, "save_every": 1, "log_every": 1, "seed": 3},
    }).validate()


def _count_reference_passes(monkeypatch) -> list:
    """Every no-grad reference pass, whoever makes it (the cache on a miss, or the attribution itself): the
    token ids of its batch."""
    import edgeprune.baselines.ig_masks as ig_masks_module
    calls = []

    def counted(model, batch, *args, **kwargs):
        calls.append(batch.input_ids.tolist())
        return reference_and_corrupted(model, batch, *args, **kwargs)
    for module in (cache_module, ig_masks_module):
        monkeypatch.setattr(module, "reference_and_corrupted", counted)
    return calls


def test_the_attribution_fills_the_cache_the_first_epoch_reads(tmp_path, monkeypatch, capsys):
    """prune.init_from eap-ig (its masks variant) makes a step's reference pass for every training batch:
    with the cache on, those passes fill it, and no pruning step makes one. The scores are the very ones
    of a run without the cache (the same passes), and its steps follow that run's."""
    require_shared(STORIES)
    task = _small_task(tmp_path)  # 8 examples, 4 a batch: 2 attribution batches, 2 steps an epoch
    calls = _count_reference_passes(monkeypatch)
    cached = prune(_cfg(tmp_path, task, "cached", steps=2), progress=False)  # one epoch: on only for the fill
    assert "after the attribution, which fills it" in capsys.readouterr().out
    assert len(calls) == 2  # the attribution's two batches, none in the steps
    calls.clear()
    plain = prune(_cfg(tmp_path, task, "plain", steps=2, cache=False), progress=False)
    assert len(calls) == 4  # the attribution's two, then each step's own
    scores = [load_scores(tmp_path / name / "scores_eap-ig.safetensors").values for name in ("cached", "plain")]
    assert torch.equal(*scores)
    for a, b in zip(plain.history, cached.history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])), (a, b)


def test_a_resumed_run_refills_the_cache_from_its_attribution(tmp_path, monkeypatch):
    """Killed inside its first epoch, a run whose attribution filled the cache refills it from the
    attribution's batches (the very passes, so the very values), not from the steps': no step makes a
    pass of its own, and the losses are the uninterrupted run's."""
    require_shared(STORIES)
    task = _small_task(tmp_path)
    calls = _count_reference_passes(monkeypatch)
    full = prune(_cfg(tmp_path, task, "full", steps=4), progress=False)
    attribution_batches = list(calls)
    assert len(attribution_batches) == 2
    first = prune(_cfg(tmp_path, task, "killed", steps=4), progress=False, stop_after=1)
    calls.clear()
    second = prune(_cfg(tmp_path, task, "killed", steps=4), resume=True, progress=False)
    assert calls == attribution_batches  # the refill; the steps read it
    assert [r["loss"] for r in first.history + second.history] == [r["loss"] for r in full.history]
