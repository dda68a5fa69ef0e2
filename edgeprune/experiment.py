"""What a run needs from its config: the edge-masked model on its device, and the task's examples."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import ablation
from .config import DataConfig, ModelConfig
from .hub import loading
from .model import EdgeModel
from .models.tracr import TracrModel
from .spans import assign_spans, describe_spans
from .tasks.jsonl import batches, is_hf_dataset, pad_token_id_for, read_hf_dataset, read_jsonl_task
from .tasks.registry import METRICS
from .tasks.tracr import tracr_examples

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def load_model(cfg: ModelConfig, device: torch.device | None = None) -> EdgeModel:
    """The edge-masked model of ``cfg`` (weights loaded once, frozen) on ``device``."""
    kwargs = {"dtype": DTYPES[cfg.dtype]}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.ablation is not None:  # None: the family's default (interchange; zero for Tracr)
        kwargs["ablation"] = cfg.ablation
    model = EdgeModel.from_pretrained(cfg.name_or_path, node_masks=cfg.node_masks, **kwargs)
    return model.to(device or resolve_device(cfg.device))


@dataclass
class TaskData:
    """Examples of one split and how to batch them."""
    examples: list
    pad_token_id: int
    source: str


def split_path(cfg: DataConfig, split: str) -> Path:
    path = Path(cfg.path)
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.jsonl"))
            raise FileNotFoundError(f"data.path {path}: no {split}.jsonl (found: {', '.join(found) or 'nothing'})")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"data.path {path}: no such file or directory")
    return path


def load_split(cfg: DataConfig, model: EdgeModel, split: str) -> TaskData:
    """Tokenized examples of ``split`` with the model's own tokenizer.

    ``data.path`` is a JSONL file (lines carry their ``split``), a directory of
    ``{train,validation,test}.jsonl`` (the file decides the split), or a ``datasets`` dataset: a
    ``save_to_disk`` directory (``Dataset`` with a ``split`` column, or ``DatasetDict`` by split)
    or a Parquet / JSON file; every record is validated the same way.
    """
    if cfg.path == TRACR_ALL_INPUTS:
        return _tracr_split(model)

    tokenizer = load_tokenizer(model)
    if is_hf_dataset(cfg.path):  # a datasets save_to_disk directory, or a Parquet / JSON file
        path = Path(cfg.path)
        examples = read_hf_dataset(path, tokenizer, split=split, max_length=cfg.max_length)
    else:
        path = split_path(cfg, split)
        examples = read_jsonl_task(path, tokenizer, split=None if Path(cfg.path).is_dir() else split,
                                   max_length=cfg.max_length)
    metric = task_metric(cfg, model)
    if metric is not None:  # a line whose answer fields do not name its predicted token is refused
        metric.check(examples, str(path))
    return with_spans(TaskData(examples, pad_token_id_for(tokenizer), str(path)), model)


def with_spans(data: TaskData, model: EdgeModel) -> TaskData:
    """Give every example the span ids of a position-aware model (``model.spans``, in its order); a
    split whose spans are not the run's is an error naming them. Shared-mask models: unchanged."""
    if model.spans is None:
        return data

    names = assign_spans(data.examples, model.span_mode, data.source)
    if set(names) != set(model.spans) or len(names) != len(model.spans):
        raise ValueError(f"{data.source}: its spans are {', '.join(names)}, but the run's masks are for "
                         f"{', '.join(model.spans)}")
    remap = [model.spans.index(n) for n in names]
    for ex in data.examples:
        ex.span_ids = [remap[i] for i in ex.span_ids]
    return data


def use_spans(mode: str | None, model: EdgeModel, data: TaskData) -> None:
    """``model.positions``: make ``model``'s edge masks position-aware for the spans of ``data`` (the
    training split decides their names and order) and give its examples their span ids."""
    if mode is None:
        return

    names = assign_spans(data.examples, mode, data.source)
    model.set_spans(names, mode=mode, info=describe_spans(data.examples, names))


def task_metric(cfg: DataConfig, model: EdgeModel):
    """The ``tasks.common.TaskMetric`` named by ``data.task`` for the model's tokenizer, or None."""
    if not cfg.task:
        return None

    if cfg.task not in METRICS:
        raise ValueError(f"data.task {cfg.task!r} is not a known task ({', '.join(sorted(METRICS))})")
    return METRICS[cfg.task](load_tokenizer(model))


TRACR_ALL_INPUTS = "tracr"  # data.path for a compiled Tracr model: every input of its task length


def _tracr_split(model: EdgeModel) -> TaskData:
    if not isinstance(model.hf, TracrModel):
        raise ValueError(f"data.path {TRACR_ALL_INPUTS!r} is the task of a compiled Tracr model, but "
                         f"{model.model_id} is not one")
    return with_spans(TaskData(tracr_examples(model.hf), pad_token_id=model.hf.bos_id,
                               source=f"every input of {model.hf.program!r} of length {model.hf.task_length}"), model)


def load_tokenizer(model: EdgeModel):
    """The model's own tokenizer; loaded once per model id (the splits and the task metric share it)."""
    if not model.model_id:
        raise ValueError("the model has no name_or_path to load its tokenizer from")
    return tokenizer_named(model.model_id)


@lru_cache(maxsize=4)
def tokenizer_named(name_or_path: str):
    """The tokenizer of a model id or path alone (no model loaded); cached per name."""
    from transformers import AutoTokenizer  # heavy: only commands that tokenize pay for transformers

    with loading(name_or_path, "tokenizer"):
        return AutoTokenizer.from_pretrained(name_or_path)


def prepare_ablation(model: EdgeModel, cfg, run_dir=None, train: TaskData | None = None, *, write: bool = False,
                     progress: bool = False) -> dict:
    """``ablation.prepare`` with this config's training split (loaded only if the states need it)."""
    return ablation.prepare(model, cfg, train if train is not None else
                            (lambda: load_split(cfg.data, model, cfg.data.train_split)), run_dir,
                            write=write, progress=progress)


def prepare(cfg, split: str, *, batch_size: int | None = None, n_batches: int | None = None, run_dir=None,
            progress: bool = False):
    """What every command that evaluates or attributes starts from: (model, batches of ``split``,
    their source, the ablation record). The model is ``cfg.model``'s, made position-aware when
    ``model.positions`` is set (the training split names the spans, as in pruning), with the
    ablation states of ``run_dir`` (a run's stored mean states) or computed by their one
    definition; batches of ``batch_size`` (default ``prune.batch_size``) in file order, the first
    ``n_batches`` if given."""
    model = load_model(cfg.model)
    train = None
    if cfg.model.positions is not None:
        train = load_split(cfg.data, model, cfg.data.train_split)
        use_spans(cfg.model.positions, model, train)
    record = prepare_ablation(model, cfg, run_dir, train, progress=progress)
    data = train if train is not None and split == cfg.data.train_split else load_split(cfg.data, model, split)
    out = []
    for i, b in enumerate(batches(data.examples, batch_size or cfg.prune.batch_size, data.pad_token_id)):
        if n_batches is not None and i >= n_batches:
            break
        out.append(b)
    return model, out, data.source, record
