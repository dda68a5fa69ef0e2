"""The writer mix (one GEMM over stored differences, a custom backward) against plain autograd."""

from contextlib import contextmanager

import pytest
import torch

from edgeprune import EdgeModel, blas, mixing
from edgeprune.eval import reference_and_corrupted
from edgeprune.mixing import StateSink, WriterStates, recompute_saved
from conftest import build, token_batch


def _naive(z, states, ablated, const):
    """x_r = const + sum_w z_rw s_w + (1 - z_rw) s~_w, by broadcasting (autograd does the rest)."""
    a = torch.zeros_like(states) if ablated is None else ablated.expand_as(states)
    x = torch.einsum("rw,wbtd->rbtd", z, states) + torch.einsum("rw,wbtd->rbtd", 1 - z, a)
    return x if const is None else x + const


@pytest.mark.parametrize("ablation", ["interchange", "mean", "zero"])
@pytest.mark.parametrize("R", [4, 1])  # 1: a one-reader mix's dL/dz, a matrix-vector product per position
def test_mix_values_and_gradients_match_plain_autograd(ablation, R):
    gen = torch.Generator().manual_seed(0)
    W, B, T, D = 7, 3, 5, 8
    states = torch.randn(W, B, T, D, generator=gen, requires_grad=True)
    ablated = {"interchange": torch.randn(W, B, T, D, generator=gen),
               "mean": torch.randn(W, 1, 1, D, generator=gen), "zero": None}[ablation]
    z = torch.rand(R, W, generator=gen, requires_grad=True)
    const = torch.randn(D, generator=gen)
    upstream = torch.randn(R, B, T, D, generator=gen)

    store = WriterStates(W, (B, T, D), torch.float32, torch.device("cpu"), ablated)
    tokens = [store.write(states[:3], 0), store.write(states[3:], 3)]
    x = store.mix(z, const, tokens)
    (x * upstream).sum().backward()
    ours = (x.detach(), z.grad.clone(), states.grad.clone())

    z.grad = states.grad = None
    ref = _naive(z, states, ablated, const)
    (ref * upstream).sum().backward()
    assert (ours[0] - ref.detach()).abs().max() <= 1e-5
    assert (ours[1] - z.grad).abs().max() <= 1e-4
    assert (ours[2] - states.grad).abs().max() <= 1e-5


def test_mix_is_exact_with_every_mask_zero():
    gen = torch.Generator().manual_seed(1)
    states, ablated = torch.randn(5, 2, 3, 4, generator=gen), torch.randn(5, 2, 3, 4, generator=gen)
    store = WriterStates(5, (2, 3, 4), torch.float32, torch.device("cpu"), ablated)
    store.write(states, 0)
    x = store.mix(torch.zeros(1, 5), None, [])
    assert torch.equal(x[0], ablated.sum(0))


def test_recompute_saved_drops_views_of_the_mix_and_rebuilds_them():
    x = torch.randn(3, 4, 8, requires_grad=True)
    y = x * 2  # the "mix output"
    rebuilt = []

    def rebuild():
        rebuilt.append(1)
        return (x * 2).detach()

    with recompute_saved(y, rebuild):
        out = torch.nn.functional.layer_norm(y[1:], (8,)).sum() + torch.nn.functional.layer_norm(y[:1], (8,)).sum()
    out.backward()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_y = ref_x * 2
    (torch.nn.functional.layer_norm(ref_y[1:], (8,)).sum() + torch.nn.functional.layer_norm(ref_y[:1], (8,)).sum()).backward()
    assert len(rebuilt) == 1  # one rebuild served both saved views
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_select_reads_out_only_the_selected_positions(kind):
    model = EdgeModel.from_hf(build(kind))
    ids, corrupted = token_batch(3, 9, seed=1), token_batch(3, 9, seed=2)
    mask = torch.ones_like(ids)
    sel = torch.zeros_like(ids, dtype=torch.bool)
    sel[:, -2:] = True
    sel[1, 3] = True
    with torch.no_grad():
        model.edge_masks.log_alpha.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
        full = model(ids, mask, corrupted, mask).logits
        part = model(ids, mask, corrupted, mask, select=sel).logits
    assert part.shape == (int(sel.sum()), full.shape[-1])
    assert (part - full[sel]).abs().max() <= 1e-5

    class Batch:
        input_ids, attention_mask, corrupted_input_ids, corrupted_attention_mask = ids, mask, corrupted, mask

    ref_all, states_all = reference_and_corrupted(model, Batch)
    ref_sel, states_sel = reference_and_corrupted(model, Batch, select=sel)
    assert (ref_sel - ref_all[sel]).abs().max() <= 1e-5
    assert states_sel.shape == (model.graph.num_writers, 3, 9, model.hf.config.hidden_size)
    assert (states_sel - states_all).abs().max() <= 1e-6


def test_gradients_do_not_depend_on_how_the_batch_is_split():
    """dL/dz sums per-example terms in fp64: two halves (summed as the processes would) equal the whole."""
    model = EdgeModel.from_hf(build("llama"))
    ids, corrupted = token_batch(4, 8, seed=1), token_batch(4, 8, seed=2)
    z = torch.rand(model.graph.num_edges, generator=torch.Generator().manual_seed(0))

    def grad(rows, reduce=None):
        model.mask_grad_reduce = reduce
        values = z.clone().requires_grad_(True)
        out = model(ids[rows], corrupted_input_ids=corrupted[rows], edge_values=values).logits
        (out.float().log_softmax(-1)[..., :5] ** 2).sum().backward()
        return values.grad

    whole = grad(slice(0, 4))
    first_half = []
    grad(slice(0, 2), lambda t: first_half.append(t.clone()))
    partial = iter(first_half)
    halves = grad(slice(2, 4), lambda t: t.add_(next(partial)))
    assert torch.equal(whole, halves)


@pytest.mark.parametrize("sizes", [(4, 4, 4), (4, 2, 2)])
def test_group_projection_matches_plain_projections(sizes):
    """project_group on a position-major view gives the outputs and input gradient of the plain
    per-reader projections (the gradient comes back position-major, no copy)."""
    from edgeprune.models.common import project, project_group

    gen = torch.Generator().manual_seed(3)
    B, T, D, dh = 2, 5, 16, 4
    R = sum(sizes)
    dense = torch.randn(B, T, R, D, generator=gen)
    projections = [(torch.randn(D, n * dh, generator=gen), torch.randn(n * dh, generator=gen), n) for n in sizes]
    ups = [torch.randn(B, n, T, dh, generator=gen) for n in sizes]

    x = dense.clone().requires_grad_(True)
    outs = project_group(x.permute(2, 0, 1, 3), projections)
    sum((o * u).sum() for o, u in zip(outs, ups)).backward()

    ref_x = dense.permute(2, 0, 1, 3).contiguous().requires_grad_(True)
    ref_outs = [project(part, w, b, n) for part, (w, b, n) in zip(ref_x.split(list(sizes)), projections)]
    sum((o * u).sum() for o, u in zip(ref_outs, ups)).backward()
    for o, r in zip(outs, ref_outs):
        assert torch.allclose(o, r, atol=1e-5)
    assert torch.allclose(x.grad.permute(2, 0, 1, 3), ref_x.grad, atol=1e-5)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("bias", [False, True])
def test_folded_norm_projection_matches_norm_then_projection(norm, bias):
    """The norm (RMS or LayerNorm) folded into the Q/K/V projections (fp32, one input per reader) gives
    the outputs and input gradient of the norm followed by the projection, by plain autograd."""
    from edgeprune.models.common import ln_project_group, project, rms_project_group

    gen = torch.Generator().manual_seed(4)
    sizes, B, T, D, dh = (4, 2, 2), 2, 5, 16, 4
    R = sum(sizes)
    dense = torch.randn(B, T, R, D, generator=gen) * 3 + 0.5
    weight = torch.rand(D, generator=gen) + 0.5
    ln = torch.nn.LayerNorm(D).requires_grad_(False)
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.normal_(generator=gen)
    projections = [(torch.randn(D, n * dh, generator=gen), torch.randn(n * dh, generator=gen) if bias else None, n)
                   for n in sizes]
    ups = [torch.randn(B, n, T, dh, generator=gen) for n in sizes]

    x = dense.clone().requires_grad_(True)
    if norm == "rms":
        outs = rms_project_group(x.permute(2, 0, 1, 3), weight, 1e-5, torch.float32, projections)
    else:
        outs = ln_project_group(x.permute(2, 0, 1, 3), ln, torch.float32, projections)
    sum((o * u).sum() for o, u in zip(outs, ups)).backward()

    ref_x = dense.permute(2, 0, 1, 3).contiguous().requires_grad_(True)
    if norm == "rms":
        normed = weight * (ref_x * torch.rsqrt(ref_x.pow(2).mean(-1, keepdim=True) + 1e-5))
    else:
        normed = torch.nn.functional.layer_norm(ref_x, (D,), ln.weight, ln.bias, ln.eps)
    ref_outs = [project(part, w, b, n) for part, (w, b, n) in zip(normed.split(list(sizes)), projections)]
    sum((o * u).sum() for o, u in zip(ref_outs, ups)).backward()
    for o, r in zip(outs, ref_outs):
        assert (o - r).abs().max() <= 1e-5
    assert (x.grad.permute(2, 0, 1, 3) - ref_x.grad).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_state_sink_leaves_clean_minus_corrupted_states_in_one_buffer(kind):
    """A corrupted pass into a sink, then a clean pass subtracting it in place, leaves exactly the
    difference of the two passes' own states (EAP's one buffer, ``baselines/ig_inputs.py``)."""
    model = EdgeModel.from_hf(build(kind, seed=4))
    ids, corrupted = token_batch(3, 7, seed=1), token_batch(3, 7, seed=2)
    clean_states = model.full_forward(ids, return_states=True).states
    corrupted_states = model.full_forward(corrupted, return_states=True).states
    buffer = torch.full(clean_states.shape, float("nan"))
    model.full_forward(corrupted, sink=StateSink(buffer))
    assert torch.equal(buffer, corrupted_states)
    logits = model.full_forward(ids, sink=StateSink(buffer, buffer)).logits
    assert torch.equal(logits, model.full_forward(ids).logits)
    assert torch.equal(buffer, clean_states - corrupted_states)
    with pytest.raises(ValueError, match="return_states or a sink"):
        model.full_forward(ids, return_states=True, sink=StateSink(buffer))


def _toy_run(kind: str, seed: int, spans: bool, layers: int | None = None):
    """A toy model, a clean and a corrupted batch (3 x 7), and span ids when ``spans`` (two spans)."""
    depth = {} if layers is None else {"n_layer" if kind == "gpt2" else "num_hidden_layers": layers}
    model = EdgeModel.from_hf(build(kind, seed=seed, **depth))
    span_ids = None
    if spans:
        model.set_spans(["a", "b"])
        span_ids = (torch.arange(7) >= 4).long().expand(3, 7)
    return model, token_batch(3, 7, seed=1), token_batch(3, 7, seed=2), span_ids


def _weighted_loss(logits: torch.Tensor) -> torch.Tensor:
    """A scalar that weighs every position differently (so no gradient cancels by symmetry)."""
    return (logits.logsumexp(-1) * torch.linspace(0.5, 2.0, logits.shape[1])).sum()


def test_the_sparse_paths_choose_alike_for_a_batch_and_its_slices(monkeypatch):
    """Whether a mix gathers its live writers, or dL/dz only the needed ones, depends on the size of
    an example, not of the batch: a process given a slice of the global batch (torchrun) makes the
    choices one process makes for the whole batch, and so computes exactly its numbers (a gathered
    product may round differently in the last bit, which AdamW's step amplifies)."""
    model = EdgeModel.from_hf(build("llama", seed=3, num_hidden_layers=4))
    model.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a pruned state: most masks clamped at exactly 0, a few open
        pruned = torch.rand(model.edge_masks.n, generator=gen) < 0.9
        model.edge_masks.log_alpha.copy_(torch.where(pruned, -10.0, 10.0))
        model.edge_masks.log_alpha[torch.rand(model.edge_masks.n, generator=gen) < 0.02] = 0.0
    ids, corrupted = token_batch(6, 7, seed=1), token_batch(6, 7, seed=2)
    late = model.graph.n_writers_before[model._group(3).start]  # the writers the last layer reads
    monkeypatch.setattr(mixing, "SPARSE_MIN", 7 * model.hf.config.hidden_size * late)  # on from the last layer
    chosen = []
    few = mixing._few_writers
    monkeypatch.setattr(mixing, "_few_writers", lambda *a: chosen.append(few(*a)) or chosen[-1])

    def choices(rows: slice) -> list:
        chosen.clear()
        model.edge_masks.generator = torch.Generator().manual_seed(5)  # the same sampled masks
        out = model(ids[rows], corrupted_input_ids=corrupted[rows]).logits.float()
        _weighted_loss(out).backward()
        return [None if c is None else c.tolist() for c in chosen]

    whole, half = choices(slice(0, 6)), choices(slice(0, 3))
    assert whole == half
    assert any(c is not None for c in whole) and any(c is None for c in whole)  # both paths taken


@pytest.mark.parametrize("kind,spans", [("gpt2", False), ("llama", False), ("llama", True)])
def test_mixing_only_the_live_writers_equals_the_dense_mix(kind, spans, monkeypatch):
    """With most masks exactly 0 (a pruned circuit) the mix reads only the writers some reader still
    takes (``mixing.live_writers``): logits and every mask gradient equal the dense mix's."""
    model, ids, corrupted, span_ids = _toy_run(kind, 5, spans)
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(model.edge_masks.n, generator=gen)
    values[torch.rand(model.edge_masks.n, generator=gen) < 0.93] = 0.0  # most edges pruned, exactly 0

    def run():
        z = values.clone().requires_grad_(True)
        out = model(ids, corrupted_input_ids=corrupted, edge_values=z, span_ids=span_ids).logits.float()
        _weighted_loss(out).backward()
        return out.detach(), z.grad

    taken = []
    live = mixing.live_writers
    monkeypatch.setattr(mixing, "SPARSE_MIN", 0)  # these widths are toy-sized
    monkeypatch.setattr(mixing, "live_writers", lambda z, n: taken.append(live(z, n)) or taken[-1])
    sparse_logits, sparse_grad = run()
    assert sum(t is not None for t in taken) > len(taken) // 2  # the sparse path ran for most mixes
    monkeypatch.setattr(mixing, "live_writers", lambda z, n: None)
    dense_logits, dense_grad = run()
    torch.testing.assert_close(sparse_logits, dense_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-6)
    assert dense_grad.abs().sum() > 0


@pytest.mark.skipif(getattr(torch._C, "_storage_Use_Count", None) is None, reason="torch without use counts")
def test_a_gather_into_the_kept_buffer_equals_indexing_and_reuses_it():
    """``mixing.gather`` copies runs of consecutive writers into a buffer kept from mix to mix: the same
    values as ``diffs[:, writers]`` for any set (runs, single writers, none, every one), the same
    bytes again once the last gather is let go, and a new buffer while it is still alive."""
    from edgeprune import buffers
    buffers.clear()
    diffs = torch.randn(6, 11, 4)
    for writers in ([0, 1, 2, 5, 7, 8, 10], [3], [], list(range(11)), [10, 0, 4, 5]):
        index = torch.tensor(writers, dtype=torch.long)
        assert torch.equal(mixing.gather(diffs, index, "t"), diffs[:, index])
    first = mixing.gather(diffs, torch.tensor([1, 2, 3]), "t")
    ptr = first.data_ptr()
    second = mixing.gather(diffs, torch.tensor([4, 9]), "t")  # the first is still alive: other bytes
    assert second.data_ptr() != ptr and torch.equal(first, diffs[:, 1:4])
    del first, second
    assert mixing.gather(diffs, torch.tensor([0, 6]), "t").untyped_storage().data_ptr() in \
        {buffers._kept[("t.sparse", torch.device("cpu"))].data_ptr()}
    assert torch.equal(mixing.gather(diffs, torch.tensor([2, 3]), None), diffs[:, 2:4])  # no pool: fresh
    buffers.clear()


@pytest.mark.parametrize("kind,spans", [("gpt2", False), ("llama", True)])
def test_the_sparse_paths_give_the_same_bits_with_kept_or_fresh_gathers(kind, spans, monkeypatch):
    """The masked forward gathers the live writers (mix, rebuild) and the needed ones (dL/dz) into a
    kept buffer (``mixing.KEEP_SCRATCH``): logits and mask gradients are those of fresh gathers bit for
    bit, over two steps. The buffer lives for one backward (let go at its end, not to sit beside the
    next forward); a one-reader mix (the read-out's) gathers nothing for its dL/dz (``_grad_z``)."""
    model, ids, corrupted, span_ids = _toy_run(kind, 7, spans)
    with torch.no_grad():  # a pruned state: most masks exactly 0, some clamped at 1, a few open; the
        gen = torch.Generator().manual_seed(0)  # read-out's own edges (the last reader's) all kept
        pruned = torch.rand(model.edge_masks.n, generator=gen) < 0.85
        index = model.graph.dense_index.repeat(model.edge_masks.n // model.graph.num_edges)  # spans: per span
        pruned &= index // model.graph.num_writers != model.graph.num_readers - 1
        model.edge_masks.log_alpha.copy_(torch.where(pruned, -10.0, torch.randn(model.edge_masks.n, generator=gen) * 3))
    model.train()
    monkeypatch.setattr(mixing, "SPARSE_MIN", 0)  # these widths are toy-sized
    gathered, cleared = [], []
    real, clear = mixing.gather, mixing.buffers.clear
    monkeypatch.setattr(mixing, "gather", lambda d, w, pool: gathered.append(pool) or real(d, w, pool))
    monkeypatch.setattr(mixing.buffers, "clear", lambda prefix="": cleared.append(prefix) or clear(prefix))

    def run(keep: bool):
        monkeypatch.setattr(mixing, "KEEP_SCRATCH", keep)
        out = []
        for seed in (1, 2):
            model.edge_masks.generator = torch.Generator().manual_seed(seed)
            model.edge_masks.log_alpha.grad = None
            logits = model(ids, corrupted_input_ids=corrupted, span_ids=span_ids).logits.float()
            _weighted_loss(logits).backward()
            out += [logits.detach(), model.edge_masks.log_alpha.grad.clone()]
        return out

    kept = run(True)
    assert "mix" in gathered and set(gathered) <= {"mix", None}  # the masked forward's pool, or fresh
    assert cleared == ["mix.sparse"] * 2  # at the end of each step's backward
    fresh = run(False)
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh))
    assert kept[1].abs().sum() > 0


@pytest.mark.parametrize("kind,spans", [("gpt2", False), ("llama", True)])
def test_dl_dz_only_where_the_clamp_passes_gradient_gives_the_same_mask_gradients(kind, spans, monkeypatch):
    """A sampled hard-concrete mask clamped at 0 or 1 passes no gradient to log_alpha, so the mix
    computes dL/dz only for the writers some unclamped mask reads (``needed_writers``): log_alpha's
    gradient equals the one from every dL/dz."""
    model, ids, corrupted, span_ids = _toy_run(kind, 6, spans)
    with torch.no_grad():  # most masks far from the clamp's edges, as in a pruned circuit
        gen = torch.Generator().manual_seed(0)
        model.edge_masks.log_alpha.copy_(torch.randn(model.edge_masks.n, generator=gen) * 8)
    model.train()

    def run():
        model.edge_masks.generator = torch.Generator().manual_seed(1)
        model.edge_masks.log_alpha.grad = None
        out = model(ids, corrupted_input_ids=corrupted, span_ids=span_ids).logits.float()
        _weighted_loss(out).backward()
        return model.edge_masks.log_alpha.grad.clone()

    taken = []
    needed = mixing.needed_writers
    monkeypatch.setattr(mixing, "SPARSE_MIN", 0)  # these widths are toy-sized
    monkeypatch.setattr(mixing, "needed_writers", lambda s, n: taken.append(needed(s, n)) or taken[-1])
    restricted = run()
    assert any(t is not None for t in taken)  # the restricted path ran
    monkeypatch.setattr(mixing, "needed_writers", lambda s, n: None)
    full = run()
    torch.testing.assert_close(restricted, full, rtol=1e-5, atol=1e-7)
    assert full.abs().sum() > 0


@pytest.mark.parametrize("kind,spans,size", [("gpt2", False, 2), ("llama", True, 2), ("gpt2", False, 3)])
def test_kept_reader_inputs_give_the_gradients_of_rebuilt_ones(kind, spans, size, monkeypatch):
    """The deepest layers' Q/K/V inputs kept for the backward (``EdgeModel.keep_inputs``) instead of
    rebuilt from the mix: the rebuild recomputes the very values, so logits and every mask gradient
    are equal bit for bit, and so are the states' gradients (through the embeddings). A group of
    layers (``model.GROUP_LAYERS``) rebuilds with one pass over the writers before it."""
    from edgeprune import model as edge_model
    monkeypatch.setattr(edge_model, "GROUP_LAYERS", size)
    model, ids, corrupted, span_ids = _toy_run(kind, 4, spans, layers=4)
    groups = 4 // size  # groups of more than one layer: (0, 1), (2, 3) for pairs; (0, 1, 2) for threes
    rebuilt = []  # the layers whose inputs were rebuilt (a rebuild serves every saved view of them)
    get = mixing._Rebuilt.get
    monkeypatch.setattr(mixing._Rebuilt, "get", lambda self, v: (self.value is None and rebuilt.append(1)) or get(self, v))
    products = []  # the passes of the groups' rebuilds over the writers before the group
    group_mix = mixing.GroupRebuild._mix
    monkeypatch.setattr(mixing.GroupRebuild, "_mix", lambda self: products.append(1) or group_mix(self))

    def run(share):
        model.keep_inputs = share
        z = torch.full((model.edge_masks.n,), 0.7).requires_grad_(True)
        rebuilt.clear(), products.clear()
        out = model(ids, corrupted_input_ids=corrupted, edge_values=z, span_ids=span_ids).logits.float()
        _weighted_loss(out).backward()
        return out.detach(), z.grad, len(rebuilt), len(products)

    logits, grad, n_rebuilt, n_products = run(0.0)
    n_layers = model.graph.spec.n_layers
    assert n_rebuilt == n_layers and model._kept_inputs == frozenset()
    assert n_products == groups  # one pass a group: the deepest layer's rebuild serves the others'
    kept_logits, kept_grad, n_kept_rebuilt, _ = run(100.0)  # every layer's inputs kept
    assert n_kept_rebuilt == 0 and model._kept_inputs == frozenset(range(n_layers))
    assert torch.equal(kept_logits, logits) and torch.equal(kept_grad, grad)
    per_layer = model.graph.reader_blocks[2].stop - model.graph.reader_blocks[0].start
    last_logits, last_grad, n_last_rebuilt, n_products = run(per_layer / model.graph.num_writers)
    assert model._kept_inputs == frozenset({n_layers - 1})  # (pairs: a second layer kept, its first rebuilt alone)
    assert n_last_rebuilt == n_layers - 1 and n_products == groups
    assert torch.equal(last_logits, logits) and torch.equal(last_grad, grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_layer_alone_completes_its_input_gradients_in_its_mix(kind, monkeypatch):
    """A layer that mixes alone leaves the x-term of its Q/K/V input gradients (the norm's, folded into
    the projections) to its mix's backward (``mixing.DeferredInput``), which rebuilds those inputs
    example by example and forms dL/dz over the same examples. The products and sums are the ones a
    whole rebuild makes, so logits, every mask gradient and the states' gradients (through the
    embeddings) are equal bit for bit; and no input is rebuilt whole."""
    from edgeprune import model as edge_model
    monkeypatch.setattr(edge_model, "GROUP_LAYERS", 1)
    model, ids, corrupted, _ = _toy_run(kind, 5, False, layers=3)
    model.keep_inputs = 0.0
    embedding = model.hf.get_input_embeddings().weight
    embedding.requires_grad_(True)
    whole, fused = [], []
    get, grad = mixing._Rebuilt.get, mixing.WriterStates._fused_grad
    monkeypatch.setattr(mixing._Rebuilt, "get", lambda self, v: (self.value is None and whole.append(1)) or get(self, v))
    monkeypatch.setattr(mixing.WriterStates, "_fused_grad", lambda self, *a: fused.append(1) or grad(self, *a))

    def run(fuse_min):
        monkeypatch.setattr(mixing, "FUSE_MIN", fuse_min)
        monkeypatch.setattr(mixing, "FUSE_CHUNK", 1)  # one example a chunk: the toy batch takes three
        whole.clear(), fused.clear()
        embedding.grad = None
        z = torch.full((model.edge_masks.n,), 0.7).requires_grad_(True)
        out = model(ids, corrupted_input_ids=corrupted, edge_values=z).logits.float()
        _weighted_loss(out).backward()
        return out.detach(), z.grad, embedding.grad.clone(), len(whole), len(fused)

    logits, grad_z, grad_emb, n_whole, n_fused = run(float("inf"))  # the sizes of toys: rebuilt whole
    assert (n_whole, n_fused) == (3, 0)
    f_logits, f_grad_z, f_grad_emb, n_whole, n_fused = run(0)
    assert (n_whole, n_fused) == (0, 3)
    assert torch.equal(f_logits, logits) and torch.equal(f_grad_z, grad_z) and torch.equal(f_grad_emb, grad_emb)
    assert grad_z.abs().sum() > 0 and grad_emb.abs().sum() > 0


def _seeded_grads(model, ids, corrupted, span_ids):
    """One backward of the toy loss with the masks sampled from seed 1: (dL/dlog_alpha, dL/d embedding weights)."""
    embedding = model.hf.get_input_embeddings().weight
    model.edge_masks.generator = torch.Generator().manual_seed(1)
    model.edge_masks.log_alpha.grad, embedding.grad = None, None
    logits = model(ids, corrupted_input_ids=corrupted, span_ids=span_ids).logits.float()
    _weighted_loss(logits).backward()
    return model.edge_masks.log_alpha.grad.clone(), embedding.grad.clone()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dl_ds_in_blocks_of_writers_gives_the_gradients_of_one_product(kind, monkeypatch):
    """dL/ds's update, (k, R) x (R, B·T·D), runs on CPU in blocks of ``mixing.GRAD_ROWS`` writers from
    ``GRAD_BLOCK_MIN`` values per example (MKL runs the whole product at a fraction of its rate on some
    CPUs). Each row sums over the same readers
    (BLAS may round a smaller block differently in the last bit): the states' gradients (through the
    embeddings) and every mask gradient are those of one product within fp32 rounding, over blocks of
    3 writers (the toy's groups have 4 to 13), dense and sparse. (Position-aware masks update per
    position, not through it.) The writer-major buffer these blocks are of is the one used where MKL's
    batch GEMM is not reachable (GPUs, other BLAS builds)."""
    model, ids, corrupted, span_ids = _toy_run(kind, 4, False, layers=3)
    monkeypatch.setattr(mixing, "GRAD_BY_POSITION", False)
    embedding = model.hf.get_input_embeddings().weight
    embedding.requires_grad_(True)
    model.train()
    with torch.no_grad():  # most masks kept, some exactly 0: dense updates and the live rows' updates
        gen = torch.Generator().manual_seed(0)
        model.edge_masks.log_alpha.copy_(torch.randn(model.edge_masks.n, generator=gen) * 3)
    monkeypatch.setattr(mixing, "SPARSE_MIN", 0)  # these widths are toy-sized
    blocks = []
    real = mixing.row_blocks
    monkeypatch.setattr(mixing, "row_blocks",
                        lambda out, a, b, add, rows: blocks.append((out.shape[0], rows)) or real(out, a, b, add, rows))
    monkeypatch.setattr(mixing, "GRAD_BLOCK_MIN", 0)  # these examples are toy-sized

    def run(rows):
        monkeypatch.setattr(mixing, "GRAD_ROWS", rows)
        return _seeded_grads(model, ids, corrupted, span_ids)

    whole = run(0)
    blocked = run(3)
    assert any(k > rows == 3 for k, rows in blocks)  # some update spans several blocks
    for b, w in zip(blocked, whole):  # fp32 rounding, carried through the layers below
        torch.testing.assert_close(b, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())
    assert whole[0].abs().sum() > 0 and whole[1].abs().sum() > 0


def test_only_a_dense_mix_on_cpu_completes_its_input_gradients():
    """The x-term is left to the mix only where its backward rebuilds the inputs as the forward made
    them: shared masks, no writer gathered (a pruned circuit's sparse paths keep the whole rebuild),
    every dL/dz wanted, on CPU, and examples of at least ``FUSE_MIN`` values."""
    W, B, T, D = 40, 2, 64, 64
    store = WriterStates(W, (B, T, D), torch.float32, torch.device("cpu"))
    dense = torch.rand(16, W) + 0.1
    assert store.fusable(dense, mixing.live_writers(dense, T * D), None)
    sparse = torch.zeros(16, W)
    sparse[:, :3] = 1.0
    assert mixing.live_writers(sparse, T * D) is not None
    assert not store.fusable(sparse, mixing.live_writers(sparse, T * D), None)
    assert not store.fusable(dense, None, torch.arange(3))  # dL/dz of a few writers only
    assert not store.fusable(dense[None].expand(2, -1, -1), None, None)  # position-aware masks
    small = WriterStates(W, (B, 2, D), torch.float32, torch.device("cpu"))
    assert not small.fusable(dense, None, None)


def test_the_deepest_layers_keep_their_inputs_within_the_share():
    """``keep_inputs`` is a share of the writer states' size: the deepest layers whose Q/K/V readers
    fit in it keep their inputs; by default CPU keeps ``KEEP_INPUTS``, other devices none."""
    from edgeprune.model import KEEP_INPUTS
    model = EdgeModel.from_hf(build("llama", num_hidden_layers=6))  # 4 query / 2 KV heads: 8 Q/K/V readers a layer
    W = model.graph.num_writers
    per_layer = model.graph.reader_blocks[2].stop - model.graph.reader_blocks[0].start
    model.keep_inputs = 3 * per_layer / W  # room for exactly three layers
    assert model._kept_inputs == frozenset({3, 4, 5})
    model.keep_inputs = (3 * per_layer - 1) / W
    assert model._kept_inputs == frozenset({4, 5})
    model.keep_inputs = None  # CPU: the default share
    assert model._kept_inputs == frozenset(range(6 - int(KEEP_INPUTS * W // per_layer), 6))


@pytest.mark.parametrize("kind,layers,spans,size", [("gpt2", 3, False, 2), ("llama", 4, True, 2),
                                                    ("gpt2", 5, False, 3), ("llama", 5, True, 4)])
def test_layers_mixing_in_groups_equal_layers_mixing_alone(kind, layers, spans, size, monkeypatch):
    """A group's first layer mixes the later layers' readers too and carries those partial mixes on
    (``model.GROUP_LAYERS``): logits and every mask gradient equal those of each layer mixing alone,
    up to fp32 rounding of the other summation order (GPT-2: attention output biases carried, a
    last group shorter than the others; Llama: position-aware masks)."""
    from edgeprune import model as edge_model
    model, ids, corrupted, span_ids = _toy_run(kind, 7, spans, layers=layers)
    values = torch.rand(model.edge_masks.n, generator=torch.Generator().manual_seed(0))

    def run(group):
        monkeypatch.setattr(edge_model, "GROUP_LAYERS", group)
        z = values.clone().requires_grad_(True)
        out = model(ids, corrupted_input_ids=corrupted, edge_values=z, span_ids=span_ids).logits.float()
        _weighted_loss(out).backward()
        return out.detach(), z.grad

    monkeypatch.setattr(edge_model, "GROUP_LAYERS", size)
    assert model._layer_group(0) == (0, size - 1) and model._layer_group(size - 1) == (0, size - 1)
    assert model._layer_group(layers - 1) == (size * ((layers - 1) // size), layers - 1)
    paired_logits, paired_grad = run(size)
    alone_logits, alone_grad = run(1)
    torch.testing.assert_close(paired_logits, alone_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paired_grad, alone_grad, rtol=1e-4, atol=1e-6)
    assert alone_grad.abs().sum() > 0


def test_layers_mix_in_pairs_where_the_model_shape_pays_for_them(monkeypatch):
    """``model.layer_group_size``: pairs for deep models with few readers a layer (SmolLM2-135M,
    Qwen2.5-0.5B, Llama-3.2-1B's shapes), each layer alone for GPT-2 small and one layer; measured in
    ``bench/step.py --vs-groups 1``. ``GROUP_LAYERS`` overrides it."""
    from edgeprune import model as edge_model
    from edgeprune.graph import Graph, GraphSpec
    shapes = {(12, 12, None, True): 1,  # GPT-2 small: 37 readers a layer, 67 writers before a pair on average
              (30, 9, 3, False): 2,  # SmolLM2-135M: 16 readers, 141 writers
              (24, 14, 2, False): 2,  # Qwen2.5-0.5B
              (16, 32, 8, False): 2,  # Llama-3.2-1B
              (1, 12, None, True): 1}  # one layer: nothing to pair
    for (layers, heads, kv, pos), size in shapes.items():
        assert edge_model.layer_group_size(Graph(GraphSpec(layers, heads, kv, pos_embeds=pos))) == size
    model = EdgeModel.from_hf(build("llama", num_hidden_layers=4))
    monkeypatch.setattr(edge_model, "GROUP_LAYERS", None)
    assert edge_model.layer_group_size(model.graph) == 1 and model._layer_group(1) == (1, 1)
    monkeypatch.setattr(edge_model, "PAIR_MIN_RATIO", 0.0)  # every shape pays: pairs
    assert model._layer_group(1) == (0, 1) and model._layer_group(3) == (2, 3)
    monkeypatch.setattr(edge_model, "GROUP_LAYERS", 3)
    assert model._layer_group(1) == (0, 2)


@contextmanager
def _bench(name: str):
    """``bench/<name>.py`` loaded as a module, the bench folder importable and torch's thread count restored
    around the block (a bench's ``main`` sets its own)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench_dir))
    threads = torch.get_num_threads()
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench_dir / f"{name}.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        yield bench
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(bench_dir))


def test_bench_mix_products_runs_at_toy_sizes(capsys):
    """``bench/mix_products.py`` (the rates of the mix's products alone) runs end to end and prints a
    figure for every product it names; at toy sizes, so its rates mean nothing here."""
    with _bench("mix_products") as bench:
        assert bench.main(["--shape", "2x8", "--d", "16", "--writers", "5,3", "--readers", "4",
                           "--threads", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("R=  4") == 2 and "dL/dz" in out and "dL/ds in blocks of 64" in out
    assert out.count("floor: the differences read once") == 2 and "gradient rows read and written once" in out
    assert "K/V input gradients" in out and "one-writer mix" in out


def test_bench_step_times_the_backward_pieces_and_restores_them(capsys):
    """``bench/step.py --backward-parts`` wraps the mix's and the norms' backward pieces for one step,
    prints each one's seconds, and leaves the functions as they were."""
    from edgeprune.models import common

    with _bench("step") as bench:
        before = [owner.__dict__[name] for owner, name, _ in bench.BACKWARD_PARTS]
        assert bench.main(["--tiny", "--models", "llama", "--shapes", "2x8", "--repeats", "1", "--warmup", "1",
                           "--no-memory", "--backward-parts"]) == 0
    assert [owner.__dict__[name] for owner, name, _ in bench.BACKWARD_PARTS] == before
    assert common._NormProjection.__dict__["backward"] is before[4]
    line = next(x for x in capsys.readouterr().out.splitlines() if "backward pieces" in x)
    seconds = {label.strip(): float(line.split(f"{label.strip()} ")[1].split(" s")[0])
               for _, _, label in bench.BACKWARD_PARTS}
    assert seconds["mix backward"] > 0 and seconds["dL/ds"] > 0 and seconds["the norms' backward"] > 0


@pytest.mark.parametrize("kind,positional", [("gpt2", False), ("llama", False), ("llama", True)])
def test_dl_ds_position_major_gives_the_gradients_of_the_writer_major_buffer(kind, positional, monkeypatch):
    """On CPU with MKL dL/ds's buffer is position-major, (P, W, D), each mix's update one batch of
    per-position products into its writers' slice (``blas.update``; the live rows of a pruned circuit
    through the kept buffer, position-aware masks per position), and each writer's gradient a strided
    view of it. The states' gradients (through the embeddings) and every mask gradient are those of the
    writer-major buffer within fp32 rounding, with dense masks, masks exactly 0 (live rows) and clamped."""
    if not blas.available():
        pytest.skip("no MKL batch GEMM in this torch build: the buffer is writer-major")
    model, ids, corrupted, span_ids = _toy_run(kind, 4, positional, layers=3)
    embedding = model.hf.get_input_embeddings().weight
    embedding.requires_grad_(True)
    model.train()
    with torch.no_grad():  # the first half of the readers' masks anywhere, the rest's mostly exactly 0
        gen = torch.Generator().manual_seed(0)
        log_alpha = model.edge_masks.log_alpha
        log_alpha.copy_(torch.randn(model.edge_masks.n, generator=gen) * 3)
        later = model.graph.dense_index // model.graph.num_writers >= model.graph.num_readers // 2
        later = later.repeat(model.edge_masks.n // later.numel())  # position-aware: every span's copy
        log_alpha[later & (torch.rand(model.edge_masks.n, generator=gen) < 0.9)] = -10.0
    monkeypatch.setattr(mixing, "SPARSE_MIN", 0)  # these widths are toy-sized
    updates, real = [], mixing.WriterStates._add_grad_by_position
    monkeypatch.setattr(mixing.WriterStates, "_add_grad_by_position",
                        lambda self, z, go, start, live, fresh: updates.append((z.dim(), live is not None))
                        or real(self, z, go, start, live, fresh))

    def run(by_position):
        monkeypatch.setattr(mixing, "GRAD_BY_POSITION", by_position)
        return _seeded_grads(model, ids, corrupted, span_ids)

    writer_major = run(False)
    assert not updates
    position_major = run(True)
    assert any(live for _, live in updates) and any(not live for _, live in updates)  # both kinds of update
    assert all(dim == (3 if positional else 2) for dim, _ in updates)
    for b, w in zip(position_major, writer_major):
        torch.testing.assert_close(b, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())
    assert writer_major[0].abs().sum() > 0 and writer_major[1].abs().sum() > 0


def test_bench_step_times_the_backward_by_node_kind(capsys, tmp_path):
    """``bench/step.py --backward-nodes`` clocks every autograd node of one more backward of the step and
    of HF's, by kind: the node times sum to at most the backward's own, the step's show the mix's and
    the norms' backward, HF's its products, and ``torch.Tensor.backward`` is left as it was."""
    original = torch.Tensor.backward
    with _bench("step") as bench:
        assert bench.main(["--tiny", "--models", "llama", "--shapes", "2x8", "--repeats", "1", "--warmup", "1",
                           "--no-memory", "--backward-nodes", "--json", str(tmp_path / "nodes.json")]) == 0
    assert torch.Tensor.backward is original
    import json
    (result,) = json.loads((tmp_path / "nodes.json").read_text())
    nodes = result["backward_nodes"]
    for name, kinds in (("prune", ("_MixBackward", "_NormProjectionBackward", "_WriteBackward")), ("hf", ("MmBackward0",))):
        q = nodes[name]
        assert all(k in q["nodes"] and q["nodes"][k][1] > 0 for k in kinds), sorted(q["nodes"])
        assert 0 < sum(sec for sec, _ in q["nodes"].values()) <= q["backward"]
    assert "_MixBackward" not in nodes["hf"]["nodes"]
    out = capsys.readouterr().out
    assert "step backward by node kind" in out and "HF backward by node kind" in out
