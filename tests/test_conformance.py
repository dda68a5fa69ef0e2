"""One conformance test for every model family, against transformers' own forward (never against
our code): numerics with every mask 1 (fp32, padded either side), every mask 0 under interchange
ablation, bf16 against HF's own bf16 over seeds, one ablated edge equal to a hook patch on the HF
modules (embedding, head and MLP writers; Q, K, V, MLP and read-out readers), the model
fingerprint's stability, the GQA grouping of K/V readers, and a short pruning run. Family-specific
checks (the features each test model turns on, published graph counts, refusals) stay in
test_families.py and test_families_gemma_olmo.py."""

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


# ---------------------------------------------------------------- one edge == a hook patch on HF
POST_NORM = ("gemma2", "gemma3_text", "olmo2")  # a norm on the attention and MLP outputs, inside the residual


def _hf_parts(hf):
    """Where writers and readers live in the HF model: (token embedding, layers, final
    norm, attention input norm(block) or None, MLP reader's module(block), output projection(block)
    with its (H * dh, D) weight, qkv(block, port, index) -> (projection, its output columns))."""
    cfg = hf.config
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if cfg.model_type == "gpt2":
        body, D = hf.transformer, cfg.hidden_size

        def qkv(blk, port, i):  # [Q | K | V], D columns each
            start = {"q": 0, "k": D, "v": 2 * D}[port] + i * dh
            return blk.attn.c_attn, slice(start, start + dh)
        return (body.wte, body.h, body.ln_f, lambda b: b.ln_1,
                lambda b: b.ln_2, lambda b: (b.attn.c_proj, b.attn.c_proj.weight), qkv)
    if cfg.model_type == "gpt_neox":
        body, port_of = hf.gpt_neox, {"q": 0, "k": 1, "v": 2}

        def qkv(blk, port, i):  # per head [q k v] blocks of dh
            start = (3 * i + port_of[port]) * dh
            return blk.attention.query_key_value, slice(start, start + dh)
        return (body.embed_in, body.layers, body.final_layer_norm, lambda b: b.input_layernorm,
                lambda b: b.post_attention_layernorm, lambda b: (b.attention.dense, b.attention.dense.weight.t()), qkv)
    body = hf.model
    if cfg.model_type == "phi3":
        nq, nkv = cfg.num_attention_heads * dh, cfg.num_key_value_heads * dh

        def qkv(blk, port, i):  # [Q heads | K heads | V heads]
            start = {"q": 0, "k": nq, "v": nq + nkv}[port] + i * dh
            return blk.self_attn.qkv_proj, slice(start, start + dh)
    else:
        def qkv(blk, port, i):
            return getattr(blk.self_attn, f"{port}_proj"), slice(i * dh, (i + 1) * dh)
    # the MLP reader's input enters its pre-norm (Gemma-2/3: pre_feedforward_layernorm), or the MLP itself (OLMo-2)
    mlp_in = {"olmo2": lambda b: b.mlp, "gemma2": lambda b: b.pre_feedforward_layernorm,
              "gemma3_text": lambda b: b.pre_feedforward_layernorm}.get(cfg.model_type, lambda b: b.post_attention_layernorm)
    attn_in = (lambda b: None) if cfg.model_type == "olmo2" else (lambda b: b.input_layernorm)
    return (body.embed_tokens, body.layers, body.norm, attn_in, mlp_in,
            lambda b: (b.self_attn.o_proj, b.self_attn.o_proj.weight.t()), qkv)


def _post_scale(norm, x):
    """What a post-norm multiplies its input x by: w_eff / rms(x), in fp32 (HF's Gemma / OLMo-2 RMSNorm)."""
    w = norm.weight.float()
    w_eff = w if type(norm).__name__.startswith("Olmo2") else 1.0 + w
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    x = x.float()
    return w_eff * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _capture_writers(hf, ids):
    """Per-writer states (B, T, D) of the HF model, from hooks on its modules.

    Heads: o_h, head h's slice of the output projection's input times its rows of the weight. With
    a post-attention norm a head's state is its share of the normed output, o_h * w_eff / rms(S),
    with S the norm's actual input in HF (the sum of the layer's heads). MLPs: what the layer adds
    to the residual stream (after ``post_feedforward_layernorm`` where there is one).
    """
    embed, layers, _, _, _, out_proj, _ = _hf_parts(hf)
    post = hf.config.model_type in POST_NORM
    n_heads = hf.config.num_attention_heads
    states, handles, heads = {}, [], {}
    handles.append(embed.register_forward_hook(lambda m, i, o: states.__setitem__("tok_embeds", o)))
    for l, blk in enumerate(layers):
        proj, weight = out_proj(blk)

        def pre(m, args, l=l, weight=weight):
            x = args[0]  # (B, T, H * dh): the heads' outputs before the projection
            dh = x.shape[-1] // n_heads
            heads[l] = [x[..., h * dh:(h + 1) * dh] @ weight[h * dh:(h + 1) * dh] for h in range(n_heads)]
        handles.append(proj.register_forward_pre_hook(pre))
        if post:
            def normed(m, args, l=l):
                scale = _post_scale(m, args[0])
                for h, o in enumerate(heads[l]):
                    states[f"a{l}.h{h}"] = o.float() * scale
            handles.append(blk.post_attention_layernorm.register_forward_pre_hook(normed))
            handles.append(blk.post_feedforward_layernorm.register_forward_hook(
                lambda m, i, o, l=l: states.__setitem__(f"m{l}", o)))
        else:
            handles.append(blk.mlp.register_forward_hook(lambda m, i, o, l=l: states.__setitem__(f"m{l}", o)))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    if not post:
        states.update({f"a{l}.h{h}": o for l, os in heads.items() for h, o in enumerate(os)})
    return states


def _patched_logits(hf, ids, reader, delta):
    """HF logits with ``delta`` added to the input of one reader only.

    A Q/K/V reader's input is the residual stream entering the layer; the reader's own columns of its
    projection's output are recomputed from that input + delta (through the attention input norm
    where the family has one) and everything after the projection is HF's (q/k norms included). An
    MLP reader's input is what enters the MLP's pre-norm (or the MLP, OLMo-2); the read-out's what
    enters the final norm. The residual stream itself stays clean.
    """
    _, layers, final, attn_in, mlp_in, _, qkv = _hf_parts(hf)
    handles = []
    if reader == "resid_post":
        handles.append(final.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    elif reader.startswith("m"):
        handles.append(mlp_in(layers[int(reader[1:])]).register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    else:
        layer, unit, port = reader.split(".")
        blk = layers[int(layer[1:])]
        norm, seen = attn_in(blk), {}
        proj, cols = qkv(blk, port, int(unit[1:]))
        if norm is not None:
            handles.append(norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid", a[0])))

        def fwd(m, a, out):
            patched = proj.forward(a[0] + delta if norm is None else norm.forward(seen["resid"] + delta))
            out = out.clone()
            out[..., cols] = patched[..., cols]
            return out
        handles.append(proj.register_forward_hook(fwd))
    with torch.no_grad():
        logits = hf(ids).logits
    for h in handles:
        h.remove()
    return logits


def _patch_cases(graph) -> list[tuple[str, str]]:
    """Edges that reach every kind of reader from every kind of writer: a head -> a later key (its
    KV group under GQA), a head -> an MLP (its own layer's, or under a parallel residual the next
    layer's), the embedding -> a query, an MLP -> a later value, the last head -> the read-out.
    (GPT-2's position embeddings are the same on both inputs: interchange never changes them.)"""
    key, value = (next(r for r in graph.readers if r.startswith("a1.") and r.endswith(port)) for port in (".k", ".v"))
    same_layer = "a0.h2" if graph.spec.parallel_residual else "a1.h2"
    return [("a0.h1", key), (same_layer, "m1"), ("tok_embeds", "a1.h0.q"), ("m0", value), ("a1.h3", "resid_post")]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_ablated_edge_equals_hook_patch_on_hf(name):
    """Ablating one edge (writer w, reader r) gives r the input clean residual - s_w + s~_w (s~_w: w's
    state on the corrupted input); no other reader sees a change. The HF reference patches just that
    reader's input with hooks; under a post-norm the layer's norm then scales whatever its heads
    output, as in the edge-masked forward."""
    hf = make(name)
    ids, corrupted = token_batch(2, 9, seed=11), token_batch(2, 9, seed=12)
    clean, dirty = _capture_writers(hf, ids), _capture_writers(hf, corrupted)
    model = EdgeModel.from_hf(hf)
    with torch.no_grad():
        full = hf(ids).logits
    for writer, reader in _patch_cases(model.graph):
        expected = _patched_logits(hf, ids, reader, dirty[writer] - clean[writer])
        model.set_edges([e for e in model.graph.edges if e != (writer, reader)])
        with torch.no_grad():
            out = model(ids, corrupted_input_ids=corrupted).logits
        assert (out - expected).abs().max().item() <= FP32_TOL, (writer, reader)
        assert (full - expected).abs().max().item() > 1e-3, (writer, reader)  # the patch really changed something


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
