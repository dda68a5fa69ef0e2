"""EAP-IG along the edge masks at one plain forward and backward per step (``baselines/ig_masks.py``):
the uniform mix against the edge-masked model's forward, and the scores against the edge-masked
forward's dm/dz (``path_gradient_scores``) across families, ablations, spans, Tracr and real width."""

from __future__ import annotations

import dataclasses
import math
import pytest
import torch

from conftest import build
from edgeprune import EdgeModel
from edgeprune.baselines import eap_ig_scores, ig_masks
from edgeprune.baselines.attribution import path_gradient_scores
from edgeprune.baselines.ig_masks import uniform_path_scores
from edgeprune.eval import reference_and_corrupted
from edgeprune.mixing import UniformMix, ablated_stream
from test_baselines import random_batch
from test_ig_inputs import (close, real_width_gqa_model_and_batches, spans_model_and_batches,
                            tracr_model_and_batches, two_batches)

ALPHAS = [0.25, 0.75]


def with_ablation(kind: str, ablation: str, seed: int) -> EdgeModel:
    model = EdgeModel.from_hf(build(kind, seed=seed), ablation=ablation)
    if ablation == "mean":
        model.set_mean_states(model.compute_mean_states((b.input_ids, b.attention_mask) for b in two_batches()))
    return model


@pytest.mark.parametrize("kind,ablation", [("gpt2", "interchange"), ("gpt2", "zero"), ("llama", "interchange"),
                                           ("llama", "mean"), ("gpt_neox", "interchange"), ("qwen2", "zero")])
def test_uniform_mix_is_the_masked_model_at_one_mask_value(kind, ablation):
    """A plain pass reading (1 - alpha) R~ + alpha R at every reader gives the edge-masked model's logits
    with every edge mask at alpha; at alpha = 0 those of the model with every edge ablated. GPT-2's
    attention bias is a layer constant (it matters under zero ablation); GPT-NeoX's MLP reads the
    stream before its layer's heads."""
    model = with_ablation(kind, ablation, seed=11)
    batch = random_batch(seed=12)
    _, corrupted = reference_and_corrupted(model, batch)
    ablated = corrupted if ablation == "interchange" else model.fixed_ablated_states()
    stream = ablated_stream(model.graph, ablated, model.family.attn_constant)
    kwargs = {"corrupted_states": corrupted} if ablation == "interchange" else {}
    with torch.no_grad():
        for alpha in (0.0, 0.4, 1.0):
            plain = model.full_forward(batch.input_ids, batch.attention_mask, path=UniformMix(alpha, stream)).logits
            masked = model(batch.input_ids, batch.attention_mask, edge_values=torch.full((model.graph.num_edges,), alpha),
                           **kwargs).logits
            assert float((plain - masked).abs().max()) <= 1e-5 * float(masked.abs().max()), (alpha, kind)


@pytest.mark.parametrize("kind,ablation", [("gpt2", "interchange"), ("gpt2", "zero"), ("llama", "interchange"),
                                           ("llama", "mean"), ("gpt_neox", "interchange"), ("qwen2", "zero"),
                                           ("gemma2", "zero"), ("olmo2", "interchange"), ("phi3", "interchange")])
def test_masks_variant_on_the_plain_model_equals_the_edge_masked_forward(kind, ablation):
    """Every family's own reader path (Gemma-2's post-norms and soft-caps, OLMo-2's norms after the
    projections, Phi-3's fused projections) reads the uniform mix as the masked model mixes."""
    model = with_ablation(kind, ablation, seed=1)
    batches = two_batches()
    close(uniform_path_scores(model, batches, ALPHAS), path_gradient_scores(model, batches, ALPHAS))


def test_masks_variant_on_the_plain_model_with_position_aware_masks():
    model, batches = spans_model_and_batches()
    fast = uniform_path_scores(model, batches, ALPHAS)
    assert fast.shape == (3 * model.graph.num_edges,)
    close(fast, path_gradient_scores(model, batches, ALPHAS))


def test_masks_variant_on_the_plain_model_on_tracr():
    model, batches = tracr_model_and_batches()  # zero ablation
    close(uniform_path_scores(model, batches, ALPHAS), path_gradient_scores(model, batches, ALPHAS))


def test_masks_variant_on_the_plain_model_at_real_vocabulary_gqa():
    """Vocabulary 32k, d 512, 8 query / 2 KV heads, 2 layers."""
    model, batches = real_width_gqa_model_and_batches()
    fast = uniform_path_scores(model, batches, ALPHAS)
    assert math.isfinite(float(fast.sum()))
    close(fast, path_gradient_scores(model, batches, ALPHAS), rel=2e-5)


def test_eap_ig_masks_variant_runs_on_the_plain_model_and_the_switch_restores_the_reference(monkeypatch):
    """``eap_ig_scores(variant="masks")`` takes the plain path; ``UNIFORM_PATH = False`` the edge-masked
    forward; both give the same scores, and the plain path runs no edge-masked forward."""
    model = EdgeModel.from_hf(build("llama", seed=4))
    batches = two_batches()
    masked_calls = []
    forward = EdgeModel.forward
    monkeypatch.setattr(EdgeModel, "forward", lambda self, *a, **k: masked_calls.append(1) or forward(self, *a, **k))
    fast = eap_ig_scores(model, batches, steps=2, variant="masks")
    assert masked_calls == []
    monkeypatch.setattr(ig_masks, "UNIFORM_PATH", False)
    slow = eap_ig_scores(model, batches, steps=2, variant="masks")
    assert len(masked_calls) == 2 * len(batches)
    close(fast, slow)


def test_uniform_path_refuses_an_empty_split():
    model = EdgeModel.from_hf(build("llama", seed=5))
    batch = random_batch(seed=6)
    empty = dataclasses.replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))
    with pytest.raises(ValueError, match="no loss positions"):
        uniform_path_scores(model, [empty], ALPHAS)
