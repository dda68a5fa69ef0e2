"""From learned masks to a binary circuit: threshold search and dangling-edge removal.

Thresholds are searched on the masks' log_alpha rather than on their deterministic values: the
deterministic hard-concrete value saturates at exactly 0 and 1 for many masks, so a threshold on
it cannot split ties, while log_alpha orders the same masks (monotonically) without ties. The
threshold is reported in both forms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .graph import Graph, span_edges
from .jsonfile import read_edge_pairs, shorten
from .names import parse_edge
from .masks import deterministic, prob_nonzero

EMBEDDINGS = ("tok_embeds", "pos_embeds")


@dataclass
class Threshold:
    kept: torch.Tensor  # (n,) bool
    log_alpha: float  # keep masks with log_alpha > this
    value: float  # the deterministic mask value at that log_alpha
    target_kept: int  # round(n * (1 - expected sparsity))


def threshold_to_sparsity(log_alpha: torch.Tensor, sparsity: float | None = None) -> Threshold:
    """The threshold whose binarised sparsity is closest to ``sparsity``.

    ``sparsity`` defaults to the masks' learned expected sparsity (1 - E[L0] / n). log_alpha (n,)
    fp32. The result keeps ``round(n * (1 - sparsity))`` masks unless log_alpha has exact ties at
    the cut: then it keeps the achievable count nearest to that target (a tied group is kept or
    dropped as a whole; on equal distance, the larger count). Masks that got no gradient from the
    fit move in lockstep under the sparsity term, so large tied groups are common: the count is
    found on the sorted values (every gap between distinct values is a possible cut), not by
    bisection, which can stop on the wrong side of a tied group.
    """
    la = log_alpha.detach().float().cpu().reshape(-1)
    n = la.numel()
    if sparsity is None:
        sparsity = 1.0 - float(prob_nonzero(la).double().sum()) / n
    target = int(round(n * (1.0 - min(max(sparsity, 0.0), 1.0))))
    if n == 0:
        return Threshold(kept=torch.zeros(0, dtype=torch.bool), log_alpha=0.0,
                         value=float(deterministic(torch.tensor([0.0]))), target_kept=0)
    desc = la.sort(descending=True).values
    # keeping k masks is achievable iff k is 0, n, or desc[k - 1] > desc[k] (the cut falls in a gap)
    gaps = torch.nonzero(desc[:-1] > desc[1:]).flatten() + 1
    achievable = torch.cat([torch.tensor([0, n]), gaps])
    dist = (achievable - target).abs()
    k = int(achievable[dist == dist.min()].max())
    if k == n:
        cut = float(desc[-1]) - 1.0
    else:
        below = float(desc[k])  # the largest dropped value: keep log_alpha > cut, cut in [below, above)
        cut = below
        if k > 0:
            mid = float(torch.tensor((float(desc[k - 1]) + below) / 2, dtype=torch.float32))
            if below <= mid < float(desc[k - 1]):
                cut = mid
    kept = la > cut
    value = float(deterministic(torch.tensor([cut])))
    return Threshold(kept=kept, log_alpha=cut, value=value, target_kept=target)


def reader_nodes(graph: Graph) -> list[list[int]]:
    """For each reader, the writer indices of the node(s) it feeds (a GQA k/v reader feeds every head
    of its group; ``resid_post`` feeds none: it is the output)."""
    w_index = graph.writer_index
    per_group = graph.spec.n_heads // graph.spec.kv_heads
    out = []
    for name in graph.readers:
        if name == "resid_post":
            out.append([])
        elif name.startswith("m"):
            out.append([w_index[name]])
        else:
            layer, unit, _ = name.split(".")
            if unit.startswith("g"):
                g = int(unit[1:])
                out.append([w_index[f"{layer}.h{h}"] for h in range(g * per_group, (g + 1) * per_group)])
            else:
                out.append([w_index[f"{layer}.{unit}"]])
    return out


def remove_dangling(graph: Graph, kept: torch.Tensor, n_spans: int | None = None) -> torch.Tensor:
    """Keep only edges on a path from an embedding writer to ``resid_post``. kept (E,) bool -> (E,) bool.

    Position-aware (``n_spans`` S; kept (S * E,), span-major): the nodes are (node, span). An edge
    (w -> r, s) joins writer w at span s to reader r at span s (the residual stream is position-wise);
    a Q reader or an MLP input at span s feeds its node at span s, while a K/V reader at span s feeds
    its head(s) at *every* span (attention reads keys and values at other positions); the
    embeddings at every span are sources and ``resid_post`` at every span is an output.
    """
    W, R = graph.num_writers, graph.num_readers
    feeds = reader_nodes(graph)
    edges = [(graph.writer_index[w], graph.reader_index[r]) for w, r in graph.edges]
    sources = {graph.writer_index[e] for e in EMBEDDINGS if e in graph.writer_index}
    outs = {graph.reader_index["resid_post"]}
    if n_spans is not None:  # the same walk over (node, span) pairs
        kv = [name.endswith((".k", ".v")) for name in graph.readers]
        feeds = [[t * W + n for t in (range(n_spans) if kv[r] else (s,)) for n in feeds[r]]
                 for s in range(n_spans) for r in range(R)]
        edges = [(s * W + w, s * R + r) for s in range(n_spans) for w, r in edges]
        sources = {s * W + w for s in range(n_spans) for w in sources}
        outs = {s * R + r for s in range(n_spans) for r in outs}
    return _live(edges, kept.detach().cpu().bool().clone(), feeds, sources, outs)


def _live(edges: list[tuple[int, int]], kept: torch.Tensor, feeds: list[list[int]], sources: set[int],
          outs: set[int]) -> torch.Tensor:
    """The kept edges (writer node, reader node) that lie on a path from a source writer to an output
    reader; ``feeds[reader]``: the writer nodes a reader's input goes into."""
    n_readers = len(feeds)
    while True:
        live = [(w, r) for (w, r), k in zip(edges, kept.tolist()) if k]
        # forward: writers reachable from a source
        reached = set(sources)
        changed = True
        while changed:
            changed = False
            for w, r in live:
                if w in reached:
                    for node in feeds[r]:
                        if node not in reached:
                            reached.add(node)
                            changed = True
        # backward: writers with a path to an output
        useful: set[int] = set()
        changed = True
        while changed:
            changed = False
            for w, r in live:
                if w not in useful and (r in outs or any(n in useful for n in feeds[r])):
                    useful.add(w)
                    changed = True
        leads_out = [r in outs or any(n in useful for n in feeds[r]) for r in range(n_readers)]
        new = torch.tensor([k and w in reached and leads_out[r] for (w, r), k in zip(edges, kept.tolist())],
                           dtype=torch.bool)
        if torch.equal(new, kept):
            return kept
        kept = new


@dataclass
class Circuit:
    edges: list[tuple[str, ...]]  # (writer, reader), or (writer, reader, span) position-aware
    kept: torch.Tensor  # (E,) bool after dangling-edge removal ((S * E,) position-aware)
    edge_threshold: Threshold
    node_threshold: Threshold | None
    counts: dict  # edges/nodes before and after dangling removal, totals, sparsities
    spans: tuple[str, ...] | None = None  # position-aware: the span names, in mask order
    span_info: list[dict] | None = None  # position-aware: per span its token counts (spans.describe_spans)

    def thresholds(self) -> dict:
        """The thresholds used, as log_alpha and as deterministic mask value (edges, and nodes if any)."""
        out = {"edge_log_alpha": self.edge_threshold.log_alpha, "edge_value": self.edge_threshold.value}
        if self.node_threshold is not None:
            out.update(node_log_alpha=self.node_threshold.log_alpha, node_value=self.node_threshold.value)
        return out


def extract_circuit(graph: Graph, edge_log_alpha: torch.Tensor, node_log_alpha: torch.Tensor | None = None,
                    edge_sparsity: float | None = None, node_sparsity: float | None = None,
                    spans=None) -> Circuit:
    """Binarise learned masks into a circuit (threshold search, node masks, dangling removal).
    Position-aware masks (``spans``: their names) give (writer, reader, span) edges; one threshold
    for every (edge, span)."""
    n_spans = None if spans is None else len(spans)
    if edge_log_alpha.shape != (graph.num_edges * (n_spans or 1),):
        per = "" if n_spans is None else f" x {n_spans} spans"
        raise ValueError(f"edge masks have {tuple(edge_log_alpha.shape)} entries, the graph has "
                         f"{graph.num_edges} edges{per} ({graph.describe()})")
    et = threshold_to_sparsity(edge_log_alpha, edge_sparsity)
    kept = et.kept.clone()
    nt = None
    if node_log_alpha is not None:
        nt = threshold_to_sparsity(node_log_alpha, node_sparsity)
        writer_of = torch.tensor([graph.writer_index[w] for w, _ in graph.edges]).repeat(n_spans or 1)
        kept &= nt.kept[writer_of]
    before = int(kept.sum())
    kept = remove_dangling(graph, kept, n_spans)
    names = span_edges(graph, spans)
    edges = [e for e, k in zip(names, kept.tolist()) if k]
    nodes = {e[0] for e in edges} | {e[1] for e in edges}
    counts = {
        "total_edges": len(names),
        "edges_thresholded": int(et.kept.sum()),
        "edges_before_dangling": before,
        "edges": len(edges),
        "nodes": len(nodes),
        "edge_sparsity": 1.0 - len(edges) / len(names),
        "expected_edge_sparsity": 1.0 - et.target_kept / len(names),
    }
    if spans is not None:
        counts["spans"] = len(spans)
    if nt is not None:
        counts["writers_kept"] = int(nt.kept.sum())
        counts["total_writers"] = graph.num_writers
    return Circuit(edges=edges, kept=kept, edge_threshold=et, node_threshold=nt, counts=counts,
                   spans=None if spans is None else tuple(spans))


# ---------------------------------------------------------------------------- edges files
class Edges(list):
    """What ``load_edges`` returns: a list of ``(writer, reader)`` tuples, or of ``(writer, reader,
    span)`` tuples for a position-aware circuit, carrying ``spans``: the span columns for a drawing
    (the ``circuit.json`` span records, ``{"name", "tokens", "min", "max"}``, or the span names in
    order of first appearance), None for a plain circuit. ``circuit_to_dot`` reads ``spans`` from it,
    so ``draw_circuit(load_edges(path), out)`` keeps the ``circuit.json`` column order."""

    spans: list | None = None


def load_edges(path: str | Path) -> Edges:
    """Read an ``edges.json`` file: a JSON list of [writer, reader] pairs of node names, or of
    [writer, reader, span] triples (position-aware; all entries one shape).

    Checks the names and their roles, not that the edges exist in a particular model; for triples,
    that each span is one of the ``spans`` of the ``circuit.json`` beside the file when it lists them.
    """
    entries = read_edge_pairs(path, spans=True)
    positional = bool(entries) and len(entries[0][1]) == 3
    info = span_info_of(path) if positional else None
    known = None if info is None else [d["name"] for d in info]
    edges = Edges()
    for i, entry in entries:
        shown = shorten(json.dumps(entry))
        try:
            parse_edge(entry[0], entry[1])
        except ValueError as e:
            raise ValueError(f"{path}: entry {i} {shown}: {e}") from None
        if known is not None and entry[2] not in known:
            raise ValueError(f"{path}: entry {i} {shown}: unknown span {entry[2]!r}; "
                             f"{summary_path(path)} lists the spans {', '.join(known)}")
        edges.append(tuple(entry))
    if positional:
        edges.spans = info if info is not None else list(dict.fromkeys(e[2] for e in edges))
    return edges


def span_info_of(edges_path: str | Path) -> list[dict] | None:
    """The ``spans`` records (``{"name", "tokens", "min", "max"}``, in column order) of the
    ``circuit.json`` beside an edges file, or None when there is no such file or it lists no spans.
    A ``spans`` field of the wrong shape is an error naming the file and the record."""
    summary = summary_path(edges_path)
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours to validate here; the spans only order the columns
    spans = data.get("spans") if isinstance(data, dict) else None
    if spans is None:
        return None
    if not isinstance(spans, list):
        raise ValueError(f"{summary}: spans: expected a list of span records, got {shorten(json.dumps(spans))}")
    records = []
    for i, record in enumerate(spans):
        if isinstance(record, str):
            record = {"name": record}
        if not (isinstance(record, dict) and isinstance(record.get("name"), str)):
            raise ValueError(f"{summary}: spans[{i}] is {shorten(json.dumps(record))}; expected a record "
                             'with a string "name", e.g. {"name": "IO", "tokens": 1.0, "min": 1, "max": 1}')
        records.append(record)
    return records


def summary_path(edges_path: str | Path) -> Path:
    """The ``circuit.json`` that ``edgeprune export`` writes beside an edges file (as
    ``export.circuit_json_path``; not imported from there, which would load the training stack)."""
    edges_path = Path(edges_path)
    return edges_path.with_name("circuit.json" if edges_path.name == "edges.json"
                                else f"{edges_path.stem}.circuit.json")
