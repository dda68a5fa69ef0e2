"""``eval.evaluate`` reads out over the vocabulary at the loss positions only, and the evaluator of many
circuits (``baselines.curve.CircuitEvaluator``: ``view``, ``curve``, ``compare``) makes the full model's
pass once: the figures are those of every position's logits, and of a pass per circuit."""

import json
from pathlib import Path

import pytest
import torch

import edgeprune.baselines.curve as curve_module
import edgeprune.cache as cache_module
from conftest import STORIES, require_shared
from edgeprune.baselines.curve import CircuitEvaluator
from edgeprune.config import from_dict
from edgeprune.eval import evaluate, position_metrics, reference_and_corrupted
from edgeprune.experiment import prepare
from edgeprune.tasks.common import TaskMetric

TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "stories_names.jsonl"


def _multi_token_task(tmp_path: Path) -> Path:
    """stories_names lines whose predicted span goes on for several tokens (several loss positions)."""
    lines = [json.loads(ln) for ln in TASK.read_text().splitlines()[:6]]
    for line in lines:
        for key in ("clean", "corrupted"):
            line[key] = line[key].replace("</predict>", " liked the box.</predict>")
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return path


def _first_token_metric() -> TaskMetric:
    """A task metric at each example's first loss position: the logit of token 5 minus token 7's."""
    def fn(logits, extras):
        return {"gap": logits[:, 5] - logits[:, 7]}
    return TaskMetric("toy", "gap", fn, lambda ex: None)


def _setup(tmp_path):
    require_shared(STORIES)
    cfg = from_dict({"model": {"name_or_path": str(STORIES), "device": "cpu"},
                     "data": {"path": str(_multi_token_task(tmp_path))}})
    model, batches, _, _ = prepare(cfg, "train", batch_size=4)
    assert any(int(b.loss_mask.sum(1).max()) > 1 for b in batches)  # several loss positions an example
    assert any(b.attention_mask.eq(0).any() for b in batches)  # and padding
    return model, batches


def test_eval_at_the_loss_positions_equals_every_positions_logits(tmp_path):
    model, batches = _setup(tmp_path)
    names = model.edge_names
    model.set_edges([e for i, e in enumerate(names) if i % 3])  # a circuit: two thirds of the edges
    metric = _first_token_metric()
    got = evaluate(model, batches, task_metric=metric, empty=False)

    sums, n_pos, n_ex = {}, 0, 0
    with torch.no_grad():
        for b in batches:
            full = model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # HF, every position
            _, corrupted = reference_and_corrupted(model, b)
            circuit = model(b.input_ids, b.attention_mask, corrupted_states=corrupted).logits
            sel, rows = b.loss_mask, torch.arange(b.input_ids.shape[0])
            for k, v in position_metrics(full[sel], circuit[sel], b.target_ids[sel]).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            for which, logits in (("full", full), ("circuit", circuit)):
                key = f"toy/gap_{which}"
                sums[key] = sums.get(key, 0.0) + float(metric(logits[rows, b.first_loss_position], None)["gap"].sum())
            n_pos, n_ex = n_pos + int(sel.sum()), n_ex + b.input_ids.shape[0]
    model.reset_masks()
    assert got["n_positions"] == n_pos and got["n_examples"] == n_ex
    for key, total in sums.items():
        want = total / (n_ex if "/" in key else n_pos)
        assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    assert got["kl"] > 1e-4  # the circuit differs from the full model: the comparison means something


def test_circuit_evaluator_makes_the_full_models_pass_once(tmp_path, monkeypatch):
    model, batches = _setup(tmp_path)
    calls = []
    monkeypatch.setattr(cache_module, "reference_and_corrupted",
                        lambda *a, **k: calls.append(1) or reference_and_corrupted(*a, **k))
    circuits = [torch.arange(len(model.edge_names)) % k != 0 for k in (2, 3, 5)]

    cached = CircuitEvaluator(model, batches)
    points = [cached.point(kept) for kept in circuits]
    assert len(calls) == len(batches)  # the empty circuit's evaluation made them; the three circuits read them

    monkeypatch.setattr(curve_module, "fits", lambda *a: False)  # no room: a pass per circuit, as before
    calls.clear()
    fresh = CircuitEvaluator(model, batches)
    assert [fresh.point(kept) for kept in circuits] == points  # the same figures, bit for bit
    assert len(calls) == 4 * len(batches)
