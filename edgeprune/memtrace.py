"""Peak tensor memory of a piece of code, counted op by op: on real tensors or on the meta device.

``LiveTensors`` is a ``TorchDispatchMode``: every tensor an op creates inside it adds its storage's
bytes to ``live`` until that storage is freed (a ``weakref.finalize`` on the storage object, which
PyTorch keeps alive exactly as long as the storage); ``peak`` is the most that was live at once.
Views and in-place results share an input's storage and add nothing; tensors made before the block
(the weights) are not counted. On the meta device nothing is allocated, so the peak of a pruning
step of a 13B model is traced in a second from its config alone (``edgeprune.estimate``).

Two ops need the data on meta: boolean-mask indexing (how many rows are selected) and
``.item()``. The first is answered with ``selected_rows`` (the caller knows how many positions its
mask selects); code that calls ``.item()`` cannot be traced on meta.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops whose CPU/CUDA kernels copy non-contiguous tensor inputs to contiguous temporaries internally
# (``expect_contiguous``): the copies live only during the op, but they count at a peak.
_CONTIGUOUS_INPUT_OPS = {torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_layer_norm_backward.default}
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
              torch.ops.aten._index_put_impl_.default}


class LiveTensors(TorchDispatchMode):
    """``with LiveTensors() as mem: ...`` then ``mem.peak`` / ``mem.live`` in bytes."""

    def __init__(self, selected_rows: int | None = None):
        super().__init__()
        self.selected_rows = selected_rows  # rows a boolean mask selects, for indexing on meta
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEX_OPS:
            args = (args[0], self._meta_indices(args[0], args[1]), *args[2:])
        out = func(*args, **kwargs)
        copies = 0  # the op's internal contiguous copies of its inputs, live while its outputs are made
        if func in _CONTIGUOUS_INPUT_OPS:
            copies = sum(a.numel() * a.element_size() for a in tree_flatten(args)[0]
                         if isinstance(a, torch.Tensor) and not a.is_contiguous())
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._tracked or key in inputs:  # a view or an in-place result
                continue
            self._tracked.add(key)
            nbytes = storage.nbytes()
            self.live += nbytes
            weakref.finalize(storage, self._freed, key, nbytes)
        self.peak = max(self.peak, self.live + copies)
        return out

    def _meta_indices(self, x: torch.Tensor, indices):
        """On meta, a boolean index of k dims becomes k long indices of ``selected_rows`` entries."""
        if x.device.type != "meta" or not any(i is not None and i.dtype == torch.bool for i in indices):
            return indices
        if self.selected_rows is None:
            raise ValueError("boolean-mask indexing on the meta device needs LiveTensors(selected_rows=...)")
        out = []
        for i in indices:
            if i is not None and i.dtype == torch.bool:
                out += [torch.zeros(self.selected_rows, dtype=torch.long, device="meta")] * i.dim()
            else:
                out.append(i)
        return out
