"""``edgeprune convert``: edgeprune files <-> EAP-IG / MIB graph JSON, reference Edge Pruning runs -> ours.

Every conversion reads and checks everything first and writes only at the end, so bad input leaves
nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..baselines.scores import METHODS, Scores, save_scores
from ..checkpoint import write_safetensors
from ..config import load_config, save_config
from ..experiment import load_model
from ..export import circuit_json_path
from ..graph import Graph
from .common import InteropError, model_facts, model_graph, refuse_existing, write_json
from .eap_ig import load_json, read_eap_ig, to_eap_ig, write_eap_ig
from .ep_reference import convert_reference_edges, read_reference
from .sources import EDGE_PRUNING, Source, load_source


# ------------------------------------------------------------------ ours -> EAP-IG
def source_to_eap_ig(src: Source, d_model: int | None = None) -> dict:
    """The EAP-IG graph dict of a run / scores file / circuit (see docs/interop.md for the scores)."""
    width = model_facts(src.model_id, d_model, str(src.path))
    values, provenance = src.values.float(), {"format": "edgeprune", "method": src.method,
                                              "source": str(src.path), "model_id": src.model_id,
                                              "graph": src.graph.fingerprint()}
    if src.method == EDGE_PRUNING:
        # MIB ranks |score|: shift log_alpha to >= 0 so |score| orders edges as log_alpha does
        offset = float(values.min())
        values = (values.double() - offset).float()
        provenance.update(score="log_alpha - score_offset", score_offset=offset)
    else:
        provenance["score"] = {"circuit": "1 in the circuit, 0 outside"}.get(
            src.method, "m(edge ablated) - m(full), as edgeprune attribute writes it")
    provenance["rank_by"] = "signed" if src.signed else "abs"
    return to_eap_ig(src.graph, values, src.kept, signed=src.signed, d_model=width, provenance=provenance)


def convert_to_eap_ig(path: str | Path, output: str | Path, *, d_model: int | None = None,
                      overwrite: bool = False) -> dict:
    src = load_source(path)
    data = source_to_eap_ig(src, d_model)
    refuse_existing([output], overwrite)
    write_eap_ig(data, output)
    return {"source": src, "edges": len(data["edges"]), "in_graph": sum(e["in_graph"] for e in data["edges"].values())}


# ------------------------------------------------------------------ EAP-IG -> ours
@dataclass
class Target:
    """The model a foreign file is converted for: its graph, id and (with --config) resolved config."""
    graph: Graph
    model_id: str
    config: object | None  # ExperimentConfig
    model: object | None = None  # EdgeModel with real weights (only when its fingerprint is needed)


def target_for(config: str | None, model: str | None, *, weights: bool = False) -> Target:
    if config:
        cfg = load_config(config)
        if weights:
            m = load_model(cfg.model)
            return Target(m.graph, m.model_id, cfg, m)
        graph, m = model_graph(cfg.model.name_or_path)
        return Target(graph, cfg.model.name_or_path, cfg)
    if model:
        graph, _ = model_graph(model)
        return Target(graph, model, None)
    raise InteropError("say which model the file is for: --config CONFIG.yaml (also writes config.yaml, so "
                       "`edgeprune eval` runs on the output) or --model NAME_OR_PATH")


def convert_from_eap_ig(path: str | Path, out_dir: str | Path, target: Target, *, method: str = "eap-ig",
                        overwrite: bool = False) -> dict:
    """An EAP-IG graph file -> OUT_DIR/scores_<method>.safetensors (or masks.safetensors for a file that
    edgeprune wrote from an Edge Pruning run) + edges.json + circuit.json (+ config.yaml with --config)."""
    out = Path(out_dir)
    g = target.graph
    prov_method = None
    cfg = load_json(path)["cfg"]
    if isinstance(cfg.get("edgeprune"), dict):
        prov_method = cfg["edgeprune"].get("method")
    signed = prov_method == EDGE_PRUNING or (prov_method or method) in ("acdc", "circuit")
    f = read_eap_ig(path, g, signed=signed)
    edges = [list(e) for e, k in zip(g.edges, f.kept.tolist()) if k]
    fp = g.fingerprint()
    config = target.config.to_dict() if target.config is not None else None
    if prov_method == EDGE_PRUNING:
        main = out / "masks.safetensors"
    else:
        m = prov_method if prov_method in METHODS else method
        if m not in METHODS:
            raise InteropError(f"--method {m!r}: choose one of {', '.join(METHODS)}")
        main = out / f"scores_{m}.safetensors"
    outputs = [main, out / "edges.json", circuit_json_path(out / "edges.json")]
    if target.config is not None:
        outputs.append(out / "config.yaml")
    refuse_existing(outputs, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if prov_method == EDGE_PRUNING:
        write_safetensors({"edge_log_alpha": f.values.float()}, main,
                          {"model_id": target.model_id, "graph": json.dumps(fp, sort_keys=True),
                           "source": str(path)})
    else:
        save_scores(Scores(method=m, values=f.values, edges=list(g.edges), graph=fp, model_id=target.model_id,
                           settings={"converted_from": str(path), "format": "eap-ig graph json"},
                           kept=f.kept if m == "acdc" else None, config=config, source=str(main)), main)
    write_json(edges, out / "edges.json")
    write_json({"model_id": target.model_id, "graph": fp, "config": config, "edges_file": "edges.json",
                "source": str(path), "counts": {"total_edges": g.num_edges, "edges": len(edges),
                                                "mib_edges_in_file": f.mib_edges,
                                                "mib_edges_in_graph": f.mib_in_graph,
                                                "edges_without_mib_entry": f.missing}},
               circuit_json_path(out / "edges.json"), indent=2)
    if target.config is not None:
        save_config(target.config, out / "config.yaml")
    return {"written": outputs, "edges": len(edges), "missing": f.missing, "file": f}


# ------------------------------------------------------------------ reference Edge Pruning -> ours
def convert_from_reference(path: str | Path, out_dir: str | Path, target: Target | None, *,
                           overwrite: bool = False) -> dict:
    """A reference run -> OUT_DIR/masks.safetensors (+ edges.json from the reference's own, renamed;
    + config.yaml with --config)."""
    path, out = Path(path), Path(out_dir)
    ref = read_reference(path, target.graph if target else None)
    ref_edges = (path if path.is_dir() else path.parent) / "edges.json"
    edges = convert_reference_edges(ref_edges, ref.graph) if ref_edges.is_file() else None
    outputs = [out / "masks.safetensors"] + ([out / "edges.json"] if edges is not None else [])
    if target is not None and target.config is not None:
        outputs.append(out / "config.yaml")
    refuse_existing(outputs, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    model_id = target.model_id if target else ref.model_id
    meta = {"model_id": str(model_id), "graph": json.dumps(ref.graph.fingerprint(), sort_keys=True),
            "source": f"edge-pruning reference run {ref.source}"}
    if target is not None and target.model is not None:
        meta["model_fingerprint"] = json.dumps(target.model.fingerprint(), sort_keys=True)
    write_safetensors({"edge_log_alpha": ref.edge_log_alpha, "node_log_alpha": ref.node_log_alpha},
                      out / "masks.safetensors", meta)
    if edges is not None:
        write_json(edges, out / "edges.json")
    if target is not None and target.config is not None:
        save_config(target.config, out / "config.yaml")
    return {"written": outputs, "reference": ref, "edges": edges}

