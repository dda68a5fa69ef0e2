"""What an architecture file provides to the edge-masked forward in ``edgeprune.model``.

A family wraps a loaded HF model (its modules and weights, unchanged) and exposes the per-head
pieces of its forward. Reader inputs arrive as (R, B, T, D) fp32 mixes before the reader's norm;
writer outputs leave in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import GraphSpec
from .common import Context


class Family(nn.Module):
    """Base class of the per-architecture wrappers (``gpt2.py``, ``llama.py``, ``tracr.py``)."""

    model_types: tuple[str, ...] = ()

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    @property
    def spec(self) -> GraphSpec:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> Context:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        return Context(B, T, self.dtype, attention_mask, position_ids, {})

    def decoder_layers(self) -> list[nn.Module]:
        """The HF modules of the decoder layers in order (what FSDP shards one at a time)."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        """(E, B, T, D) embedding writer states."""
        raise NotImplementedError

    def attention(self, layer: int, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Per-head outputs (H, B, T, D) from fp32 reader inputs x: (1, B, T, D) when every Q/K/V
        reader sees the same input (the full model), else (H + 2 G, B, T, D), one per reader in graph
        order (Q heads, K, V; ``split_readers``). The whole of x goes through the norm at once: it is a
        view of the mix's position-major output, and its Q/K/V parts alone are not dense."""
        raise NotImplementedError

    def split_readers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Q, K and V reader inputs of ``attention``'s x (views)."""
        if x.shape[0] == 1:
            return x, x, x
        spec = self.spec
        return tuple(x.split([spec.n_heads, spec.kv_heads, spec.kv_heads]))

    def attn_constant(self, layer: int) -> torch.Tensor | None:
        """(D,) output-projection bias of the layer (not split across heads), or None."""
        return None

    def mlp(self, layer: int, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """MLP writer state (B, T, D) from its (B, T, D) fp32 input (bias folded in)."""
        raise NotImplementedError

    def readout(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Logits (B, T, V) from the (B, T, D) fp32 ``resid_post`` input."""
        raise NotImplementedError
