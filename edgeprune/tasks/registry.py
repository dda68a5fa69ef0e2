"""The built-in tasks by name: their generators, their metrics, and writing a dataset to disk.

``generate("ioi", tokenizer, "data/datasets/ioi", n_train=300, n_val=100, n_test=1000, seed=0)``
writes ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (one JSON object per line: ``clean``,
``corrupted``, ``split`` and the task's fields) and ``meta.json`` (task, tokenizer, seed, counts,
options, template ids per split).

``METRICS[task](tokenizer)`` gives ``metric(logits, extras) -> dict[str, Tensor]``: ``logits`` is
(N, V), the model's logits at each example's first predicted position (the position whose next token
is the first span token); ``extras`` is the list of the N records' task fields; each value is an (N,)
per-example tensor for the caller to average.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import boolean_expressions, gendered_pronoun, greater_than, ioi
from .common import SPLITS, TaskData

GENERATORS: dict[str, Callable[..., TaskData]] = {
    "ioi": ioi.generate,
    "gt": greater_than.generate,
    "gp": gendered_pronoun.generate,
    "boolean": boolean_expressions.generate,
}

METRICS: dict[str, Callable] = {
    "ioi": ioi.metric,
    "gt": greater_than.metric,
    "gp": gendered_pronoun.metric,
    "boolean": boolean_expressions.metric,
}


def _lookup(table: dict, task: str):
    if task not in table:
        raise ValueError(f"unknown task {task!r}; the built-in tasks are {sorted(table)}")
    return table[task]


def get_metric(task: str, tokenizer) -> Callable:
    """The metric of ``task`` for ``tokenizer`` (see the module docstring)."""
    return _lookup(METRICS, task)(tokenizer)


def generate(task: str, tokenizer, out_dir: str | Path, *, n_train: int, n_val: int, n_test: int,
             seed: int, **options) -> dict[str, Path]:
    """Generate ``task`` for ``tokenizer`` into ``out_dir``; returns {split: path of its JSONL}."""
    data = _lookup(GENERATORS, task)(tokenizer, n_train=n_train, n_val=n_val, n_test=n_test,
                                     seed=seed, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = out / f"{split}.jsonl"
        with open(paths[split], "w", encoding="utf-8") as f:
            for row in data.splits[split]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    meta = {
        "task": task,
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "seed": seed,
        "counts": {split: len(data.splits[split]) for split in SPLITS},
        "options": data.options,
        "templates": data.templates,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return paths
