"""From per-edge scores to a circuit: top-n, threshold, and greedy growth from the output.

Every selection ends with ``circuit.remove_dangling`` (the same function the pruning path uses):
an edge is kept only on a path from an embedding to ``resid_post``. Removal can only shrink a
selection, and a longer prefix of an edge ordering never gives a smaller dangling-free circuit
(paths only get added), so ``circuit_of_size`` finds by binary search the longest prefix whose
dangling-free circuit has at most the requested number of edges. That is how circuits of "equal
size" are compared: the same count of edges that really are in the circuit.

Orderings (most important first), from a ranking key (E,) where larger = more important:
- ``topn``: edges by key, ties by edge index. Position-aware masks (``n_spans`` S): the key is
  (S * E,), one entry per (edge, span) in mask order, and dangling removal walks the spans
  (``circuit.remove_dangling``).
- ``greedy``: start from the readers of ``resid_post``; repeatedly take the best-keyed edge whose
  reader is already connected to the output; taking (w, r) connects every reader that feeds w's
  node (its Q/K/V or MLP input; every K/V group reader of a GQA head). Every edge is reached
  eventually (each writer has an edge to ``resid_post``), so this is a full ordering.
  Position-aware: the nodes are (node, span); ``resid_post`` at every span starts connected, and
  taking (w, r, s) connects the Q and MLP readers of w's node at span s and its K/V readers at
  every span (the dangling-removal rule).
"""

from __future__ import annotations

import heapq

import torch

from ..circuit import reader_nodes, remove_dangling
from ..graph import Graph

ORDERINGS = ("topn", "greedy")


def _n_masks(graph: Graph, n_spans: int | None) -> int:
    return graph.num_edges * (n_spans or 1)


def edge_order(graph: Graph, key: torch.Tensor, how: str = "topn", n_spans: int | None = None) -> torch.Tensor:
    """(E,) long permutation of edge indices (S * E with ``n_spans``), most important first."""
    key = key.detach().float().cpu()
    n = _n_masks(graph, n_spans)
    if key.shape != (n,):
        raise ValueError(f"scores have shape {tuple(key.shape)}, the graph has ({n},) edges"
                         + ("" if n_spans is None else f" ({graph.num_edges} x {n_spans} spans)"))
    if how == "topn":
        return torch.argsort(key, descending=True, stable=True)
    if how == "greedy":
        return _greedy_order(graph, key, n_spans)
    raise ValueError(f"unknown selection {how!r}; choose one of {', '.join(ORDERINGS)}")


def _greedy_order(graph: Graph, key: torch.Tensor, n_spans: int | None = None) -> torch.Tensor:
    values = key.tolist()
    E, spans = graph.num_edges, range(n_spans or 1)
    feeders: dict[int, list[int]] = {}  # writer -> readers feeding its node
    for r, nodes in enumerate(reader_nodes(graph)):
        for w in nodes:
            feeders.setdefault(w, []).append(r)
    every_span = [n_spans is not None and name.endswith((".k", ".v")) for name in graph.readers]
    heap: list[tuple[float, int]] = []
    connected_readers: set[tuple[int, int]] = set()  # (reader, span)
    connected_writers: set[tuple[int, int]] = set()

    def connect(r: int, s: int) -> None:
        if (r, s) in connected_readers:
            return
        connected_readers.add((r, s))
        start = s * E + graph.edge_offsets[r]
        for e in range(start, start + graph.n_writers_before[r]):
            heapq.heappush(heap, (-values[e], e))

    for s in spans:
        connect(graph.reader_index["resid_post"], s)
    order: list[int] = []
    writer_of = [graph.writer_index[w] for w, _ in graph.edges]
    while heap:
        _, e = heapq.heappop(heap)
        order.append(e)
        s, w = e // E, writer_of[e % E]
        if (w, s) not in connected_writers:
            connected_writers.add((w, s))
            for r in feeders.get(w, []):
                for t in (spans if every_span[r] else (s,)):
                    connect(r, t)
    if len(order) < len(values):  # unreachable edges (cannot happen for a full graph): last, by key
        taken = set(order)
        rest = [e for e in torch.argsort(key, descending=True, stable=True).tolist() if e not in taken]
        order.extend(rest)
    return torch.tensor(order, dtype=torch.long)


def prefix_mask(graph: Graph, order: torch.Tensor, n: int) -> torch.Tensor:
    """(E,) bool: the first n edges of ``order`` (before dangling-edge removal)."""
    kept = torch.zeros(order.numel(), dtype=torch.bool)
    kept[order[:n]] = True
    return kept


def select_top(graph: Graph, key: torch.Tensor, n: int, how: str = "topn", n_spans: int | None = None) -> torch.Tensor:
    """(E,) bool: the first n edges of the ordering, then dangling edges removed (may leave fewer)."""
    if n < 0:
        raise ValueError(f"number of edges must be >= 0, got {n}")
    return remove_dangling(graph, prefix_mask(graph, edge_order(graph, key, how, n_spans), n), n_spans)


def select_threshold(graph: Graph, key: torch.Tensor, threshold: float, n_spans: int | None = None) -> torch.Tensor:
    """(E,) bool: edges with key >= threshold, then dangling edges removed."""
    return remove_dangling(graph, key.detach().float().cpu() >= threshold, n_spans)


def circuit_of_size(graph: Graph, key: torch.Tensor, n_edges: int, how: str = "topn",
                    order: torch.Tensor | None = None, n_spans: int | None = None) -> torch.Tensor:
    """(E,) bool: the largest dangling-free circuit from a prefix of the ordering with <= n_edges edges.

    ``order`` (from ``edge_order``) can be passed to reuse it across sizes.
    """
    if n_edges < 0:
        raise ValueError(f"number of edges must be >= 0, got {n_edges}")
    order = edge_order(graph, key, how, n_spans) if order is None else order
    E = order.numel()

    def size(n):
        kept = remove_dangling(graph, prefix_mask(graph, order, n), n_spans)
        return int(kept.sum()), kept

    count, kept = size(min(n_edges, E))
    if count == n_edges or n_edges >= E:
        return kept
    lo, hi = min(n_edges, E), E  # size(lo) <= n_edges < size(hi) unless nothing exceeds
    best = kept
    top_count, top_kept = size(hi)
    if top_count <= n_edges:
        return top_kept
    while hi - lo > 1:
        mid = (lo + hi) // 2
        count, kept = size(mid)
        if count <= n_edges:
            lo, best = mid, kept
            if count == n_edges:
                break
        else:
            hi = mid
    return best
