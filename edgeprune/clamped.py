"""The mix's backward where most masks are clamped: dL/dz and dL/ds in one pass over the writers (CPU, numba).

A sampled hard-concrete mask is mostly clamped, at 1 (log-alpha well above 0: four in five at a cold
start's log-alpha 3) or at 0 (a pruned circuit). A clamped mask passes no gradient to its log-alpha,
so dL/dz is needed only at the unclamped entries; and a writer's gradient from a mix,

    dL/ds_w = sum_r z_rw g_r  =  S - sum_r (1 - z_rw) g_r,        S = sum_r g_r,

is a sum over the readers whose mask is not 0, or S less a sum over those whose mask is not 1,
whichever is shorter (g_r: reader r's input gradient at one position). The dense products
(``mixing.WriterStates._grad_z`` and ``_add_grad``) compute every entry of both, at MKL's rate for
products of 16-32 reader rows; this pass visits each writer's row once per position and does only
the entries that count: ~6 of a pair's 32 readers per writer at a cold start. A writer with no
entry and no S term is not touched at all.

Numerics: dL/ds is the same sum in another order (``S - ...``), within fp32 rounding of the dense
update; dL/dz is summed in fp32 over chunks of ``CHUNK`` positions of one example, the chunks in
fp64, so the result does not depend on how a batch is split over processes (as ``_grad_z``'s per
example sums). Used by ``mixing`` when numba is importable (``available``); elsewhere the dense path
runs. Bench: ``bench/step.py --vs mixing.CLAMPED=0``.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 16  # positions a dL/dz partial sums in fp32 (within one example)
numba = None  # imported at first use (``available``): ~60 MB of RSS, which commands that never mix do not pay
_numba_checked = False
_kernel = None


def available() -> bool:
    """Whether the pass can run here: numba importable (imported on the first call)."""
    global numba, _numba_checked
    if not _numba_checked:
        _numba_checked = True
        try:
            import numba as _numba  # heavy: ~60 MB, only where a mix runs
            numba = _numba
        except ImportError:  # pragma: no cover - exercised where numba is absent
            numba = None
    return numba is not None


def warm() -> bool:
    """Load both kernels now (numba's JIT: ~75 MB of RSS once per process, and the compile itself the first
    time on a machine, ~3 s, cached after). ``bench/step.py``'s memory runs call it before they take the
    step's peak, as the model's weights are loaded before it: a one-time runtime cost, not the step's.
    -> whether the kernels are there (numba importable)."""
    if not available():
        return False
    z = torch.ones(2, 3)
    z[0, 1] = 0.5
    diffs, go = torch.zeros(2, 3, 4), torch.zeros(2, 2, 4)
    mix(diffs, 0, MixEntries(z), None)
    backward(diffs, torch.zeros(2, 3, 4), 0, go, Entries(z, (z > 0) & (z < 1)), 1, 2)
    return True


def _compile():
    @numba.njit(parallel=True, fastmath=True, boundscheck=False, cache=True)
    def kernel(diffs, grad, start, go, total, wptr, rows, coef, dz_index, one, T, out):  # pragma: no cover
        n_chunks = out.shape[0]
        per_example = (T + CHUNK - 1) // CHUNK
        k = wptr.shape[0] - 1
        D = diffs.shape[2]
        for task in numba.prange(n_chunks):
            b, c = task // per_example, task % per_example
            acc = out[task]
            acc[:] = 0.0
            for p in range(b * T + c * CHUNK, min((b + 1) * T, b * T + (c + 1) * CHUNK)):
                dp, gp, sp = diffs[p], grad[p], total[p]
                for w in range(k):
                    e0, e1 = wptr[w], wptr[w + 1]
                    if e0 == e1 and one[w] == 0:
                        continue
                    d, gw = dp[start + w], gp[start + w]
                    for e in range(e0, e1):
                        gr = go[rows[e], p]
                        i = dz_index[e]
                        if i >= 0:
                            s = np.float32(0.0)
                            for j in range(D):
                                s += gr[j] * d[j]
                            acc[i] += s
                        a = coef[e]
                        if a != 0.0:
                            for j in range(D):
                                gw[j] += a * gr[j]
                    if one[w] != 0:
                        for j in range(D):
                            gw[j] += sp[j]
    return kernel


def _compile_mix():
    @numba.njit(parallel=True, fastmath=True, boundscheck=False, cache=True)
    def kernel(diffs, start, base, base_step, one_writers, rptr, cols, coef, out):  # pragma: no cover
        P, R, D = out.shape
        for p in numba.prange(P):
            dp = diffs[p]
            shared = base[p * base_step].copy()  # the base and every writer the readers take whole
            for i in range(one_writers.shape[0]):
                d = dp[start + one_writers[i]]
                for j in range(D):
                    shared[j] += d[j]
            for r in range(R):
                o = out[p, r]
                for j in range(D):
                    o[j] = shared[j]
                for e in range(rptr[r], rptr[r + 1]):
                    a = coef[e]
                    d = dp[start + cols[e]]
                    for j in range(D):
                        o[j] += a * d[j]
    return kernel


_mix_kernel = None


class MixEntries:
    """The entries of a mix's masks z (R, k) its forward visits, reader by reader: a writer whose masks are
    mostly 1 is added whole once for every reader (``one_writers``) and each reader takes z - 1 of it where its
    mask is not 1; any other writer, z where the mask is not 0."""

    def __init__(self, z: torch.Tensor):
        z = z.detach()
        R, k = z.shape
        one = (z != 1).sum(0) < (z != 0).sum(0)
        coef = torch.where(one, z - 1, z)
        r, w = (coef != 0).nonzero(as_tuple=True)  # reader by reader, writers in order
        self.count = int(r.numel())
        self.one_writers = one.nonzero()[:, 0].contiguous()
        self.rptr = torch.zeros(R + 1, dtype=torch.int64)
        self.rptr[1:] = torch.bincount(r, minlength=R).cumsum(0)
        self.cols = w.contiguous()
        self.coef = coef[r, w].contiguous()
        self.shape = (R, k)

    def density(self) -> float:
        """The share of z's entries the mix visits (the writers taken whole count once per position)."""
        return (self.count + int(self.one_writers.numel())) / max(1, self.shape[0] * self.shape[1])


def mix(diffs: torch.Tensor, start: int, entries: MixEntries, base: torch.Tensor | None) -> torch.Tensor:
    """base + z @ d[p] at every position p over writers start..start + k - 1, (P, R, D) fp32: each reader's row
    is the base plus the writers taken whole (one sum a position, shared), plus its own entries. diffs: (P, W, D)
    fp32 position-major, contiguous; base: (P, D)-like ((B, T, D)), (D,) / (1, 1, D), or None."""
    global _mix_kernel
    if _mix_kernel is None:
        _mix_kernel = _compile_mix()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    P, _, D = diffs.shape
    if base is None:
        base2, step = diffs.new_zeros((1, D)), 0
    elif base.numel() == D:
        base2, step = base.reshape(1, D).contiguous(), 0
    else:
        base2, step = base.reshape(P, D).contiguous(), 1
    out = torch.empty((P, entries.shape[0], D), dtype=torch.float32)
    _mix_kernel(diffs.numpy(), start, base2.numpy(), step, entries.one_writers.numpy(), entries.rptr.numpy(),
                entries.cols.numpy(), entries.coef.numpy(), out.numpy())
    return out


class Entries:
    """The entries of one mix's masks z (R, k) the pass visits, writer by writer: for each writer the
    readers whose term in dL/ds is not folded into S (coef: z, or z - 1 where the writer takes S) and
    those whose dL/dz is needed (``support``)."""

    def __init__(self, z: torch.Tensor, support: torch.Tensor):
        z = z.detach()
        R, k = z.shape
        unclamped = support
        self.one = (z != 1).sum(0) < (z != 0).sum(0)  # (k,) writers that take S less their non-1 terms
        coef = torch.where(self.one, z - 1, z)
        visit = (coef != 0) | unclamped  # (R, k)
        w, r = visit.T.nonzero(as_tuple=True)  # writer by writer, readers in order
        self.count = int(w.numel())
        self.wptr = torch.zeros(k + 1, dtype=torch.int64)
        self.wptr[1:] = torch.bincount(w, minlength=k).cumsum(0)
        self.rows = r.contiguous()
        self.coef = coef[r, w].contiguous()
        needed = unclamped[r, w]
        self.dz_index = torch.where(needed, needed.long().cumsum(0) - 1, -1).contiguous()
        self.dz_rows, self.dz_cols = r[needed], w[needed]  # where each dL/dz lands in (R, k)
        self.shape = (R, k)

    def density(self) -> float:
        """The share of z's entries the pass visits."""
        return self.count / max(1, self.shape[0] * self.shape[1])


def backward(diffs: torch.Tensor, grad: torch.Tensor, start: int, go: torch.Tensor, entries: Entries,
             B: int, T: int) -> torch.Tensor:
    """grad[:, start:start + k] += z^T g at every position, and dL/dz at the needed entries summed over the
    batch, (R, k) fp64 (0 elsewhere). diffs, grad: (P, W, D) fp32 position-major, contiguous; go: (R, P, D)
    fp32 reader-major, contiguous."""
    global _kernel
    if _kernel is None:
        _kernel = _compile()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    total = go.sum(0) if bool(entries.one.any()) else go.new_zeros(go.shape[1:])  # S at every position
    n_dz = int(entries.dz_rows.numel())
    out = np.zeros((B * ((T + CHUNK - 1) // CHUNK), max(1, n_dz)), np.float32)
    _kernel(diffs.numpy(), grad.numpy(), start, go.numpy(), total.numpy(), entries.wptr.numpy(),
            entries.rows.numpy(), entries.coef.numpy(), entries.dz_index.numpy(), entries.one.numpy().astype(np.int64),
            T, out)
    grad_z = torch.zeros(entries.shape, dtype=torch.float64)
    if n_dz:
        grad_z[entries.dz_rows, entries.dz_cols] = torch.from_numpy(out[:, :n_dz]).double().sum(0)
    return grad_z
