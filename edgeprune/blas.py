"""Batched products that PyTorch's CPU ``baddbmm_`` runs one by one: MKL's batch GEMM through ctypes.

``torch.baddbmm_`` hands a batch to MKL's batch GEMM only when its output is contiguous; a strided
output -- a slice of writers at every position of a position-major buffer, (P, k, D) out of (P, W, D)
-- falls back to a loop of small ``addmm_`` calls, each threaded on its own (1.5-2x slower than the
batch on SmolLM2's dL/ds, ``bench/mix_products.py``). MKL itself takes any row and batch stride, and
PyTorch's CPU library exports its ``cblas_sgemm_batch``, so ``update`` calls it directly where it is
there (x86 wheels built with MKL) and falls back to ``torch.baddbmm_`` elsewhere: same values up to
the order of the fp32 sums within each product. The call passes MKL's integers so that an LP64 and an
ILP64 build read them alike, and before its first use the symbol must reproduce a small strided batch
as torch computes it (else it is never called).
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import torch

_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS_LAYOUT and CBLAS_TRANSPOSE: C enums, 4-byte ints in every build
# MKL_INT is 4 bytes in MKL's LP64 interface and 8 in ILP64, and a build's cblas_sgemm_batch may be either. Its
# integers go as 8-byte values: little-endian, an LP64 build reads the low half of each, an ILP64 build the whole
_MKL_INT = ctypes.c_int64
_batch = None  # cblas_sgemm_batch, or False where torch has none or it failed the first-use check


def _cblas_sgemm_batch():
    global _batch
    if _batch is None:
        _batch = False
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            fn = lib.cblas_sgemm_batch
            fn.restype = None
        except (OSError, AttributeError):
            return _batch
        if torch.backends.mkl.is_available() and sys.byteorder == "little" and _agrees(fn):
            _batch = fn
    return _batch


def _agrees(fn) -> bool:
    """Whether ``fn`` computes a small strided batch as torch does (else ``update`` never calls it)."""
    gen = torch.Generator().manual_seed(0)
    out, a = torch.randn(3, 5, 4, generator=gen), torch.randn(2, 3, generator=gen)
    b = torch.randn(3, 3, 4, generator=gen)
    expected = out[:, 1:3] + torch.bmm(a.expand(3, 2, 3), b)
    _call(fn, out[:, 1:3], a, b, 1.0, 3, 4, 4)
    return torch.allclose(out[:, 1:3], expected, rtol=1e-5, atol=1e-5)


def available() -> bool:
    """Whether ``update`` runs through MKL's batch GEMM here (else through ``torch.baddbmm_``)."""
    return bool(_cblas_sgemm_batch())


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
    operands = (out, a, b)
    fn = _cblas_sgemm_batch() if P and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in operands) \
        else None  # (other devices, dtypes and empty batches: torch's own checks and loop)
    lda, ldb, ldc = (_row_major(a), _row_major(b[0]), _row_major(out[0])) if fn else (None,) * 3
    if None in (lda, ldb, ldc) or max(P, m, n, k, lda, ldb, ldc) >= 1 << 31 \
            or (P > 1 and out.stride(0) < m * ldc):  # batches that overlap: torch's loop, in order
        out.baddbmm_(a.expand(P, m, k), b, beta=beta)
        return
    _call(fn, out, a, b, beta, lda, ldb, ldc)


def _call(fn, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, lda: int, ldb: int, ldc: int) -> None:
    """cblas_sgemm_batch, one group: out[p] = a @ b[p] + beta out[p], row-major, pointers p by p."""
    P, m, n = out.shape
    size = out.element_size()
    positions = np.arange(P, dtype=np.uint64)
    outs = positions * np.uint64(out.stride(0) * size) + np.uint64(out.data_ptr())
    bs = positions * np.uint64(b.stride(0) * size) + np.uint64(b.data_ptr())
    as_ = np.full(P, a.data_ptr(), dtype=np.uint64)
    one = lambda ctype, v: (ctype * 1)(v)  # noqa: E731
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    fn(ctypes.c_int(_ROW_MAJOR), one(ctypes.c_int, _NO_TRANS), one(ctypes.c_int, _NO_TRANS), one(_MKL_INT, m),
       one(_MKL_INT, n), one(_MKL_INT, a.shape[1]), one(ctypes.c_float, 1.0), as_.ctypes.data_as(ptrs),
       one(_MKL_INT, lda), bs.ctypes.data_as(ptrs), one(_MKL_INT, ldb), one(ctypes.c_float, beta),
       outs.ctypes.data_as(ptrs), one(_MKL_INT, ldc), _MKL_INT(1), one(_MKL_INT, P))
