"""Draw a circuit (a list of [writer, reader] edges, as in ``edges.json``) with graphviz.

Conventions of a drawing:

- Top to bottom in forward order: the embeddings share the top rank; then each layer ``l`` takes
  three ranks, the attention inputs (``a{l}.h{h}.q`` / ``.k`` / ``.v``, or ``a{l}.g{g}.k`` / ``.v``
  under grouped-query attention), the head outputs ``a{l}.h{h}``, and the MLP ``m{l}``; the
  read-out ``resid_post`` is alone at the bottom. A grey label at the side names each rank.
- Only nodes that occur in some edge are drawn, plus the head that a per-head input belongs to.
  The MLP is a single node ``m{l}``: the edges into it are its input, the edges out its output.
- A head's inputs are small ellipses labelled with their full names (``a3.h5.q``, ``a3.g1.k``)
  above the head, joined to it by a dashed edge, so that a head's inputs and its output are never
  confused. A grouped input ``a{l}.g{g}.k`` joins the drawn heads of its group only: heads
  ``g * heads_per_group`` to ``(g + 1) * heads_per_group - 1``. The edges file does not say the
  group size: ``draw_circuit`` takes it (``edgeprune draw`` reads it from the ``circuit.json``
  beside the edges file, or ``--heads-per-group``); without it grouped inputs are drawn unjoined,
  with a warning, never joined to heads they do not feed.
- Every node kind has its own fill colour, and every circuit edge takes the colour of the kind of
  reader it feeds (q, k, v, MLP or output), so that with a few hundred edges one can still follow
  what a writer is used for. The legend at the top spells the colours out.

Nodes are named exactly as in ``edges.json`` (and in SVG output the full name is each node's
tooltip), so a name seen in a drawing can be searched for in the file and in the logs.

Position-aware circuits (``edges.json`` entries ``[writer, reader, span]``: the reader at the
positions of ``span`` reads the writer at those same positions) are drawn with one column (a
graphviz cluster) per span, labelled with the span's name and token count, left to right in the
order of the ``circuit.json`` ``spans`` beside the edges file (else in order of first appearance;
spans without edges get no column). A node is drawn once in every span it appears in (its
graphviz id is ``"{span}:{name}"``, its label the plain name), and the ranks run across the
columns as above. Within a column an edge ``(w, r, s)`` joins ``w`` to ``r``, a Q input and an MLP
input feed their node in the same column; a head appears in a column where it writes, or where its
Q input is read. A K/V input read at span ``s`` feeds its head at every span the head appears in
(attention reads keys and values at other positions): dashed within its column as in a plain
drawing, dotted and thicker into the other columns. A head whose only inputs are K/V inputs (so
it appears in no column of its own) is drawn beside those inputs.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import graphviz
from graphviz.quoting import attr_list, quote

from .circuit import summary_path
from .jsonfile import shorten
from .names import NodeName, parse_edge, parse_node

SUFFIXES = (".pdf", ".png", ".svg", ".dot")

# Okabe-Ito colours: distinguishable under the common forms of colour blindness.
COLOURS = {
    "embed": "#BBBBBB",
    "q": "#D55E00",
    "k": "#0072B2",
    "v": "#009E73",
    "head": "#56B4E9",
    "mlp": "#CC79A7",
    "output": "#E69F00",
}
LEGEND = (
    ("embed", "embeddings: tok_embeds, pos_embeds"),
    ("q", "query input a{l}.h{h}.q"),
    ("k", "key input a{l}.h{h}.k / a{l}.g{g}.k"),
    ("v", "value input a{l}.h{h}.v / a{l}.g{g}.v"),
    ("head", "head output a{l}.h{h}"),
    ("mlp", "MLP m{l}"),
    ("output", "output resid_post"),
)
EDGE_ALPHA = "b0"  # partly transparent, so bundles of crossing edges stay readable

def circuit_to_dot(edges: Iterable[tuple[str, ...]], title: str | None = None,
                   heads_per_group: int | None = None, spans: Iterable | None = None) -> graphviz.Digraph:
    """Lay out a circuit as a top-to-bottom graphviz graph (see the module docstring).

    ``edges``: (writer, reader) pairs, or (writer, reader, span) triples for a position-aware
    circuit (one column per span). ``heads_per_group``: query heads per KV head under grouped-query
    attention (needed to join a grouped K/V input to its heads). ``spans`` (triples only): the
    columns, left to right, as span names or ``circuit.json`` span records (``{"name", "tokens",
    "min", "max"}``); every span of an edge must be among them. Default: ``edges.spans`` when
    ``edges`` came from ``load_edges``, else the spans in order of first appearance."""
    if heads_per_group is not None and heads_per_group < 1:
        raise ValueError(f"heads_per_group must be >= 1, got {heads_per_group}")
    if spans is None:
        spans = getattr(edges, "spans", None)
    edges = list(dict.fromkeys(tuple(e) for e in edges))  # drop repeats, keep the file's order
    positional = _check_shapes(edges)
    dot = _digraph(title)
    if not edges:
        dot.node("empty", "empty circuit", shape="plaintext", style="", fontcolor="#666666")
    elif positional:
        _span_layout(dot, edges, _columns(edges, spans), heads_per_group)
    else:
        _plain_layout(dot, edges, heads_per_group)
    return dot


def _digraph(title: str | None) -> graphviz.Digraph:
    """An empty top-to-bottom graph with our defaults (and the title above it)."""
    dot = graphviz.Digraph(
        "circuit",
        graph_attr=dict(rankdir="TB", newrank="true", splines="spline", nodesep="0.15",
                        ranksep="0.4", outputorder="edgesfirst", fontname="Helvetica"),
        node_attr=dict(fontname="Helvetica", fontsize="10", style="filled", penwidth="0.5"),
        edge_attr=dict(arrowsize="0.5", penwidth="0.8"),
    )
    # `concentrate` stays off: it merges edges whatever their colour, losing the reader kind.
    if title:
        dot.attr(label=graphviz.nohtml(title), labelloc="t", fontsize="16")
    return dot


def _plain_layout(dot: graphviz.Digraph, edges: list[tuple[str, str]], heads_per_group: int | None) -> None:
    """A circuit with shared masks: one node per name, a rank per layer part, Q/K/V inputs joined to their heads."""
    nodes: dict[str, NodeName] = {}
    for writer, reader in edges:
        for node in parse_edge(writer, reader):
            nodes[node.name] = node
    for node in list(nodes.values()):
        if node.kind in ("q", "k", "v") and node.head is not None:
            head = f"a{node.layer}.h{node.head}"
            nodes.setdefault(head, parse_node(head))
    ordered = sorted(nodes.values(), key=_order)
    heads_by_layer, ranks = defaultdict(list), defaultdict(list)
    for node in ordered:
        ranks[_rank(node)].append(node)
        if node.kind == "head":
            heads_by_layer[node.layer].append(node.name)
    _plain_ranks(dot, ranks)
    unjoined = []
    for node in ordered:
        if node.kind not in ("q", "k", "v"):
            continue
        heads = _joined_heads(node, heads_by_layer[node.layer], heads_per_group)
        if heads is None:
            heads = []
            unjoined.append(node.name)
        for head in heads:
            dot.edge(node.name, head, style="dashed", color=COLOURS[node.kind], arrowsize="0.4")
    for writer, reader in edges:
        dot.edge(writer, reader, color=COLOURS[nodes[reader].kind] + EDGE_ALPHA)
    if unjoined:
        warnings.warn(f"grouped K/V inputs ({', '.join(unjoined[:3])}{' ...' if len(unjoined) > 3 else ''}) are "
                      "drawn without their heads: the group size is unknown (pass heads_per_group, or "
                      "--heads-per-group to edgeprune draw)", stacklevel=3)
    dot.node("legend", _legend_label(), shape="plaintext", style="", fontsize="9")


def _plain_ranks(dot: graphviz.Digraph, ranks: dict[tuple[float, int], list[NodeName]]) -> None:
    """The nodes of each rank side by side, with one labelled anchor per rank chained below, so ranks
    keep forward order even where no circuit edge links them."""
    _labelled_ranks(dot, ranks, lambda same, node: same.node(node.name, **_node_style(node)))


def _labelled_ranks(dot: graphviz.Digraph, ranks: dict, add_node) -> None:
    """Each rank as one ``rank=same`` row (``add_node(row, item)`` per member) beside a labelled
    anchor; the anchors chained top to bottom keep the rows in forward order."""
    anchors = []
    for i, rank in enumerate(sorted(ranks)):
        anchor = f"_rank{i}"
        anchors.append(anchor)
        with dot.subgraph() as same:
            same.attr(rank="same")
            same.node(anchor, _rank_label(rank), shape="plaintext", style="", fontsize="9",
                      fontcolor="#888888")
            for item in ranks[rank]:
                add_node(same, item)
    for upper, lower in zip(anchors, anchors[1:]):
        dot.edge(upper, lower, style="invis", weight="100")


def draw_circuit(edges: Iterable[tuple[str, ...]], out_path: str | Path,
                 title: str | None = None, heads_per_group: int | None = None,
                 spans: Iterable | None = None) -> Path:
    """Draw a circuit to ``out_path`` (.pdf, .png, .svg or .dot); returns the path written.
    ``edges``, ``heads_per_group``, ``spans``: as ``circuit_to_dot`` (triples: a column per span).

    The graphviz source always goes beside the output as ``<stem>.dot``. Without graphviz's ``dot``
    program only that source is written, with a warning saying how to render it, and its path is
    returned.
    """
    out = Path(out_path)
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot draw to {out}: the file name must end in one of {', '.join(SUFFIXES)}")
    dot = circuit_to_dot(edges, title, heads_per_group, spans)
    out.parent.mkdir(parents=True, exist_ok=True)
    dot_path = out.with_suffix(".dot")
    dot_path.write_text(dot.source, encoding="utf-8")
    if suffix == ".dot":
        return dot_path
    try:
        graphviz.render("dot", suffix[1:], dot_path, outfile=out)
    except graphviz.ExecutableNotFound:
        warnings.warn(f"graphviz's `dot` program was not found, so only {dot_path} was written. "
                      "Install graphviz (apt-get install graphviz / brew install graphviz / "
                      f"conda install graphviz) and render it with: dot -T{suffix[1:]} {dot_path} "
                      f"-o {out}", stacklevel=2)
        return dot_path
    return out


def heads_per_group_of(edges_path: str | Path) -> int | None:
    """Query heads per KV head from the ``circuit.json`` that ``edgeprune export`` wrote beside an
    edges file (its graph fingerprint), or None when there is none."""
    summary = summary_path(edges_path)
    if not summary.is_file():
        return None
    try:
        graph = json.loads(summary.read_text()).get("graph") or {}
        return int(graph["n_heads"]) // int(graph["n_kv_heads"])
    except (ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError):
        return None


def _check_shapes(edges: list[tuple]) -> bool:
    """Whether ``edges`` are (writer, reader, span) triples; all entries must be one shape, and a
    span a string. Errors name the entry."""
    width = len(edges[0]) if edges else 2
    for i, edge in enumerate(edges):
        shown = shorten(json.dumps(list(edge), default=repr))
        if len(edge) not in (2, 3) or len(edge) != width:
            raise ValueError(f"entry {i} {shown}: expected a [writer, reader] pair or a [writer, reader, "
                             f"span] triple, the same shape as entry 0 ({width} elements)")
        if width == 3 and not isinstance(edge[2], str):
            raise ValueError(f"entry {i} {shown}: the span (third element) must be a string, "
                             'a span name such as "IO" or "END"')
    return width == 3


def _columns(edges: list[tuple[str, str, str]], spans: Iterable | None) -> list[dict]:
    """The span columns that hold edges, in order, as records with at least a ``name``."""
    if spans is None:
        records = [{"name": s} for s in dict.fromkeys(e[2] for e in edges)]
    else:
        records = [dict(s) if isinstance(s, dict) else {"name": s} for s in spans]
        known = {r.get("name") for r in records}
        for i, edge in enumerate(edges):
            if edge[2] not in known:
                raise ValueError(f"entry {i} {shorten(json.dumps(list(edge)))}: unknown span {edge[2]!r}; "
                                 f"the spans are {', '.join(str(r.get('name')) for r in records)}")
    used = {e[2] for e in edges}
    return [r for r in records if r["name"] in used]


def _span_layout(dot: graphviz.Digraph, edges: list[tuple[str, str, str]], columns: list[dict],
                 heads_per_group: int | None) -> None:
    """A position-aware circuit: a cluster per span column, nodes repeated per span (module docstring)."""
    nodes = _span_nodes(edges)
    order = {c["name"]: i for i, c in enumerate(columns)}
    ranks, members = _span_clusters(dot, nodes, columns)
    _hold_column_order(dot, columns, members)
    _align_ranks(dot, ranks)
    unjoined = _join_span_heads(dot, nodes, order, heads_per_group)
    for writer, reader, span in edges:
        _edge(dot, _span_node_id(span, writer), _span_node_id(span, reader),
              color=COLOURS[nodes[(span, reader)].kind] + EDGE_ALPHA)
    if unjoined:
        unjoined = list(dict.fromkeys(unjoined))
        warnings.warn(f"grouped K/V inputs ({', '.join(unjoined[:3])}{' ...' if len(unjoined) > 3 else ''}) are "
                      "drawn without their heads: the group size is unknown (pass heads_per_group, or "
                      "--heads-per-group to edgeprune draw)", stacklevel=3)
    dot.node("legend", _legend_label(spans=True), shape="plaintext", style="", fontsize="9")


def _span_node_id(span: str, name: str) -> str:
    return f"{span}:{name}"


def _span_nodes(edges: list[tuple[str, str, str]]) -> dict[tuple[str, str], NodeName]:
    """(span, name) -> node of every edge end, plus the head of every Q input (and of K/V inputs whose
    head is drawn nowhere else, beside them)."""
    nodes: dict[tuple[str, str], NodeName] = {}
    for writer, reader, span in edges:
        for node in parse_edge(writer, reader):
            nodes[(span, node.name)] = node
    for (span, _), node in list(nodes.items()):
        if node.kind == "q":
            head = f"a{node.layer}.h{node.head}"
            nodes.setdefault((span, head), parse_node(head))
    placed = {name for (_, name), node in nodes.items() if node.kind == "head"}
    for (span, _), node in list(nodes.items()):
        if node.kind in ("k", "v") and node.head is not None and f"a{node.layer}.h{node.head}" not in placed:
            head = f"a{node.layer}.h{node.head}"  # fed by K/V inputs only: drawn beside them
            nodes.setdefault((span, head), parse_node(head))
    return nodes


def _span_clusters(dot: graphviz.Digraph, nodes: dict[tuple[str, str], NodeName],
                   columns: list[dict]) -> tuple[dict[tuple[float, int], list[str]], dict[str, list[str]]]:
    """One cluster per span column with its nodes; returns the node ids per rank and per column."""
    ranks: dict[tuple[float, int], list[str]] = defaultdict(list)
    members: dict[str, list[str]] = {}  # column -> its node ids
    for i, column in enumerate(columns):
        span = column["name"]
        members[span] = []
        with dot.subgraph(name=f"cluster_span{i}") as cluster:
            cluster.attr(label=_span_label(column), labeljust="c", style="rounded",
                         color="#AAAAAA", fontsize="11", fontcolor="#333333")
            for node in sorted((n for (s, _), n in nodes.items() if s == span), key=_order):
                ident = _span_node_id(span, node.name)
                cluster.node(ident, **{**_node_style(node), "tooltip": f"{node.name} at span {span}"})
                ranks[_rank(node)].append(ident)
                members[span].append(ident)
    return ranks, members


def _hold_column_order(dot: graphviz.Digraph, columns: list[dict], members: dict[str, list[str]]) -> None:
    """The K/V joins across columns would let graphviz reorder the clusters, so an invisible point per
    column, chained left to right in the top rank (outside the clusters, where graphviz keeps the
    order of a same-rank chain), holds each column below its point."""
    tops = [f"_column{i}" for i in range(len(columns))]
    with dot.subgraph() as top:
        top.attr(rank="min")
        for ident in tops:
            top.node(ident, "", shape="point", style="invis", width="0", height="0")
        for left, right in zip(tops, tops[1:]):
            top.edge(left, right, style="invis")
    for ident, column in zip(tops, columns):
        for member in members[column["name"]]:
            _edge(dot, ident, member, style="invis")


def _align_ranks(dot: graphviz.Digraph, ranks: dict[tuple[float, int], list[str]]) -> None:
    """One rank across all columns (newrank allows it across clusters), labelled at the side."""
    _labelled_ranks(dot, ranks, lambda same, ident: same.node(ident))


def _join_span_heads(dot: graphviz.Digraph, nodes: dict[tuple[str, str], NodeName], order: dict[str, int],
                     heads_per_group: int | None) -> list[str]:
    """Q inputs join their head in their own column; K/V inputs join it in every column it appears in
    (attention reads keys and values at other positions). Returns the K/V inputs left unjoined."""
    head_spans: dict[str, list[str]] = defaultdict(list)  # head -> the columns it appears in
    for span, name in sorted(nodes, key=lambda key: order[key[0]]):
        if nodes[(span, name)].kind == "head":
            head_spans[name].append(span)
    unjoined = []
    for (span, name), node in sorted(nodes.items(), key=lambda item: (order[item[0][0]], _order(item[1]))):
        if node.kind not in ("q", "k", "v"):
            continue
        heads = _joined_heads(node, [h for h in head_spans if parse_node(h).layer == node.layer], heads_per_group)
        if heads is None:
            heads = []
            unjoined.append(name)
        for head in heads:
            for target in [span] if node.kind == "q" else head_spans[head]:
                style = dict(style="dashed", color=COLOURS[node.kind], arrowsize="0.4")
                if target != span:  # attention reads keys/values at other positions
                    style.update(style="dotted", penwidth="1.4", constraint="false")
                _edge(dot, _span_node_id(span, name), _span_node_id(target, head), **style)
    return unjoined


def _edge(dot: graphviz.Digraph, tail: str, head: str, **attrs: str) -> None:
    """An edge between node ids as written: ``Digraph.edge`` would read the ``:`` of ``"IO:a3.h1"``
    as a port separator (node ``IO``, port ``a3.h1``)."""
    dot.body.append(f"\t{quote(tail)} -> {quote(head)}{attr_list(attributes=attrs)}\n")


def _span_label(column: dict) -> str:
    """A column's title: the span name and its tokens per prompt (a mean, with the range if it varies)."""
    tokens = column.get("tokens")
    if not isinstance(tokens, (int, float)):
        return graphviz.escape(column["name"])
    lo, hi = column.get("min"), column.get("max")
    count = f"{tokens:g} token{'' if tokens == 1 else 's'}"
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo != hi:
        count += f" ({lo:g}-{hi:g})"
    return f"{graphviz.escape(column['name'])}\\n{count}"  # \n: graphviz's centred line break


def _rank(node: NodeName) -> tuple[float, int]:
    """Vertical position: embeddings, then per layer inputs / heads / MLP, then the output."""
    if node.kind == "embed":
        return (-1, 0)
    if node.kind == "output":
        return (math.inf, 0)
    return (node.layer, {"q": 0, "k": 0, "v": 0, "head": 1, "mlp": 2}[node.kind])


def _joined_heads(node, layer_heads, heads_per_group: int | None) -> list[str] | None:
    """The heads (names among ``layer_heads``) a Q/K/V node feeds: its own head, or for a grouped K/V
    input the heads of its group; None when the group size is unknown."""
    if node.head is not None:
        return [f"a{node.layer}.h{node.head}"]
    if heads_per_group is None:
        return None
    return [h for h in layer_heads if parse_node(h).head // heads_per_group == node.group]


def _rank_label(rank: tuple[float, int]) -> str:
    layer, step = rank
    if layer == -1:
        return "embeddings"
    if layer == math.inf:
        return "output"
    return f"layer {int(layer)} " + ("attn inputs", "heads", "mlp")[step]


def _order(node: NodeName) -> tuple:
    """Left-to-right order within a rank: by head (or KV group), then q, k, v."""
    index = node.head if node.head is not None else node.group
    return (_rank(node), -1 if index is None else index, "qkv".find(node.kind), node.name)


def _node_style(node: NodeName) -> dict[str, str]:
    style = dict(fillcolor=COLOURS[node.kind], tooltip=node.name)
    if node.kind in ("q", "k", "v"):
        style.update(label=node.name, shape="ellipse", height="0.25", margin="0.02", fontsize="8",
                     fontcolor="white")
    else:
        style.update(label=node.name, shape="box", height="0.3")
        if node.kind in ("embed", "output"):
            style.update(style="filled,rounded")
    return style


def _legend_label(spans: bool = False) -> str:
    rows = "".join(f'<TR><TD BGCOLOR="{COLOURS[kind]}" WIDTH="14" HEIGHT="10"></TD>'
                   f'<TD ALIGN="LEFT">{text}</TD></TR>' for kind, text in LEGEND)
    notes = ('<TR><TD COLSPAN="2" ALIGN="LEFT">edge colour: kind of the reader it feeds</TD></TR>'
             '<TR><TD COLSPAN="2" ALIGN="LEFT">dashed: a head\'s input into the head</TD></TR>')
    if spans:
        notes += ('<TR><TD COLSPAN="2" ALIGN="LEFT">columns: token spans; a node is drawn in each span '
                  'it appears in</TD></TR>'
                  '<TR><TD COLSPAN="2" ALIGN="LEFT">dotted: a K/V input read by its head at another '
                  'span</TD></TR>')
    return (f'<<TABLE BORDER="1" COLOR="#CCCCCC" CELLBORDER="0" CELLSPACING="2" CELLPADDING="2">'
            f'<TR><TD COLSPAN="2"><B>legend</B></TD></TR>{rows}{notes}</TABLE>>')

