"""How ``EdgeModel`` runs its per-layer pieces: directly, with activation checkpointing, under FSDP.

The edge-masked forward (``EdgeModel._run``) calls every decoder layer through ``LayerRunner.layer``
and the whole pass through ``LayerRunner.root``. By default both just call the function. With
``checkpoint=True`` each layer runs under ``torch.utils.checkpoint`` (non-reentrant): its saved
activations (projections, attention, MLP internals, the reader norms' inputs) are dropped after the
forward and recomputed in the backward, which gives gradients identical to the un-checkpointed run
(the recomputation repeats the same operations on the same inputs). The writer states themselves
live outside the layers (``mixing.WriterStates``) and are kept either way.

``edgeprune.distributed.shard_model`` points ``root``/``layers`` at FSDP2 modules: the call then
goes through ``fully_shard``'s hooks, which all-gather that layer's sharded weights before it runs
(and again before its backward) and free them after.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


class LayerRunner:
    """Calls per-layer functions; ``checkpoint`` turns on activation checkpointing per decoder layer."""

    def __init__(self, checkpoint: bool = False):
        self.checkpoint = checkpoint
        # set by edgeprune.distributed.shard_model: callables (fn, *args) -> fn(*args) through FSDP hooks
        self.root_call: Callable | None = None
        self.layer_calls: list[Callable] | None = None

    def root(self, fn: Callable, *args):
        return fn(*args) if self.root_call is None else self.root_call(fn, *args)

    def layer(self, index: int, fn: Callable, *args):
        if self.checkpoint and torch.is_grad_enabled():
            args = (fn, *args)
            fn = _checkpointed
        return fn(*args) if self.layer_calls is None else self.layer_calls[index](fn, *args)


def _checkpointed(fn: Callable, *args):
    # no RNG runs in the frozen model (dropout is off), so its state need not be stashed
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
