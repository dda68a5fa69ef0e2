import pytest
import torch

from edgeprune.circuit import extract_circuit, remove_dangling, threshold_to_sparsity
from edgeprune.graph import Graph, GraphSpec, edges_to_mask
from edgeprune.masks import prob_nonzero


@pytest.mark.parametrize("seed", range(5))
def test_threshold_hits_expected_sparsity_within_one_edge(seed):
    g = torch.Generator().manual_seed(seed)
    la = torch.randn(3000, generator=g) * 4 + torch.rand(1, generator=g) * 6 - 3
    expected = 1 - float(prob_nonzero(la).sum()) / la.numel()
    t = threshold_to_sparsity(la)
    assert abs(int(t.kept.sum()) - round(la.numel() * (1 - expected))) <= 1
    assert t.kept.equal(la > t.log_alpha)


def test_threshold_with_saturated_masks_still_splits():
    # many masks deterministic exactly 1 (log_alpha far above the saturation point): ties on the value
    la = torch.cat([torch.linspace(5, 9, 100), torch.full((100,), -8.0)])
    t = threshold_to_sparsity(la, sparsity=0.75)
    assert int(t.kept.sum()) == 50 and t.kept[50:100].all()


def small_graph():
    return Graph(GraphSpec(n_layers=2, n_heads=2, n_kv_heads=1, pos_embeds=True))


def test_dangling_edges_are_removed():
    g = small_graph()
    keep = [("tok_embeds", "a0.h0.q"), ("a0.h0", "m0"), ("m0", "resid_post"),
            ("a0.h1", "a1.h0.q"),          # a0.h1 has no input: not reached from an embedding
            ("tok_embeds", "a1.h1.q")]     # a1.h1 writes nowhere: no path to resid_post
    kept = remove_dangling(g, edges_to_mask(g, keep))
    got = {e for e, k in zip(g.edges, kept.tolist()) if k}
    assert got == {("tok_embeds", "a0.h0.q"), ("a0.h0", "m0"), ("m0", "resid_post")}


def test_grouped_kv_reader_feeds_every_head_of_its_group():
    g = small_graph()
    keep = [("pos_embeds", "a0.g0.k"), ("a0.h1", "resid_post")]
    kept = remove_dangling(g, edges_to_mask(g, keep))
    assert int(kept.sum()) == 2


def test_extract_circuit_reports_counts_before_and_after():
    g = small_graph()
    la = torch.full((g.num_edges,), -5.0)
    for e in [("tok_embeds", "a0.h0.q"), ("a0.h0", "resid_post"), ("a0.h1", "m1")]:
        la[g.edge_index(*e)] = 5.0
    c = extract_circuit(g, la, edge_sparsity=1 - 3 / g.num_edges)
    assert c.counts["edges_before_dangling"] == 3 and c.counts["edges"] == 2
    assert set(c.edges) == {("tok_embeds", "a0.h0.q"), ("a0.h0", "resid_post")}


def test_edges_to_mask_names_bad_entry():
    g = small_graph()
    with pytest.raises(ValueError, match="edge 1: no edge m1 -> a0.h0.q"):
        edges_to_mask(g, [("tok_embeds", "m0"), ("m1", "a0.h0.q")])
    with pytest.raises(ValueError, match="edge 0: expected a \\[writer, reader\\] pair"):
        edges_to_mask(g, ["tok_embeds"])
