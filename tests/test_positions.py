"""Position-aware masks (one mask per (edge, span)): equal to HF with every mask 1, equal to an activation
patch by hooks with one span's masks 0, equal to the shared-mask model when every span has the same masks,
and attribution per span that sums to the shared-mask attribution."""

import pytest
import torch

from conftest import build, token_batch
from edgeprune import EdgeModel
from edgeprune.circuit import extract_circuit, remove_dangling
from edgeprune.graph import edges_to_mask, span_edges

TOL = 1e-5
SPANS = ("other", "IO", "END")


def _span_ids(B, T):
    """Spans of a (B, T) batch: IO at positions 2-3, END at the last position, other elsewhere."""
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[:, 2:4] = 1
    ids[:, -1] = 2
    return ids


@pytest.fixture(params=["gpt2", "llama"])
def kind(request):
    return request.param


def _model(kind, ablation="interchange"):
    hf = build(kind, num_key_value_heads=2) if kind == "llama" else build(kind)
    model = EdgeModel.from_hf(hf, ablation=ablation)
    model.set_spans(SPANS)
    return hf, model


def test_every_mask_one_equals_hf(kind):
    hf, model = _model(kind)
    ids, corrupted = token_batch(seed=1), token_batch(seed=2)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids, corrupted_input_ids=corrupted, span_ids=_span_ids(*ids.shape)).logits
    assert model.edge_masks.n == len(SPANS) * model.graph.num_edges
    assert (out - ref).abs().max().item() <= TOL


def _reader_norms(hf, kind):
    """Per layer the modules whose *input* is a reader's input (attention, MLP), and the final norm."""
    if kind == "gpt2":
        blocks = hf.transformer.h
        return [(b.ln_1, b.ln_2) for b in blocks], hf.transformer.ln_f
    blocks = hf.model.layers
    return [(b.input_layernorm, b.post_attention_layernorm) for b in blocks], hf.model.norm


def test_one_span_ablated_equals_a_hook_patch_of_those_positions(kind):
    """Span IO's masks 0: at IO's positions every reader (Q, K, V, MLP, read-out) gets the corrupted run's
    residual stream instead of the clean one; everywhere else the clean mix. By hooks: the norms' inputs
    at those positions replaced with the corrupted run's (the residual path itself is left alone)."""
    hf, model = _model(kind)
    ids, corrupted = token_batch(seed=1), token_batch(seed=2)
    span_ids = _span_ids(*ids.shape)
    at = span_ids == 1  # (B, T)
    layers, final = _reader_norms(hf, kind)
    modules = [m for pair in layers for m in pair] + [final]
    seen, handles = {}, []
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0].detach().clone())))
    with torch.no_grad():
        hf(corrupted)
    for h in handles:
        h.remove()

    def patch(mod, a):
        x = a[0].clone()
        x[at] = seen[mod][at]
        return (x,)

    handles = [m.register_forward_pre_hook(patch) for m in modules]
    with torch.no_grad():
        ref = hf(ids).logits
    for h in handles:
        h.remove()
    E = model.graph.num_edges
    values = torch.ones(len(SPANS) * E)
    values[E:2 * E] = 0.0  # span IO
    with torch.no_grad():
        out = model(ids, corrupted_input_ids=corrupted, span_ids=span_ids, edge_values=values).logits
        clean = model(ids, corrupted_input_ids=corrupted, span_ids=span_ids).logits
    assert (out - ref).abs().max().item() <= TOL
    assert (out - clean).abs().max().item() > 1e-2  # the patch changed something


def test_shared_circuit_as_positional_gives_the_same_logits(kind):
    hf, model = _model(kind)
    shared = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(seed=3), token_batch(seed=4)
    gen = torch.Generator().manual_seed(0)
    values = (torch.rand(shared.graph.num_edges, generator=gen) > 0.5).float()
    with torch.no_grad():
        ref = shared(ids, corrupted_input_ids=corrupted, edge_values=values).logits
        out = model(ids, corrupted_input_ids=corrupted, span_ids=_span_ids(*ids.shape),
                    edge_values=values.repeat(len(SPANS))).logits
    assert (out - ref).abs().max().item() <= TOL


def test_gradient_per_span_sums_to_the_shared_gradient(kind):
    """dL/dz per (edge, span) summed over spans = dL/dz of the shared mask (EAP's attribution product)."""
    hf, model = _model(kind)
    shared = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(seed=5), token_batch(seed=6)
    z_shared = torch.ones(shared.graph.num_edges, requires_grad=True)
    shared(ids, corrupted_input_ids=corrupted, edge_values=z_shared).logits.float().pow(2).mean().backward()
    z_pos = torch.ones(model.edge_masks.n, requires_grad=True)
    model(ids, corrupted_input_ids=corrupted, span_ids=_span_ids(*ids.shape),
          edge_values=z_pos).logits.float().pow(2).mean().backward()
    per_span = z_pos.grad.view(len(SPANS), -1)
    assert torch.allclose(per_span.sum(0), z_shared.grad, atol=1e-6, rtol=1e-4)
    assert per_span[1].abs().sum() > 0 and per_span[2].abs().sum() > 0


def test_training_backward_matches_autograd_of_a_dense_reference():
    """The custom backward (per-span dL/dz, per-position state gradients) against finite differences."""
    hf, model = _model("gpt2")
    ids, corrupted = token_batch(batch=2, seq=6, seed=7), token_batch(batch=2, seq=6, seed=8)
    span_ids = _span_ids(2, 6)
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(model.edge_masks.n, generator=gen, dtype=torch.float64).float()
    z = base.clone().requires_grad_(True)
    model(ids, corrupted_input_ids=corrupted, span_ids=span_ids, edge_values=z).logits.float().sum().backward()
    for i in torch.randint(0, model.edge_masks.n, (6,), generator=gen).tolist():
        step = torch.zeros_like(base)
        step[i] = 1e-2
        with torch.no_grad():
            up = model(ids, corrupted_input_ids=corrupted, span_ids=span_ids, edge_values=base + step).logits.sum()
            down = model(ids, corrupted_input_ids=corrupted, span_ids=span_ids, edge_values=base - step).logits.sum()
        fd = float(up - down) / 2e-2
        assert fd == pytest.approx(float(z.grad[i]), rel=2e-2, abs=2e-2), i


def test_span_ids_are_required_and_checked():
    _, model = _model("gpt2")
    ids = token_batch()
    with pytest.raises(ValueError, match="need span_ids"):
        model(ids, corrupted_input_ids=ids)
    with pytest.raises(ValueError, match=r"span_ids must be in \[0, 3\)"):
        model(ids, corrupted_input_ids=ids, span_ids=torch.full(ids.shape, 3))
    shared = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match="shared by every position"):
        shared(ids, corrupted_input_ids=ids, span_ids=torch.zeros_like(ids))


def test_dangling_removal_walks_spans():
    _, model = _model("gpt2")
    g = model.graph
    # a0.h0 at END reads tok_embeds through its Q; its output reaches resid_post at END: kept
    # a0.h1 reads its K at IO, its output goes to resid_post at END: kept (K/V feed the head at every span)
    # m0 at IO reads a0.h0, but nothing at IO carries m0 on to the output: dangling
    edges = [("tok_embeds", "a0.h0.q", "END"), ("a0.h0", "resid_post", "END"),
             ("tok_embeds", "a0.h1.k", "IO"), ("a0.h1", "resid_post", "END"),
             ("a0.h0", "m0", "IO")]
    kept = remove_dangling(g, edges_to_mask(g, edges, SPANS), len(SPANS))
    names = [e for e, k in zip(span_edges(g, SPANS), kept.tolist()) if k]
    assert sorted(names) == sorted(edges[:4])
    with pytest.raises(ValueError, match="unknown span 'S2'"):
        edges_to_mask(g, [("tok_embeds", "m0", "S2")], SPANS)
    with pytest.raises(ValueError, match="triples"):
        edges_to_mask(g, [("tok_embeds", "m0")], SPANS)
    la = torch.full((len(SPANS) * g.num_edges,), -5.0)
    la[edges_to_mask(g, edges, SPANS)] = 5.0
    circuit = extract_circuit(g, la, spans=SPANS)
    assert sorted(circuit.edges) == sorted(edges[:4]) and circuit.counts["spans"] == 3


def test_greedy_order_per_span_takes_only_edges_whose_reader_reaches_the_output():
    """Greedy growth over (node, span): an edge is taken only once its reader at its span is the
    read-out or feeds a writer node already taken (Q/MLP at the same span, K/V at any span)."""
    from edgeprune.baselines.selection import circuit_of_size, edge_order
    from edgeprune.circuit import reader_nodes

    _, model = _model("gpt2")
    g, S = model.graph, len(SPANS)
    E = g.num_edges
    key = torch.randn(S * E, generator=torch.Generator().manual_seed(3))
    order = edge_order(g, key, "greedy", n_spans=S).tolist()
    assert sorted(order) == list(range(S * E))
    feeds = reader_nodes(g)
    writer_of = [g.writer_index[w] for w, _ in g.edges]
    reader_of = [g.reader_index[r] for _, r in g.edges]
    kv = [name.endswith((".k", ".v")) for name in g.readers]
    out, taken = g.reader_index["resid_post"], set()
    for f in order:
        s, e = divmod(f, E)
        r = reader_of[e]
        spans = range(S) if kv[r] else (s,)
        assert r == out or any((w, t) in taken for w in feeds[r] for t in spans), (f, g.edges[e], SPANS[s])
        taken.add((writer_of[e], s))
    kept = circuit_of_size(g, key, 40, "greedy", n_spans=S)
    assert 0 < int(kept.sum()) <= 40 and torch.equal(kept, remove_dangling(g, kept, S))
