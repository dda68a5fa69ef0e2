"""Reader taps: the gradient at every reader's own input in a plain (unmasked) forward.

In the plain residual stream every Q/K/V reader of a layer reads the same residual x (B, T, D), so
autograd would only give their sum. A tap hands the layer's R readers R *views* of x, an
expanded (R, B, T, D) tensor with stride 0 along R: no copy, and the family's per-reader code path
(the one the masked model runs: each reader's own norm and projection) then returns one gradient
per reader in the backward, ``dm/dx_r``. The tap adds them to an fp32 buffer and passes their sum
on to x, so the rest of the backward is the plain model's. Summed over several backward passes
(the alphas of EAP-IG), the buffer holds ``sum_alpha dm/dx_r (alpha)`` for one contraction with the
writer states at the end (``baselines/ig_inputs.py``).

The norms and projections recognise a stride-0 reader axis (``models.common``): the norm's forward
and the projections' forward run once on x, as in HF, and only their backward is per reader.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class ReaderTaps:
    """fp32 ``grad`` (readers, B, T, D): the reader-input gradients of every backward so far.

    ``tap(x, rows)``: x (B, T, D) fp32 -> (R, B, T, D) stride-0 view for the readers ``rows`` (a
    slice of the graph's reader order); gradients that reach it are added to ``grad[rows]``.
    """

    def __init__(self, n_readers: int, shape: tuple[int, int, int], device: torch.device,
                 grad: torch.Tensor | None = None):
        """``grad``: an fp32 (n_readers, *shape) buffer to use (its contents are ignored), else a new one."""
        if grad is None:
            grad = torch.empty((n_readers, *shape), dtype=torch.float32, device=device)
        elif tuple(grad.shape) != (n_readers, *shape) or grad.dtype != torch.float32:
            raise ValueError(f"ReaderTaps: buffer of shape {tuple(grad.shape)} ({grad.dtype}), "
                             f"needs {(n_readers, *shape)} float32")
        self.grad = grad
        self._written = torch.zeros(n_readers, dtype=torch.bool)  # rows holding a gradient (else garbage)

    def add(self, rows: slice, grad: torch.Tensor) -> None:
        """grad[rows] += grad (R, B, T, D); the first gradient of a row is copied (no zero-filled buffer)."""
        if self._written[rows].all():
            self.grad[rows].add_(grad)
        else:
            self.grad[rows].copy_(grad)
            self._written[rows] = True

    def reset(self) -> None:
        """Forget the gradients so far: the next backward's replace them (an IG step whose contraction is
        its own, ``baselines/ig_masks.py``)."""
        self._written[:] = False

    def finish(self) -> torch.Tensor:
        """The buffer, rows that no gradient reached set to zero."""
        if not self._written.all():
            self.grad[~self._written] = 0.0
            self._written[:] = True
        return self.grad

    def tap(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        if tuple(x.shape) != tuple(self.grad.shape[1:]):
            raise ValueError(f"tap: reader input of shape {tuple(x.shape)}, the taps hold {tuple(self.grad.shape[1:])}")
        return _Tap.apply(x, self, rows)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, taps, rows):
        ctx.taps, ctx.rows = taps, rows
        return x[None].expand(rows.stop - rows.start, *x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ctx.taps.add(ctx.rows, grad)
        return grad.sum(0) if grad.shape[0] > 1 else grad[0], None, None
