"""The page's data: nodes laid out by layer, the feeds of each reader, and each source's ranked edges.

Layout (computed here, shipped as coordinates): embeddings at the bottom, then per layer a row of
attention inputs (``.q``/``.k``/``.v`` under their head; grouped ``.k``/``.v`` under their group's
heads), a row of heads and a row for the MLP; ``resid_post`` on top. Only nodes that an edge of
some shipped source touches are laid out; rows without nodes are dropped.

Only the top ``cap`` edges of each ranking are shipped (a 13B graph has millions of edges); the page
says so. The slider takes a prefix of that ranking and removes dangling edges in the page with the
same rule as ``circuit.remove_dangling`` (``reader_nodes`` gives each reader's feeds). Values are
rounded to 6 significant digits and keys sorted, so a given input always gives the same bytes.

Position-aware inputs: one column per span, left to right in mask order; a node is drawn in each
span an edge touches it in (``name@span``). ``feeds`` follow ``circuit.remove_dangling``'s span
rule (a K/V input at a span feeds its head at every span), ``guides`` (the line from an input to
its head) stay in the input's column, and ``outputs`` lists ``resid_post`` of every span.
"""

from __future__ import annotations

from ..circuit import EMBEDDINGS, reader_nodes
from ..graph import span_edges
from ..draw import COLOURS
from ..names import parse_node
from .sources import ViewSource

FORMAT = "edgeprune.viewer/1"
DEFAULT_CAP = 5000
COL_W, ROW_H, MARGIN_L, MARGIN = 90, 56, 150, 30
SPAN_GAP = 60  # between span columns


def _r(v: float) -> float:
    return float(f"{v:.6g}")


def _place(names: set[str], graph) -> tuple[dict[str, tuple[float, float]], list[dict], float, float]:
    """(x, y) per node name, the row labels, the width and height."""
    n_heads = graph.spec.n_heads
    per_group = n_heads // graph.spec.kv_heads
    width = max(n_heads * COL_W, 480)
    mid = MARGIN_L + width / 2
    parsed = {n: parse_node(n) for n in names}

    def row_key(p):
        if p.kind == "embed":
            return (-1, 0)
        if p.kind == "output":
            return (10 ** 9, 0)
        return (p.layer, {"q": 0, "k": 0, "v": 0, "head": 1, "mlp": 2}[p.kind])

    rows = sorted({row_key(p) for p in parsed.values()})
    height = MARGIN * 2 + ROW_H * (len(rows) - 1) + 20
    y_of = {k: MARGIN + 10 + ROW_H * (len(rows) - 1 - i) for i, k in enumerate(rows)}
    labels = []
    for k in rows:
        layer, step = k
        text = ("embeddings" if layer == -1 else "output" if layer == 10 ** 9
                else f"layer {layer} " + ("attn inputs", "heads", "mlp")[step])
        labels.append({"y": y_of[k], "label": text})
    pos = {}
    for name, p in parsed.items():
        y = y_of[row_key(p)]
        if p.kind == "embed":
            x = mid + (-70 if p.name == "tok_embeds" else 70)
        elif p.kind in ("output", "mlp"):
            x = mid
        elif p.kind == "head":
            x = MARGIN_L + (p.head + 0.5) * COL_W
        elif p.head is not None:
            x = MARGIN_L + (p.head + 0.5) * COL_W + {"q": -24, "k": 0, "v": 24}[p.kind]
        else:  # grouped k/v: under the middle of the group's heads, slightly lower than the q inputs
            x = MARGIN_L + (p.group + 0.5) * per_group * COL_W + (-12 if p.kind == "k" else 12)
            y += 14
        pos[name] = (x, float(y))
    return pos, labels, MARGIN_L + width + MARGIN, float(height + 14)


def build_payload(sources: list[ViewSource], cap: int = DEFAULT_CAP, title: str | None = None,
                  initial: list[int | None] | None = None, span_tokens: dict[str, str] | None = None) -> dict:
    """The JSON-able data of the page for one or two sources (two: the comparison view).
    ``span_tokens``: position-aware pages write an example prompt's tokens under each span column."""
    graph = _common_graph(sources, cap)
    spans = sources[0].spans
    columns = [None] if spans is None else list(spans)
    shipped = [s.edges[:cap] for s in sources]
    span_of = (lambda e: None) if spans is None else (lambda e: e[2])
    feeds_of = dict(zip(graph.readers, reader_nodes(graph)))
    lay = _Layout(_node_keys(graph, shipped, span_of, columns, feeds_of), graph, spans, columns)

    def fed(k, every_span: bool) -> list[int]:
        """The nodes reader ``k``'s input goes into (K/V at every span when ``every_span``)."""
        name, span = k
        if name not in feeds_of:
            return []
        targets = columns if every_span and name.endswith((".k", ".v")) else [span]
        return [lay.index[(graph.writers[w], t)] for t in targets for w in feeds_of[name]
                if (graph.writers[w], t) in lay.index]

    mask_order = {tuple(e): i for i, e in enumerate(span_edges(graph, spans))}  # the order export writes
    out = [_source_payload(s, edges, lay.index, span_of, mask_order, cap,
                           s.default_n if not initial or initial[k] is None else initial[k])
           for k, (s, edges) in enumerate(zip(sources, shipped))]
    payload = {
        "format": FORMAT, "title": title or " vs ".join(s.label for s in sources),
        "graph": graph.describe(), "total_edges": graph.num_edges * len(columns), "cap": cap,
        "width": _r(lay.width + (len(columns) - 1) * (lay.col_w + SPAN_GAP)),
        "height": _r(lay.height + (0 if spans is None else 10)),
        "rows": lay.rows, "nodes": lay.nodes, "feeds": [fed(k, True) for k in lay.order],
        "embeds": [lay.index[(e, c)] for c in columns for e in EMBEDDINGS if (e, c) in lay.index],
        "output": lay.index[("resid_post", columns[0])], "colours": COLOURS, "sources": out,
    }
    if spans is not None:
        payload.update(spans=list(spans), outputs=[lay.index[("resid_post", c)] for c in columns],
                       guides=[fed(k, False) for k in lay.order],
                       columns=[{"x": _r(MARGIN_L + lay.shift[c] + lay.col_w / 2), "label": c,
                                 **({"tokens": span_tokens[c]} if span_tokens and c in span_tokens else {})}
                                for c in columns])
        payload["graph"] += f" x {len(spans)} spans"
    return payload


def _common_graph(sources: list[ViewSource], cap: int):
    """The graph one or two sources share (errors when they cannot be compared); an inferred graph
    gives way to a known one."""
    if not 1 <= len(sources) <= 2:
        raise ValueError(f"view takes one or two circuits, got {len(sources)}")
    if cap < 1:
        raise ValueError(f"--max-edges must be at least 1, got {cap}")
    graph = sources[0].graph
    spans = sources[0].spans
    for s in sources[1:]:
        if s.graph.spec != graph.spec and s.graph_known and sources[0].graph_known:
            raise ValueError(f"{s.label} and {sources[0].label} are circuits of different graphs "
                             f"({s.graph.describe()} vs {graph.describe()}): they cannot be compared")
        if s.spans != spans:
            raise ValueError(f"{s.label} and {sources[0].label} have different spans ({_spans(s.spans)} vs "
                             f"{_spans(spans)}): they cannot be compared")
    if not sources[0].graph_known and len(sources) > 1 and sources[1].graph_known:
        return sources[1].graph
    return graph


def _node_keys(graph, shipped: list[list[tuple]], span_of, columns: list, feeds_of: dict) -> set[tuple]:
    """(node name, span or None) of every node drawn: the ends of every shipped edge, a head input's
    head (so it can be drawn and followed), the embeddings and the read-out of every column."""
    keys = set()
    for edges in shipped:
        for e in edges:
            keys.update(((e[0], span_of(e)), (e[1], span_of(e))))
            keys.update((graph.writers[w], span_of(e)) for w in feeds_of.get(e[1], []))
    keys.update((e, c) for e in EMBEDDINGS if e in graph.writer_index for c in columns)
    keys.update(("resid_post", c) for c in columns)
    return keys


class _Layout:
    """Coordinates of the drawn nodes, one copy of the layer layout per span column; ``order`` (top
    to bottom, left to right) gives each node its index on the page."""

    def __init__(self, keys: set[tuple], graph, spans, columns: list):
        pos, self.rows, self.width, self.height = _place({n for n, _ in keys}, graph)
        self.col_w = self.width - MARGIN_L - MARGIN
        self.shift = {c: i * (self.col_w + SPAN_GAP) for i, c in enumerate(columns)}
        xy = {k: (pos[k[0]][0] + self.shift[k[1]], pos[k[0]][1]) for k in keys}
        shown = (lambda k: k[0]) if spans is None else (lambda k: f"{k[0]}@{k[1]}")
        self.order = sorted(keys, key=lambda k: (-xy[k][1], xy[k][0], shown(k)))
        self.index = {k: i for i, k in enumerate(self.order)}
        self.nodes = [{"name": shown(k), "kind": parse_node(k[0]).kind, "x": _r(xy[k][0]), "y": _r(xy[k][1]),
                       **({} if spans is None else {"label": k[0]})} for k in self.order]


def _source_payload(s: ViewSource, edges: list[tuple], index: dict, span_of, mask_order: dict, cap: int,
                    n0: int) -> dict:
    """One source's ranked edges (as node indices), values, measured points and defaults."""
    return {
        "label": s.label, "kind": s.kind, "rank_by": s.rank_by, "value_name": s.value_name,
        "signed": s.kind == "scores",  # attribution scores carry a sign (negative: drawn dashed)
        "candidates": len(s.edges), "shipped": len(edges), "default_n": max(0, min(n0, len(edges))),
        "w": [index[(e[0], span_of(e))] for e in edges], "r": [index[(e[1], span_of(e))] for e in edges],
        "gi": [mask_order.get(tuple(e), -1) for e in edges],
        "values": None if s.values is None else [_r(v) for v in s.values[:cap]],
        "points": [{k2: (_r(v) if isinstance(v, float) else v) for k2, v in q.items()} for q in s.points],
        "node_values": None if s.node_values is None else
        {n: _r(v) for n, v in sorted(s.node_values.items()) if (n, None) in index},
        "graph_known": s.graph_known,
    }


def _spans(spans) -> str:
    return "shared masks" if spans is None else ", ".join(spans)
