"""The incremental key/value cache of the edge-masked forward (``EdgeModel.generate``).

In the masked model every K and V reader has its own input (its own mix of the writers), so the
keys and values of a layer are not one projection of one residual stream: a KV head ``g`` of layer
``l`` gets its keys from reader ``a{l}.g{g}.k``. What later positions need is exactly those
projected (and rotated) keys and values, one (B, G, T, dh) tensor per layer whose G rows are the
G K/V readers: that is what is cached, in HF's own ``DynamicCache`` (one full, never cropped,
layer per decoder layer; sliding windows are applied by the attention mask, as in the uncached
forward). Everything else in the forward (the mix, the norms, the MLPs, the read-out) is per
position, so a step over new positions needs only their own writer states (and their ablated
states: the columns of the corrupted prompt at those positions, under interchange ablation).

The attention mask of a step covers every key column so far (past + new), as HF's does: causal on
absolute columns, padding keys masked, a query always sees itself (as ``Context.sdpa_mask``).
"""

from __future__ import annotations

import torch


class EdgeKVCache:
    """Per-K/V-reader keys and values of the positions seen so far, for one batch."""

    def __init__(self):
        from transformers import DynamicCache  # heavy: `import edgeprune` stays transformers-free

        self.cache = DynamicCache()
        self.past = 0  # key columns before the current step
        self._layer = 0
        self._masks: dict = {}

    @property
    def seq_length(self) -> int:
        return self.cache.get_seq_length()

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """attention_mask must cover past + new columns: (B, past + T)."""
        B, T = input_ids.shape
        want = (B, self.seq_length + T)
        if attention_mask is not None and tuple(attention_mask.shape) != want:
            raise ValueError(f"with a KV cache attention_mask covers the past and the new tokens: expected "
                             f"shape {want}, got {tuple(attention_mask.shape)}")

    def next_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Position ids of the new tokens as HF's generate derives them: from the mask's cumulative sum."""
        T = input_ids.shape[1]
        if attention_mask is None:
            return torch.arange(self.seq_length, self.seq_length + T, device=input_ids.device)[None]
        return positions_from_mask(attention_mask)[:, -T:]

    def begin(self, ctx) -> None:
        """Start a step: the families' attention (``models.common``) finds this cache in the context."""
        self.past, self._layer, self._masks = self.seq_length, 0, {}
        ctx.extra["kv_cache"] = self

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's (B, G, T, dh) keys/values of the next layer; all of them so far."""
        out = self.cache.update(k, v, self._layer)
        self._layer += 1
        return out

    def sdpa_mask(self, ctx, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean (B|1, 1, T, past + T) mask of the new queries over every key column."""
        if sliding_window not in self._masks:
            dev = ctx.position_ids.device
            q = torch.arange(self.past, self.past + ctx.seq, device=dev)[:, None]
            k = torch.arange(self.past + ctx.seq, device=dev)[None, :]
            allowed = k <= q
            if sliding_window is not None:
                allowed = allowed & (q - k < sliding_window)
            allowed = allowed[None, None]
            if ctx.attention_mask is not None:
                keys = ctx.attention_mask.bool()[:, None, None, :]
                allowed = (allowed & keys) | (q == k)[None, None]
            self._masks[sliding_window] = allowed
        return self._masks[sliding_window]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of a left-padded batch, as HF's generate: cumsum - 1, padding at 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)
