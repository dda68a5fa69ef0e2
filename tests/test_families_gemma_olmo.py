"""Gemma, Gemma-2, Gemma-3 (text) and OLMo-2 against transformers' own forward, never against our code.

The test models (``conftest.GEMMA_OLMO_BUILDERS``) turn on what these families add: Gemma-2's
attention and final-logit soft-caps and ``query_pre_attn_scalar``, sliding windows shorter than
the test sequences, Gemma-3's q/k norms and its local rotary base, OLMo-2's whole-projection q/k
norms, and the post-norms of Gemma-2/3 and OLMo-2. HF's reference runs its default attention:
eager for Gemma-2 (HF's Gemma-2 does not support SDPA, which has no soft-cap), SDPA for the rest.
"""


import pytest
import torch

from conftest import build, token_batch
from edgeprune import EdgeModel
from edgeprune.graph import Graph, GraphSpec

FP32_TOL = 1e-5
KINDS = ["gemma", "gemma2", "gemma3_text", "olmo2"]


def test_gemma2_reference_is_hf_eager_attention():
    assert build("gemma2").config._attn_implementation == "eager"


@pytest.mark.parametrize("kind,without", [
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 16}),
    ("gemma2", {"sliding_window": 64}),
    ("gemma3_text", {"sliding_window": 64}),
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
])
def test_test_models_exercise_their_feature(kind, without):
    """Each feature under test changes HF's own logits at the test length, so matching HF checks it."""
    ids = token_batch(2, 12, seed=1)
    with torch.no_grad():
        assert (build(kind)(ids).logits - build(kind, **without)(ids).logits).abs().max() > 1e-3


# ---------------------------------------------------------------- one edge == a hook patch on HF
def _post_scale(norm, x):
    """What a post-norm multiplies its input x by: w_eff / rms(x), in fp32 (HF's Gemma / OLMo-2 RMSNorm)."""
    w = norm.weight.float()
    w_eff = w if type(norm).__name__.startswith("Olmo2") else 1.0 + w
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    x = x.float()
    return w_eff * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _capture_writers(hf, ids):
    """Per-writer states (B, T, D) of the HF model, from hooks on its modules.

    Heads: o_h, head h's slice of ``o_proj``'s input times its columns of the weight. With a
    post-attention norm a head's state is its share of the normed output, o_h * w_eff / rms(S),
    with S the norm's actual input in HF (the sum of the layer's heads). MLPs: what the layer adds
    to the residual stream (after ``post_feedforward_layernorm`` where there is one).
    """
    post = hf.config.model_type != "gemma"
    states, handles, heads = {}, [], {}
    n_heads = hf.config.num_attention_heads
    layers = hf.model.layers
    handles.append(hf.model.embed_tokens.register_forward_hook(lambda m, i, o: states.__setitem__("tok_embeds", o)))
    for l, blk in enumerate(layers):
        def pre(m, args, l=l):
            x = args[0]  # (B, T, H * dh)
            dh = x.shape[-1] // n_heads
            w = m.weight.t()  # (H * dh, D)
            heads[l] = [x[..., h * dh:(h + 1) * dh] @ w[h * dh:(h + 1) * dh] for h in range(n_heads)]
        handles.append(blk.self_attn.o_proj.register_forward_pre_hook(pre))
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

    A Q/K/V reader's input is the residual stream entering the layer; the reader's own slice of its
    projection's output is recomputed from that input + delta (through ``input_layernorm`` where the
    family has one) and everything after the projection is HF's (OLMo-2's q/k norm then acts over the
    patched projection, Gemma-3's per head). An MLP reader's input is the residual stream entering the
    MLP's pre-norm (Gemma: ``post_attention_layernorm``, Gemma-2/3: ``pre_feedforward_layernorm``), or
    the MLP itself (OLMo-2); the residual stream that the layer adds to stays clean.
    """
    mt = hf.config.model_type
    dh = hf.config.head_dim
    handles = []
    if reader.startswith("m"):
        blk = hf.model.layers[int(reader[1:])]
        target = {"gemma": blk.post_attention_layernorm, "olmo2": blk.mlp}.get(mt, getattr(blk, "pre_feedforward_layernorm", None))
        handles.append(target.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    else:
        layer, unit, port = reader.split(".")
        blk = hf.model.layers[int(layer[1:])]
        proj = getattr(blk.self_attn, f"{port}_proj")
        cols = slice(int(unit[1:]) * dh, (int(unit[1:]) + 1) * dh)
        norm = None if mt == "olmo2" else blk.input_layernorm

        def fwd(m, a, out):
            patched = proj.forward(a[0] + delta if norm is None else norm.forward(seen["resid"] + delta))
            out = out.clone()
            out[..., cols] = patched[..., cols]
            return out
        seen = {}
        if norm is not None:
            handles.append(norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid", a[0])))
        handles.append(proj.register_forward_hook(fwd))
    with torch.no_grad():
        logits = hf(ids).logits
    for h in handles:
        h.remove()
    return logits


PATCH_CASES = [(kind, "a0.h1", "a1.g0.k") for kind in KINDS]  # head -> a later head's key (GQA group)
PATCH_CASES += [(kind, "a1.h2", "m1") for kind in KINDS]  # head -> the MLP of its layer
PATCH_CASES += [("olmo2", "m0", "a1.h3.q"), ("gemma2", "tok_embeds", "a1.h0.q")]  # through q_norm / the softcap


@pytest.mark.parametrize("kind,writer,reader", PATCH_CASES)
def test_one_ablated_edge_equals_hook_patch_on_hf(kind, writer, reader):
    """Ablating one edge (writer w, reader r) gives r the input clean residual - s_w + s~_w, where a
    head's state s_w under a post-norm is its share of the normed output (``_capture_writers``) and
    s~_w the same on the corrupted input; no other reader sees a change. The HF reference patches
    just that reader's input with hooks; the layer's post-norm then scales from whatever its heads
    output, as in the edge-masked forward."""
    hf = build(kind)
    ids, corrupted = token_batch(2, 9, seed=11), token_batch(2, 9, seed=12)
    delta = _capture_writers(hf, corrupted)[writer] - _capture_writers(hf, ids)[writer]
    expected = _patched_logits(hf, ids, reader, delta)

    model = EdgeModel.from_hf(hf)
    model.set_edges([e for e in model.graph.edges if e != (writer, reader)])
    with torch.no_grad():
        out = model(ids, corrupted_input_ids=corrupted).logits
        full = hf(ids).logits
    assert (out - expected).abs().max().item() <= FP32_TOL
    assert (full - expected).abs().max().item() > 1e-3  # the patch really changed something


# ---------------------------------------------------------------- graph, refusals, end to end
def test_gemma2_2b_and_olmo2_7b_graph_counts():
    # Gemma-2-2B: 26 layers, 8 query / 4 KV heads; OLMo-2-7B: 32 layers, 32 heads (no GQA)
    gemma = Graph(GraphSpec(n_layers=26, n_heads=8, n_kv_heads=4, pos_embeds=False))
    olmo = Graph(GraphSpec(n_layers=32, n_heads=32, pos_embeds=False))
    assert (gemma.num_writers, gemma.num_readers, gemma.num_edges) == (235, 443, 50_610)
    assert (olmo.num_writers, olmo.num_readers, olmo.num_edges) == (1057, 3105, 1_592_881)


@pytest.mark.parametrize("name,params", [("google/gemma-2-2b", 2_614_341_888), ("google/gemma-2-9b", 9_241_705_984),
                                         ("allenai/OLMo-2-1124-7B", 7_298_617_344)])
def test_known_configs_have_their_published_size(name, params):
    from transformers import AutoModelForCausalLM

    from edgeprune.estimate import hf_config
    config, source = hf_config(name)
    assert "known" in source
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in hf.parameters()) == params  # tied embeddings counted once
    EdgeModel.from_hf(hf)  # a supported family


@pytest.mark.parametrize("kind", ["gemma2", "olmo2"])
def test_output_bias_inside_a_post_norm_is_refused(kind):
    with pytest.raises(ValueError, match="attention_bias"):
        EdgeModel.from_hf(build(kind, attention_bias=True))
