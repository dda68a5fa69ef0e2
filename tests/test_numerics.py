"""The edge-masked forward against transformers' own forward (never against our code)."""


import torch

from edgeprune import EdgeModel
from conftest import build, token_batch

FP32_TOL = 1e-5


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
