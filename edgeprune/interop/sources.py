"""What edgeprune wrote, as one thing to convert: a graph, per-edge scores and a circuit.

- a run directory (``masks.safetensors`` or a checkpoint): scores = the edge masks' log_alpha
  (ranked by value: larger = kept longer), circuit = the run's circuit as ``edgeprune eval``
  extracts it (threshold at the expected sparsity, node masks, dangling edges removed);
- a scores file (``edgeprune.scores/1``): its scores, ranked as selection ranks them (|score| for
  EAP / EAP-IG, score for ACDC); circuit = ACDC's own circuit, else empty;
- a circuit (``edges.json`` with its ``circuit.json``, or the ``circuit.json``): score 1 for the
  circuit's edges and 0 for the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import ArtifactError, expect
from ..baselines.scores import load_scores
from ..circuit import extract_circuit
from ..config import load_config
from ..export import circuit_json_path
from ..graph import Graph, edges_to_mask
from ..rundir import load_masks
from ..spans import refuse_positions
from .common import InteropError, graph_from_fingerprint

EDGE_PRUNING = "edge-pruning"


@dataclass
class Source:
    path: Path
    kind: str  # "run" | "scores" | "circuit"
    method: str  # edge-pruning | eap | eap-ig | acdc | circuit
    graph: Graph
    values: torch.Tensor  # (E,) float32
    kept: torch.Tensor  # (E,) bool: the source's own circuit (may be empty)
    signed: bool  # rank by value (True) or by |value|
    model_id: str | None
    config: dict | None
    counts: dict | None = None  # a run's circuit counts

    def ranking_key(self) -> torch.Tensor:
        return self.values.float() if self.signed else self.values.float().abs()


def _run_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    return load_config(path).to_dict() if path.is_file() else None


def load_source(path: str | Path) -> Source:
    """A run directory, a scores file or a circuit file, recognised by what it is."""
    path = Path(path)
    try:
        kind = expect(path, ("run", "scores", "edges", "circuit"),
                      "convert --to eap-ig takes a run directory, a scores file or an edges.json / circuit.json")
    except ArtifactError as err:
        raise InteropError(str(err)) from None
    return _run(path) if kind == "run" else _scores(path) if kind == "scores" else _circuit(path)


def _refuse(spans, where) -> None:
    try:
        refuse_positions(spans, str(where), "EAP-IG / MIB interchange (convert, mib-export)")
    except ValueError as err:
        raise InteropError(str(err)) from None


def _run(run_dir: Path) -> Source:
    masks = load_masks(run_dir)
    _refuse(masks.spans, run_dir)
    graph = graph_from_fingerprint(masks.graph, str(masks.source))
    if masks.edge_log_alpha.numel() != graph.num_edges:
        raise InteropError(f"{masks.source}: {masks.edge_log_alpha.numel()} edge masks, the graph has {graph.num_edges}")
    circuit = extract_circuit(graph, masks.edge_log_alpha, masks.node_log_alpha)
    config = _run_config(run_dir)
    model_id = masks.model_id or (config or {}).get("model", {}).get("name_or_path")
    key = masks.edge_log_alpha.float()
    if masks.node_log_alpha is not None:  # an edge lasts as long as both its mask and its writer's
        writer_of = torch.tensor([graph.writer_index[w] for w, _ in graph.edges])
        key = torch.minimum(key, masks.node_log_alpha.float()[writer_of])
    return Source(run_dir, "run", EDGE_PRUNING, graph, key, circuit.kept, True, model_id, config, circuit.counts)


def _scores(path: Path) -> Source:
    s = load_scores(path)
    _refuse(s.graph.get("spans"), path)
    graph = graph_from_fingerprint(s.graph, str(path))
    if [tuple(e) for e in s.edges] != graph.edges:
        raise InteropError(f"{path}: the edge names/order differ from the graph its fingerprint describes")
    kept = s.kept.bool() if s.kept is not None else torch.zeros(graph.num_edges, dtype=torch.bool)
    model_id = s.model_id or ((s.config or {}).get("model", {}).get("name_or_path"))
    return Source(path, "scores", s.method, graph, s.values.float(), kept, s.rank_by == "signed", model_id, s.config)


def _circuit(path: Path) -> Source:
    if path.name.endswith("circuit.json"):
        summary_path = path
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InteropError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        edges_path = path.with_name(summary.get("edges_file", "edges.json"))
    else:
        edges_path, summary_path = path, circuit_json_path(path)
        if not summary_path.is_file():
            raise InteropError(f"{path}: no {summary_path.name} beside it (it records the model and graph an "
                               "edges.json belongs to; `edgeprune export` writes both)")
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise InteropError(f"{summary_path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if "graph" not in summary:
        raise InteropError(f"{summary_path}: no 'graph' field (the graph fingerprint)")
    _refuse(summary["graph"].get("spans") if isinstance(summary["graph"], dict) else None, summary_path)
    graph = graph_from_fingerprint(summary["graph"], str(summary_path))
    try:
        edges = json.loads(edges_path.read_text())
        kept = edges_to_mask(graph, edges)
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise InteropError(f"{edges_path}: {err}") from None
    return Source(path, "circuit", "circuit", graph, kept.float(), kept, True, summary.get("model_id"),
                  summary.get("config"))
