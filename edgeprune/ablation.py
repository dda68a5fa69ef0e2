"""Ablation: what an edge outside the circuit carries, and where those states come from. One place
for every command (prune, eval, stability, attribute, curve, compare, generate).

- ``interchange`` (the default; zero for Tracr): the writer states of each example's corrupted
  input, computed with every batch (``eval.reference_and_corrupted``);
- ``zero``: nothing: the writer's contribution is removed;
- ``mean``: each writer's mean state over the real (non-padding) tokens of the **whole training
  split** (``data.train_split``, in file order: independent of the seed's shuffle and of the batch
  size). ``edgeprune prune`` computes them once and stores them in the run directory
  (``mean_states.safetensors``: a (writers, d_model) fp32 tensor, the model's fingerprint and the
  data they came from), and every later command on that run reads the very states pruning used.
  A run written before the file existed gets them computed by the same definition (and says so).

``prepare`` gives a model its states and returns the record that ``metrics.json``, ``compare.json``
and the log keep: ``{"ablation": kind, "source": where the states came from}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, write_safetensors
from .model import EdgeModel
from .models.tracr import TracrModel
from .tasks.jsonl import batches

MEAN_STATES = "mean_states.safetensors"
MEAN_BATCH = 16  # examples per forward while averaging (the mean does not depend on it)


def kind_of(cfg, model: EdgeModel) -> str:
    """A config's ablation (``model.ablation``), or the default for this model: zero for a compiled
    Tracr model (its task has no corrupted inputs), interchange otherwise."""
    return cfg.model.ablation or ("zero" if isinstance(model.hf, TracrModel) else "interchange")


def mean_states(model: EdgeModel, data, progress: bool = False) -> torch.Tensor:
    """(W, D) fp32: every writer's mean state over the real tokens of every example of ``data``
    (a ``TaskData``), in file order."""
    parts = batches(data.examples, MEAN_BATCH, data.pad_token_id)
    total = -(-len(data.examples) // MEAN_BATCH)
    bar = tqdm(parts, total=total, desc="mean states", disable=not progress, leave=False)
    return model.compute_mean_states((b.input_ids, b.attention_mask) for b in bar)


def save_mean_states(path: Path, states: torch.Tensor, model: EdgeModel, source: str, n: int) -> Path:
    meta = {"model_fingerprint": json.dumps(model.fingerprint(), sort_keys=True), "source": source,
            "examples": str(n), "definition": "mean over the real tokens of the whole training split"}
    return write_safetensors({"mean_states": states.detach().float().cpu()}, path, meta)


def load_mean_states(path: Path, model: EdgeModel) -> torch.Tensor:
    """The stored states, checked against ``model`` (shape and weights fingerprint); CheckpointError
    naming the file otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            states = f.get_tensor("mean_states")
    except (SafetensorError, OSError, KeyError) as err:
        raise CheckpointError(f"{path}: damaged mean-states file ({type(err).__name__}: {err}); delete it and "
                              "rerun the command to recompute it from the training split") from None
    saved = json.loads(meta.get("model_fingerprint", "null"))  # written with the current fingerprint version
    if saved is not None and saved != model.fingerprint():
        raise CheckpointError(f"{path}: these mean states were computed on another model (its config or weights "
                              "differ); delete the file to recompute them for this model")
    expected = (model.graph.num_writers, model.hf.config.hidden_size)
    if tuple(states.shape) != expected:
        raise CheckpointError(f"{path}: mean states of shape {tuple(states.shape)}, this model needs {expected}")
    return states


def prepare(model: EdgeModel, cfg, train, run_dir: str | Path | None = None, *, write: bool = False,
            progress: bool = False) -> dict:
    """Give ``model`` the states its ablation (``model.ablation``) needs; returns their record.

    ``train``: the training split (a ``TaskData``), or a function returning it (called only when the
    means must be computed); ``experiment.prepare_ablation`` passes the loader. ``run_dir``: the run
    whose stored mean states to use (and, with ``write``, where to store newly computed ones:
    ``edgeprune prune``)."""
    kind = model.ablation
    if kind == "interchange":
        return {"ablation": kind, "source": "the corrupted input of each example"}
    if kind == "zero":
        return {"ablation": kind, "source": "zeros"}
    path = Path(run_dir) / MEAN_STATES if run_dir is not None else None
    if path is not None and path.is_file():
        model.set_mean_states(load_mean_states(path, model))
        return {"ablation": kind, "source": str(path)}
    train = train() if callable(train) else train
    states = mean_states(model, train, progress)
    model.set_mean_states(states)
    source = f"{train.source} ({len(train.examples)} examples, every real token)"
    if write and path is not None:
        save_mean_states(path, states, model, train.source, len(train.examples))
        return {"ablation": kind, "source": str(path), "computed_from": source}
    return {"ablation": kind, "source": source}
