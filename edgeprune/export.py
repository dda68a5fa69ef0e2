"""A run's circuit as files: ``edges.json`` (the reference implementation's format) + ``circuit.json``."""

from __future__ import annotations

import json
from pathlib import Path

from .circuit import Circuit, extract_circuit
from .config import load_config
from .graph import Graph
from .rundir import load_masks


def run_circuit(run_dir: str | Path) -> tuple[Circuit, dict]:
    """The binarised circuit of a run (threshold search + dangling removal) and its graph fingerprint,
    from the saved masks alone (no model weights are loaded)."""
    masks = load_masks(run_dir)
    fp = masks.graph
    graph = Graph.from_fingerprint(fp, str(masks.source))
    circuit = extract_circuit(graph, masks.edge_log_alpha, masks.node_log_alpha, spans=masks.spans)
    circuit.span_info = masks.span_info
    return circuit, fp


def circuit_json_path(edges_path: Path) -> Path:
    return edges_path.with_name("circuit.json" if edges_path.name == "edges.json" else f"{edges_path.stem}.circuit.json")


def export_run(run_dir: str | Path, edges_path: str | Path) -> tuple[Circuit, dict]:
    """Write ``edges_path`` and ``circuit.json`` beside it; returns the circuit and the summary."""
    run_dir, edges_path = Path(run_dir), Path(edges_path)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (is this a run directory written by `edgeprune prune`?)")
    cfg = load_config(cfg_path)
    circuit, fp = run_circuit(run_dir)
    edges_path.parent.mkdir(parents=True, exist_ok=True)
    edges_path.write_text(json.dumps([list(e) for e in circuit.edges], indent=0))
    summary = {
        "model_id": cfg.model.name_or_path,
        "graph": fp,
        "config": cfg.to_dict(),
        "sparsity": {"expected_edge": circuit.counts["expected_edge_sparsity"], "edge": circuit.counts["edge_sparsity"]},
        "thresholds": circuit.thresholds(),
        "counts": circuit.counts,
        "edges_file": edges_path.name,
    }
    if circuit.spans is not None:  # position-aware: the spans, in order, with their token counts
        info = {d["name"]: d for d in (circuit.span_info or [])}
        summary["spans"] = [info.get(name, {"name": name}) for name in circuit.spans]
        summary["positions"] = fp.get("positions", "spans")
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        saved = json.loads(metrics_path.read_text())
        if saved.get("source") == "masks":
            summary["metrics"] = {"split": saved["split"], **saved["metrics"]}
    circuit_json_path(edges_path).write_text(json.dumps(summary, indent=2))
    return circuit, summary
