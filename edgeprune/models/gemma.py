"""Gemma, Gemma-2 and Gemma-3 (text) decoders as edge-masked models.

Like Llama (``llama.py``: rotary, GQA readers per KV head, no position writer), with Gemma's own
pieces, each taken from the HF modules and matched to HF's arithmetic:

- ``tok_embeds`` is HF's scaled embedding: the table times sqrt(d_model), the normaliser cast to
  the model dtype first, as HF does (in bf16 sqrt(3072) = 55.43 becomes 55.5).
- Every norm is RMSNorm with weight ``1 + w``, normalised and scaled in fp32 and cast once
  (``rms_norm_fp32_scale``). Readers: each Q/K/V reader applies ``input_layernorm`` to its own mix;
  the MLP reader applies ``post_attention_layernorm`` (Gemma: despite its name, a pre-norm) or
  ``pre_feedforward_layernorm`` (Gemma-2/3); ``resid_post`` the final ``norm``.
- Gemma-2/3 post-norms. ``post_attention_layernorm`` acts on the sum of a layer's heads, so heads
  are not separable writers: the norm's scale is computed from the layer's own attention output in
  this forward (the sum of its heads, each computed from its masked inputs) and shared by its
  heads, and a head writes its share, o_h * (1 + w) / rms(sum of the layer's o_h)
  (``common.post_norm_shares``). With every mask 1 this is exactly HF's layer. Ablating an edge into
  a head of layer l changes that head's output and so the scale of every head of layer l; the
  states of earlier writers do not move. ``post_feedforward_layernorm`` is part of the MLP writer.
  An ``o_proj`` bias would sit inside the post-norm, where its share is position-dependent and not
  a layer constant: no Gemma-2/3 checkpoint has one (``attention_bias`` is false), so it is refused.
  In Gemma (no post-norms) it is a layer constant, and q/k/v biases belong to their readers.
- Attention: scale ``query_pre_attn_scalar ** -0.5`` (Gemma-2/3; HF's ``attn.scaling``);
  Gemma-2's ``attn_logit_softcapping`` runs through ``common.softcap_attention`` (SDPA has no
  soft-cap; HF itself then uses eager attention). HF's Gemma-3 attention never applies the
  attention soft-cap (it does not pass it on), and neither do we. Sliding windows per layer where
  HF's attention module has one (``layer_types`` / ``sliding_window``).
- Gemma-3: per-head ``q_norm`` / ``k_norm`` ((1 + w) RMSNorm over head_dim, before rotary, part
  of each head's reader path); local (sliding) layers use their own rotary base
  (``rope_parameters["sliding_attention"]``, the old ``rope_local_base_freq``): HF's rotary module
  gives cos/sin per layer type, and each layer takes those of its type.
- ``final_logit_softcapping`` (Gemma-2/3): logits = cap * tanh(logits / cap), as HF applies it.
"""

from __future__ import annotations

import torch

from .base import Family
from .common import (attention, head_outputs, post_norm_shares, project_group, rms_norm_fp32_scale, rotary,
                     softcap_attention)
from .llama import LlamaFamily


class GemmaFamily(LlamaFamily):
    model_types = ("gemma", "gemma2", "gemma3_text")
    global_window_types = ()

    def __init__(self, hf_model):
        super().__init__(hf_model)
        cfg = hf_model.config
        self.post_norms = cfg.model_type != "gemma"
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None) if cfg.model_type == "gemma2" else None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError(f"{cfg.model_type} with use_bidirectional_attention=True is not supported "
                             "(edge pruning needs a causal decoder)")
        if self.post_norms and self.body.layers[0].self_attn.o_proj.bias is not None:
            raise ValueError(f"{cfg.model_type} with attention_bias=True is not supported: the o_proj bias would "
                             "sit inside post_attention_layernorm, where it is neither a head nor a layer constant")

    def context(self, input_ids, attention_mask, position_ids):
        ctx = Family.context(self, input_ids, attention_mask, position_ids)
        probe = torch.empty(0, dtype=ctx.dtype, device=input_ids.device)
        rope = self.body.rotary_emb
        if self.hf.config.model_type == "gemma3_text":  # one cos/sin per layer type (local / global bases)
            ctx.extra["rotary"] = {t: rope(probe, ctx.position_ids, t) for t in set(self.hf.config.layer_types)}
        else:
            ctx.extra["rotary"] = {None: rope(probe, ctx.position_ids)}  # cos, sin: (1|B, T, dh)
        return ctx

    def _norm(self, x, norm, ctx):
        return rms_norm_fp32_scale(x, 1.0 + norm.weight.float(), norm.eps, ctx.dtype)

    def attention(self, layer, x, ctx):
        block = self.body.layers[layer]
        attn = block.self_attn
        normed = self._norm(x, block.input_layernorm, ctx)  # every Q/K/V reader: input_layernorm
        q, k, v = project_group(normed, self.projections(attn))  # (B, H|G, T, dh)
        if hasattr(attn, "q_norm"):  # Gemma-3: per-head (1 + w) RMSNorm before rotary
            q, k = self._norm(q, attn.q_norm, ctx), self._norm(k, attn.k_norm, ctx)
        rope_type = getattr(attn, "layer_type", None) if self.hf.config.model_type == "gemma3_text" else None
        cos, sin = ctx.extra["rotary"][rope_type]
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        window = getattr(attn, "sliding_window", None)
        if self.attn_softcap is not None:
            out = softcap_attention(q, k, v, ctx, attn.scaling, self.attn_softcap, window)
        else:
            out = attention(q, k, v, ctx, attn.scaling, sliding_window=window)  # (B, H, T, dh)
        heads = head_outputs(out, attn.o_proj.weight.t(), ctx)  # (H, B, T, D)
        if not self.post_norms:
            return heads
        norm = block.post_attention_layernorm
        return post_norm_shares(heads, 1.0 + norm.weight.float(), norm.eps)

    def mlp(self, layer, x, ctx):
        block = self.body.layers[layer]
        if not self.post_norms:
            return block.mlp(self._norm(x, block.post_attention_layernorm, ctx))
        out = block.mlp(self._norm(x, block.pre_feedforward_layernorm, ctx))
        return self._norm(out, block.post_feedforward_layernorm, ctx)  # the post-norm is part of the writer

    def readout(self, x, ctx):
        logits = self.hf.lm_head(self._norm(x, self.body.norm, ctx))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
