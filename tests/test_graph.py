"""The computation graph: names, counts and ordering."""

import pytest

from edgeprune import Graph


def test_gpt2_small_counts():
    g = Graph.from_spec(n_layers=12, n_heads=12)
    assert (g.num_writers, g.num_readers, g.num_edges) == (158, 445, 32936)
    assert len(g.edges) == 32936


def test_gqa_llama_counts_and_kv_reader_names():
    g = Graph.from_spec(n_layers=5, n_heads=8, n_kv_heads=4, pos_embeds=False)
    assert g.num_writers == 1 + 5 * (8 + 1)
    assert g.num_readers == 5 * (8 + 4 + 4 + 1) + 1
    # layer l attention readers see 1 + 9 l writers, the MLP also sees layer l's heads
    expected = sum(16 * (1 + 9 * l) + (1 + 9 * l + 8) for l in range(5)) + g.num_writers
    assert g.num_edges == expected
    assert "a2.g3.k" in g.reader_index and "a2.g3.v" in g.reader_index
    assert "a2.h3.k" not in g.reader_index
    assert "pos_embeds" not in g.writer_index


def test_every_reader_sees_only_earlier_writers():
    g = Graph.from_spec(n_layers=3, n_heads=2)

    def position(name):  # forward order: embeddings, then per layer heads before the MLP
        if name.endswith("_embeds"):
            return -1.0
        if name.startswith("a"):
            return int(name[1:].split(".")[0])
        if name.startswith("m"):
            return int(name[1:]) + 0.5
        return 1e9

    for writer, reader in g.edges:
        reader_pos = position(reader) if reader.startswith("m") else (
            1e9 if reader == "resid_post" else int(reader[1:].split(".")[0]) - 0.25)
        assert position(writer) < reader_pos, (writer, reader)
    assert ("a1.h0", "m1") in g.edges and ("a1.h0", "a1.h1.q") not in g.edges
    assert ("m2", "resid_post") in g.edges


def test_edge_index_round_trip_and_errors():
    g = Graph.from_spec(n_layers=2, n_heads=2)
    for i, (w, r) in enumerate(g.edges):
        assert g.edge_index(w, r) == i
    with pytest.raises(KeyError, match="unknown writer"):
        g.edge_index("a9.h0", "m0")
    with pytest.raises(KeyError, match="does not come before"):
        g.edge_index("m1", "a0.h0.q")


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Graph.from_spec(n_layers=2, n_heads=6, n_kv_heads=4)
