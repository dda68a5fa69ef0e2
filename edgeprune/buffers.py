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
``--no-huge-pages`` measures without). The CLI and the benchmarks turn it on.

Safe by construction: a kept buffer is reused only when no tensor outside this module still views
it (its storage's use count), so a buffer that escaped -- states returned to a caller, an autograd
graph still alive -- is never overwritten; a new one is allocated and kept instead. Only CPU buffers
are kept (CUDA's caching allocator already reuses blocks), and none where torch does not expose the
use count. ``clear()`` lets them go (an attribution lets its own go when it ends).
"""

from __future__ import annotations

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
