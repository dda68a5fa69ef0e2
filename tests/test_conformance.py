"""One conformance test for every model family, against transformers' own forward (never against
our code): numerics with every mask 1 (fp32, padded either side), every mask 0 under interchange
ablation, bf16 against HF's own bf16 over seeds, the model fingerprint's stability, the GQA
grouping of K/V readers, and a short pruning run. Family-specific checks (one ablated edge equals a
hook patch on the HF modules, the features each test model turns on, published graph counts) stay
in test_patching.py, test_families.py and test_families_gemma_olmo.py."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from conftest import build, prune_tiny, token_batch
from edgeprune import EdgeModel

FP32_TOL = 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

# test name -> (conftest builder kind, config overrides); every family, and the variants that change its forward
FAMILIES = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {}),  # GQA: 4 query / 2 KV heads
    "llama_obias": ("llama", {"attention_bias": True}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", {}),  # q/k norms, a sliding-window layer
    "mistral_window": ("mistral", {}),
    "pythia": ("gpt_neox", {}),  # parallel residual, partial rotary
    "neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "phi3": ("phi3", {}),  # fused projections, sliding window
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),  # soft-caps, post-norms, alternating windows
    "gemma3_text": ("gemma3_text", {}),
    "olmo2": ("olmo2", {}),  # whole-projection q/k norms, post-norms
}


def make(name: str, seed: int = 0, **kw):
    kind, overrides = FAMILIES[name]
    return build(kind, seed=seed, **{**overrides, **kw})


def _mask(batch, seq, side):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if side == "right":
        mask[0, -4:] = 0
        mask[1, -1:] = 0
    elif side == "left":
        mask[0, :4] = 0
        mask[1, :1] = 0
    return mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_mask_matches_hf_logits_fp32(name, padding):
    hf = make(name)
    model = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(3, 12, seed=1), token_batch(3, 12, seed=2)  # 12 > every sliding window
    mask = None if padding == "none" else _mask(3, 12, padding)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = model(ids, mask, corrupted, mask).logits
    valid = torch.ones(3, 12, dtype=torch.bool) if mask is None else mask.bool()
    assert (out - ref)[valid].abs().max().item() <= FP32_TOL
    assert ref[valid].abs().max() > 1.0  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("name", list(FAMILIES))
def test_all_masks_zero_is_hf_on_corrupted_input(name):
    hf = make(name)
    model = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(2, 10, seed=3), token_batch(2, 10, seed=4)
    model.edge_masks.set_values(torch.zeros(model.graph.num_edges))
    with torch.no_grad():
        out = model(ids, corrupted_input_ids=corrupted).logits
        ref = hf(corrupted).logits
        clean = hf(ids).logits
    assert (out - ref).abs().max().item() <= FP32_TOL
    assert (clean - ref).abs().max().item() > 0.1


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_over_seeds_mean_and_median_worst_logit_within_hfs_own(name):
    """bf16 against HF fp32, over 5 seeds (weights and inputs): the mean |dlogit| no larger than HF
    bf16's, and the median over seeds of the worst logit's ratio (ours / HF) within 1.1. The worst
    logit of one seed is chaotic for HF too: its two attention implementations differ by up to 1.37x
    in it (bench/bf16_spread.py, docs/families.md), so one seed is not the criterion."""
    ours_mean = hf_mean = 0.0
    ratios = []
    for seed in range(5):
        hf32 = make(name, seed=seed)
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        ids, corrupted = token_batch(2, 20, seed=100 + seed), token_batch(2, 20, seed=200 + seed)
        with torch.no_grad():
            ref = hf32(ids).logits
            hf_err = (hf16(ids).logits.float() - ref).abs()
            our_err = (EdgeModel.from_hf(hf16)(ids, corrupted_input_ids=corrupted).logits.float() - ref).abs()
        ours_mean, hf_mean = ours_mean + our_err.mean().item(), hf_mean + hf_err.mean().item()
        ratios.append(our_err.max().item() / hf_err.max().item())
    assert ours_mean <= hf_mean, (ours_mean / hf_mean, ratios)
    assert statistics.median(ratios) <= 1.1, ratios


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fingerprint_is_the_model_not_its_dtype_or_path(name, tmp_path):
    hf = make(name)
    fp = EdgeModel.from_hf(hf).fingerprint()
    assert EdgeModel.from_hf(copy.deepcopy(hf).to(torch.bfloat16)).fingerprint() == fp  # bf16-rounded samples
    hf.save_pretrained(tmp_path / "saved")
    assert EdgeModel.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32).fingerprint() == fp
    assert EdgeModel.from_hf(make(name, seed=1)).fingerprint()["weights"] != fp["weights"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kv_readers_follow_the_real_kv_heads(name):
    hf = make(name)
    graph = EdgeModel.from_hf(hf).graph
    cfg = hf.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    keys = [r for r in graph.readers if r.startswith("a0.") and r.endswith(".k")]
    assert len(keys) == kv and graph.spec.kv_heads == kv
    assert all((".g" in r) == (kv < heads) for r in keys)  # grouped-query attention: one K reader per KV head


# qwen2 shares llama.py with llama (pruned here); saved beside the stories260K tokenizer, its model_type makes
# AutoTokenizer pick Qwen2's tokenizer class, which splits the task's lines differently
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "qwen2"])
def test_prune_runs_end_to_end(name, tmp_path):
    result = prune_tiny(make(name, vocab_size=512), tmp_path, name)  # the stories260K vocabulary
    assert result.finished and result.step == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert (tmp_path / "run" / "masks.safetensors").is_file()
