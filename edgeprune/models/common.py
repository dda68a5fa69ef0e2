"""Per-head building blocks shared by the architecture files: norms, projections, attention.

Inputs to readers arrive as (R, B, T, D) fp32 mixes, one per reader (R = 1 when every reader sees
the same residual stream, as in the full model). Projections run in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..mixing import deferred_input


@dataclass
class Context:
    """What every layer needs about the current batch."""

    batch: int
    seq: int
    dtype: torch.dtype  # the model's compute dtype
    attention_mask: torch.Tensor | None  # (B, T) 1 = real token, or None (no padding)
    position_ids: torch.Tensor  # (1 or B, T)
    extra: dict  # family-specific: rotary cos/sin, ...

    def sdpa_mask(self, sliding_window: int | None = None) -> torch.Tensor | None:
        """Boolean (B, 1, T, T) attention mask for the current length only, or None for plain causal.

        Padding keys are masked; a query still sees itself so that rows of padding never become
        all-masked (which would give NaN that leaks through 0 * NaN in later layers).
        """
        if self.attention_mask is None and sliding_window is None:
            return None
        key = f"sdpa_mask_{sliding_window}"
        if key not in self.extra:
            dev = self.position_ids.device
            q = torch.arange(self.seq, device=dev)[:, None]
            k = torch.arange(self.seq, device=dev)[None, :]
            allowed = k <= q
            if sliding_window is not None:
                allowed = allowed & (q - k < sliding_window)
            allowed = allowed[None, None]  # (1, 1, T, T)
            if self.attention_mask is not None:
                keys = self.attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
                allowed = (allowed & keys) | (q == k)[None, None]
            self.extra[key] = allowed
        return self.extra[key]


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm of an fp32 mix with the module's weights, in fp32, cast to ``dtype``.

    Reader inputs are (R, B, T, D) views of position-major (B, T, R, D) mixes (``mixing``); the norm
    runs on that dense layout (it is per row of D) and the result is viewed back, so no copy is made.
    """
    w = None if norm.weight is None else norm.weight.float()
    b = None if norm.bias is None else norm.bias.float()
    x = x.float()
    if shared_input(x) and dtype == torch.float32 and torch.is_grad_enabled() and x.requires_grad \
            and w is not None and not norm.weight.requires_grad:
        return _SharedLayerNorm.apply(x, w, b, norm.eps)
    dense, order = _dense(x)
    out = F.layer_norm(dense, norm.normalized_shape, w, b, norm.eps).to(dtype)
    return out if order is None else out.permute(*[order.index(i) for i in range(len(order))])


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """x as a contiguous permuted view with the last dim kept last, and the permutation (None: x itself)."""
    if x.is_contiguous():
        return x, None
    order = sorted(range(x.dim() - 1), key=lambda i: -x.stride(i)) + [x.dim() - 1]
    dense = x.permute(*order)
    return (dense, order) if dense.is_contiguous() else (x.contiguous(), None)


def shared_input(x: torch.Tensor) -> bool:
    """Is x (R, B, T, D) one input seen by R readers, a stride-0 reader axis (``edgeprune.taps``)? The
    norms and projections then run their forward once, as HF does, and only their backward per reader."""
    return x.dim() == 4 and x.shape[0] > 1 and x.stride(0) == 0


class _SharedLayerNorm(torch.autograd.Function):
    """fp32 LayerNorm of one input x (R, B, T, D) with a stride-0 reader axis, frozen weights: the
    forward once (F.layer_norm on x[0], HF's op), the backward per reader,
    dx = r (g - mean(g) - xhat mean(g xhat)), g = dy * w, xhat = (x - mean(x)) r, r = 1/std(x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x1 = x[:1]
        out = F.layer_norm(x1, x.shape[-1:], weight, bias, eps)
        mu = x1.mean(-1, keepdim=True)
        rstd = torch.rsqrt((x1 - mu).pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward((x1 - mu) * rstd, rstd, weight)
        return out.expand_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # dy (R, B, T, D); xhat (1, B, T, D): per reader, in three passes over dy
        xhat, rstd, weight = ctx.saved_tensors
        D = xhat.shape[-1]
        mean_g = (dy @ weight).unsqueeze(-1) / D  # (R, B, T, 1)
        mean_gx = reader_dots(dy, weight * xhat) / D
        dx = scale_grad(dy, weight * rstd)
        dx.sub_(rstd * mean_g)
        return dx.addcmul_(xhat, rstd * mean_gx, value=-1.0), None, None, None


def reader_dots(dy: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(R, B, T, 1): sum_d dy[r, b, t, d] v[0, b, t, d] for dy (R, B, T, D), v (1, B, T, D), as one
    batched product over positions (2.7x faster on CPU than the multiply-and-sum of vecdot)."""
    R, B, T, D = dy.shape
    return torch.bmm(dy.reshape(R, B * T, D).transpose(0, 1), v.reshape(B * T, D, 1)).view(B, T, R).permute(2, 0, 1)[..., None]


def scale_grad(dy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dy * s, in place where dy is a dense buffer of its own (the projections' backward made it)."""
    return dy.mul_(s) if dy.is_contiguous() else dy * s


class _RMSNorm(torch.autograd.Function):
    """fp32 RMSNorm with frozen weight: HF's forward, op for op, and a backward in four passes over
    x instead of autograd's eight (every Q/K/V reader normalises its own input: 15 norms a layer in
    SmolLM2, a tenth of a pruning step). dx = r (g - x r^2 mean(g x)), g = dy * w, r = 1/rms(x)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shared = shared_input(x)  # one input, R readers: normalise it once, the backward per reader
        x1 = x[:1] if shared else x
        rstd = torch.rsqrt(x1.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x1, rstd, weight)
        out = weight * (x1 * rstd)
        return out.expand_as(x) if shared else out

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        if x.shape[0] != dy.shape[0]:  # one input x (1, B, T, D) seen by R readers: per reader, three passes over dy
            dot = reader_dots(dy, weight * x)  # sum_d g x
            dx = scale_grad(dy, weight * rstd)
            return dx.addcmul_(x, rstd.pow(3) * dot / x.shape[-1], value=-1.0), None, None
        g = dy * weight
        dot = torch.linalg.vecdot(g, x, dim=-1).unsqueeze(-1)  # sum_d g x
        return g.mul_(rstd).sub_(x * (rstd.pow(3) * dot / x.shape[-1])), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm (Llama style: normalise in fp32, then scale), cast to ``dtype``."""
    x = x.float()
    if dtype == torch.float32 and x.requires_grad and not weight.requires_grad and torch.is_grad_enabled():
        return _RMSNorm.apply(x, weight, eps)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if dtype == torch.float32:
        return weight * x
    # HF rounds the normalised input to the model dtype before scaling; keep that rounding.
    return (weight.float() * x.to(dtype).float()).to(dtype)


def project(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, n_out: int) -> torch.Tensor:
    """Per-reader projection to heads.

    x: (R, B, T, D) with R = 1 (shared input) or R = n_out (one input per head);
    weight_t: (D, n_out * d_head); bias: (n_out * d_head,) or None.
    Returns (B, n_out, T, d_head).
    """
    R, B, T, D = x.shape
    d_head = weight_t.shape[1] // n_out
    if R == 1:
        y = x[0] @ weight_t if bias is None else torch.addmm(bias, x[0].reshape(B * T, D), weight_t)
        return y.view(B, T, n_out, d_head).transpose(1, 2)
    assert R == n_out, f"expected {n_out} reader inputs, got {R}"
    w = weight_t.view(D, n_out, d_head).transpose(0, 1)  # (n_out, D, d_head)
    if bias is None:
        y = torch.bmm(x.reshape(R, B * T, D), w)  # (R, B*T, d_head)
    else:  # one rounding, as HF's addmm
        y = torch.baddbmm(bias.view(n_out, 1, d_head).expand(n_out, B * T, d_head), x.reshape(R, B * T, D), w)
    return y.view(R, B, T, d_head).permute(1, 0, 2, 3)


def project_group(x: torch.Tensor, projections: list) -> list[torch.Tensor]:
    """The Q, K and V projections of one layer's readers, from one tensor of their (normed) inputs.

    x: (1, B, T, D) (every reader sees the same input) or (sum of n_out, B, T, D), one input per
    reader in ``projections`` order; projections: [(weight_t (D, n_out * d_head), bias or None,
    n_out), ...]. Returns one (B, n_out, T, d_head) per projection, as ``project`` does.

    With one input per reader, x is a view of a position-major (B, T, R, D) tensor (``mixing``). The
    gradient of x is then written straight into that layout (``_GroupProjection``): autograd would
    return it reader-major, and the norm's backward would copy it back (2x slower at 32 x 64).
    """
    if x.shape[0] == 1:
        return [project(x, w, b, n) for w, b, n in projections]
    sizes = tuple(n for _, _, n in projections)
    if x.shape[0] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} reader inputs, got {x.shape[0]}")
    flat = [t for w, b, _ in projections for t in (w, b)]
    return list(_GroupProjection.apply(x, sizes, *flat))


def rms_project_group(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype,
                      projections: list) -> list[torch.Tensor]:
    """Each reader's RMSNorm (Llama style, ``rms_norm``) and then its Q/K/V projection: ``project_group(
    rms_norm(x, weight, eps, dtype), projections)``, with the same arguments and outputs.

    For fp32 per-reader inputs (a layer's Q/K/V mixes) the norm is folded into the projection
    (``_NormProjection``): y = rstd * (x @ (w W)) + b, where rstd = 1 / rms(x) is a scalar per reader
    and position. The norm's elementwise passes over x (R x B x T x D, 15 readers a layer in
    SmolLM2) then vanish from the forward, and its backward runs in d_head space but for one
    multiply-add over x. Otherwise (bf16/fp16, which HF rounds between norm and scale; one input
    for every reader) it is exactly the composition.
    """
    if _shared_foldable(x, dtype, weight):
        return _fold(x, weight, None, eps, False, projections, shared=True)
    if not _foldable(x, dtype, weight):
        return project_group(rms_norm(x, weight, eps, dtype), projections)
    return _fold(x, weight, None, eps, False, projections)


def ln_project_group(x: torch.Tensor, norm: torch.nn.LayerNorm, dtype: torch.dtype,
                     projections: list) -> list[torch.Tensor]:
    """Each reader's LayerNorm and then its Q/K/V projection: ``project_group(layer_norm(x, norm, dtype),
    projections)``. For fp32 per-reader inputs the norm is folded into the projection as in
    ``rms_project_group``: y = rstd ((x @ W') - mean(x) colsum(W')) + (b_norm @ W + b), W' = diag(w) W,
    with mean and rstd from one pass over x. (Centring after the product cancels mean(x) colsum(W')
    in fp32: an error of ~1e-7 |mean| / std relative, far inside the 1e-5 bar for residual streams,
    whose mean over d_model is small against their spread.)"""
    bias = None if norm.bias is None else norm.bias.float()
    if norm.weight is not None and _shared_foldable(x, dtype, norm.weight):
        return _fold(x, norm.weight, bias, norm.eps, True, projections, shared=True)
    if norm.weight is None or not _foldable(x, dtype, norm.weight):
        return project_group(layer_norm(x, norm, dtype), projections)
    return _fold(x, norm.weight.float(), bias, norm.eps, True, projections)


def _foldable(x: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor) -> bool:
    return dtype == torch.float32 and x.shape[0] > 1 and not shared_input(x) and not weight.requires_grad


# the reader taps' norm and projections in one function whose backward folds the norm into the projection
# (``_SharedNormProjection``); False: the norm's own backward, then the projections' (bench/attribution.py --vs)
SHARED_FOLD = True


def _shared_foldable(x: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """One fp32 input seen by every reader (``edgeprune.taps``), whose per-reader gradients are wanted."""
    return SHARED_FOLD and dtype == torch.float32 and shared_input(x) and torch.is_grad_enabled() \
        and x.requires_grad and not weight.requires_grad


def _fold(x, weight, bias, eps, centred, projections, shared: bool = False) -> list[torch.Tensor]:
    """The norm folded into the projections: ``_NormProjection``, or for one input seen by every reader
    (``shared``) ``_SharedNormProjection``."""
    sizes = tuple(n for _, _, n in projections)
    if x.shape[0] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} reader inputs, got {x.shape[0]}")
    flat = [t for w, b, _ in projections for t in (w, b)]
    fn = _SharedNormProjection if shared else _NormProjection
    return list(fn.apply(x.float(), weight.float(), bias, eps, centred, sizes, *flat))


def _folded_weight_t(weight: torch.Tensor, w_t: torch.Tensor, n: int) -> torch.Tensor:
    """W'^T per reader, (n, d_head, D), W' = diag(weight) W for w_t (D, n * d_head): the norm's scale folded in."""
    return (weight[:, None] * w_t).view(weight.shape[0], n, -1).permute(1, 2, 0)


def _bmm_with_column(a: torch.Tensor, w: torch.Tensor, const: torch.Tensor | None, out: torch.Tensor) -> None:
    """out (n, P, D) = a (n, P, d_head) @ w (n, d_head, D), with const (n, P, 1), where given, added to every
    column of a row as one more column of the product."""
    if const is None:
        torch.bmm(a, w, out=out)
    else:
        torch.bmm(torch.cat([a, const], -1), torch.cat([w, w.new_ones(w.shape[0], 1, w.shape[-1])], 1), out=out)


def _mix_width(x: torch.Tensor) -> int:
    """The rows of the gradient buffer of x (R, B, T, D) (``_NormProjection``'s backward: the first R rows
    of an empty reader-major (width, P, D) tensor). Where x is a view of a position-major mix with rows
    of D ``stride`` apart (a part of a larger reader group), as wide as the group, so that the mix's
    backward takes it whole (``mixing._Mix``); else R, dense. Reader-major, every per-reader product of
    the backward writes one dense block, and the mix's dL/ds is one GEMM over it."""
    R, B, T, D = x.shape
    wide = x.stride(2) // D if x.stride(0) == D and x.stride(-1) == 1 and x.stride(2) % D == 0 \
        and x.stride(1) == T * x.stride(2) and x.storage_offset() == 0 else R
    return max(wide, R)


class _NormProjection(torch.autograd.Function):
    """A norm (RMS, or LayerNorm with ``centred``) folded into the per-reader projections:
    y_r = rstd_r (x_r @ W'_r - m_r c_r) + b'_r with W' = diag(w) W, c = colsum(W'), b' = b_norm @ W + b,
    m = mean(x) (0 for RMS), rstd = 1 / std(x) (1 / rms(x)), per row of x. The backward, with
    u = (x - m) @ W' (saved, d_head wide) and dy the output gradient of a row:
        dx = (rstd dy) @ W'^T - rstd^3 (dy . u) / D (x - m) - rstd (dy . c) / D    (last term: LayerNorm)
    so that only the product and one multiply-add touch D-wide rows; the constant part rides on the
    product as one more column. x (R, B, T, D) is typically a view of a position-major mix, saved as it
    is (``mixing.recompute_saved`` rebuilds it), and its gradient is written reader-major, as
    ``_GroupProjection``'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, centred, sizes, *weights_and_biases):
        R, B, T, D = x.shape
        rows = x.reshape(R, B * T, D)  # a view for position-major x
        # one read of x each (pow(2).mean() writes a copy first; var_mean is ~40x slower on CPU)
        ms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_().div_(D)  # (R, P, 1) mean of x^2
        if centred:  # var = E[x^2] - mean^2: see ln_project_group for its rounding
            mean = rows.sum(-1, keepdim=True).div_(D)
            rstd = ms.sub_(mean.square()).clamp_(min=0.0).add_(eps).rsqrt_()
        else:
            mean = None
            rstd = ms.add_(eps).rsqrt_()
        outs, folded, us, start = [], [], [], 0
        for n, w_t, b in zip(sizes, weights_and_biases[0::2], weights_and_biases[1::2]):
            d_head = w_t.shape[1] // n
            w_full = weight[:, None] * w_t  # (D, n * d_head): the norm's scale folded in
            w = w_full.view(D, n, d_head).transpose(0, 1)  # (n, D, d_head)
            u = torch.bmm(rows[start:start + n], w)  # (n, P, d_head)
            r = rstd[start:start + n]
            if centred:
                u.sub_(mean[start:start + n] * w_full.sum(0).view(n, 1, d_head))
                if bias is not None:
                    b = bias @ w_t if b is None else torch.addmv(b, w_t.t(), bias)
            y = u * r if b is None else torch.addcmul(b.view(n, 1, d_head), u, r)
            outs.append(y.view(n, B, T, d_head).permute(1, 0, 2, 3))
            folded.append(w_t)  # the weight itself, not W': nothing weight-sized is kept per layer
            us.append(u)
            start += n
        # a dense mix rebuilds x in its own backward and adds the x-term there (mixing.DeferredInput): x is
        # then not saved at all
        ctx.deferred = deferred_input(x)
        ctx.save_for_backward(*([] if ctx.deferred else [x]), rstd, weight, *([] if mean is None else [mean]),
                              *folded, *us)
        ctx.sizes, ctx.centred, ctx.shape, ctx.width = sizes, centred, x.shape, _mix_width(x)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        saved = list(ctx.saved_tensors)
        x = None if ctx.deferred else saved.pop(0)
        rstd, weight, *rest = saved
        mean = rest.pop(0) if ctx.centred else None
        k = len(ctx.sizes)
        R, B, T, D = ctx.shape
        dense = rstd.new_empty((ctx.width, B * T, D))[:R]  # (R, P, D), reader-major
        coef = rstd.new_zeros((R, B * T, 1))  # -rstd^3 (dy . u) / D: the multiplier of x
        start = 0
        for n, w_t, u, g in zip(ctx.sizes, rest[:k], rest[k:], grads):
            target = dense[start:start + n]  # (n, P, D), dense
            if g is None:
                target.zero_()
                start += n
                continue
            r = rstd[start:start + n]
            dy = g.permute(1, 0, 2, 3).reshape(n, B * T, -1)  # (n, P, d_head)
            c = torch.linalg.vecdot(dy, u).unsqueeze(-1) * r.pow(3) / -D
            coef[start:start + n] = c
            w = _folded_weight_t(weight, w_t, n)
            const = None  # the constant part of each row (LayerNorm): colsum(W') is the docstring's c
            if ctx.centred:
                const = -(c * mean[start:start + n]) - r * (dy @ w.sum(-1, keepdim=True)) / D  # (n, P, 1)
            _bmm_with_column(dy * r, w, const, target)
            start += n
        dx = dense.view(R, B, T, D)
        if x is None:  # the mix adds coef * x, rebuilding x as it goes
            ctx.deferred.give(coef)
        else:
            dx.addcmul_(x, coef.view(R, B, T, 1))
        return (dx, None, None, None, None, None, *[None] * (2 * k))


class _SharedNormProjection(torch.autograd.Function):
    """One input x (R, B, T, D) with a stride-0 reader axis (``edgeprune.taps``): its norm (RMS, or
    LayerNorm with ``centred``) and the readers' projections, the forward once and as HF runs it (the
    norm, then one GEMM per projection: ``_RMSNorm``, ``_SharedLayerNorm``, ``_GroupProjection``), the
    backward per reader with the norm folded into the projection, as ``_NormProjection``'s: with
    u_r = h @ W_r (h the normed input, less its bias b_norm: the projection's output y_r less
    b'_r = b_norm @ W_r + b_r, d_head wide) and W' = diag(w) W,
        dx_r = (rstd dy_r) @ W'_r^T - rstd^2 (dy_r . u_r) / D xc - rstd (dy_r . colsum W'_r) / D
    (xc: x centred for LayerNorm, x for RMS; the last term LayerNorm's only, one more column of the
    product). Only the product and one multiply-add touch D-wide rows, where the norm's own backward
    made three more passes over every reader's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, centred, sizes, *weights_and_biases):
        R, B, T, D = x.shape
        x1 = x[:1]
        if centred:  # as _SharedLayerNorm: HF's op, and x centred and rstd for the backward
            h = F.layer_norm(x1, (D,), weight, bias, eps)
            xc = x1 - x1.mean(-1, keepdim=True)
            rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        else:  # as _RMSNorm
            xc = x1
            rstd = torch.rsqrt(x1.pow(2).mean(-1, keepdim=True) + eps)
            h = weight * (x1 * rstd)
        rows = h[0].reshape(B * T, D)
        outs, us = [], []
        for n, w_t, b in zip(sizes, weights_and_biases[0::2], weights_and_biases[1::2]):
            y = rows @ w_t if b is None else torch.addmm(b, rows, w_t)  # (P, n * d_head), as _GroupProjection
            outs.append(y.view(B, T, n, -1).transpose(1, 2))
            shift = b if bias is None else (bias @ w_t if b is None else torch.addmv(b, w_t.t(), bias))
            us.append(y if shift is None else y - shift)
        ctx.save_for_backward(xc, rstd, weight, *weights_and_biases[0::2], *us)
        ctx.sizes, ctx.centred, ctx.shape = sizes, centred, x.shape
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        xc, rstd, weight, *rest = ctx.saved_tensors
        k = len(ctx.sizes)
        R, B, T, D = ctx.shape
        P = B * T
        r = rstd.view(1, P, 1)
        dense = rstd.new_empty((R, P, D))  # reader-major: every product writes one dense block
        coef = rstd.new_zeros((R, P, 1))  # the multiplier of xc
        start = 0
        for n, w_t, u, g in zip(ctx.sizes, rest[:k], rest[k:], grads):
            target = dense[start:start + n]
            if g is None:
                target.zero_()
                start += n
                continue
            dy = g.permute(1, 0, 2, 3).reshape(n, P, -1)  # (n, P, d_head)
            coef[start:start + n] = torch.linalg.vecdot(dy, u.view(P, n, -1).transpose(0, 1)).unsqueeze(-1) \
                * r.square() / -D
            w = _folded_weight_t(weight, w_t, n)
            const = (dy @ w.sum(-1, keepdim=True)) * r / -D if ctx.centred else None  # LayerNorm's term
            _bmm_with_column(dy * r, w, const, target)
            start += n
        dense.addcmul_(xc.view(1, P, D), coef)
        return (dense.view(R, B, T, D), None, None, None, None, None, *[None] * (2 * k))


class _GroupProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, *weights_and_biases):
        R, B, T, D = x.shape
        rows = x.reshape(R, B * T, D)  # a view for position-major x: rows of D, R * D apart
        weights = weights_and_biases[0::2]
        outs, start = [], 0
        for n, w_t, b in zip(sizes, weights, weights_and_biases[1::2]):
            d_head = w_t.shape[1] // n
            w = w_t.view(D, n, d_head).transpose(0, 1)
            if shared_input(x):  # one input for every reader (edgeprune.taps): one GEMM, as HF
                y = rows[0] @ w_t if b is None else torch.addmm(b, rows[0], w_t)  # (B*T, n * d_head)
                outs.append(y.view(B, T, n, d_head).transpose(1, 2))
                start += n
                continue
            if b is None:
                y = torch.bmm(rows[start:start + n], w)  # (n, B*T, d_head)
            else:  # bias added before the one rounding to the model dtype, as HF's addmm (not bmm, then +)
                y = torch.baddbmm(b.view(n, 1, d_head).expand(n, B * T, d_head), rows[start:start + n], w)
            outs.append(y.view(n, B, T, d_head).permute(1, 0, 2, 3))
            start += n
        ctx.save_for_backward(*weights)
        ctx.sizes, ctx.shape, ctx.shared = sizes, (R, B, T, D), shared_input(x)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        R, B, T, D = ctx.shape
        # reader-major, so that every product writes a dense block (the mix's backward takes any layout)
        dense = next(g for g in grads if g is not None).new_empty((R, B * T, D))
        start = 0
        for n, w_t, g in zip(ctx.sizes, ctx.saved_tensors, grads):
            d_head = w_t.shape[1] // n
            target = dense[start:start + n]  # (n, B*T, D)
            if g is None:
                target.zero_()
            else:
                g_rows = g.permute(1, 0, 2, 3).reshape(n, B * T, d_head)
                torch.bmm(g_rows, w_t.view(D, n, d_head).permute(1, 2, 0), out=target)
            start += n
        return (dense.view(R, B, T, D), None, *[None] * (2 * len(ctx.sizes)))


def head_outputs(attn: torch.Tensor, w_out: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
    """Each head's contribution to the residual stream.

    attn: (B, H, T, d_head) attention-weighted values; w_out: (H * d_head, D) output projection
    (input-major). Returns (H, B, T, D) in attn's dtype (no bias: that is a layer constant). Where the
    forward needs only their sum (``ctx.extra["heads_summed"]``: the plain forward of reader taps,
    ``edgeprune.taps``), returns that sum as one (1, B, T, D) pseudo-head, one GEMM as in HF.
    """
    B, H, T, dh = attn.shape
    if ctx is not None and ctx.extra.get("heads_summed"):
        return (attn.transpose(1, 2).reshape(B * T, H * dh) @ w_out).view(1, B, T, -1)
    w = w_out.reshape(H, dh, -1)
    out = torch.bmm(attn.transpose(0, 1).reshape(H, B * T, dh), w)
    return out.view(H, B, T, w.shape[-1])


def attention(q, k, v, ctx: Context, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal SDPA over (B, H, T, dh) queries and (B, G, T, dh) keys/values (G divides H)."""
    gqa = k.shape[1] != q.shape[1]
    cache = ctx.extra.get("kv_cache")
    if cache is not None:  # incremental decoding: this layer's past K/V reader outputs (edgeprune.kvcache)
        k, v = cache.update(k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=cache.sdpa_mask(ctx, sliding_window), scale=scale,
                                              enable_gqa=gqa)
    mask = ctx.sdpa_mask(sliding_window)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, T, dh) queries or keys, HF's half-split convention; cos/sin (1|B, T, r).

    Partial rotary (GPT-NeoX's ``rotary_pct``, ``partial_rotary_factor``; r < dh) turns only the first
    r dimensions of each head and passes the rest through, as HF's ``apply_rotary_pos_emb`` does.
    Shared by every rotary family (``llama.py``, ``gpt_neox.py``, ``phi3.py``).
    """
    cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]
    part = x if r == x.shape[-1] else x[..., :r]
    half = r // 2
    turned = part * cos + torch.cat((-part[..., half:], part[..., :half]), dim=-1) * sin
    return turned if r == x.shape[-1] else torch.cat((turned, x[..., r:]), dim=-1)


def rms_norm_fp32_scale(x: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm that scales in fp32 and casts once (Gemma's ``(1 + w)`` norms, OLMo-2's), unlike
    Llama's ``rms_norm``, which rounds the normalised input to the model dtype before scaling.

    x: (..., D) any dtype; scale: (D,) fp32, the effective weight (``1 + w.float()`` for Gemma,
    ``w.float()`` for OLMo-2). Returns x's shape in ``dtype``.
    """
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale).to(dtype)


def post_norm_shares(heads: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Each head's share of an RMS post-norm of the heads' sum (Gemma-2/3, OLMo-2 ``post_attention_layernorm``).

    A post-norm acts on the sum of a layer's heads, so heads are not separable writers as in GPT-2.
    The rule: the norm's 1 / rms comes from the sum of these heads (this forward's heads, computed
    from their own masked inputs) and is shared by them, so head h writes

        s_h = o_h * scale / rms(sum_g o_g)

    and the shares add up to the normed output: with every mask 1 the model is HF's. heads: (H, B,
    T, D) per-head output-projection terms o_h in the model dtype; scale: (D,) fp32 effective norm
    weight. Returns (H, B, T, D) in heads' dtype. The norm is computed in fp32, as HF's.
    """
    x = heads.float()
    inv = torch.rsqrt(x.sum(0).pow(2).mean(-1, keepdim=True) + eps)  # (B, T, 1), shared by the heads
    return (x * inv * scale).to(heads.dtype)


def softcap_attention(q, k, v, ctx: Context, scale: float, softcap: float,
                      sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention with tanh soft-capped logits (Gemma-2's ``attn_logit_softcapping``).

    SDPA has no soft-cap, so the scores are formed explicitly, for the current length only (never an
    n_ctx x n_ctx buffer), masked with ``Context.sdpa_mask`` (causal, padding, sliding window):
    scores = softcap * tanh(q k^T * scale / softcap). q: (B, H, T, dh); k, v: (B, G, T, dh) with G
    dividing H (grouped heads are not copied). Scores and softmax run in fp32 (HF's eager path rounds
    the scores to the model dtype first); probabilities are cast to v's dtype, as HF does.
    Returns (B, H, T, dh).
    """
    B, H, T, dh = q.shape
    G = k.shape[1]
    cache = ctx.extra.get("kv_cache")
    if cache is not None:  # incremental decoding (edgeprune.kvcache): keys so far, mask over all of them
        k, v = cache.update(k, v)
        mask = cache.sdpa_mask(ctx, sliding_window)
    else:
        mask = ctx.sdpa_mask(sliding_window)  # (B, 1, T, T) bool or None (plain causal)
    qg = q.unflatten(1, (G, H // G))  # (B, G, H/G, T, dh)
    scores = torch.matmul(qg.float(), k.float()[:, :, None].transpose(-1, -2)) * scale  # (B, G, H/G, T, T)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        mask = mask[:, :, None]  # (B, 1, 1, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v[:, :, None]).flatten(1, 2)  # (B, H, T, dh)
