"""One ablated edge == an activation patch done with plain PyTorch hooks on the HF model.

The patch subtracts the writer's clean contribution from the reader's input and adds its
contribution on the corrupted input; only that one reader (one head's Q, K or V, one MLP, the
read-out) sees the change.
"""

import pytest
import torch

from edgeprune import EdgeModel
from conftest import build, token_batch

TOL = 1e-5


def _capture_writers(hf, ids, family):
    """Per-writer contributions (B, T, D) of the HF model, captured with hooks."""
    states, handles = {}, []
    if family == "gpt2":
        body, layers = hf.transformer, hf.transformer.h
        handles.append(body.wte.register_forward_hook(lambda m, i, o: states.__setitem__("tok_embeds", o)))
        handles.append(body.wpe.register_forward_hook(
            lambda m, i, o: states.__setitem__("pos_embeds", o.expand(ids.shape[0], -1, -1))))
        out_proj = [(blk.attn.c_proj, lambda m: m.weight) for blk in layers]
    else:
        body, layers = hf.model, hf.model.layers
        handles.append(body.embed_tokens.register_forward_hook(lambda m, i, o: states.__setitem__("tok_embeds", o)))
        out_proj = [(blk.self_attn.o_proj, lambda m: m.weight.t()) for blk in layers]
    n_heads = hf.config.num_attention_heads
    for l, (proj, weight_of) in enumerate(out_proj):
        def pre(m, args, l=l, weight_of=weight_of):
            x = args[0]
            dh = x.shape[-1] // n_heads
            w = weight_of(m)  # (H*dh, D)
            for h in range(n_heads):
                states[f"a{l}.h{h}"] = x[..., h * dh:(h + 1) * dh] @ w[h * dh:(h + 1) * dh]
        handles.append(proj.register_forward_pre_hook(pre))
        handles.append(layers[l].mlp.register_forward_hook(lambda m, i, o, l=l: states.__setitem__(f"m{l}", o)))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    return states


def _patched_logits(hf, ids, family, reader, delta):
    """HF logits with ``delta`` added to the input of one reader only."""
    handles = []
    layers = hf.transformer.h if family == "gpt2" else hf.model.layers
    if reader == "resid_post":
        final = hf.transformer.ln_f if family == "gpt2" else hf.model.norm
        handles.append(final.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    elif reader.startswith("m"):
        blk = layers[int(reader[1:])]
        norm = blk.ln_2 if family == "gpt2" else blk.post_attention_layernorm
        handles.append(norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    else:
        layer, unit, port = reader.split(".")
        blk = layers[int(layer[1:])]
        index = int(unit[1:])
        norm = blk.ln_1 if family == "gpt2" else blk.input_layernorm
        seen = {}
        handles.append(norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid", a[0])))
        if family == "gpt2":
            D = hf.config.n_embd
            dh = D // hf.config.n_head
            proj, offset = blk.attn.c_attn, {"q": 0, "k": D, "v": 2 * D}[port]
        else:
            proj, offset = getattr(blk.self_attn, f"{port}_proj"), 0
            dh = blk.self_attn.head_dim
        cols = slice(offset + index * dh, offset + (index + 1) * dh)

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


CASES = [
    ("gpt2", "a0.h1", "a1.h3.k"),   # head -> head.k
    ("gpt2", "a1.h2", "m1"),        # head -> MLP (same layer)
    ("gpt2", "tok_embeds", "a1.h0.q"),  # embedding -> head.q
    ("gpt2", "m0", "resid_post"),   # MLP -> read-out
    ("gpt2", "tok_embeds", "a0.h2.v"),
    ("llama", "a0.h1", "a1.g0.k"),  # head -> a KV group's key input (GQA)
    ("llama", "m0", "a1.h3.q"),
    ("llama", "a1.h3", "resid_post"),
]


@pytest.mark.parametrize("family,writer,reader", CASES)
def test_one_ablated_edge_equals_hook_patch_on_hf(family, writer, reader):
    hf = build(family)
    ids, corrupted = token_batch(2, 9, seed=11), token_batch(2, 9, seed=12)
    clean_states = _capture_writers(hf, ids, family)
    corrupt_states = _capture_writers(hf, corrupted, family)
    delta = corrupt_states[writer] - clean_states[writer]
    expected = _patched_logits(hf, ids, family, reader, delta)

    model = EdgeModel.from_hf(hf)
    model.set_edges([e for e in model.graph.edges if e != (writer, reader)])
    with torch.no_grad():
        out = model(ids, corrupted_input_ids=corrupted).logits
        full = hf(ids).logits
    assert (out - expected).abs().max().item() <= TOL
    assert (full - expected).abs().max().item() > 1e-3  # the patch really changed something
