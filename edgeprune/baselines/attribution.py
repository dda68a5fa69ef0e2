"""EAP and EAP-IG edge scores from the edge-masked model's gradients (DESIGN.md section 6).

Every edge e = (w, r) has a mask z_e in the reader's input x_r = ... + z_e s_w + (1 - z_e) s~_w, so

    dm/dz_e = <dm/dx_r, s_w - s~_w>

(summed over batch, positions and d_model) is exactly the attribution-patching product of the
writer's clean-minus-ablated contribution with the metric's gradient at the reader's input.

Sign convention (both methods): ``score_e`` estimates the change of the metric when edge e alone is
ablated, ``m(z_e = 0) - m(z = 1)``:
- EAP (Syed et al. 2023): first order at the full model, ``score_e = -dm/dz_e (z = 1)``. It runs as
  one plain forward and backward with the gradient taken at every reader's input
  (``ig_inputs``, the default); ``variant="masks"`` takes dm/dz through the edge-masked forward
  instead (the same quantity, at several times the cost: the reference for the fast path).
- EAP-IG, two variants (``VARIANTS``), each a Riemann sum of ``steps`` points (``midpoint``:
  alpha_k = (k + 1/2) / steps, default; ``right``: alpha_k = (k + 1) / steps, the last point is
  EAP):
  - ``inputs`` (Hanna et al. 2024; ``ig_inputs``): the plain model runs on inputs interpolated at the
    embeddings, alpha * clean + (1 - alpha) * corrupted, and ``score_e = -<s_w - s~_w, mean_k
    dm/dx_r (alpha_k)>``. One plain forward and backward per step; interchange ablation only.
    Completeness holds for the cut at the input: the scores of the edges out of the embeddings sum
    to ~ m(corrupted input) - m(clean input) (the other edges' scores do not add up to anything).
  - ``masks`` ("activations"): dm/dz averaged along the straight path z = alpha * 1 (every edge mask
    moves together, so each reader sees a mixture of clean and ablated writer states), ``score_e =
    -mean_k dm/dz_e (alpha_k)``. One plain forward and backward per step with every reader reading
    the uniform mix, plus a contraction per step (``ig_masks``; ``path_gradient_scores`` takes the
    same dm/dz through the edge-masked forward, at ~3x the cost: the reference); any ablation.
    Completeness: the scores sum to ~ m(every edge ablated) - m(full), exactly in the limit of many
    steps.

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

from ..eval import reference_and_corrupted
from ..model import EdgeModel
from . import ig_masks
from .ig_inputs import (METRICS, Reference, check_metric, count_loss_positions, input_gradient_scores,
                        metric_at_positions)

IG_RULES = ("midpoint", "right")
VARIANTS = ("inputs", "masks")  # EAP-IG's path: interpolated inputs (default) or edge masks
__all__ = ["IG_RULES", "METRICS", "VARIANTS", "Prepared", "check_metric", "eap_ig_scores", "eap_scores",
           "ig_alphas", "masked_logits", "metric_sum", "metric_value", "path_gradient_scores", "prepare"]


@dataclass
class Prepared:
    """A batch with everything a masked forward and the metric need, on the model's device.

    ref: (N, V) fp32 full-model logits at the N loss positions (every read-out runs only there);
    targets, alt: (N,) long, the target token and the full model's top alternative; corrupted: writer
    groups (g, B, T, D) or None.
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
    full, corrupted = reference_and_corrupted(model, batch, select=batch.loss_mask)
    r = Reference.of(full, batch.target_ids[batch.loss_mask])
    return Prepared(batch, corrupted, r.ref, r.targets, r.alt)


def metric_sum(logits: torch.Tensor, p: Prepared, metric: str) -> torch.Tensor:
    """Scalar: the metric summed over the loss positions of ``p``. logits (N, V) of the circuit there."""
    return metric_at_positions(logits, p.ref, p.targets, p.alt, metric)


def masked_logits(model: EdgeModel, p: Prepared, z: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the loss positions of the model with edge values z (E,) fp32 (may require grad)."""
    b = p.batch
    return model(b.input_ids, b.attention_mask, corrupted_states=p.corrupted, edge_values=z, select=b.loss_mask,
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
    n_total = count_loss_positions(batches)
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


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EAP-IG variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def default_variant(model: EdgeModel, variant: str | None = None) -> str:
    """``variant``, checked; None: ``inputs`` under interchange ablation (one plain forward and backward per
    step), else ``masks`` (zero and mean ablation give the inputs variant no input to start from)."""
    if variant is None:
        return "inputs" if model.ablation == "interchange" else "masks"
    return check_variant(variant)


def eap_scores(model: EdgeModel, batches, metric: str = "logit_diff", progress: bool = False,
               variant: str = "inputs") -> torch.Tensor:
    """EAP: (E,) first-order estimates of m(edge ablated) - m(full); see the module docstring. Both
    variants compute the same scores; ``inputs`` (one plain forward and backward) is the fast one."""
    if metric == "kl" or metric == "mse":
        warnings.warn(f"EAP with metric {metric!r}: the metric is minimal at the full model, so its gradient "
                      "there (and every EAP score) is ~0; use --metric logit_diff or eap-ig", stacklevel=2)
    if check_variant(variant) == "inputs":
        return input_gradient_scores(model, batches, [1.0], metric, progress, desc="eap")
    return path_gradient_scores(model, batches, [1.0], metric, progress, desc="eap")


def eap_ig_scores(model: EdgeModel, batches, steps: int = 5, rule: str = "midpoint", metric: str = "logit_diff",
                  progress: bool = False, variant: str | None = None, reference=None) -> torch.Tensor:
    """EAP-IG: (E,) path-integrated estimates along interpolated inputs (``inputs``) or edge masks
    (``masks``); see the module docstring for what each sums to. None: ``default_variant``.
    ``reference``: serves the masks variant's per-batch pass (``ig_masks.uniform_path_scores``)."""
    alphas = ig_alphas(steps, rule)
    if default_variant(model, variant) == "inputs":
        return input_gradient_scores(model, batches, alphas, metric, progress, desc="eap-ig")
    if ig_masks.UNIFORM_PATH:
        return ig_masks.uniform_path_scores(model, batches, alphas, metric, progress, desc="eap-ig",
                                            reference=reference)
    return path_gradient_scores(model, batches, alphas, metric, progress, desc="eap-ig")
