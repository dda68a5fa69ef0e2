"""Llama-family decoders (Llama 1-3.x, CodeLlama, Mistral, Qwen2/2.5, Qwen3) as edge-masked models.

Rotary models have no position writer: the graph starts at ``tok_embeds``. Under grouped-query
attention the K and V readers are per KV head (``a{l}.g{g}.k`` / ``.v``), each feeding the query
heads of its group, so the mask graph follows the real inputs of the module and GQA keeps its
savings. Each reader applies ``input_layernorm`` to its own mix; q/k/v biases (Qwen2) belong to
their reader; an ``o_proj`` bias (Llama with ``attention_bias``) is a layer constant; MLP biases
are part of the MLP writer. Rotary embeddings come from the HF module itself, so every
``rope_scaling`` HF implements (Llama-3.x ``llama3``, linear, dynamic, YaRN) is HF's own.
Qwen3 normalises each query and key head over its head dimensions (``q_norm`` / ``k_norm``,
RMSNorm) after the projection and before rotary: part of the head's reader path, per head.
Sliding windows follow HF: per layer where the attention module has one (Qwen2/Qwen3
``layer_types``), else the config's ``sliding_window`` for the families that apply it everywhere
(Mistral; Phi-3 in ``phi3.py``).
"""

from __future__ import annotations

import torch

from ..graph import GraphSpec
from .base import Family
from .common import attention, head_outputs, rms_norm, rms_project_group, rotary


class LlamaFamily(Family):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    global_window_types = ("mistral",)  # model types whose config.sliding_window applies to every layer

    def __init__(self, hf_model):
        super().__init__(hf_model)
        cfg = hf_model.config
        self.body = hf_model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def spec(self) -> GraphSpec:
        cfg = self.hf.config
        return GraphSpec(n_layers=cfg.num_hidden_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv,
                         pos_embeds=False)

    def context(self, input_ids, attention_mask, position_ids):
        ctx = super().context(input_ids, attention_mask, position_ids)
        probe = torch.empty(0, dtype=ctx.dtype, device=input_ids.device)
        ctx.extra["rotary"] = self.body.rotary_emb(probe, ctx.position_ids)  # cos, sin: (1|B, T, dh)
        return ctx

    def decoder_layers(self):
        return list(self.body.layers)

    def embed(self, input_ids, ctx):
        return self.body.embed_tokens(input_ids)[None]  # (1, B, T, D)

    def _norm(self, x, norm, ctx):
        return rms_norm(x, norm.weight, norm.variance_epsilon, ctx.dtype)

    def projections(self, attn) -> list:
        """The Q, K and V projections as ``project_group`` takes them: [(weight_t, bias, n_out)]."""
        return [(lin.weight.t(), lin.bias, n) for lin, n in
                ((attn.q_proj, self.n_heads), (attn.k_proj, self.n_kv), (attn.v_proj, self.n_kv))]

    def attention(self, layer, x, ctx):
        block = self.body.layers[layer]
        attn = block.self_attn
        norm = block.input_layernorm  # every Q/K/V reader normalises its own input, then projects it
        q, k, v = rms_project_group(x, norm.weight, norm.variance_epsilon, ctx.dtype, self.projections(attn))
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before rotary
            q, k = self._norm(q, attn.q_norm, ctx), self._norm(k, attn.k_norm, ctx)
        cos, sin = ctx.extra["rotary"]
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        window = getattr(attn, "sliding_window", None)
        if window is None and self.hf.config.model_type in self.global_window_types:
            window = getattr(self.hf.config, "sliding_window", None)
        out = attention(q, k, v, ctx, attn.scaling, sliding_window=window)  # (B, H, T, dh)
        return head_outputs(out, attn.o_proj.weight.t(), ctx)  # (H, B, T, D)

    def attn_constant(self, layer):
        return self.body.layers[layer].self_attn.o_proj.bias

    def mlp(self, layer, x, ctx):
        block = self.body.layers[layer]
        return block.mlp(self._norm(x, block.post_attention_layernorm, ctx))

    def readout(self, x, ctx):
        return self.hf.lm_head(self._norm(x, self.body.norm, ctx))

