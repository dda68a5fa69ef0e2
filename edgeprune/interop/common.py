"""What the foreign-format converters share: the error type, graphs from fingerprints or model names,
and what the foreign formats need to know about a model (its width, whether MIB defines its graph)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..estimate import hf_config, meta_model
from ..graph import Graph
from ..model import EdgeModel
from ..models.tracr import is_tracr_artifact


class InteropError(ValueError):
    """A foreign file that cannot be converted (malformed, another model, unknown names, ...)."""


def graph_from_fingerprint(fp: dict, where: str) -> Graph:
    """``Graph.from_fingerprint``, its error as an InteropError."""
    try:
        return Graph.from_fingerprint(fp, where)
    except ValueError as err:
        raise InteropError(str(err)) from None


def model_graph(name_or_path: str):
    """(graph, model) of a model built on the meta device from its config alone (no weights)."""
    if is_tracr_artifact(name_or_path):
        raise InteropError(tracr_refusal(name_or_path))
    config, _ = hf_config(name_or_path)
    model = EdgeModel.from_hf(meta_model(config), model_id=name_or_path)
    return model.graph, model


def tracr_refusal(name: str) -> str:
    return (f"{name}: a compiled Tracr model; MIB and the EAP-IG library define graphs for TransformerLens "
            "language models only (Tracr's residual stream is categorical/numerical subspaces, with no "
            "'input'/'logits' nodes of that kind), so there is no MIB graph to convert to or from")


def model_facts(model_id: str | None, d_model: int | None, where: str) -> int:
    """The residual width the EAP-IG graph file records (``cfg.d_model``), refusing Tracr models."""
    if model_id and is_tracr_artifact(model_id):
        raise InteropError(tracr_refusal(model_id))
    if d_model is not None:
        return int(d_model)
    if not model_id:
        raise InteropError(f"{where}: the model is not recorded; pass --d-model (the residual width the "
                           "EAP-IG graph file records as cfg.d_model)")
    try:
        config, _ = hf_config(model_id)
    except (ValueError, OSError) as err:
        raise InteropError(f"{where}: cannot read the config of model {model_id!r} to get its width ({err}); "
                           "pass --d-model") from None
    if getattr(config, "model_type", None) == "tracr":
        raise InteropError(tracr_refusal(model_id))
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not width:
        raise InteropError(f"{where}: model {model_id!r} has no hidden_size in its config; pass --d-model")
    return int(width)


def write_json(obj, path: str | Path, indent: int | None = None) -> Path:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)
    return path


def refuse_existing(paths, overwrite: bool) -> None:
    """Nothing is replaced unless asked: an error naming the first output that exists."""
    if overwrite:
        return
    for p in paths:
        if Path(p).exists():
            raise InteropError(f"{p} exists; pass --overwrite to replace it")
