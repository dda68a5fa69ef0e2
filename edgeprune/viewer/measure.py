"""The figures along the viewer's slider, measured when the page is built (``edgeprune view``).

For a run or a scores file with a config, the circuit the slider shows at prefix n (the top n ranked
edges, dangling edges removed: ``selection.select_top``, the page's own rule) is evaluated at ~16
log-spaced n and at the run's own circuit, with ``curve``'s evaluator (``CircuitEvaluator``): KL,
the normalised faithfulness, and the task's own metric where the config names a task. Each point
records its prefix, so the page shows a figure only for the circuit it was measured on.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..baselines.curve import CircuitEvaluator
from ..circuit import remove_dangling
from ..experiment import prepare, split_path, task_metric, tokenizer_named
from ..tasks.jsonl import read_jsonl_task
from .sources import ViewSource

POINTS = 16


def prefix_sizes(shipped: int, own: int | None, n: int = POINTS) -> list[int]:
    """~``n`` log-spaced prefix sizes in [1, shipped], and ``own`` (the run's circuit), sorted, unique."""
    if shipped < 1:
        return []
    sizes = {max(1, min(shipped, round(math.exp(i * math.log(shipped) / max(n - 1, 1))))) for i in range(n)}
    if own:
        sizes.add(min(own, shipped))
    return sorted(sizes)


def measure(source: ViewSource, cfg, cap: int, *, run_dir: Path | None = None, split: str | None = None,
            n_batches: int | None = None, progress: bool = False) -> list[dict]:
    """Points {"edges", "prefix", "split", "source", "faithfulness", "kl", ...} along ``source``'s slider."""
    split = split or cfg.data.eval_split
    model, batches, _, _ = prepare(cfg, split, n_batches=n_batches, run_dir=run_dir)
    if source.spans is not None and list(model.spans or []) != list(source.spans):
        raise ValueError(f"{source.label}: its spans {source.spans} are not the config's ({model.spans})")
    ev = CircuitEvaluator(model, batches, loss=cfg.data.loss, task_metric=task_metric(cfg.data, model))
    index = {tuple(e): i for i, e in enumerate(model.edge_names)}
    try:
        ranked = [index[tuple(e)] for e in source.edges[:cap]]
    except KeyError as err:
        raise ValueError(f"{source.label}: edge {err.args[0]} is not in the config's model") from None
    sizes = prefix_sizes(len(ranked), source.default_n if source.kind == "run" else None)
    points = []
    for n in tqdm(sizes, desc="view: measuring the slider", disable=not progress, leave=False):
        kept = torch.zeros(len(index), dtype=torch.bool)
        kept[ranked[:n]] = True
        kept = remove_dangling(model.graph, kept, model.n_spans)
        points.append({"prefix": n, "split": split, "source": "view", **ev.point(kept)})
    return points


def span_tokens(cfg, spans: list[str], split: str | None = None) -> dict[str, str]:
    """An example prompt's tokens under each span column: the first line of ``split`` (default the
    config's validation split), decoded per span (the tokenizer alone is loaded, not the model)."""
    split = split or cfg.data.eval_split
    path = split_path(cfg.data, split)
    tokenizer = tokenizer_named(cfg.model.name_or_path)
    examples = read_jsonl_task(path, tokenizer, split=None if Path(cfg.data.path).is_dir() else split,
                               max_length=cfg.data.max_length)
    if not examples or examples[0].span_names is None:
        return {}
    ex = examples[0]
    by_span: dict[str, list[int]] = {}
    for token, name in zip(ex.input_ids, ex.span_names):
        by_span.setdefault(name, []).append(token)
    return {name: tokenizer.decode(by_span[name]) for name in spans if name in by_span}
