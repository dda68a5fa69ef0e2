"""EAP and EAP-IG edge scores from the edge-masked model's gradients (DESIGN.md section 6).

Every edge e = (w, r) has a mask z_e in the reader's input x_r = ... + z_e s_w + (1 - z_e) s~_w, so

    dm/dz_e = <dm/dx_r, s_w - s~_w>

(summed over batch, positions and d_model) is exactly the attribution-patching product of the
writer's clean-minus-ablated contribution with the metric's gradient at the reader's input.

Sign convention (both methods): ``score_e`` estimates the change of the metric when edge e alone is
ablated, ``m(z_e = 0) - m(z = 1)``:
- EAP (Syed et al. 2023): first order at the full model, ``score_e = -dm/dz_e (z = 1)``: one
  forward and one backward per batch.
- EAP-IG on the masks ("activations" variant): the same gradient averaged along the straight path
  z = alpha * 1 for alpha from 0 to 1 (every edge moves together), ``score_e = -mean_k dm/dz_e
  (alpha_k)`` with a Riemann sum of ``steps`` points (``midpoint``: alpha_k = (k + 1/2) / steps,
  default; ``right``: alpha_k = (k + 1) / steps, the last point is EAP). Completeness: the scores
  sum to ~ m(every edge ablated) - m(full), exactly in the limit of many steps.

Metrics (per loss position, averaged over every loss position of the data):
- ``logit_diff``: target logit minus the logit of the full model's top alternative (the argmax of
  the full model's logits over every other token), as ``edgeprune.eval``; higher = better, so an
  important edge gets a *negative* score (ablating it lowers the logit difference).
- ``kl``: KL(p_full || p_circuit) in nats; 0 and minimal at the full model, so its EAP gradient is
  zero there (use it with EAP-IG or ACDC).
- ``mse``: mean squared error of the output vs the full model (numerical tasks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..eval import kl_divergence, reference_and_corrupted
from ..model import EdgeModel

METRICS = ("logit_diff", "kl", "mse")
IG_RULES = ("midpoint", "right")


@dataclass
class Prepared:
    """A batch with everything a masked forward and the metric need, on the model's device.

    ref: (N, V) fp32 full-model logits at the N loss positions; targets, alt: (N,) long, the target
    token and the full model's top alternative; corrupted: writer groups (g, B, T, D) or None.
    """

    batch: object  # tasks.jsonl.Batch
    corrupted: list[torch.Tensor] | None
    ref: torch.Tensor
    targets: torch.Tensor
    alt: torch.Tensor

    @property
    def n_positions(self) -> int:
        return self.targets.numel()


def prepare(model: EdgeModel, batch) -> Prepared:
    """One no-grad pass of the frozen weights: reference logits, alternatives, ablated states."""
    batch = batch.to(model.device)
    full, corrupted = reference_and_corrupted(model, batch)
    sel = batch.loss_mask
    ref = full[sel].float()
    targets = batch.target_ids[sel]
    others = ref.clone()
    others.scatter_(1, targets[:, None], -torch.inf)
    return Prepared(batch, corrupted, ref, targets, others.argmax(-1))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def metric_sum(logits: torch.Tensor, p: Prepared, metric: str) -> torch.Tensor:
    """Scalar: the metric summed over the loss positions of ``p``. logits (B, T, V) of the circuit."""
    cur = logits[p.batch.loss_mask].float()  # (N, V)
    if metric == "logit_diff":
        return (cur.gather(1, p.targets[:, None]) - cur.gather(1, p.alt[:, None])).sum()
    if metric == "kl":
        return kl_divergence(p.ref, cur).sum()
    if metric == "mse":
        return ((cur - p.ref) ** 2).mean(-1).sum()
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def masked_logits(model: EdgeModel, p: Prepared, z: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of the model with edge values z (E,) fp32 (may require grad)."""
    b = p.batch
    return model(b.input_ids, b.attention_mask, corrupted_states=p.corrupted, edge_values=z,
                 span_ids=b.span_ids).logits


@torch.no_grad()
def metric_value(model: EdgeModel, prepared: list[Prepared], z: torch.Tensor, metric: str) -> float:
    """The metric averaged over every loss position of ``prepared`` at edge values z (E,)."""
    total = sum(float(metric_sum(masked_logits(model, p, z), p, metric)) for p in prepared)
    return total / sum(p.n_positions for p in prepared)


def ig_alphas(steps: int, rule: str = "midpoint") -> list[float]:
    """Points of the Riemann sum along z = alpha * 1."""
    if steps < 1:
        raise ValueError(f"ig steps must be >= 1, got {steps}")
    if rule == "midpoint":
        return [(k + 0.5) / steps for k in range(steps)]
    if rule == "right":
        return [(k + 1) / steps for k in range(steps)]
    raise ValueError(f"unknown integration rule {rule!r}; choose one of {', '.join(IG_RULES)}")


def path_gradient_scores(model: EdgeModel, batches, alphas: list[float], metric: str = "logit_diff",
                         progress: bool = False, desc: str = "attribute") -> torch.Tensor:
    """(E,) fp32 on CPU: ``-mean_alpha dm/dz (alpha * 1)``, m the metric averaged over all loss positions.

    ``batches``: Batch objects (tasks.jsonl.batches). One forward + backward per batch and alpha.
    """
    check_metric(metric)
    batches = list(batches)
    n_total = sum(int(b.loss_mask.sum()) for b in batches)
    if n_total == 0:
        raise ValueError("attribution got no loss positions (empty split?)")
    E = model.edge_masks.n  # (S * E,) for position-aware masks: a score per (edge, span)
    grad = torch.zeros(E, dtype=torch.float32, device=model.device)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(batches) * len(alphas), desc=desc, disable=not progress, leave=False)
        for batch in batches:
            p = prepare(model, batch)
            for alpha in alphas:
                z = torch.full((E,), float(alpha), dtype=torch.float32, device=model.device, requires_grad=True)
                m = metric_sum(masked_logits(model, p, z), p, metric) / n_total
                (g,) = torch.autograd.grad(m, z)
                grad += g
                bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    return (-grad / len(alphas)).cpu()


def eap_scores(model: EdgeModel, batches, metric: str = "logit_diff", progress: bool = False) -> torch.Tensor:
    """EAP: (E,) first-order estimates of m(edge ablated) - m(full); see the module docstring."""
    if metric == "kl" or metric == "mse":
        warnings.warn(f"EAP with metric {metric!r}: the metric is minimal at the full model, so its gradient "
                      "there (and every EAP score) is ~0; use --metric logit_diff or eap-ig", stacklevel=2)
    return path_gradient_scores(model, batches, [1.0], metric, progress, desc="eap")


def eap_ig_scores(model: EdgeModel, batches, steps: int = 5, rule: str = "midpoint", metric: str = "logit_diff",
                  progress: bool = False) -> torch.Tensor:
    """EAP-IG on the masks: (E,) path-integrated estimates; they sum to ~ m(all ablated) - m(full)."""
    return path_gradient_scores(model, batches, ig_alphas(steps, rule), metric, progress, desc="eap-ig")
