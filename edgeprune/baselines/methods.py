"""``attribute``: one entry point for the baseline scoring methods, returning a ``Scores``."""

from __future__ import annotations

import time

from ..model import EdgeModel
from .acdc import DEFAULT_TAU, acdc
from .attribution import check_metric, default_variant, eap_ig_scores, eap_scores
from .scores import METHODS, Scores

# EAP's gradient of KL at the full model is zero, so attribution uses the logit difference; ACDC
# measures KL to the full model, as the ACDC paper does.
DEFAULT_METRIC = {"eap": "logit_diff", "eap-ig": "logit_diff", "acdc": "kl"}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return method


def attribute(model: EdgeModel, batches, method: str, *, metric: str | None = None, ig_steps: int = 5,
              ig_rule: str = "midpoint", ig_variant: str | None = None, tau: float = DEFAULT_TAU,
              progress: bool = False, settings: dict | None = None, config: dict | None = None,
              reference=None) -> Scores:
    """Per-edge scores of ``method`` on ``batches`` (Batch objects), with its settings and wall time.

    ``ig_variant``: EAP-IG's path, ``inputs`` (interpolated inputs) or ``masks`` (every edge mask
    together); each one plain forward and backward per step (``ig_inputs``, ``ig_masks``), the masks
    with a contraction per step; ``attribution``'s docstring has the difference. None: ``inputs`` under
    interchange ablation (1.1x a plain forward+backward per step on SmolLM2's shape, against 1.3x for
    the masks: bench/attribution.py, docs/scale.md), ``masks`` under zero or mean ablation. EAP always
    runs the plain forward and backward (both variants compute the same EAP scores).

    ``settings`` (e.g. split, batch size) and ``config`` (the resolved experiment config) are
    stored with the scores. ``reference``: serves the per-batch no-grad pass of EAP-IG's masks variant
    (a pruning run's ``cache.ReferenceCache``, which the pass then fills); the other methods run their own.
    """

    check_method(method)
    metric = check_metric(metric or DEFAULT_METRIC[method])
    batches = list(batches)
    info = {"metric": metric, "n_batches": len(batches),
            "n_examples": sum(b.input_ids.shape[0] for b in batches),
            "n_positions": sum(int(b.loss_mask.sum()) for b in batches), "ablation": model.ablation}
    kept = None
    start = time.perf_counter()
    if method == "eap":
        values = eap_scores(model, batches, metric=metric, progress=progress)
    elif method == "eap-ig":
        ig_variant = default_variant(model, ig_variant)
        values = eap_ig_scores(model, batches, steps=ig_steps, rule=ig_rule, metric=metric, progress=progress,
                               variant=ig_variant, reference=reference)
        info.update(ig_steps=ig_steps, ig_rule=ig_rule, ig_variant=ig_variant)
    else:
        result = acdc(model, batches, tau=tau, metric=metric, progress=progress)
        values, kept = result.effects, result.kept
        info.update(tau=tau, edges_kept=int(kept.sum()), edges_kept_before_dangling=int(result.decisions.sum()),
                    edges_tested=int(result.tested.sum()), forwards=result.forwards, metric_full=result.metric_full, metric_final=result.metric_final)
    wall = time.perf_counter() - start
    return Scores(method=method, values=values.float().cpu(), edges=model.edge_names,
                  graph=model.graph_fingerprint(), model_id=model.model_id, settings={**info, **(settings or {})},
                  kept=kept, wall_time_s=wall, config=config)
