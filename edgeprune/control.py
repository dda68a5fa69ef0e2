"""Sparsity control by solving each step's Lagrange multiplier (``prune.sparsity_control: project``).

The paper's Lagrangian ``lambda1 (s - t) + lambda2 (s - t)^2`` learns its lambdas by gradient
ascent. Under Adam a lambda moves by about its learning rate per step whatever the gap, so it
winds up while the masks lag the ramp, overshoots, and unwinds slowly: measured on stories260K
(100 steps, warm-up 65, target 0.98) the expected sparsity ends the warm-up at 0.67 and the run at
0.83 (docs/cli.md, "Reaching the target").

Here the multiplier is solved for instead. The gradient on each log_alpha is the fit's gradient
plus ``mu * ds/dlog_alpha`` (the sparsity term's gradient, mu the price of sparsity, the same role
as ``lambda1 + 2 lambda2 (s - t)``); the masks' own optimiser update (AdamW, with its moments,
bias correction and weight decay) is evaluated for a candidate mu, and a bisection on mu finds the
one whose update lands the expected sparsity on the next step's target. The masks then move as
under the Lagrangian (edges the loss needs resist the price, the others leave first), but the
sparsity follows the ramp to within the reach of one step of the optimiser (each log_alpha moves
at most about ``lr_masks`` per step): ``learn_rate * warmup_steps`` must cover the way from the
initial log_alpha down to the pruned side (about 12), which the defaults do (docs/cli.md).
Cost: ~40 evaluations of an elementwise update over the masks per step (negligible next to a
forward on any model; ~0.1 s on one CPU core for 4M edges).
"""

from __future__ import annotations

import math

import torch

from .masks import BETA, LEFT, RIGHT

_SHIFT = BETA * math.log(-LEFT / RIGHT)  # prob_nonzero(a) = sigmoid(a - _SHIFT)


def adamw_preview(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """The value ``param`` would take after one AdamW step with ``grad`` (torch.optim.AdamW's update,
    not its state: nothing is modified). Shapes as ``param``."""
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    t = float(state["step"]) + 1 if state else 1.0
    m = state["exp_avg"] * b1 + grad * (1 - b1) if state else grad * (1 - b1)
    v = state["exp_avg_sq"] * b2 + grad * grad * (1 - b2) if state else grad * grad * (1 - b2)
    denom = (v / (1 - b2 ** t)).sqrt() + eps
    return param * (1 - lr * wd) - (lr / (1 - b1 ** t)) * m / denom


def solve_price(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, target: float,
                cap_quantile: float | None = None, tolerance: float = 0.0005, iters: int = 40) -> float:
    """The price mu such that one AdamW step with ``grad + mu * ds/dparam`` gives expected sparsity
    ``target``; ``ds/dparam = -sigmoid'(param - shift) / n``. param, grad (n,) fp32. Returns mu
    (as a Lagrangian's lambda: the price per unit of sparsity); when the target is out of one step's
    reach, the bound that gets closest."""
    with torch.no_grad():
        n = param.numel()
        p = torch.sigmoid(param.float() - _SHIFT)
        ds = -(p * (1 - p)) / n  # (n,) d expected sparsity / d log_alpha
        scale = float(grad.abs().max()) / max(float(ds.abs().max()), 1e-30) + 1.0 / max(float(ds.abs().max()), 1e-30)

        def sparsity(mu: float) -> float:
            new = adamw_preview(param, grad + mu * ds, state, group)
            return 1.0 - float(torch.sigmoid(new - _SHIFT).sum()) / n

        # s(mu) falls as mu rises (a positive price pushes masks up, as lambda1 > 0 would)
        lo, hi = -1e3 * scale, 1e3 * scale
        if cap_quantile is not None:
            # the price never outweighs the fit's gradient on more than this fraction of the masks: the
            # edges the loss needs most keep their direction, so masks polarise instead of all sliding
            # into the stochastic middle together
            has = grad != 0
            if bool(has.any()):
                ratio = (grad[has].abs() / ds[has].abs()).float()
                k = max(1, min(ratio.numel(), int(math.ceil(cap_quantile * ratio.numel()))))
                cap = float(ratio.kthvalue(k).values)
                # ... unless the capped price cannot keep the step within ``tolerance`` of the target:
                # then reaching the target wins (late in the warm-up, on the few masks still alive)
                if sparsity(-cap) >= target - tolerance:
                    lo = max(lo, -cap)
                if sparsity(cap) <= target + tolerance:
                    hi = min(hi, cap)
        for _ in range(iters):  # bisection on a symmetric log scale: the price spans many decades
            mid = _mid(lo, hi)
            if sparsity(mid) > target:
                lo = mid
            else:
                hi = mid
        return _mid(lo, hi)


def _mid(lo: float, hi: float) -> float:
    """Midpoint in asinh space, so that a bisection resolves small and large prices alike."""
    return math.sinh((math.asinh(lo) + math.asinh(hi)) / 2)


def sparsity_grad(param: torch.Tensor) -> torch.Tensor:
    """(n,) d expected sparsity / d log_alpha."""
    p = torch.sigmoid(param.detach().float() - _SHIFT)
    return -(p * (1 - p)) / param.numel()
