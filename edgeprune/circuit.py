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

from .graph import Graph
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
        sparsity = 1.0 - float(prob_nonzero(la).sum()) / n
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


def remove_dangling(graph: Graph, kept: torch.Tensor) -> torch.Tensor:
    """Keep only edges on a path from an embedding writer to ``resid_post``. kept (E,) bool -> (E,) bool."""
    kept = kept.detach().cpu().bool().clone()
    feeds = reader_nodes(graph)
    edges = [(graph.writer_index[w], graph.reader_index[r]) for w, r in graph.edges]
    out_reader = graph.reader_index["resid_post"]
    while True:
        live = [(w, r) for (w, r), k in zip(edges, kept.tolist()) if k]
        # forward: writers reachable from an embedding (edges are in topological order per reader)
        reached = {graph.writer_index[e] for e in EMBEDDINGS if e in graph.writer_index}
        changed = True
        while changed:
            changed = False
            for w, r in live:
                if w in reached:
                    for node in feeds[r]:
                        if node not in reached:
                            reached.add(node)
                            changed = True
        # backward: writers with a path to resid_post
        useful: set[int] = set()
        changed = True
        while changed:
            changed = False
            for w, r in live:
                if w not in useful and (r == out_reader or any(n in useful for n in feeds[r])):
                    useful.add(w)
                    changed = True
        leads_out = [r == out_reader or any(n in useful for n in feeds[r]) for r in range(graph.num_readers)]
        new = torch.tensor([k and w in reached and leads_out[r] for (w, r), k in zip(edges, kept.tolist())],
                           dtype=torch.bool)
        if torch.equal(new, kept):
            return kept
        kept = new


@dataclass
class Circuit:
    edges: list[tuple[str, str]]
    kept: torch.Tensor  # (E,) bool after dangling-edge removal
    edge_threshold: Threshold
    node_threshold: Threshold | None
    counts: dict  # edges/nodes before and after dangling removal, totals, sparsities

    def thresholds(self) -> dict:
        """The thresholds used, as log_alpha and as deterministic mask value (edges, and nodes if any)."""
        out = {"edge_log_alpha": self.edge_threshold.log_alpha, "edge_value": self.edge_threshold.value}
        if self.node_threshold is not None:
            out.update(node_log_alpha=self.node_threshold.log_alpha, node_value=self.node_threshold.value)
        return out


def extract_circuit(graph: Graph, edge_log_alpha: torch.Tensor, node_log_alpha: torch.Tensor | None = None,
                    edge_sparsity: float | None = None, node_sparsity: float | None = None) -> Circuit:
    """Binarise learned masks into a circuit (threshold search, node masks, dangling removal)."""
    if edge_log_alpha.shape != (graph.num_edges,):
        raise ValueError(f"edge masks have {tuple(edge_log_alpha.shape)} entries, the graph has "
                         f"({graph.num_edges},) edges ({graph.describe()})")
    et = threshold_to_sparsity(edge_log_alpha, edge_sparsity)
    kept = et.kept.clone()
    nt = None
    if node_log_alpha is not None:
        nt = threshold_to_sparsity(node_log_alpha, node_sparsity)
        writer_of = torch.tensor([graph.writer_index[w] for w, _ in graph.edges])
        kept &= nt.kept[writer_of]
    before = int(kept.sum())
    kept = remove_dangling(graph, kept)
    edges = [e for e, k in zip(graph.edges, kept.tolist()) if k]
    nodes = {w for w, _ in edges} | {r for _, r in edges}
    counts = {
        "total_edges": graph.num_edges,
        "edges_thresholded": int(et.kept.sum()),
        "edges_before_dangling": before,
        "edges": len(edges),
        "nodes": len(nodes),
        "edge_sparsity": 1.0 - len(edges) / graph.num_edges,
        "expected_edge_sparsity": 1.0 - et.target_kept / graph.num_edges,
    }
    if nt is not None:
        counts["writers_kept"] = int(nt.kept.sum())
        counts["total_writers"] = graph.num_writers
    return Circuit(edges=edges, kept=kept, edge_threshold=et, node_threshold=nt, counts=counts)


def edges_to_mask(graph: Graph, edges) -> torch.Tensor:
    """(E,) bool of a list of [writer, reader] pairs; errors name the bad entry."""
    kept = torch.zeros(graph.num_edges, dtype=torch.bool)
    for i, pair in enumerate(edges):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"edge {i}: expected a [writer, reader] pair, got {pair!r}")
        try:
            kept[graph.edge_index(*pair)] = True
        except KeyError as err:
            raise ValueError(f"edge {i}: {err.args[0]} ({graph.describe()})") from None
    return kept


def read_edge_pairs(path: str | Path) -> list[tuple[int, list]]:
    """The entries of an ``edges.json``-format file (a JSON list of [writer, reader] name pairs) as
    ``(index, [writer, reader])``, checked for shape only; errors (ValueError) name the file and entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edges file {path} does not exist (or is not a file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of [writer, reader] pairs, got a JSON {_json_type(data)}")
    for i, entry in enumerate(data):
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(n, str) for n in entry)):
            raise ValueError(f"{path}: entry {i} is {shorten(json.dumps(entry))}; expected a [writer, reader] pair of node names, "
                             'e.g. ["a0.h1", "m2"]')
    return list(enumerate(data))


def _json_type(value) -> str:
    names = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
