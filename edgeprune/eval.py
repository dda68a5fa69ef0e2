"""Faithfulness of a circuit: the masked model against the full model on a task split.

All metrics are over the loss positions (the tokens of the predicted span, teacher-forced):
- ``kl``: mean KL(p_full || p_circuit), nats.
- ``logit_diff_full`` / ``logit_diff_circuit`` / ``logit_diff_empty``: logit of the target token
  minus the logit of the full model's top alternative (its argmax over every other token),
  averaged, for the full model, the circuit and the empty circuit (every edge ablated).
- ``faithfulness`` (the headline): normalised, ``(m(C) - m(empty)) / (m(full) - m(empty))`` with m
  the logit difference: 0 for the empty circuit, 1 for the full model, whatever the sign of m
  (the same quantity as ``edgeprune curve``). NaN, and said so, when m(full) = m(empty).
- ``logit_diff_ratio``: the plain ratio m(C) / m(full). Only meaningful when m(full) is clearly
  positive: with negative logit differences a worse circuit can read above 1.
- ``accuracy_full`` / ``accuracy_circuit``: argmax == target.
- ``exact_match``: the circuit's argmax equals the full model's argmax.
For numerical outputs (``loss: mse``) the metrics are ``mse`` and ``max_abs_error`` instead.
Task metrics (``tasks.common.TaskMetric``) are computed at each example's first loss position and
stored under the task's name: ``ioi/logit_diff_full``, ``ioi/logit_diff_circuit``,
``ioi/logit_diff_empty``, ``ioi/accuracy_...``, and ``ioi/faithfulness`` / ``ioi/logit_diff_ratio``
on the task's main metric (``logit_diff``; ``prob_diff`` for ``gt``), defined as above.
m(empty) costs one more forward per batch; ``EmptyBaseline`` keeps it across evaluations of the
same batches (the pruning loop's validations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import buffers
from .mixing import StateSink
from .model import EdgeModel


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_ref || p) in fp32. (N, V), (N, V) -> (N,)."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    cur = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - cur)).sum(-1)


def reference_and_corrupted(model: EdgeModel, batch, select: torch.Tensor | None = None):
    """One no-grad pass of the frozen weights over clean and corrupted inputs together.

    Returns the full model's clean logits (B, T, V), or (N, V) at the positions of ``select``
    ((B, T) bool, e.g. ``batch.loss_mask``: the read-out then runs only there), and the corrupted
    writer states (W, B, T, D), or None where the ablation does not use them. Only the corrupted
    half's states are kept, and the corrupted half gets no read-out at all. The states are written
    into ``buffers.SWAP`` (the bytes the step's dL/ds buffer takes once they are let go).
    """
    B, T = batch.input_ids.shape
    with torch.no_grad():
        if model.ablation != "interchange":
            return model.full_forward(batch.input_ids, batch.attention_mask, select=select).logits, None
        ids = torch.cat([batch.input_ids, batch.corrupted_input_ids])
        mask = torch.cat([batch.attention_mask, batch.corrupted_attention_mask])
        clean = torch.ones_like(batch.input_ids, dtype=torch.bool) if select is None else select
        both = torch.cat([clean, torch.zeros_like(clean)])
        states = buffers.take(buffers.SWAP, (model.graph.num_writers, B, T, model.hf.config.hidden_size),
                              model.dtype, model.device)
        out = model.full_forward(ids, mask, select=both, states_rows=slice(B, None), sink=StateSink(states))
        logits = out.logits if select is not None else out.logits.view(B, T, out.logits.shape[-1])
        return logits, states


def position_metrics(full: torch.Tensor, circuit: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-position sums for (N, V) full/circuit logits at loss positions with (N,) targets."""
    full, circuit = full.float(), circuit.float()
    others = full.clone()
    others.scatter_(1, targets[:, None], -math.inf)
    alt = others.argmax(-1)
    ld_full = full.gather(1, targets[:, None])[:, 0] - full.gather(1, alt[:, None])[:, 0]
    ld_circ = circuit.gather(1, targets[:, None])[:, 0] - circuit.gather(1, alt[:, None])[:, 0]
    return {
        "kl": kl_divergence(full, circuit).sum(),
        "logit_diff_full": ld_full.sum(),
        "logit_diff_circuit": ld_circ.sum(),
        "accuracy_full": (full.argmax(-1) == targets).float().sum(),
        "accuracy_circuit": (circuit.argmax(-1) == targets).float().sum(),
        "exact_match": (circuit.argmax(-1) == full.argmax(-1)).float().sum(),
    }


def numerical_metrics(full: torch.Tensor, circuit: torch.Tensor) -> dict:
    err = (circuit.float() - full.float())
    return {"mse": (err ** 2).mean(-1).sum(), "max_abs_error": err.abs().amax(-1).sum()}


class EmptyBaseline:
    """The empty circuit's per-batch metric sums, computed on the first evaluation and reused by
    later ones over the same batches (they do not depend on the masks)."""

    def __init__(self):
        self.sums: list[dict] = []


@torch.no_grad()
def evaluate(model: EdgeModel, batches, *, loss: str = "kl", task_metric=None, progress: bool = False,
             desc: str = "eval", output_scale: float = 1.0, reduce=None, empty: bool | EmptyBaseline = True,
             total: int | None = None, reference=None) -> dict:
    """Circuit (the model's current masks, deterministic) vs full model over ``batches``.

    ``task_metric``: a ``tasks.common.TaskMetric`` (its metrics are namespaced by its name).
    ``output_scale`` multiplies every model's outputs first (``data.output_scale``).
    ``reduce(dict of sums) -> dict`` combines the sums of several processes (``Dist.sum_floats``).
    ``empty``: also evaluate the empty circuit for the normalised faithfulness (True), reuse an
    ``EmptyBaseline`` across calls, or skip it (False: no ``faithfulness``, only the ratio).
    ``total``: the number of batches, for the progress bar.
    ``reference``: serves each batch's full-model pass, called as ``reference(model, batch, select)`` ->
    (logits at the loss positions, corrupted states), as ``reference_and_corrupted``, the default; the
    evaluator of many circuits on the same batches passes a ``cache.ReferenceCache``
    (``baselines.curve.CircuitEvaluator``). Every read-out runs at the loss positions only.
    """
    was_training = model.training
    model.eval()
    baseline = EmptyBaseline() if empty is True else (empty or None)
    reuse = baseline is not None and bool(baseline.sums)
    sums: dict[str, float] = {}
    n_pos = n_ex = 0

    def add(part: dict, prefix: str = "") -> None:
        for k, v in part.items():
            sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v)

    try:
        for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False, total=total)):
            batch = batch.to(model.device)
            outputs = _batch_outputs(model, batch, baseline is not None and not reuse, output_scale, reference)
            part, empty_part = _batch_sums(outputs, batch, loss, task_metric)
            add(part)
            n_pos += int(batch.loss_mask.sum())
            n_ex += batch.input_ids.shape[0]
            if baseline is not None:
                if reuse:
                    if i >= len(baseline.sums):
                        raise ValueError("EmptyBaseline was computed on fewer batches than this evaluation")
                    empty_part = baseline.sums[i]
                else:
                    baseline.sums.append(empty_part)
                add(empty_part, "empty:")
    finally:
        model.train(was_training)
    return _metrics(sums, n_pos, n_ex, reduce, loss, task_metric)


def _batch_outputs(model: EdgeModel, batch, with_empty: bool, output_scale: float,
                   reference=None) -> dict[str, torch.Tensor]:
    """(N, V) logits at the batch's N loss positions (the read-out over the vocabulary runs only there)
    of the full model, the circuit and (``with_empty``) the empty circuit, scaled."""
    sel = batch.loss_mask
    reference = reference_and_corrupted if reference is None else reference  # (an empty cache is falsy: no `or`)
    full, corrupted = reference(model, batch, sel)
    circuit = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted, select=sel,
                    span_ids=batch.span_ids).logits
    outputs = {"full": full, "circuit": circuit}
    if with_empty:
        zeros = torch.zeros(model.edge_masks.n, device=model.device)
        outputs["empty"] = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted, select=sel,
                                 edge_values=zeros, span_ids=batch.span_ids).logits
    if output_scale != 1.0:
        outputs = {k: v * output_scale for k, v in outputs.items()}
    return outputs


def _batch_sums(outputs: dict[str, torch.Tensor], batch, loss: str, task_metric) -> tuple[dict, dict]:
    """One batch's metric sums: (full vs circuit, and the task metric of both; the empty circuit's).
    ``outputs``: (N, V) logits at the batch's loss positions, in the order of ``batch.loss_mask``."""
    full, circuit = outputs["full"], outputs["circuit"]
    sel = batch.loss_mask
    part: dict[str, float] = {}
    empty_part: dict[str, float] = {}
    if loss == "mse":
        part.update(numerical_metrics(full, circuit))
    else:
        part.update(position_metrics(full, circuit, batch.target_ids[sel]))
        if "empty" in outputs:
            ld = position_metrics(full, outputs["empty"], batch.target_ids[sel])
            empty_part["logit_diff_empty"] = float(ld["logit_diff_circuit"])
    if task_metric is not None:
        task = getattr(task_metric, "name", "task")
        # each example's first loss position, as a row of the (N, V) outputs
        row_of = torch.full(sel.shape, -1, dtype=torch.long, device=sel.device)
        row_of[sel] = torch.arange(full.shape[0], device=sel.device)
        first = row_of[torch.arange(sel.shape[0], device=sel.device), batch.first_loss_position]
        if bool((first < 0).any()):  # (collate puts it among them; a row of -1 would read another position)
            raise ValueError("evaluate: an example's first loss position is not among the batch's loss positions")
        for which, logits in outputs.items():
            for k, v in task_metric(logits[first].float(), batch.extras).items():
                key = f"{task}/{k}_{which}"
                if which == "empty":
                    empty_part[key] = float(v.float().sum())
                else:
                    part[key] = float(v.float().sum())
    return part, empty_part


def _metrics(sums: dict[str, float], n_pos: int, n_ex: int, reduce, loss: str, task_metric) -> dict:
    """Means of the sums (over positions; task metrics over examples), summed across processes by
    ``reduce`` first, with the circuit / full ratios and the normalised faithfulness."""
    if reduce is not None:
        totals = reduce({**{f"sum:{k}": v for k, v in sums.items()}, "n_pos": n_pos, "n_ex": n_ex})
        sums = {k[4:]: v for k, v in totals.items() if k.startswith("sum:")}
        n_pos, n_ex = int(totals["n_pos"]), int(totals["n_ex"])
    if n_pos == 0:
        raise ValueError("evaluation got no loss positions (empty split?)")
    metrics = {"n_examples": n_ex, "n_positions": n_pos}
    for k, v in sums.items():
        name = k[len("empty:"):] if k.startswith("empty:") else k
        metrics[name] = v / (n_ex if "/" in name else n_pos)
    if loss != "mse":
        _ratios(metrics, "logit_diff")
    if task_metric is not None:
        _ratios(metrics, f"{getattr(task_metric, 'name', 'task')}/{task_metric.main}")
    return metrics


def normalized_faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    """(m(C) - m(empty)) / (m(full) - m(empty)); NaN when the full model and the empty circuit tie."""
    denom = m_full - m_empty
    return (m_circuit - m_empty) / denom if denom != 0 else float("nan")


def _ratios(metrics: dict, m: str) -> None:
    """``faithfulness`` (normalised, when the empty circuit was evaluated) and ``logit_diff_ratio``
    (plain) of metric ``m``, named after m's namespace (``ioi/faithfulness``)."""
    prefix = m.rpartition("/")[0] + "/" if "/" in m else ""
    full, circ = metrics[f"{m}_full"], metrics[f"{m}_circuit"]
    if f"{m}_empty" in metrics:
        metrics[f"{prefix}faithfulness"] = normalized_faithfulness(circ, full, metrics[f"{m}_empty"])
    metrics[f"{prefix}{m.rpartition('/')[2]}_ratio" if prefix else "logit_diff_ratio"] = (
        circ / full if full != 0 else float("nan"))


def format_table(metrics: dict, title: str | None = None) -> str:
    """A two-column text table of scalar metrics."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    width = max((len(k) for k, _ in rows), default=10)
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  value")
    lines.append("-" * (width + 14))
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
