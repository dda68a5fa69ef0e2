"""Reference logits and corrupted writer states per example, kept across epochs (``prune.cache_corrupted``:
``auto``, the default, turns it on when the run has more than one epoch, or an attribution that fills
it first, and the cache fits in a quarter of the free memory; ``decide``).

Every pruning step needs, for its batch, the full model's logits at the loss positions and (under
interchange ablation) the writer states of the corrupted inputs: a no-grad pass over twice the
batch, a quarter or more of the step. Both depend on the example alone, not on the masks, so a run
of many epochs (the paper's IOI setting: 300 examples, 3000 steps of 32) can compute them once per
example and reuse them.

Cost: memory of examples x writers x length x d_model in the model's dtype, on the model's device
(GPT-2 small, 300 IOI examples of ~20 tokens: ~2.9 GB in fp32), plus the logits at the loss
positions. Under torchrun each rank caches the examples it has seen.

Values computed in one batch serve the example in any later batch: batches are right-padded and
attention is causal with padded keys masked, so padding never reaches real positions (cached
states are zero at padded positions, which nothing real reads). A cached value equals a fresh pass
up to float rounding of the other batch shape.
"""

from __future__ import annotations

import torch

from . import buffers
from .eval import reference_and_corrupted


CACHE_SHARE = 0.25  # ``auto``: the cache may take this share of the free memory


def cache_nbytes(model, examples) -> int:
    """Bytes the cache takes for ``examples``: per example its corrupted writer states (interchange
    ablation; writers x its length x d_model in the model's dtype) and its reference logits (fp32)."""
    return _nbytes(model, sum(len(ex.input_ids) for ex in examples), sum(len(ex.loss_positions) for ex in examples))


def batches_nbytes(model, batches) -> int:
    """``cache_nbytes`` of the examples of ``batches`` (Batch objects; padding not counted)."""
    return _nbytes(model, sum(int(b.attention_mask.sum()) for b in batches), sum(int(b.loss_mask.sum()) for b in batches))


def _nbytes(model, tokens: int, positions: int) -> int:
    vocab = getattr(model.hf.config, "vocab_size", None) or 0
    states = model.graph.num_writers * tokens * model.hf.config.hidden_size * model.dtype.itemsize
    return (states if model.ablation == "interchange" else 0) + positions * vocab * 4


def fits(nbytes: int, free: int | None) -> bool:
    """Whether a cache of ``nbytes`` fits in ``CACHE_SHARE`` of ``free`` bytes (None: unknown, no)."""
    return free is not None and nbytes <= CACHE_SHARE * free


def decide(setting, epochs: float, nbytes: int, free: int | None, attribution: bool = False) -> tuple[bool, str]:
    """(use the cache?, why) for ``prune.cache_corrupted`` = true / false / auto. ``attribution``: an
    attribution before the steps makes the same pass over every training example (EAP-IG's masks
    variant), one more use of each entry."""
    size = f"{nbytes / 2**30:.2f} GiB"
    if setting is True or setting is False:
        return setting, f"prune.cache_corrupted: {str(setting).lower()} ({size})"
    if epochs <= 1 and not attribution:
        return False, "off (auto: the run sees each example once)"
    if not fits(nbytes, free):
        room = "unknown free memory" if free is None else f"{free / 2**30:.2f} GiB free"
        return False, f"off (auto: {size} would not fit in a quarter of the {room})"
    uses = f"{epochs:.1f} epochs" + (" after the attribution, which fills it" if attribution else "")
    return True, f"on (auto: {size} for {uses}; prune.cache_corrupted: false turns it off)"


class ReferenceCache:
    """``cache(model, batch, select)`` = ``eval.reference_and_corrupted(model, batch, select)``,
    computed once per example (keyed by its clean and corrupted token ids). ``select`` must be the
    batch's loss mask. With ``enabled=False`` it just calls through."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def warm(self, model, batches) -> None:
        """Fill the cache from these batches (a resumed run replays the batches that filled it before
        the kill, so its entries are the very values an uninterrupted run reuses: exact resume)."""
        for batch in batches:
            if any(k not in self.entries for k in self._keys(batch)):
                self(model, batch, batch.loss_mask)

    @staticmethod
    def _keys(batch) -> list[tuple]:
        lengths = batch.attention_mask.sum(1).tolist()
        return [(tuple(ids[:n]), tuple(cor[:n])) for ids, cor, n in
                zip(batch.input_ids.tolist(), batch.corrupted_input_ids.tolist(), lengths)]

    def __call__(self, model, batch, select: torch.Tensor):
        if not self.enabled:
            return reference_and_corrupted(model, batch, select=select)
        lengths = batch.attention_mask.sum(1).tolist()
        keys = self._keys(batch)
        if any(k not in self.entries for k in keys):
            ref, states = reference_and_corrupted(model, batch, select=select)
            start = 0
            for b, (key, count) in enumerate(zip(keys, select.sum(1).tolist())):
                if key not in self.entries:
                    kept = None if states is None else states[:, b, :lengths[b]].clone()
                    self.entries[key] = (ref[start:start + count].clone(), kept)
                start += count
            return ref, states
        cached = [self.entries[k] for k in keys]
        ref = torch.cat([logits for logits, _ in cached])
        if cached[0][1] is None:
            return ref, None
        T = batch.input_ids.shape[1]
        W, _, D = cached[0][1].shape
        states = buffers.take(buffers.SWAP, (W, *batch.input_ids.shape, D), cached[0][1].dtype, model.device)
        if all(kept.shape[1] == T for _, kept in cached):  # no padding: one write of the states, no zero fill
            return ref, torch.stack([kept for _, kept in cached], dim=1, out=states)
        states.zero_()
        for b, (_, kept) in enumerate(cached):
            states[:, b, :kept.shape[1]] = kept
        return ref, states
