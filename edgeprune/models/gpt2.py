"""GPT-2 (``GPT2LMHeadModel``) as an edge-masked model.

Writers: ``tok_embeds``, ``pos_embeds``, heads ``a{l}.h{h}``, MLPs ``m{l}``. Every Q/K/V reader
applies ``ln_1`` to its own mix, the MLP reader ``ln_2``, ``resid_post`` ``ln_f``. The ``c_attn``
biases belong to their Q/K/V reader; the ``c_proj`` bias of attention is a layer constant (always
on, in every later reader's input, never ablated); MLP biases are part of the MLP writer.
"""

from __future__ import annotations

import torch

from ..graph import GraphSpec
from .base import Family
from .common import Context, attention, head_outputs, layer_norm, ln_project_group


class GPT2Family(Family):
    model_types = ("gpt2",)

    def __init__(self, hf_model):
        super().__init__(hf_model)
        cfg = hf_model.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported (decoder-only models only)")
        self.body = hf_model.transformer
        self.n_heads = cfg.n_head
        self.d_model = cfg.n_embd

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec(n_layers=self.hf.config.n_layer, n_heads=self.n_heads, pos_embeds=True)

    def decoder_layers(self):
        return list(self.body.h)

    def embed(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        tok = self.body.wte(input_ids)  # (B, T, D)
        pos = self.body.wpe(ctx.position_ids).expand_as(tok)
        return torch.stack([tok, pos])  # (2, B, T, D)

    def attention(self, layer, x, ctx):
        block = self.body.h[layer]
        attn, D, H = block.attn, self.d_model, self.n_heads
        w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: (D, 3D), input-major
        # every Q/K/V reader applies ln_1 to its own input, then its projection
        q, k, v = ln_project_group(x, block.ln_1, ctx.dtype, [(w[:, :D], b[:D], H), (w[:, D:2 * D], b[D:2 * D], H),
                                                              (w[:, 2 * D:], b[2 * D:], H)])
        out = attention(q, k, v, ctx, attn.scaling)  # (B, H, T, dh)
        return head_outputs(out, attn.c_proj.weight, ctx)  # (H, B, T, D)

    def attn_constant(self, layer):
        return self.body.h[layer].attn.c_proj.bias

    def mlp(self, layer, x, ctx):
        block = self.body.h[layer]
        return block.mlp(layer_norm(x, block.ln_2, ctx.dtype))

    def readout(self, x, ctx):
        return self.hf.lm_head(layer_norm(x, self.body.ln_f, ctx.dtype))
