"""Drawings of position-aware circuits: [writer, reader, span] edges, a column per span."""

import json
import re
import shutil

import pytest

from edgeprune.cli import main
from edgeprune.circuit import load_edges, span_info_of
from edgeprune.draw import circuit_to_dot, draw_circuit

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="graphviz's dot program is not installed (apt-get install graphviz)")

# END is read first in the file, but circuit.json orders the columns IO, S1, other, END
POSITIONAL = [
    ("tok_embeds", "a0.h1.q", "END"),
    ("tok_embeds", "a0.h1.k", "IO"),
    ("tok_embeds", "a0.h1.v", "IO"),
    ("a0.h1", "m0", "END"),
    ("tok_embeds", "m0", "IO"),
    ("m0", "a1.h0.k", "IO"),
    ("tok_embeds", "a1.h0.q", "END"),
    ("a1.h0", "resid_post", "END"),
    ("m0", "resid_post", "END"),
    ("pos_embeds", "a1.h0.v", "S1"),
    ("a1.h0", "m1", "S1"),
    ("m1", "resid_post", "S1"),
]
SPANS = [{"name": "IO", "tokens": 1.0, "min": 1, "max": 1},
         {"name": "S1", "tokens": 1.5, "min": 1, "max": 2},
         {"name": "other", "tokens": 7.0, "min": 5, "max": 9},
         {"name": "END", "tokens": 1.0, "min": 1, "max": 1}]


def write_run(tmp_path, edges, spans=SPANS, name="edges.json"):
    path = tmp_path / name
    path.write_text(json.dumps([list(e) for e in edges]))
    if spans is not None:
        summary = "circuit.json" if name == "edges.json" else f"{path.stem}.circuit.json"
        (tmp_path / summary).write_text(json.dumps({"graph": {"n_heads": 2, "n_kv_heads": 2}, "spans": spans}))
    return path


def clusters(source):
    """{cluster label's first line: the node ids declared in it}, in declaration order."""
    out = {}
    for block in re.findall(r"subgraph cluster_\w+ \{(.*?)\n\t\}", source, re.S):
        label = re.search(r'label=(?:"([^"\\]*)|(\w+))', block)
        label = label.group(1) or label.group(2)
        out[label] = re.findall(r'^\t\t"([^"]+)" \[', block, re.M)
    return out


# ------------------------------------------------------------------ load_edges
def test_load_edges_returns_triples_in_file_order_with_the_circuit_json_spans(tmp_path):
    edges = load_edges(write_run(tmp_path, POSITIONAL))
    assert edges == POSITIONAL
    assert [s["name"] for s in edges.spans] == ["IO", "S1", "other", "END"]


def test_load_edges_without_circuit_json_orders_spans_by_first_appearance(tmp_path):
    edges = load_edges(write_run(tmp_path, POSITIONAL, spans=None))
    assert edges.spans == ["END", "IO", "S1"]


def test_load_edges_of_a_plain_file_has_no_spans_even_beside_a_positional_circuit_json(tmp_path):
    edges = load_edges(write_run(tmp_path, [("tok_embeds", "m0"), ("m0", "resid_post")]))
    assert edges == [("tok_embeds", "m0"), ("m0", "resid_post")] and edges.spans is None


def test_span_info_reads_the_named_circuit_json_of_a_renamed_edges_file(tmp_path):
    path = write_run(tmp_path, POSITIONAL, name="small.json")
    assert (tmp_path / "small.circuit.json").is_file()
    assert [s["name"] for s in span_info_of(path)] == ["IO", "S1", "other", "END"]


# ------------------------------------------------------------------ bad input
def test_a_triple_in_a_file_of_pairs_is_an_error_naming_file_and_entry(tmp_path):
    path = write_run(tmp_path, [("tok_embeds", "m0"), ("m0", "resid_post"), ("m0", "resid_post", "END")])
    with pytest.raises(ValueError, match=r"edges\.json: entry 2 is .*expected a \[writer, reader\] pair "
                                         r"of node names like entry 0 .*not both"):
        load_edges(path)


def test_a_pair_in_a_file_of_triples_is_an_error_naming_file_and_entry(tmp_path):
    path = write_run(tmp_path, [("tok_embeds", "m0", "IO"), ("m0", "resid_post")])
    with pytest.raises(ValueError, match=r"edges\.json: entry 1 is .*expected a \[writer, reader, span\] "
                                         r"triple like entry 0 .*not both"):
        load_edges(path)


@pytest.mark.parametrize("span", [3, None, ["IO"]])
def test_a_span_that_is_not_a_string_is_an_error_naming_file_and_entry(tmp_path, span):
    path = write_run(tmp_path, [("tok_embeds", "m0", "IO"), ("m0", "resid_post", span)])
    with pytest.raises(ValueError, match=r"edges\.json: entry 1 is .*the span \(third element\) must be a string"):
        load_edges(path)


def test_a_span_missing_from_circuit_json_is_an_error_listing_the_spans(tmp_path):
    path = write_run(tmp_path, [("tok_embeds", "m0", "IO"), ("m0", "resid_post", "S3")])
    with pytest.raises(ValueError, match=r"edges\.json: entry 1 \[\"m0\", \"resid_post\", \"S3\"\]: unknown "
                                         r"span 'S3'; .*circuit\.json lists the spans IO, S1, other, END"):
        load_edges(path)


def test_bad_node_names_in_triples_are_errors_naming_the_entry(tmp_path):
    path = write_run(tmp_path, [("tok_embeds", "m0", "IO"), ("a0.h1.q", "m0", "IO")])
    with pytest.raises(ValueError, match=r"edges\.json: entry 1 .*'a0.h1.q' is a reader"):
        load_edges(path)


def test_a_malformed_spans_field_in_circuit_json_names_the_record(tmp_path):
    path = write_run(tmp_path, POSITIONAL, spans=[{"name": "IO"}, {"tokens": 1}])
    with pytest.raises(ValueError, match=r"circuit\.json: spans\[1\] is .*a string \"name\""):
        load_edges(path)


def test_circuit_to_dot_rejects_mixed_shapes_and_unknown_spans_by_entry():
    with pytest.raises(ValueError, match=r"entry 1 .*same shape as entry 0"):
        circuit_to_dot([("tok_embeds", "m0", "IO"), ("m0", "resid_post")])
    with pytest.raises(ValueError, match=r"entry 1 .*must be a string"):
        circuit_to_dot([("tok_embeds", "m0", "IO"), ("m0", "resid_post", 0)])
    with pytest.raises(ValueError, match=r"entry 0 .*unknown span 'END'; the spans are IO, S1"):
        circuit_to_dot([("tok_embeds", "m0", "END")], spans=["IO", "S1"])


# ------------------------------------------------------------------ layout
def test_one_cluster_per_span_with_edges_in_circuit_json_order_labelled_with_tokens(tmp_path):
    source = circuit_to_dot(load_edges(write_run(tmp_path, POSITIONAL))).source
    assert list(clusters(source)) == ["IO", "S1", "END"]  # "other" has no edge: no column
    assert 'label="IO\\n1 token"' in source and 'label="S1\\n1.5 tokens (1-2)"' in source


def test_a_node_is_drawn_in_every_column_it_appears_in_labelled_with_its_plain_name(tmp_path):
    columns = clusters(circuit_to_dot(load_edges(write_run(tmp_path, POSITIONAL))).source)
    assert "IO:tok_embeds" in columns["IO"] and "END:tok_embeds" in columns["END"]
    assert "S1:tok_embeds" not in columns["S1"]
    assert {"IO:m0", "END:m0"} <= set(columns["IO"]) | set(columns["END"])  # an MLP: one node per column
    assert columns["END"].count("END:m0") == 1
    source = circuit_to_dot(POSITIONAL, spans=SPANS).source
    assert '"IO:tok_embeds" [label=tok_embeds' in source and '"END:a0.h1" [label="a0.h1"' in source


def test_heads_appear_where_they_write_or_their_query_is_read():
    columns = clusters(circuit_to_dot(POSITIONAL, spans=SPANS).source)
    assert "END:a1.h0" in columns["END"]  # query read at END
    assert "S1:a1.h0" in columns["S1"]  # writes m1 at S1
    assert "IO:a1.h0" not in columns["IO"]  # only its key is read at IO
    assert "END:a0.h1" in columns["END"] and "IO:a0.h1" not in columns["IO"]


def test_every_circuit_edge_joins_its_nodes_within_its_span_column():
    source = circuit_to_dot(POSITIONAL, spans=SPANS).source
    for writer, reader, span in POSITIONAL:
        assert re.search(rf'^\t"{re.escape(f"{span}:{writer}")}" -> "{re.escape(f"{span}:{reader}")}" '
                         r'\[color="#[0-9A-F]{6}b0"\]$', source, re.M), (writer, reader, span)


def test_kv_inputs_join_their_head_in_every_column_it_appears_in_dotted_across_columns():
    source = circuit_to_dot(POSITIONAL, spans=SPANS).source
    joins = dict(re.findall(r'^\t("(?:IO|S1|END):a\d\.h\d\.[qkv]" -> "[^"]+") \[(.*)\]$', source, re.M))
    # a1.h0 appears at END (query) and S1 (writes m1): its key read at IO feeds both
    assert "style=dotted" in joins['"IO:a1.h0.k" -> "END:a1.h0"']
    assert "style=dotted" in joins['"IO:a1.h0.k" -> "S1:a1.h0"']
    # its value read at S1 feeds the S1 head within the column (dashed) and the END head across
    assert "style=dashed" in joins['"S1:a1.h0.v" -> "S1:a1.h0"']
    assert "style=dotted" in joins['"S1:a1.h0.v" -> "END:a1.h0"']
    # a query input feeds its head in its own column only
    assert "style=dashed" in joins['"END:a1.h0.q" -> "END:a1.h0"']
    assert not [j for j in joins if j.startswith('"END:a1.h0.q"') and not j.endswith('"END:a1.h0"')]
    assert all("constraint=false" in attrs for j, attrs in joins.items() if "dotted" in attrs)


def test_a_head_read_only_through_keys_is_drawn_beside_them():
    columns = clusters(circuit_to_dot([("tok_embeds", "a2.h3.k", "IO"), ("tok_embeds", "m2", "END")]).source)
    assert columns == {"IO": ["IO:tok_embeds", "IO:a2.h3.k", "IO:a2.h3"], "END": ["END:tok_embeds", "END:m2"]}


def test_grouped_kv_inputs_join_only_their_groups_heads_in_every_column():
    edges = [("tok_embeds", "a1.g0.k", "IO"), ("tok_embeds", "a1.h1.q", "END"), ("a1.h0", "m1", "S1"),
             ("tok_embeds", "a1.h2.q", "END")]
    source = circuit_to_dot(edges, heads_per_group=2).source  # g0 serves h0, h1
    assert '"IO:a1.g0.k" -> "END:a1.h1"' in source and '"IO:a1.g0.k" -> "S1:a1.h0"' in source
    assert '"IO:a1.g0.k" -> "END:a1.h2"' not in source
    with pytest.warns(UserWarning, match="group size is unknown"):
        assert '"IO:a1.g0.k" ->' not in circuit_to_dot(edges).source


def test_plain_edges_draw_without_columns():
    source = circuit_to_dot([("tok_embeds", "a0.h0.q"), ("a0.h0", "resid_post")]).source
    assert "cluster" not in source and '"a0.h0.q" -> "a0.h0"' in source


@needs_dot
def test_layers_share_a_rank_across_columns_and_columns_run_left_to_right(tmp_path):
    plain = circuit_to_dot(load_edges(write_run(tmp_path, POSITIONAL))).pipe(format="plain", encoding="utf-8")
    pos = {line.split()[1].strip('"'): (float(line.split()[2]), float(line.split()[3]))
           for line in plain.splitlines() if line.startswith("node ")}
    assert pos["IO:tok_embeds"][1] == pos["END:tok_embeds"][1] == pos["S1:pos_embeds"][1]
    assert pos["IO:m0"][1] == pos["END:m0"][1]
    assert pos["IO:a1.h0.k"][1] == pos["S1:a1.h0.v"][1] == pos["END:a1.h0.q"][1]
    assert pos["END:a1.h0"][1] == pos["S1:a1.h0"][1] < pos["END:a1.h0.q"][1]  # y grows upwards
    xs = {span: [x for name, (x, _) in pos.items() if name.startswith(f"{span}:")] for span in ("IO", "S1", "END")}
    assert max(xs["IO"]) < min(xs["S1"]) and max(xs["S1"]) < min(xs["END"])


@needs_dot
def test_cli_draws_a_positional_file_to_svg_with_every_edge(tmp_path):
    path = write_run(tmp_path, POSITIONAL)
    assert main(["draw", str(path), "-o", str(tmp_path / "c.svg"), "--title", "spans"]) == 0
    svg = (tmp_path / "c.svg").read_text()
    titles = set(re.findall(r'<g id="edge\d+" class="edge">\s*<title>(.*?)</title>', svg))
    for writer, reader, span in POSITIONAL:
        assert f"{span}:{writer}&#45;&gt;{span}:{reader}" in titles, (writer, reader, span)
    assert "IO:a1.h0.k&#45;&gt;END:a1.h0" in titles
    assert (tmp_path / "c.dot").read_text().count("subgraph cluster_") == 3


def test_draw_circuit_passes_spans_through_to_the_dot_source(tmp_path):
    out = draw_circuit(POSITIONAL, tmp_path / "c.dot", spans=["END", "S1", "IO"])
    assert list(clusters(out.read_text())) == ["END", "S1", "IO"]
