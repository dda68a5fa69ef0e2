"""Per-edge score files: one safetensors file per attribution run.

Layout (``edgeprune.scores/1``):
- tensor ``scores`` (E,) float32, in the graph's edge order (reader-major, as ``model.graph.edges``);
- tensor ``kept`` (E,) bool, only for methods that also decide a circuit themselves (ACDC);
- metadata (strings): ``format``, ``method``, ``model_id``, ``graph`` (JSON: the graph fingerprint,
  the same dict as ``EdgeModel.graph_fingerprint`` and a run's ``masks.safetensors``), ``edges`` (JSON
  list of ``[writer, reader]`` pairs, the names of the entries of ``scores``), ``settings`` (JSON:
  metric, split, batches, steps, tau, ...), ``config`` (JSON: the resolved experiment config, so
  ``curve``/``compare`` can rebuild model and data) and ``wall_time_s``.

Sign convention of ``scores``: the (estimated or measured) change of the metric when the edge
alone is ablated, ``m(z_e = 0) - m(full)``; see ``attribution.py``. Circuit selection ranks EAP
and EAP-IG scores by magnitude (``rank_by = "abs"``) and ACDC effects by value (``"signed"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import write_safetensors

FORMAT = "edgeprune.scores/1"
METHODS = ("eap", "eap-ig", "acdc")


class ScoresError(ValueError):
    """A scores file that cannot be used here (wrong format, another graph, ...)."""


@dataclass
class Scores:
    method: str  # one of METHODS
    values: torch.Tensor  # (E,) float32, edge order of the graph
    edges: list[tuple[str, str]]
    graph: dict  # graph fingerprint (EdgeModel.graph_fingerprint)
    model_id: str | None = None
    settings: dict = field(default_factory=dict)
    kept: torch.Tensor | None = None  # (E,) bool: the method's own circuit (ACDC), else None
    wall_time_s: float | None = None
    config: dict | None = None  # resolved ExperimentConfig.to_dict()
    source: str | None = None  # the file it was read from

    def __post_init__(self):
        if self.method not in METHODS:
            raise ScoresError(f"unknown method {self.method!r}; known methods: {', '.join(METHODS)}")
        if self.values.shape != (len(self.edges),):
            raise ScoresError(f"scores have shape {tuple(self.values.shape)} but there are {len(self.edges)} edges")
        bad = (~torch.isfinite(self.values.float())).nonzero().flatten()
        if bad.numel():  # a NaN would sort anywhere and give a circuit that means nothing
            first = self.edges[int(bad[0])]
            raise ScoresError(f"{bad.numel()} of {len(self.edges)} scores are NaN or infinite (the first is edge "
                              f"{first[0]} -> {first[1]}); the attribution run that wrote them failed: rerun it")

    @property
    def rank_by(self) -> str:
        """How selection orders edges: by |score| (attribution) or by score (ACDC's measured effects)."""
        return "signed" if self.method == "acdc" else "abs"

    def ranking_key(self) -> torch.Tensor:
        """(E,) float32: larger = more important."""
        v = self.values.float()
        return v if self.rank_by == "signed" else v.abs()

    def top(self, k: int = 10) -> list[tuple[tuple[str, str], float]]:
        idx = torch.argsort(self.ranking_key(), descending=True, stable=True)[:k]
        return [(self.edges[i], float(self.values[i])) for i in idx.tolist()]


def save_scores(scores: Scores, path: str | Path) -> Path:
    """Write ``scores`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"scores": scores.values.detach().float().cpu().contiguous()}
    if scores.kept is not None:
        tensors["kept"] = scores.kept.detach().bool().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "method": scores.method,
        "model_id": str(scores.model_id),
        "graph": json.dumps(scores.graph),
        "edges": json.dumps([list(e) for e in scores.edges]),
        "settings": json.dumps(scores.settings),
        "config": json.dumps(scores.config),
        "wall_time_s": json.dumps(scores.wall_time_s),
    }
    return write_safetensors(tensors, path, meta)


def load_scores(path: str | Path) -> Scores:
    """Read a scores file; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            values = f.get_tensor("scores") if "scores" in keys else None
            kept = f.get_tensor("kept") if "kept" in keys else None
    except (SafetensorError, OSError) as err:
        raise ScoresError(f"{path}: not a safetensors file ({err})") from None
    if meta.get("format") != FORMAT or values is None:
        hint = " (it looks like a run's masks file: pass the run directory instead)" if "edge_log_alpha" in keys else ""
        raise ScoresError(f"{path}: not an edgeprune scores file (expected metadata format={FORMAT!r} and a "
                          f"'scores' tensor){hint}")
    try:
        edges = [tuple(e) for e in json.loads(meta["edges"])]
        scores = Scores(method=meta["method"], values=values.float(), edges=edges, graph=json.loads(meta["graph"]),
                        model_id=None if meta.get("model_id") in (None, "None") else meta["model_id"],
                        settings=json.loads(meta.get("settings", "{}")), kept=kept,
                        wall_time_s=json.loads(meta.get("wall_time_s", "null")),
                        config=json.loads(meta.get("config", "null")), source=str(path))
    except (KeyError, json.JSONDecodeError) as err:
        raise ScoresError(f"{path}: damaged scores metadata ({err!r})") from None
    except ScoresError as err:
        raise ScoresError(f"{path}: {err}") from None
    return scores


def check_graph(scores: Scores, model) -> None:
    """Refuse scores computed on another graph than ``model``'s (a clear error naming both)."""

    ours = model.graph_fingerprint()
    where = scores.source or "scores"
    if scores.graph != ours:
        raise ScoresError(f"{where}: scores are for another graph ({_describe(scores.graph)}, model "
                          f"{scores.model_id!r}); this model ({model.model_id!r}) has {_describe(ours)}")
    if [tuple(e) for e in scores.edges] != model.edge_names:
        raise ScoresError(f"{where}: the edge names/order differ from this model's graph ({model.graph.describe()})")


def _describe(fp: dict) -> str:
    try:
        return (f"{fp['n_layers']} layers, {fp['n_heads']} heads, {fp['n_kv_heads']} kv heads, "
                f"{fp['num_edges']} edges")
    except (KeyError, TypeError):
        return json.dumps(fp)
