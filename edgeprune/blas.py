"""Batched products that PyTorch's CPU ``baddbmm_`` runs one by one: MKL's batch GEMM through ctypes.

``torch.baddbmm_`` hands a batch to MKL's batch GEMM only when its output is contiguous; a strided
output -- a slice of writers at every position of a position-major buffer, (P, k, D) out of (P, W, D)
-- falls back to a loop of small ``addmm_`` calls, each threaded on its own (1.5-2x slower than the
batch on SmolLM2's dL/ds, ``bench/mix_products.py``). MKL itself takes any row and batch stride, and
PyTorch's CPU library exports its ``cblas_sgemm_batch``, so ``update`` calls it directly where it is
there (x86 wheels built with MKL) and falls back to ``torch.baddbmm_`` elsewhere: same values up to
the order of the fp32 sums within each product.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_INT = ctypes.c_int  # MKL's LP64 interface (the symbol without the _64 suffix)
_batch = None  # cblas_sgemm_batch, or False where torch has none


def _cblas_sgemm_batch():
    global _batch
    if _batch is None:
        _batch = False
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            _batch = lib.cblas_sgemm_batch
            _batch.restype = None
        except (OSError, AttributeError):
            pass
    return _batch


def available() -> bool:
    """Whether ``update`` runs through MKL's batch GEMM here (else through ``torch.baddbmm_``)."""
    return bool(_cblas_sgemm_batch()) and torch.backends.mkl.is_available()


def _row_major(t: torch.Tensor) -> int | None:
    """The leading dimension of a 2-d row-major matrix (each row contiguous), else None. A one-column
    matrix's rows are contiguous whatever its column stride (the read-out's masks, (W, 1))."""
    rows, cols = t.shape
    if cols == 1:
        return max(t.stride(0), 1) if rows > 1 else 1
    if t.stride(1) != 1:
        return None
    if rows == 1:
        return max(t.stride(0), cols)
    return t.stride(0) if t.stride(0) >= cols else None


def update(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """out[p] = a @ b[p] + beta * out[p] for every p: out (P, m, n), a (m, k) shared by every p, b (P, k, n);
    fp32 on CPU, each matrix's rows contiguous, any row and batch stride (``out`` a strided slice of a
    larger buffer: written in place)."""
    P, m, n = out.shape
    k = a.shape[1]
    if a.shape[0] != m or b.shape != (P, k, n):
        raise ValueError(f"batched update: out {tuple(out.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)} do not fit")
    fn = _cblas_sgemm_batch() if out.device.type == "cpu" else None
    lda, ldb, ldc = _row_major(a), _row_major(b[0]), _row_major(out[0])
    if not fn or P == 0 or None in (lda, ldb, ldc) or any(t.dtype != torch.float32 for t in (out, a, b)) \
            or not torch.backends.mkl.is_available() or max(P, m, n, k, lda, ldb, ldc) >= 1 << 31 \
            or (P > 1 and out.stride(0) < m * ldc):  # batches that overlap: torch's loop, in order
        out.baddbmm_(a.expand(P, m, k), b, beta=beta)
        return
    size = out.element_size()
    positions = np.arange(P, dtype=np.uint64)
    outs = (positions * np.uint64(out.stride(0) * size) + np.uint64(out.data_ptr())).astype(np.uint64)
    bs = (positions * np.uint64(b.stride(0) * size) + np.uint64(b.data_ptr())).astype(np.uint64)
    as_ = np.full(P, a.data_ptr(), dtype=np.uint64)
    one = lambda ctype, v: (ctype * 1)(v)  # noqa: E731
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    fn(_INT(_ROW_MAJOR), one(_INT, _NO_TRANS), one(_INT, _NO_TRANS), one(_INT, m), one(_INT, n), one(_INT, k),
       one(ctypes.c_float, 1.0), as_.ctypes.data_as(ptrs), one(_INT, lda), bs.ctypes.data_as(ptrs), one(_INT, ldb),
       one(ctypes.c_float, beta), outs.ctypes.data_as(ptrs), one(_INT, ldc), _INT(1), one(_INT, P))
