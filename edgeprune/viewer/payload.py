"""The page's data: nodes laid out by layer, the feeds of each reader, and each source's ranked edges.

Layout (computed here, shipped as coordinates): embeddings at the bottom, then per layer a row of
attention inputs (``.q``/``.k``/``.v`` under their head; grouped ``.k``/``.v`` under their group's
heads), a row of heads and a row for the MLP; ``resid_post`` on top. Only nodes that an edge of
some shipped source touches are laid out; rows without nodes are dropped.

Only the top ``cap`` edges of each ranking are shipped (a 13B graph has millions of edges); the page
says so. The slider takes a prefix of that ranking and removes dangling edges in the page with the
same rule as ``circuit.remove_dangling`` (``reader_nodes`` gives each reader's feeds). Values are
rounded to 6 significant digits and keys sorted, so a given input always gives the same bytes.
"""

from __future__ import annotations

from ..circuit import EMBEDDINGS, reader_nodes
from ..draw import COLOURS, parse_node
from .sources import ViewSource

FORMAT = "edgeprune.viewer/1"
DEFAULT_CAP = 5000
COL_W, ROW_H, MARGIN_L, MARGIN = 90, 56, 150, 30


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
                  initial: list[int | None] | None = None) -> dict:
    """The JSON-able data of the page for one or two sources (two: the comparison view)."""
    if not 1 <= len(sources) <= 2:
        raise ValueError(f"view takes one or two circuits, got {len(sources)}")
    if cap < 1:
        raise ValueError(f"--max-edges must be at least 1, got {cap}")
    graph = sources[0].graph
    for s in sources[1:]:
        if s.graph.spec != graph.spec and s.graph_known and sources[0].graph_known:
            raise ValueError(f"{s.label} and {sources[0].label} are circuits of different graphs "
                             f"({s.graph.describe()} vs {graph.describe()}): they cannot be compared")
    if not sources[0].graph_known and len(sources) > 1 and sources[1].graph_known:
        graph = sources[1].graph
    shipped = [s.edges[:cap] for s in sources]
    names = {n for edges in shipped for e in edges for n in e}
    feeds_of = dict(zip(graph.readers, reader_nodes(graph)))
    for edges in shipped:  # a head input's head, so it can be drawn and followed
        for _, r in edges:
            names.update(graph.writers[w] for w in feeds_of.get(r, []))
    names.update(e for e in EMBEDDINGS if e in graph.writer_index)
    names.add("resid_post")
    pos, rows, width, height = _place(names, graph)
    order = sorted(names, key=lambda n: (-pos[n][1], pos[n][0], n))
    index = {n: i for i, n in enumerate(order)}
    nodes = [{"name": n, "kind": parse_node(n).kind, "x": _r(pos[n][0]), "y": _r(pos[n][1])} for n in order]
    feeds = [[index[graph.writers[w]] for w in feeds_of[n] if graph.writers[w] in index] if n in feeds_of else []
             for n in order]
    out = []
    for k, (s, edges) in enumerate(zip(sources, shipped)):
        n0 = s.default_n if not initial or initial[k] is None else initial[k]
        out.append({
            "label": s.label, "kind": s.kind, "rank_by": s.rank_by, "value_name": s.value_name,
            "candidates": len(s.edges), "shipped": len(edges), "default_n": max(0, min(n0, len(edges))),
            "w": [index[w] for w, _ in edges], "r": [index[r] for _, r in edges],
            "values": None if s.values is None else [_r(v) for v in s.values[:cap]],
            "points": [{k2: (_r(v) if isinstance(v, float) else v) for k2, v in q.items()} for q in s.points],
            "node_values": None if s.node_values is None else
            {n: _r(v) for n, v in sorted(s.node_values.items()) if n in index},
            "graph_known": s.graph_known,
        })
    return {
        "format": FORMAT, "title": title or " vs ".join(s.label for s in sources),
        "graph": graph.describe(), "total_edges": graph.num_edges, "cap": cap,
        "width": _r(width), "height": _r(height), "rows": rows, "nodes": nodes, "feeds": feeds,
        "embeds": [index[e] for e in EMBEDDINGS if e in index], "output": index["resid_post"],
        "colours": COLOURS, "sources": out,
    }
