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
of MB each at 32 x 64) are made fresh by torch at every layer, and on Linux every 4 KiB page of them
faults on first touch. ``use_huge_pages`` asks PyTorch to back its CPU allocations of 2 MiB and more
with transparent huge pages, one fault per 2 MiB. GPT-2 small's 32 x 64 step on 2 cores: 2.9 M page
faults and 5.1 s of system CPU a step on 4 KiB pages, 44 k and 1.9 s on huge pages (HF's own
forward+backward: 1.1 s and 0.65 s), the step 1.0-1.8 s faster (``bench/step.py`` prints both, and
``--no-huge-pages`` measures without). The CLI and the benchmarks turn it on, and ask glibc to keep
the free top of its heap (``keep_freed_heap``): blocks just under 32 MiB live there, and glibc gave
their pages back between layers (``tune_cpu_allocator`` does both).

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
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
MMAP_THRESHOLD = 32 << 20  # blocks from here up are mmapped: glibc's own ceiling for its dynamic threshold
TRIM_THRESHOLD = 128 << 20  # free memory at the heap's top glibc keeps, not gives back (1 GiB: as fast)
KEEP_HEAP = "EDGEPRUNE_KEEP_HEAP"  # "0": leave glibc's own behaviour (``keep_freed_heap``)


def keep_freed_heap() -> bool:
    """Ask glibc to keep the free memory at the top of its heap (up to ``TRIM_THRESHOLD``) instead of
    giving it back to the kernel, with its mmap threshold fixed at ``MMAP_THRESHOLD`` (where its
    dynamic threshold settles anyway). The mix's per-layer tensors just under 32 MiB (GPT-2 small's at
    8 x 32: 37 readers x 256 positions x 768) live in the heap, and glibc trimmed the heap's top as they
    were freed, so the next layer's faulted and zeroed the same pages again: 0.14 s of system CPU in a
    ~1 s step. Kept, GPT-2 small's cached 8x32 step is 1.10-1.14x faster (``bench/step.py`` with and
    without ``--no-keep-heap``); SmolLM2's and GPT-2's 32x64 steps do not change (their tensors are
    mmapped, or reused already). The cost is RSS: with the threshold fixed from the start, blocks
    under 32 MiB live in the heap from the model's loading on, and glibc's fragmentation grows the
    step's peak RSS by 0-1% on GPT-2 small and 4-8% on SmolLM2 at 8x32 (``--malloc-default``); the
    live tensors, which the memory target counts, are the same. Linux with glibc only; nothing is
    changed where the environment sets any of glibc's ``MALLOC_*`` thresholds (``HEAP_ENV``: the
    user's, or ``bench/step.py``'s memory runs) or ``KEEP_HEAP=0``. Returns whether it was applied."""
    if os.environ.get(KEEP_HEAP) == "0" or any(name in os.environ for name in HEAP_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def tune_cpu_allocator() -> None:
    """What the CLI does before it loads a model: ``use_huge_pages`` and ``keep_freed_heap``."""
    use_huge_pages()
    keep_freed_heap()
