"""Inputs of the viewer, each read into a ``ViewSource``: a ranked list of the graph's edges.

- a run directory: every edge ranked by its mask's log_alpha (the run's circuit is a prefix of it);
- a scores file (``edgeprune.scores/1``): every edge ranked as circuit selection ranks it
  (|score| for EAP/EAP-IG, score for ACDC), ties by edge index (``selection.edge_order``);
- an ``edges.json`` (with the ``circuit.json`` beside it when there is one): a fixed circuit.

Position-aware inputs (``model.positions``) rank (writer, reader, span) triples and carry their
span names (``ViewSource.spans``); the page draws one column per span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import expect
from ..baselines.scores import load_scores
from ..baselines.selection import edge_order
from ..circuit import load_edges
from ..export import circuit_json_path, run_circuit
from ..graph import Graph, GraphSpec, edges_to_mask, span_edges
from ..jsonfile import read_json
from ..names import parse_node
from ..rundir import load_masks


@dataclass
class ViewSource:
    label: str  # the path as given
    kind: str  # "run" | "scores" | "edges"
    graph: Graph
    edges: list[tuple]  # ranked, most important first (kind "edges": the circuit, graph order);
    # (writer, reader) pairs, or (writer, reader, span) triples for position-aware inputs
    values: list[float] | None  # per ranked edge: log_alpha or score; None for a fixed circuit
    value_name: str | None  # "log_alpha" | "score"
    rank_by: str  # how ``edges`` is ordered, in words
    default_n: int  # the prefix the page opens at (the run's own circuit)
    graph_known: bool = True  # False: graph inferred from the edge names
    points: list[dict] = field(default_factory=list)  # evaluated sizes: {"edges", "faithfulness", "kl", ...}
    node_values: dict[str, float] | None = None  # writer -> node log_alpha
    spans: list[str] | None = None  # position-aware: the span names, in mask order


def load_source(path: str | Path, curve: dict | None = None) -> ViewSource:
    """Read one input of ``edgeprune view``; a clear ValueError for anything that is not a circuit."""
    p = Path(path)
    kind = expect(p, ("run", "scores", "edges", "circuit"),
                  "view takes a run directory, an edges.json / circuit.json or a scores .safetensors file")
    src = _run_source(p) if kind == "run" else _scores_source(p) if kind == "scores" else _edges_source(p)
    if curve is not None:
        src.points.extend(_curve_points(curve, p, src.kind))
    src.points.sort(key=lambda q: q["edges"])
    return src


def _run_source(run_dir: Path) -> ViewSource:
    masks = load_masks(run_dir)
    circuit, fp = run_circuit(run_dir)
    graph = Graph.from_fingerprint(fp, str(run_dir))
    spans = masks.spans
    names = span_edges(graph, spans)
    order = edge_order(graph, masks.edge_log_alpha.float(), "topn", None if spans is None else len(spans)).tolist()
    la = masks.edge_log_alpha.float().tolist()
    points = []
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        saved = _read_json(metrics_path)
        if isinstance(saved, dict) and saved.get("source") == "masks" and isinstance(saved.get("metrics"), dict):
            points.append({"edges": int(saved.get("counts", {}).get("edges", circuit.counts["edges"])),
                           "source": "metrics.json", "split": saved.get("split"), **saved["metrics"]})
    node_values = None
    if masks.node_log_alpha is not None:
        node_values = dict(zip(graph.writers, masks.node_log_alpha.float().tolist()))
    return ViewSource(str(run_dir), "run", graph, [names[i] for i in order], [la[i] for i in order],
                      "log_alpha", "mask log_alpha", circuit.counts["edges_thresholded"], points=points,
                      node_values=node_values, spans=spans)


def _scores_source(path: Path) -> ViewSource:
    scores = load_scores(path)
    graph = Graph.from_fingerprint(scores.graph, str(path))
    spans = scores.graph.get("spans")
    names = span_edges(graph, spans)
    if [tuple(e) for e in scores.edges] != names:
        raise ValueError(f"{path}: the scores' edges do not match their graph ({graph.describe()}, "
                         f"{len(scores.edges)} scores): the file is for another graph or damaged")
    order = edge_order(graph, scores.ranking_key(), "topn", None if spans is None else len(spans)).tolist()
    values = scores.values.float().tolist()
    default = int(scores.kept.sum()) if scores.kept is not None else min(100, len(names))
    return ViewSource(str(path), "scores", graph, [names[i] for i in order], [values[i] for i in order],
                      f"score ({scores.method})", "|score|" if scores.rank_by == "abs" else "score", default,
                      spans=spans)


def _edges_source(path: Path) -> ViewSource:
    data = _read_json(path)
    summary_path = path
    if isinstance(data, dict):  # a circuit.json: its edges file is beside it
        if "edges_file" not in data or "graph" not in data:
            raise ValueError(f"{path}: not a circuit: a JSON object without 'graph' and 'edges_file' "
                             "(expected an edges.json list of [writer, reader] pairs or a circuit.json)")
        path = path.with_name(data["edges_file"])
        summary = data
    else:
        summary_path = circuit_json_path(path)
        summary = _read_json(summary_path) if summary_path.is_file() else None
    edges = load_edges(path)
    spans = None
    if any(len(e) == 3 for e in edges):  # position-aware: span names from circuit.json, else as they occur
        records = getattr(edges, "spans", None)
        if not records and isinstance(summary, dict):
            records = summary.get("spans")
        spans = ([r["name"] if isinstance(r, dict) else str(r) for r in records] if records
                 else list(dict.fromkeys(e[2] for e in edges if len(e) == 3)))
    if isinstance(summary, dict) and isinstance(summary.get("graph"), dict):
        graph, known = Graph.from_fingerprint(summary["graph"], str(summary_path)), True
    else:
        graph, known = _infer_graph([e[:2] for e in edges]), False
    try:
        kept = edges_to_mask(graph, edges, spans)
    except ValueError as err:
        raise ValueError(f"{path}: {err} (the circuit does not match the graph of {summary_path})") from None
    ranked = [e for e, k in zip(span_edges(graph, spans), kept.tolist()) if k]
    points = []
    if isinstance(summary, dict) and isinstance(summary.get("metrics"), dict):
        points.append({"edges": len(ranked), "source": summary_path.name, **summary["metrics"]})
    return ViewSource(str(path), "edges", graph, ranked, None, None, "file", len(ranked), graph_known=known,
                      points=points, spans=spans)


def _infer_graph(edges: list[tuple[str, str]]) -> Graph:
    """The smallest sequential graph holding every named node (no circuit.json to say the real one)."""
    nodes = [parse_node(n) for e in edges for n in e]
    layers = max([n.layer for n in nodes if n.layer is not None] or [0]) + 1
    heads = max([n.head for n in nodes if n.head is not None] or [0]) + 1
    groups = max([n.group for n in nodes if n.group is not None] or [-1]) + 1
    if groups:
        heads = -(-heads // groups) * groups
    return Graph(GraphSpec(n_layers=layers, n_heads=heads, n_kv_heads=groups or heads,
                           pos_embeds=any(n.name == "pos_embeds" for n in nodes)))


def _curve_points(curve: dict, path: Path, kind: str) -> list[dict]:
    """The points of ``curve.json`` measured for this input (matched by path)."""
    want = path.resolve()
    out = []
    for entry in (curve.get("methods") or {}).values():
        for q in entry.get("points", []):
            src = q.get("run") if kind == "run" else (entry.get("sources") or [None])[0]
            if src is not None and Path(src).resolve() == want:
                out.append({"source": "curve.json", **q})
    return out


def _read_json(path: Path):
    return read_json(path, "not a circuit: ")
