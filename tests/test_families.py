"""The families of issue 12 (GPT-NeoX/Pythia, Phi-3, Qwen3, Llama-3.x rotary scaling, Mistral's
sliding window) against transformers' own forward, never against our code."""


import pytest
import torch

from conftest import build, token_batch
from edgeprune import EdgeModel
from edgeprune.graph import Graph, GraphSpec
from edgeprune.models import family_for

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

# test kind -> (conftest kind, config overrides)
KINDS = {
    "pythia": ("gpt_neox", {}),  # parallel residual
    "neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "phi3": ("phi3", {}),
    "qwen3": ("qwen3", {}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "mistral_window": ("mistral", {}),
}


def make(kind, **kw):
    base, overrides = KINDS[kind]
    return build(base, **{**overrides, **kw})


@pytest.mark.parametrize("kind,without", [
    ("llama3_rope", {"rope_scaling": None}),
    ("mistral_window", {"sliding_window": None}),
    ("qwen3", {"use_sliding_window": False}),
    ("phi3", {"sliding_window": None}),
    ("pythia", {"rotary_pct": 1.0}),
])
def test_test_models_exercise_their_feature(kind, without):
    """The feature under test (rope scaling, a window shorter than the sequence, partial rotary)
    changes HF's own logits at the test length, so matching HF above really checks it."""
    ids = token_batch(2, 12, seed=1)
    with torch.no_grad():
        assert (make(kind)(ids).logits - make(kind, **without)(ids).logits).abs().max() > 1e-3


# ---------------------------------------------------------------- one edge == a hook patch on HF
def _modules(hf):
    """Where the writers and readers live in the HF model: (embedding, layers, final norm, attention
    input norm, MLP input norm, output projection, qkv(block, port, index) -> (module, columns))."""
    cfg = hf.config
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if cfg.model_type == "gpt_neox":
        body = hf.gpt_neox
        port_of = {"q": 0, "k": 1, "v": 2}

        def qkv(blk, port, i):  # per head [q k v] blocks of dh
            start = (3 * i + port_of[port]) * dh
            return blk.attention.query_key_value, slice(start, start + dh)
        return (body.embed_in, body.layers, body.final_layer_norm, lambda b: b.input_layernorm,
                lambda b: b.post_attention_layernorm, lambda b: b.attention.dense, qkv)
    body = hf.model
    if cfg.model_type == "phi3":
        nq, nkv = cfg.num_attention_heads * dh, cfg.num_key_value_heads * dh

        def qkv(blk, port, i):  # [Q heads | K heads | V heads]
            start = {"q": 0, "k": nq, "v": nq + nkv}[port] + i * dh
            return blk.self_attn.qkv_proj, slice(start, start + dh)
    else:
        def qkv(blk, port, i):
            return getattr(blk.self_attn, f"{port}_proj"), slice(i * dh, (i + 1) * dh)
    return (body.embed_tokens, body.layers, body.norm, lambda b: b.input_layernorm,
            lambda b: b.post_attention_layernorm, lambda b: b.self_attn.o_proj, qkv)


def _capture_writers(hf, ids):
    """Per-writer contributions (B, T, D) of the HF model, captured with hooks."""
    embed, layers, _, _, _, out_proj, _ = _modules(hf)
    states, handles = {}, []
    handles.append(embed.register_forward_hook(lambda m, i, o: states.__setitem__("tok_embeds", o)))
    n_heads = hf.config.num_attention_heads
    for l, blk in enumerate(layers):
        def pre(m, args, l=l):
            x = args[0]  # (B, T, H * dh): the heads' outputs before the projection
            dh = x.shape[-1] // n_heads
            w = m.weight.t()  # (H * dh, D)
            for h in range(n_heads):
                states[f"a{l}.h{h}"] = x[..., h * dh:(h + 1) * dh] @ w[h * dh:(h + 1) * dh]
        handles.append(out_proj(blk).register_forward_pre_hook(pre))
        handles.append(blk.mlp.register_forward_hook(lambda m, i, o, l=l: states.__setitem__(f"m{l}", o)))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    return states


def _patched_logits(hf, ids, reader, delta):
    """HF logits with ``delta`` added to the input of one reader only."""
    _, layers, final, attn_norm, mlp_norm, _, qkv = _modules(hf)
    handles = []
    if reader == "resid_post":
        handles.append(final.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    elif reader.startswith("m"):
        norm = mlp_norm(layers[int(reader[1:])])
        handles.append(norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    else:
        layer, unit, port = reader.split(".")
        blk = layers[int(layer[1:])]
        norm, seen = attn_norm(blk), {}
        proj, cols = qkv(blk, port, int(unit[1:]))
        handles.append(norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid", a[0])))

        def fwd(m, a, out):
            patched = proj.forward(norm.forward(seen["resid"] + delta))
            out = out.clone()
            out[..., cols] = patched[..., cols]
            return out
        handles.append(proj.register_forward_hook(fwd))
    with torch.no_grad():
        logits = hf(ids).logits
    for h in handles:
        h.remove()
    return logits


PATCH_CASES = [
    ("pythia", "a0.h1", "a1.h3.k"),  # head -> later head's key
    ("pythia", "a0.h2", "m1"),  # head -> MLP of a later layer (parallel: none in the same layer)
    ("neox_sequential", "a1.h2", "m1"),  # head -> MLP of the same layer
    ("phi3", "a0.h1", "a1.g1.k"),  # fused qkv_proj, GQA key group
    ("phi3", "a1.h2", "m1"),
    ("qwen3", "a0.h1", "a1.g0.k"),  # through k_norm
    ("qwen3", "a1.h2", "m1"),
]


@pytest.mark.parametrize("kind,writer,reader", PATCH_CASES)
def test_one_ablated_edge_equals_hook_patch_on_hf(kind, writer, reader):
    hf = make(kind)
    ids, corrupted = token_batch(2, 9, seed=11), token_batch(2, 9, seed=12)
    delta = _capture_writers(hf, corrupted)[writer] - _capture_writers(hf, ids)[writer]
    expected = _patched_logits(hf, ids, reader, delta)

    model = EdgeModel.from_hf(hf)
    model.set_edges([e for e in model.graph.edges if e != (writer, reader)])
    with torch.no_grad():
        out = model(ids, corrupted_input_ids=corrupted).logits
        full = hf(ids).logits
    assert (out - expected).abs().max().item() <= 1e-5
    assert (full - expected).abs().max().item() > 1e-3  # the patch really changed something


# ---------------------------------------------------------------- the parallel-residual graph
def test_parallel_residual_mlp_does_not_read_its_own_layers_heads():
    model = EdgeModel.from_hf(make("pythia"))
    graph = model.graph
    assert graph.spec.parallel_residual
    with pytest.raises(KeyError, match="parallel residual"):
        graph.edge_index("a1.h2", "m1")
    graph.edge_index("a0.h2", "m1")
    graph.edge_index("m0", "m1")
    assert not EdgeModel.from_hf(make("neox_sequential")).graph.spec.parallel_residual


def test_pythia_160m_graph_counts():
    # 12 layers x 12 heads, rotary (no pos_embeds): writers 1 + 12 * 13, readers 12 * (36 + 1) + 1;
    # edges: each of a layer's 37 readers sees 1 + 13 l writers, resid_post all 157
    parallel = Graph(GraphSpec(n_layers=12, n_heads=12, pos_embeds=False, parallel_residual=True))
    sequential = Graph(GraphSpec(n_layers=12, n_heads=12, pos_embeds=False))
    assert (parallel.num_writers, parallel.num_readers, parallel.num_edges) == (157, 445, 32347)
    assert sequential.num_edges - parallel.num_edges == 12 * 12  # the same-layer head -> MLP edges
    assert len(parallel.edges) == parallel.num_edges


def test_known_pythia_160m_config_builds_its_published_shape_offline():
    from transformers import AutoModelForCausalLM

    from edgeprune.estimate import hf_config

    config, source = hf_config("EleutherAI/pythia-160m")
    assert "known configs" in source  # nothing downloaded
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in hf.parameters()) == 162_322_944  # the checkpoint's parameter count
    graph = EdgeModel.from_hf(hf).graph
    assert graph.spec.parallel_residual
    assert (graph.num_writers, graph.num_readers, graph.num_edges) == (157, 445, 32347)


# ---------------------------------------------------------------- registry and end to end
def test_unsupported_model_type_names_the_supported_ones_and_how_to_add_one():
    with pytest.raises(ValueError) as err:
        family_for("bert")
    message = str(err.value)
    for supported in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3"):
        assert supported in message
    assert "edgeprune/models/" in message and "Family" in message


def test_export_of_a_parallel_residual_run_rebuilds_its_graph(tmp_path):
    """The graph fingerprint carries parallel_residual, so export (no weights loaded) rebuilds the
    Pythia graph, without the same-layer head -> MLP edges."""
    from edgeprune.export import run_circuit
    from edgeprune.prune import _write_masks

    model = EdgeModel.from_hf(build("gpt_neox"))
    assert model.graph.spec.parallel_residual
    _write_masks(model, tmp_path / "masks.safetensors")
    circuit, fp = run_circuit(tmp_path)
    assert fp["parallel_residual"] is True
    assert circuit.counts["total_edges"] == model.graph.num_edges
    assert not any(w.startswith("a0.") and r == "m0" for w, r in circuit.edges)
