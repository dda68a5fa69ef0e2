"""Circuit drawings: node names, edges.json loading, graphviz layout and rendering."""

import json
import random
import re
import shutil

import pytest

from edgeprune import Graph
from edgeprune.circuit import load_edges
from edgeprune.draw import circuit_to_dot, draw_circuit
from edgeprune.names import NodeName, parse_node

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="graphviz's dot program is not installed (apt-get install graphviz)")

SMALL = [
    ("tok_embeds", "a0.h1.q"),
    ("pos_embeds", "a0.h1.k"),
    ("tok_embeds", "a0.h1.v"),
    ("a0.h1", "m0"),
    ("m0", "a1.h0.q"),
    ("a1.h0", "resid_post"),
    ("m0", "resid_post"),
]


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------ parse_node
def test_parse_node_embeddings_and_output_have_no_layer():
    assert parse_node("tok_embeds") == NodeName("embed", None, None, None, "tok_embeds")
    assert parse_node("pos_embeds") == NodeName("embed", None, None, None, "pos_embeds")
    assert parse_node("resid_post") == NodeName("output", None, None, None, "resid_post")


def test_parse_node_head_output_and_its_qkv_inputs():
    assert parse_node("a3.h11") == NodeName("head", 3, 11, None, "a3.h11")
    for kind in "qkv":
        assert parse_node(f"a10.h0.{kind}") == NodeName(kind, 10, 0, None, f"a10.h0.{kind}")


def test_parse_node_grouped_kv_inputs_carry_the_group_not_a_head():
    assert parse_node("a2.g3.k") == NodeName("k", 2, None, 3, "a2.g3.k")
    assert parse_node("a2.g3.v") == NodeName("v", 2, None, 3, "a2.g3.v")


def test_parse_node_mlp_is_both_writer_and_reader():
    node = parse_node("m7")
    assert node == NodeName("mlp", 7, None, None, "m7")
    assert node.is_writer and node.is_reader


@pytest.mark.parametrize("name", ["", "m", "mlp0", "a0", "a0.h", "a0.h1.x", "a0.g1.q", "a0.g1",
                                  "A0.h1", "a01.h1", "a-1.h0", " m0", "a0.h1.q ", "resid_pre",
                                  "embeds", 3, None])
def test_parse_node_rejects_bad_names_listing_the_accepted_forms(name):
    with pytest.raises(ValueError, match=r"unknown node name .*expected one of .*a\{l\}\.g\{g\}\.k\|v"):
        parse_node(name)


@pytest.mark.parametrize("spec", [dict(n_layers=2, n_heads=3), dict(n_layers=2, n_heads=4, n_kv_heads=2,
                                                                    pos_embeds=False)])
def test_every_name_of_the_graph_parses_in_its_role(spec):
    g = Graph.from_spec(**spec)
    assert all(parse_node(w).is_writer for w in g.writers)
    assert all(parse_node(r).is_reader for r in g.readers)


# ------------------------------------------------------------------ load_edges
def test_load_edges_returns_pairs_as_tuples_in_file_order(tmp_path):
    path = write_json(tmp_path / "edges.json", [list(e) for e in SMALL])
    assert load_edges(path) == SMALL


def test_load_edges_accepts_an_empty_circuit(tmp_path):
    assert load_edges(write_json(tmp_path / "edges.json", [])) == []


def test_load_edges_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_edges(tmp_path / "nope.json")


def test_load_edges_invalid_json_reports_file_line_and_column(tmp_path):
    path = tmp_path / "edges.json"
    path.write_text('[\n  ["tok_embeds", "m0"],\n  ["m0" "resid_post"]\n]')
    with pytest.raises(ValueError, match=r"edges\.json: invalid JSON at line 3, column 9"):
        load_edges(path)


def test_load_edges_requires_a_list_at_top_level(tmp_path):
    path = write_json(tmp_path / "edges.json", {"edges": []})
    with pytest.raises(ValueError, match=r"edges\.json: expected a JSON list .* got a JSON object"):
        load_edges(path)


@pytest.mark.parametrize("entry", [["m0"], ["tok_embeds", "m0", "m1"], ["tok_embeds", 0], "m0", None,
                                   {"writer": "m0", "reader": "m1"}])
def test_load_edges_rejects_entries_that_are_not_string_pairs_by_index(tmp_path, entry):
    path = write_json(tmp_path / "edges.json", [["tok_embeds", "m0"], entry])
    with pytest.raises(ValueError, match=r"edges\.json: entry 1 is .*expected a \[writer, reader\] pair"):
        load_edges(path)


def test_load_edges_rejects_unknown_node_names_by_index(tmp_path):
    path = write_json(tmp_path / "edges.json", [["tok_embeds", "m0"], ["tok_embeds", "a0.h1.x"]])
    expected = r"edges\.json: entry 1 \[\"tok_embeds\", \"a0\.h1\.x\"\]: unknown node name 'a0\.h1\.x'"
    with pytest.raises(ValueError, match=expected):
        load_edges(path)


def test_load_edges_rejects_a_reader_as_writer(tmp_path):
    path = write_json(tmp_path / "edges.json", [["a0.h1.q", "m0"]])
    with pytest.raises(ValueError, match=r"entry 0 .*'a0.h1.q' is a reader and cannot be the writer"):
        load_edges(path)


@pytest.mark.parametrize("reader", ["tok_embeds", "pos_embeds", "a0.h1"])
def test_load_edges_rejects_a_writer_only_name_as_reader(tmp_path, reader):
    path = write_json(tmp_path / "edges.json", [["tok_embeds", "m0"], ["tok_embeds", reader]])
    with pytest.raises(ValueError, match=rf"entry 1 .*'{reader}' only writes and cannot be the reader"):
        load_edges(path)


# ------------------------------------------------------------------ circuit_to_dot
def test_dot_source_declares_every_node_of_the_circuit_and_the_legend():
    source = circuit_to_dot(SMALL, title="IOI").source
    for name in {n for edge in SMALL for n in edge}:
        assert re.search(rf'^\s+"?{re.escape(name)}"? \[', source, re.MULTILINE), name
    assert re.search(r"^\tlegend \[label=<<TABLE", source, re.MULTILINE)
    assert "label=IOI" in source


def test_head_inputs_feed_their_head_by_dashed_edges_and_imply_the_head():
    source = circuit_to_dot([("tok_embeds", "a2.h5.k")]).source
    assert '"a2.h5.k" -> "a2.h5" [arrowsize=0.4 color="#0072B2" style=dashed]' in source
    assert '"a2.h5" [label="a2.h5"' in source


def test_grouped_k_reader_connects_only_to_the_heads_of_its_group():
    edges = [("tok_embeds", "a4.g0.k"), ("tok_embeds", "a4.g1.v"), ("a4.h0", "m4"), ("a4.h1", "m4"),
             ("a4.h4", "m4"), ("a4.h7", "m4"), ("a0.h2", "m0")]
    source = circuit_to_dot(edges, heads_per_group=2).source  # g0 serves h0, h1; g1 serves h2, h3
    assert '"a4.g0.k" -> "a4.h0"' in source and '"a4.g0.k" -> "a4.h1"' in source
    for wrong in ('"a4.g0.k" -> "a4.h4"', '"a4.g0.k" -> "a4.h7"', '"a4.g0.k" -> "a0.h2"', '"a4.g1.v" ->'):
        assert wrong not in source


def test_grouped_reader_without_group_size_is_not_joined_to_any_head():
    with pytest.warns(UserWarning, match="group size is unknown"):
        source = circuit_to_dot([("tok_embeds", "a1.g0.k"), ("a1.h0", "m1")]).source
    assert '"a1.g0.k" -> "a1.h0"' not in source


def test_head_inputs_are_labelled_with_their_full_names():
    source = circuit_to_dot([("tok_embeds", "a2.h5.q"), ("tok_embeds", "a2.g1.k")], heads_per_group=4).source
    assert '"a2.h5.q" [label="a2.h5.q"' in source and '"a2.g1.k" [label="a2.g1.k"' in source


def test_draw_cli_reads_the_group_size_from_circuit_json(tmp_path):
    from edgeprune.cli import main

    edges = tmp_path / "edges.json"
    edges.write_text(json.dumps([["tok_embeds", "a1.g1.k"], ["a1.h2", "m1"], ["a1.h0", "m1"]]))
    (tmp_path / "circuit.json").write_text(json.dumps({"graph": {"n_heads": 4, "n_kv_heads": 2}}))
    assert main(["draw", str(edges), "-o", str(tmp_path / "c.dot")]) == 0
    source = (tmp_path / "c.dot").read_text()
    assert '"a1.g1.k" -> "a1.h2"' in source and '"a1.g1.k" -> "a1.h0"' not in source


def test_edges_take_the_colour_of_their_reader_kind():
    source = circuit_to_dot([("tok_embeds", "a0.h0.q"), ("tok_embeds", "a0.h0.v"), ("a0.h0", "m0"),
                             ("m0", "resid_post")]).source
    assert 'tok_embeds -> "a0.h0.q" [color="#D55E00b0"]' in source
    assert 'tok_embeds -> "a0.h0.v" [color="#009E73b0"]' in source
    assert '"a0.h0" -> m0 [color="#CC79A7b0"]' in source
    assert 'm0 -> resid_post [color="#E69F00b0"]' in source


def test_repeated_edges_are_drawn_once():
    source = circuit_to_dot([("m0", "resid_post"), ("m0", "resid_post")]).source
    assert source.count("m0 -> resid_post") == 1


def test_circuit_to_dot_rejects_an_edge_with_roles_swapped():
    with pytest.raises(ValueError, match="'a0.h0.q' is a reader"):
        circuit_to_dot([("a0.h0.q", "m0")])


@needs_dot
def test_layout_runs_embeddings_top_layers_down_output_bottom():
    edges = [("tok_embeds", "a0.h0.q"), ("a0.h0", "m0"), ("m0", "a1.h0.q"), ("a1.h0", "m1"),
             ("tok_embeds", "resid_post"), ("m1", "resid_post")]
    plain = circuit_to_dot(edges).pipe(format="plain", encoding="utf-8")
    y = {line.split()[1].strip('"'): float(line.split()[3]) for line in plain.splitlines()
         if line.startswith("node ")}  # plain output: y grows upwards
    order = ["tok_embeds", "a0.h0.q", "a0.h0", "m0", "a1.h0.q", "a1.h0", "m1", "resid_post"]
    assert [y[n] for n in order] == sorted((y[n] for n in order), reverse=True)
    assert len({y[n] for n in order}) == len(order)


# ------------------------------------------------------------------ draw_circuit
@needs_dot
@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".png", b"\x89PNG"), (".svg", b"<svg")])
def test_draw_writes_the_image_and_its_dot_source_beside_it(tmp_path, suffix, magic):
    out = draw_circuit(SMALL, tmp_path / f"circuit{suffix}", title="small")
    assert out == tmp_path / f"circuit{suffix}"
    data = out.read_bytes()
    assert magic in data[:512]
    assert (tmp_path / "circuit.dot").read_text().startswith("digraph circuit")


@needs_dot
def test_draw_creates_missing_parent_directories(tmp_path):
    out = draw_circuit(SMALL, tmp_path / "runs" / "ioi" / "circuit.png")
    assert out.is_file() and out.with_suffix(".dot").is_file()


def test_draw_to_a_dot_suffix_writes_only_the_source(tmp_path):
    out = draw_circuit(SMALL, tmp_path / "circuit.dot")
    assert out == tmp_path / "circuit.dot"
    assert [p.name for p in tmp_path.iterdir()] == ["circuit.dot"]


def test_draw_rejects_an_unknown_suffix_naming_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match=r"circuit\.jpg.*\.pdf, \.png, \.svg, \.dot"):
        draw_circuit(SMALL, tmp_path / "circuit.jpg")


@needs_dot
def test_draw_an_empty_circuit_renders_a_note(tmp_path):
    out = draw_circuit([], tmp_path / "empty.svg", title="nothing kept")
    text = out.read_text()
    assert "empty circuit" in text and "nothing kept" in text


@needs_dot
def test_draw_300_random_edges_of_a_12_layer_12_head_graph_to_png(tmp_path):
    edges = random.Random(0).sample(Graph.from_spec(n_layers=12, n_heads=12).edges, 300)
    out = draw_circuit(edges, tmp_path / "big.png")
    assert out.is_file() and out.stat().st_size > 0


def test_draw_without_dot_writes_the_source_and_warns_how_to_render(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))
    hint = (r"apt-get install graphviz / brew install graphviz / conda install graphviz\)"
            r".*dot -Tpdf .*circuit\.dot -o .*circuit\.pdf")
    with pytest.warns(UserWarning, match=hint):
        out = draw_circuit(SMALL, tmp_path / "circuit.pdf")
    assert out == tmp_path / "circuit.dot" and out.is_file()
    assert not (tmp_path / "circuit.pdf").exists()
