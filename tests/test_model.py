"""EdgeModel: loading, masks, ablation modes, gradients, memory shape rules and bad input."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

from edgeprune import EdgeModel
from conftest import STORIES, build, require_shared, token_batch


def test_from_pretrained_local_directory_matches_hf(tmp_path):
    hf = build("gpt2")
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    model = EdgeModel.from_pretrained(str(tmp_path / "tiny-gpt2"), dtype=torch.float32)
    ids = token_batch(2, 8)
    with torch.no_grad():
        assert (model.full_forward(ids).logits - hf(ids).logits).abs().max() <= 1e-5
    assert model.model_id.endswith("tiny-gpt2")


def test_stories260k_loads_and_matches_hf_at_full_mask():
    """A real trained model has logits up to ~17, so 1e-5 absolute is below fp32's own noise here:
    the bar is HF's own fp32 error against an fp64 forward of the same weights."""
    path = require_shared(STORIES)
    model = EdgeModel.from_pretrained(str(path))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hf64 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    assert model.graph.describe() == "46 writers, 86 readers, 1701 edges"
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # BOS
    with torch.no_grad():
        exact = hf64(ids).logits
        ref = hf(ids).logits
        ours = model(ids, corrupted_input_ids=ids.flip(0)).logits
    noise_floor = (ref.double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 1.1 * noise_floor
    assert (ours - ref).abs().max() <= 2 * noise_floor


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_no_buffer_or_allocation_grows_with_n_positions_squared(kind):
    n_pos = 8192
    hf = build(kind, n_positions=n_pos) if kind == "gpt2" else build(kind, max_position_embeddings=n_pos)
    model = EdgeModel.from_hf(hf)
    for name, buf in model.named_buffers():
        assert buf.numel() < n_pos * n_pos // 64, name
    ids = token_batch(2, 16)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with _MaxNumel() as probe:
        model(ids, mask, token_batch(2, 16, seed=9), mask).logits.sum().backward()
    # the largest tensor is a (readers, B, T, D)-sized mix or the logits, far below n_pos^2
    assert probe.largest < n_pos * n_pos // 64


def test_gradients_reach_every_mask_parameter():
    hf = build("gpt2")
    model = EdgeModel.from_hf(hf, ablation="zero", node_masks=True).eval()
    with torch.no_grad():  # mid-range masks: the clamp of a hard-concrete at 1 would block gradients
        model.edge_masks.log_alpha.fill_(0.0)
        model.node_masks.log_alpha.fill_(0.0)
    out = model(token_batch(2, 8)).logits
    (out.float() ** 2).mean().backward()
    assert (model.edge_masks.log_alpha.grad != 0).all()
    assert (model.node_masks.log_alpha.grad != 0).all()
    assert all(p.grad is None for p in hf.parameters())  # the base model is frozen


def test_zero_ablation_keeps_attention_output_biases_as_layer_constants():
    hf = build("gpt2")
    model = EdgeModel.from_hf(hf, ablation="zero")
    model.set_edges([])
    body = hf.transformer
    const = sum(blk.attn.c_proj.bias for blk in body.h)
    with torch.no_grad():
        expected = hf.lm_head(body.ln_f(const))
        out = model(token_batch(2, 5)).logits
    assert (out - expected).abs().max() <= 1e-5


def test_mean_ablation_with_all_masks_zero_ignores_the_input():
    hf = build("llama")
    model = EdgeModel.from_hf(hf, ablation="mean")
    ids = token_batch(4, 8)
    model.set_mean_states(model.compute_mean_states([(ids, None)]))
    model.set_edges([])
    with torch.no_grad():
        out = model(token_batch(2, 8, seed=7)).logits
    assert (out - out[0, 0]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"mean states must have shape \(11, 64\)"):
        model.set_mean_states(torch.zeros(3, 64))


def test_set_edges_keeps_only_the_given_edges():
    model = EdgeModel.from_hf(build("gpt2"))
    keep = [("tok_embeds", "resid_post"), ("a0.h1", "a1.h2.v")]
    model.set_edges(keep)
    values = model.edge_masks().detach()
    assert values.sum() == 2
    assert values[model.graph.edge_index("a0.h1", "a1.h2.v")] == 1
    with pytest.raises(ValueError, match="edge 0: unknown reader 'a1.h9.q'"):
        model.set_edges([("tok_embeds", "a1.h9.q")])


def test_unsupported_architecture_is_named():
    bert = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture: model_type 'bert'; supported: gpt2"):
        EdgeModel.from_hf(bert)


def test_unsupported_architecture_is_rejected_before_loading_weights(tmp_path):
    BertConfig(num_hidden_layers=1).save_pretrained(tmp_path)  # config only: no weights to load
    with pytest.raises(ValueError, match="model_type 'bert'"):
        EdgeModel.from_pretrained(str(tmp_path))


def test_mismatched_corrupted_shape_is_rejected():
    model = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match=r"corrupted_input_ids must have the shape of input_ids \(2, 8\)"):
        model(token_batch(2, 8), corrupted_input_ids=token_batch(2, 7))
    with pytest.raises(ValueError, match="interchange ablation needs corrupted_input_ids"):
        model(token_batch(2, 8))


def test_mask_tensor_of_wrong_size_is_rejected():
    model = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match=f"edge mask values must have shape \\({model.graph.num_edges},\\)"):
        model(token_batch(1, 4), corrupted_input_ids=token_batch(1, 4), edge_values=torch.ones(7))


def test_model_dtype_the_mix_cannot_handle_is_rejected():
    hf = build("gpt2").to(torch.float64)
    with pytest.raises(ValueError, match="model dtype torch.float64 is not supported"):
        EdgeModel.from_hf(hf)
