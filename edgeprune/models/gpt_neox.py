"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) as an edge-masked model.

Writers: ``tok_embeds`` (rotary: no position writer), heads ``a{l}.h{h}``, MLPs ``m{l}``. Every
Q/K/V reader applies ``input_layernorm`` to its own mix, the MLP reader ``post_attention_layernorm``,
``resid_post`` ``final_layer_norm``. ``query_key_value`` biases belong to their Q/K/V reader; the
``dense`` (attention output) bias is a layer constant; MLP biases are part of the MLP writer.

``query_key_value`` is fused per head: its output rows are [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], each
block ``head_size`` long (HF views the output as (B, T, H, 3 * dh) and chunks the last dim). The Q,
K and V weights are strided slices of it; ``project_group`` needs each as one (D, H * dh) matrix,
so they are gathered per call (3 D^2 values per layer, transient; the HF weight stays as it is).

Rotary is partial (``rotary_pct``, stored by HF as ``partial_rotary_factor``; Pythia: 0.25): only
the first ``rotary_ndims`` of each head turn (``common.rotary``).

Parallel residual (``use_parallel_residual``, True for Pythia): attention and MLP of layer l read
the same residual stream, so the MLP reader ``m{l}`` reads only the writers before layer l's heads
(``GraphSpec.parallel_residual``: no ``a{l}.h{h} -> m{l}`` edge), and neither the heads nor the
``dense`` bias of layer l reach it. With the flag off the layer is sequential, as GPT-2.
"""

from __future__ import annotations

import torch

from ..graph import GraphSpec
from .base import Family
from .common import attention, head_outputs, layer_norm, ln_project_group, rotary


class GPTNeoXFamily(Family):
    model_types = ("gpt_neox",)

    def __init__(self, hf_model):
        super().__init__(hf_model)
        cfg = hf_model.config
        self.body = hf_model.gpt_neox
        self.n_heads = cfg.num_attention_heads
        self.d_model = cfg.hidden_size
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    @property
    def spec(self) -> GraphSpec:
        cfg = self.hf.config
        return GraphSpec(n_layers=cfg.num_hidden_layers, n_heads=self.n_heads, pos_embeds=False,
                         parallel_residual=bool(cfg.use_parallel_residual))

    def context(self, input_ids, attention_mask, position_ids):
        ctx = super().context(input_ids, attention_mask, position_ids)
        probe = torch.empty(0, dtype=ctx.dtype, device=input_ids.device)
        ctx.extra["rotary"] = self.body.rotary_emb(probe, ctx.position_ids)  # cos, sin: (1|B, T, rotary_ndims)
        return ctx

    def decoder_layers(self):
        return list(self.body.layers)

    def embed(self, input_ids, ctx):
        return self.body.embed_in(input_ids)[None]  # (1, B, T, D)

    def projections(self, attn) -> list:
        """Q, K and V of the per-head interleaved ``query_key_value`` as [(weight_t, bias, H)]."""
        H, dh, D = self.n_heads, self.head_dim, self.d_model
        w = attn.query_key_value.weight.view(H, 3, dh, D)
        b = attn.query_key_value.bias
        b = None if b is None else b.view(H, 3, dh)
        return [(w[:, i].reshape(H * dh, D).t(), None if b is None else b[:, i].reshape(H * dh), H)
                for i in range(3)]

    def attention(self, layer, x, ctx):
        block = self.body.layers[layer]
        attn = block.attention
        # every Q/K/V reader: input_layernorm, then its projection; (B, H, T, dh)
        q, k, v = ln_project_group(x, block.input_layernorm, ctx.dtype, self.projections(attn))
        cos, sin = ctx.extra["rotary"]
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        out = attention(q, k, v, ctx, attn.scaling)  # (B, H, T, dh)
        return head_outputs(out, attn.dense.weight.t(), ctx)  # (H, B, T, D)

    def attn_constant(self, layer):
        return self.body.layers[layer].attention.dense.bias

    def mlp(self, layer, x, ctx):
        block = self.body.layers[layer]
        return block.mlp(layer_norm(x, block.post_attention_layernorm, ctx.dtype))

    def readout(self, x, ctx):
        return self.hf.lm_head(layer_norm(x, self.body.final_layer_norm, ctx.dtype))
