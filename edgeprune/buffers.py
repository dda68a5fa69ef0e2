"""Big CPU buffers kept from one step to the next.

A fresh CPU allocation of a few hundred MB costs the kernel's zeroing of every page on first touch:
~25 ms per 177 MB on a 2-core machine, as much as the arithmetic of a memory-bound pass over it. The
allocator does not keep blocks that large: each step's writer states (177 MB on SmolLM2-135M at
8 x 32), and each attribution batch's writer differences and reader gradients, were zeroed by the
kernel again every time (~5% of a step, measured in one process). ``take`` hands out a view of a
kept buffer instead.

A buffer is kept as bytes, so one name can serve tensors of different dtypes in turn: ``SWAP`` holds
a step's corrupted writer states until the masked forward ends and then its dL/ds buffer (the two
are never alive together), so keeping it adds nothing to the step's peak.

The mix's other large tensors (each layer's product, its rebuild, the readers' gradients: hundreds
of MB each at 32 x 64) are made fresh by torch at every layer; glibc mmaps such blocks and unmaps them
when freed, so on Linux every 4 KiB page of them faults on first touch, at every layer of every step,
unless glibc is told to keep them in its heap (``keep_freed_heap``, below). ``use_huge_pages`` asks
PyTorch to back its CPU allocations of 2 MiB and more with transparent huge pages, one fault per
2 MiB. GPT-2 small's 32 x 64 step on 2 cores: 2.9 M page faults and 5.1 s of system CPU a step on
4 KiB pages, 44 k and 1.9 s on huge pages (HF's own forward+backward: 1.1 s and 0.65 s), the step
1.0-1.8 s faster (``bench/step.py`` prints both, and ``--no-huge-pages`` measures without). The CLI
and the benchmarks turn it on, and ask glibc to carve every block from its heap and keep the heap's
free top (``keep_freed_heap``), so that freed pages are reused rather than faulted again
(``tune_cpu_allocator`` does both).

Safe by construction: a kept buffer is reused only when no tensor outside this module still views
it (its storage's use count), so a buffer that escaped -- states returned to a caller, an autograd
graph still alive -- is never overwritten; a new one is allocated and kept instead. Only CPU buffers
are kept (CUDA's caching allocator already reuses blocks), and none where torch does not expose the
use count. ``clear()`` lets them go (an attribution lets its own go when it ends).
"""

from __future__ import annotations

import ctypes
import math
import os

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)
_kept: dict[tuple, torch.Tensor] = {}

SWAP = "step.swap"  # a step's corrupted writer states, then (once they are let go) its dL/ds buffer


def _free(flat: torch.Tensor) -> bool:
    # the kept tensor and the temporary storage object below hold two references: any more is a view
    return _use_count(flat.untyped_storage()._cdata) <= 2


def take(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised ``shape`` tensor: a view of the buffer kept under ``name`` when it is free and
    large enough, else a new one (kept from now on, on CPU). Its contents are whatever was there."""
    device = torch.device(device)
    if device.type != "cpu" or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape) * dtype.itemsize
    key = (name, device)
    flat = _kept.get(key)
    if flat is None or flat.numel() < n or not _free(flat):
        _kept.pop(key, None)  # (a busy one stays alive through its views; a small one goes now)
        flat = _kept[key] = torch.empty(n, dtype=torch.uint8, device=device)
    return flat[:n].view(dtype).view(shape)


def clear(prefix: str = "") -> None:
    """Let the kept buffers whose names start with ``prefix`` go (all of them by default)."""
    for key in [k for k in _kept if k[0].startswith(prefix)]:
        del _kept[key]


HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch: madvise(MADV_HUGEPAGE) on CPU allocations >= 2 MiB


def use_huge_pages() -> None:
    """Back PyTorch's CPU allocations of 2 MiB and more with transparent huge pages (Linux, where the
    kernel's ``transparent_hugepage/enabled`` is ``madvise`` or ``always``), unless the environment
    already says either way (``THP_MEM_ALLOC_ENABLE=0`` turns it off). Call it before the model is
    loaded: PyTorch reads the switch once. The peak memory is unchanged (``bench/step.py``)."""
    os.environ.setdefault(HUGE_PAGES, "1")


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
HEAP_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold (moot while MMAP_MAX is 0)
MMAP_MAX = 0  # blocks glibc may mmap at once: none, every block comes from the heap and is reused there
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top glibc keeps, not gives back (mallopt's largest)
KEEP_HEAP = "EDGEPRUNE_KEEP_HEAP"  # "0": leave glibc's own behaviour (``keep_freed_heap``)


def keep_freed_heap() -> bool:
    """Ask glibc to carve every block from its heap (``MMAP_MAX`` 0: nothing mmapped) and to keep the
    free memory at the heap's top (up to ``TRIM_THRESHOLD``) instead of giving it back to the kernel:
    a freed tensor's pages are then reused by the next one, never faulted and zeroed again.

    Under glibc's defaults, blocks of 32 MiB and more are mmapped and unmapped one by one, so each of
    the mix's per-layer tensors (hundreds of MB at 32 x 64: a layer's product, its rebuild, the readers'
    gradients) faulted and was zeroed at every layer of every step, huge pages or not: SmolLM2-135M's
    32x64 step spent 3.2 s of system CPU on 52k page faults, HF's own forward+backward 3.6 s. From the
    heap, after the first steps, neither faults: SmolLM2's step 16.4 -> 13.5 s (1.21x), HF's 8.8 -> 6.9 s
    (1.28x); GPT-2 small's 11.0 -> 9.7 s (1.13x), HF's 8.3 -> 6.2 s (1.33x); at 8x32 nothing faulted
    either way (``bench/step.py --shapes 32x64 --cache``, against the former policy, mmap threshold 32 MiB
    and trim 128 MiB, set by ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728``; two
    processes run back to back). Smaller blocks gained already from the kept top alone (GPT-2 small's
    cached 8x32 step 1.10-1.14x faster: ``bench/step.py`` with and without ``--no-keep-heap``).

    The cost is RSS: the heap never shrinks below its high-water mark, and small allocations split
    freed blocks, so it grows a few blocks past the live tensors before the loop reuses its pages
    (the same runs' peak RSS 10.17 GiB against 9.33, ``bench/step.py`` prints it); the live tensors,
    which the memory target counts, are the same. Linux with glibc only; nothing is changed where the
    environment sets any of glibc's ``MALLOC_*`` thresholds (``HEAP_ENV``: the user's, or
    ``bench/step.py``'s memory runs) or ``KEEP_HEAP=0``. Returns whether it was applied. (A thread's
    own arena cannot grow past 64 MiB without mmap: glibc then serves its large blocks from the main
    heap.)"""
    if os.environ.get(KEEP_HEAP) == "0" or any(name in os.environ for name in HEAP_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return (bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            and bool(mallopt(_M_MMAP_MAX, MMAP_MAX)))


def tune_cpu_allocator() -> None:
    """What the CLI does before it loads a model: ``use_huge_pages`` and ``keep_freed_heap``."""
    use_huge_pages()
    keep_freed_heap()
