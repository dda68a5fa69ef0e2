"""Hard-concrete (L0) masks, Louizos et al. 2018: a stretched, clamped binary-concrete variable.

With u ~ U(0, 1):  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clamp(s (r - l) + l, 0, 1).
Deterministically (eval): z = clamp(sigmoid(log_alpha) (r - l) + l, 0, 1).
P(z != 0) = sigmoid(log_alpha - beta log(-l / r)) is the expected L0 norm (differentiable).

The initial log_alpha (10) makes every deterministic mask exactly 1.0 (not 0.99999, as plain
sigmoids would), so a freshly wrapped model *is* the full model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LEFT, RIGHT, BETA = -0.1, 1.1, 2.0 / 3.0
INIT_LOG_ALPHA = 10.0
# log_alpha above this gives a deterministic mask of exactly 1: sigmoid(a) (r - l) + l >= 1.
FULL_LOG_ALPHA = math.log((1 - LEFT) / (RIGHT - 1))
# log_alpha of a mask fixed at exactly 0 (``prune.candidates``): sampled and deterministic values are
# 0.0 for every u in [1e-6, 1 - 1e-6], and P(z != 0) ~ 1e-13 adds nothing to the expected L0.
OFF_LOG_ALPHA = -30.0


def stretched(log_alpha: torch.Tensor, noise: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The mask values before the clamp to [0, 1]: s (r - l) + l, with s sampled (``noise``) or sigmoid(log_alpha)."""
    if not noise:
        return torch.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=torch.float32)
    u = u.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return s * (RIGHT - LEFT) + LEFT


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """Eval-time mask values in [0, 1], same shape as ``log_alpha``."""
    return stretched(log_alpha, noise=False).clamp(0.0, 1.0)


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time stochastic mask values in [0, 1] (reparameterised, differentiable)."""
    return stretched(log_alpha, noise=True, generator=generator).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) per mask: the expected L0 contribution of each mask."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


class HardConcreteMasks(nn.Module):
    """A vector of hard-concrete masks, always fp32, with an optional fixed override.

    The override (``set_values``) replaces the learned masks by given values, e.g. a binary
    circuit or a tensor that requires grad for attribution (EAP). ``reset`` clears it and
    re-initialises log_alpha so every mask is 1 again.
    """

    def __init__(self, n: int, init: float = INIT_LOG_ALPHA):
        super().__init__()
        self.init = init
        self.log_alpha = nn.Parameter(torch.full((n,), init, dtype=torch.float32))
        self.override: torch.Tensor | None = None
        self.generator: torch.Generator | None = None

    @property
    def n(self) -> int:
        return self.log_alpha.numel()

    def forward(self) -> torch.Tensor:
        """(n,) fp32 mask values: sampled in training mode, deterministic in eval mode."""
        return self.values_and_support()[0]

    def values_and_support(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward()``'s values and, where they come from log_alpha, (n,) bool: the masks a gradient
        reaches log_alpha through. A mask clamped at 0 or 1 passes none (the clamp's gradient is 0 outside
        [0, 1], as torch's), so the model need not compute dL/dz for it (``mixing``). None: all."""
        if self.override is not None:
            return self.override, None
        x = stretched(self.log_alpha, self.training, self.generator)
        return x.clamp(0.0, 1.0), ((x >= 0.0) & (x <= 1.0)).detach()

    def set_values(self, values: torch.Tensor) -> None:
        if values.shape != (self.n,):
            raise ValueError(f"mask values must have shape ({self.n},), got {tuple(values.shape)}")
        self.override = values.to(device=self.log_alpha.device, dtype=torch.float32)

    def reset(self) -> None:
        self.override = None
        with torch.no_grad():
            self.log_alpha.fill_(self.init)

    def expected_l0(self) -> torch.Tensor:
        """Scalar: expected number of non-zero masks (differentiable in log_alpha)."""
        return prob_nonzero(self.log_alpha).sum()

    def expected_sparsity(self) -> torch.Tensor:
        """Scalar: expected fraction of masks that are zero."""
        return 1.0 - self.expected_l0() / self.n
