"""Faithfulness of a circuit: the masked model against the full model on a task split.

All metrics are over the loss positions (the tokens of the predicted span, teacher-forced):
- ``kl``: mean KL(p_full || p_circuit), nats.
- ``logit_diff_full`` / ``logit_diff_circuit``: logit of the target token minus the logit of the
  full model's top alternative (its argmax over every other token), averaged.
- ``faithfulness``: logit_diff_circuit / logit_diff_full (fraction of the full model's logit
  difference the circuit keeps; ratio of the means).
- ``accuracy_full`` / ``accuracy_circuit``: argmax == target.
- ``exact_match``: the circuit's argmax equals the full model's argmax.
For numerical outputs (``loss: mse``) the metrics are ``mse`` and ``max_abs_error`` instead.
Task metrics (IOI logit difference, ...) are computed at each example's first loss position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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
    half's states are kept, and the corrupted half gets no read-out at all.
    """
    B = batch.input_ids.shape[0]
    with torch.no_grad():
        if model.ablation != "interchange":
            return model.full_forward(batch.input_ids, batch.attention_mask, select=select).logits, None
        ids = torch.cat([batch.input_ids, batch.corrupted_input_ids])
        mask = torch.cat([batch.attention_mask, batch.corrupted_attention_mask])
        clean = torch.ones_like(batch.input_ids, dtype=torch.bool) if select is None else select
        both = torch.cat([clean, torch.zeros_like(clean)])
        out = model.full_forward(ids, mask, return_states=True, select=both, states_rows=slice(B, None))
        logits = out.logits if select is not None else out.logits.view(*batch.input_ids.shape, out.logits.shape[-1])
        return logits, out.states


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


@torch.no_grad()
def evaluate(model: EdgeModel, batches, *, loss: str = "kl", task_metric=None, progress: bool = False,
             desc: str = "eval", output_scale: float = 1.0, reduce=None) -> dict:
    """Circuit (the model's current masks, deterministic) vs full model over ``batches``.

    ``task_metric(logits (B, V), extras) -> {name: (B,)}`` adds task metrics for both models.
    ``output_scale`` multiplies both models' outputs first (``data.output_scale``).
    ``reduce(dict of sums) -> dict`` combines the sums of several processes (``Dist.sum_floats``).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    task_sums: dict[str, float] = {}
    n_pos = n_ex = 0
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = batch.to(model.device)
            full, corrupted = reference_and_corrupted(model, batch)
            circuit = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted).logits
            if output_scale != 1.0:
                full, circuit = full * output_scale, circuit * output_scale
            sel = batch.loss_mask
            if loss == "mse":
                part = numerical_metrics(full[sel], circuit[sel])
            else:
                part = position_metrics(full[sel], circuit[sel], batch.target_ids[sel])
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_pos += int(sel.sum())
            n_ex += batch.input_ids.shape[0]
            if task_metric is not None:
                rows = torch.arange(batch.input_ids.shape[0], device=full.device)
                first = batch.first_loss_position
                for which, logits in (("full", full), ("circuit", circuit)):
                    for k, v in task_metric(logits[rows, first].float(), batch.extras).items():
                        key = f"{k}_{which}"
                        task_sums[key] = task_sums.get(key, 0.0) + float(v.float().sum())
    finally:
        model.train(was_training)
    if reduce is not None:
        totals = reduce({**{f"sum:{k}": v for k, v in sums.items()}, **{f"task:{k}": v for k, v in task_sums.items()},
                         "n_pos": n_pos, "n_ex": n_ex})
        sums = {k[4:]: v for k, v in totals.items() if k.startswith("sum:")}
        task_sums = {k[5:]: v for k, v in totals.items() if k.startswith("task:")}
        n_pos, n_ex = int(totals["n_pos"]), int(totals["n_ex"])
    if n_pos == 0:
        raise ValueError("evaluation got no loss positions (empty split?)")
    metrics = {"n_examples": n_ex, "n_positions": n_pos}
    metrics.update({k: v / n_pos for k, v in sums.items()})
    if loss != "mse":
        full_ld = metrics["logit_diff_full"]
        metrics["faithfulness"] = metrics["logit_diff_circuit"] / full_ld if full_ld != 0 else float("nan")
    metrics.update({k: v / n_ex for k, v in task_sums.items()})
    return metrics


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
