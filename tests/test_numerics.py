"""The edge-masked forward against transformers' own forward (never against our code)."""

import copy

import pytest
import torch

from edgeprune import EdgeModel
from conftest import build, token_batch

FP32_TOL = 1e-5


def _masks(batch, seq, side):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if side == "right":
        mask[0, -4:] = 0
        mask[1, -1:] = 0
    elif side == "left":
        mask[0, :4] = 0
        mask[1, :1] = 0
    return mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "llama_obias"])
def test_full_mask_matches_hf_logits_fp32(kind, padding):
    hf = build("llama", attention_bias=True) if kind == "llama_obias" else build(kind)
    model = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(3, 12, seed=1), token_batch(3, 12, seed=2)
    mask = None if padding == "none" else _masks(3, 12, padding)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = model(ids, mask, corrupted, mask).logits
    valid = torch.ones(3, 12, dtype=torch.bool) if mask is None else mask.bool()
    assert (out - ref)[valid].abs().max().item() <= FP32_TOL
    assert ref[valid].abs().max() > 1.0  # the comparison is not between two near-zero tensors


def test_all_masks_zero_is_hf_on_corrupted_input(family_kind):
    hf = build(family_kind)
    model = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(2, 10, seed=3), token_batch(2, 10, seed=4)
    model.edge_masks.set_values(torch.zeros(model.graph.num_edges))
    with torch.no_grad():
        out = model(ids, corrupted_input_ids=corrupted).logits
        ref = hf(corrupted).logits
        clean = hf(ids).logits
    assert (out - ref).abs().max().item() <= FP32_TOL
    assert (clean - ref).abs().max().item() > 0.1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_full_mask_is_as_close_to_hf_fp32_as_hf_bf16(kind):
    hf32 = build(kind, n_layer=4) if kind == "gpt2" else build(kind, num_hidden_layers=4)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    model = EdgeModel.from_hf(hf16)
    ids, corrupted = token_batch(4, 32, seed=5), token_batch(4, 32, seed=6)
    with torch.no_grad():
        ref = hf32(ids).logits
        hf_err = (hf16(ids).logits.float() - ref).abs()
        our_err = (model(ids, corrupted_input_ids=corrupted).logits.float() - ref).abs()
    assert our_err.mean() <= hf_err.mean()
    assert our_err.max() <= 1.1 * hf_err.max()


def test_reset_masks_restores_the_full_model():
    hf = build("gpt2")
    model = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(2, 8, seed=1), token_batch(2, 8, seed=2)
    model.set_edges([("tok_embeds", "resid_post")])
    with torch.no_grad():
        pruned = model(ids, corrupted_input_ids=corrupted).logits
        model.reset_masks()
        full = model(ids, corrupted_input_ids=corrupted).logits
        ref = hf(ids).logits
    assert (pruned - ref).abs().max() > 0.1
    assert (full - ref).abs().max() <= FP32_TOL
