"""Activation checkpointing per decoder layer changes memory, never gradients."""

import pytest
import torch

from edgeprune import EdgeModel
from conftest import build, token_batch


def _grads(model: EdgeModel, ids, corrupted, mask):
    model.edge_masks.log_alpha.grad = None
    if model.node_masks is not None:
        model.node_masks.log_alpha.grad = None
    model.train()
    model.edge_masks.generator = torch.Generator().manual_seed(3)
    if model.node_masks is not None:
        model.node_masks.generator = torch.Generator().manual_seed(4)
    logits = model(ids, mask, corrupted, mask).logits
    (logits.float()[mask.bool()].log_softmax(-1)[:, :7] ** 2).mean().backward()
    grads = [model.edge_masks.log_alpha.grad.clone()]
    if model.node_masks is not None:
        grads.append(model.node_masks.log_alpha.grad.clone())
    return logits.detach(), grads


@pytest.mark.parametrize("kind,group", [("gpt2", None), ("llama", None), ("qwen2", None), ("gpt2", 2), ("llama", 2)])
def test_activation_checkpointing_gives_the_same_gradients_fp32(kind, group, monkeypatch):
    from edgeprune import model as edge_model
    monkeypatch.setattr(edge_model, "GROUP_LAYERS", group)  # None: the model's own (alone here); 2: pairs
    model = EdgeModel.from_hf(build(kind), node_masks=True)
    with torch.no_grad():  # mid-range masks, so that gradients reach every mask
        model.edge_masks.log_alpha.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
        model.node_masks.log_alpha.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
    ids, corrupted = token_batch(3, 10, seed=1), token_batch(3, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    plain_logits, plain = _grads(model, ids, corrupted, mask)
    model.activation_checkpointing = True
    ckpt_logits, ckpt = _grads(model, ids, corrupted, mask)
    assert (plain_logits - ckpt_logits).abs().max() <= 1e-6
    for a, b in zip(plain, ckpt):
        assert (a != 0).any()
        assert (a - b).abs().max() <= 1e-6


def test_activation_checkpointing_recomputes_layers_in_the_backward():
    model = EdgeModel.from_hf(build("gpt2"))
    model.activation_checkpointing = True
    calls = []
    mlp = model.hf.transformer.h[0].mlp
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    with torch.no_grad():
        model.edge_masks.log_alpha.fill_(0.0)
    model(token_batch(2, 6), corrupted_input_ids=token_batch(2, 6, seed=5)).logits.sum().backward()
    handle.remove()
    # corrupted pass (no grad), masked forward, and its recomputation during the backward
    assert len(calls) == 3
