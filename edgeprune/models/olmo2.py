"""OLMo-2 decoders as edge-masked models.

Like Llama (``llama.py``: rotary, GQA readers per KV head, no position writer) but with norms in
other places, each matched to HF's ``Olmo2RMSNorm`` (normalise and scale in fp32, cast once):

- No pre-norms: every Q/K/V reader projects its own mix as it is, and so does the MLP reader;
  ``resid_post`` applies the final ``norm``.
- Q/K norms over the whole projection: ``q_norm`` is an RMSNorm over all H x d_head query
  features at a position, not per head (``k_norm`` likewise over all KV heads). So the Q readers
  of a layer interact through that norm: with one input per reader, head h's query slice comes
  from its own reader's input, and the RMS is then taken over the concatenation of every head's
  slice, each from its own reader. Head h's query is therefore scaled by a statistic of the other
  Q readers' inputs too, and ablating an edge into ``a{l}.h{j}.q`` moves the queries of every head
  of layer l a little (through that shared RMS), as an activation patch of head j's slice of
  ``q_proj``'s output does in HF. Same for K across the KV heads. With every mask 1 it is HF's.
- Post-norms: ``post_attention_layernorm`` acts on the sum of a layer's heads. The norm's scale
  comes from the layer's own attention output in this forward (the sum of its heads, computed from
  their masked inputs) and is shared by its heads; a head writes o_h * w / rms(sum of the layer's
  o_h) (``common.post_norm_shares``), so the shares add up to HF's normed output.
  ``post_feedforward_layernorm`` is part of the MLP writer.
- Biases: q/k/v biases would belong to their reader; an ``o_proj`` bias would sit inside the
  post-norm, where its share is position-dependent and not a layer constant. OLMo-2 checkpoints
  have none (``attention_bias`` is false), so ``attention_bias=True`` is refused.
"""

from __future__ import annotations

from .common import attention, head_outputs, post_norm_shares, project_group, rms_norm_fp32_scale, rotary
from .llama import LlamaFamily


class Olmo2Family(LlamaFamily):
    model_types = ("olmo2",)
    global_window_types = ()

    def __init__(self, hf_model):
        super().__init__(hf_model)
        if self.body.layers[0].self_attn.o_proj.bias is not None:
            raise ValueError("olmo2 with attention_bias=True is not supported: the o_proj bias would sit inside "
                             "post_attention_layernorm, where it is neither a head nor a layer constant")

    def _norm(self, x, norm, ctx):
        return rms_norm_fp32_scale(x, norm.weight.float(), norm.variance_epsilon, ctx.dtype)

    def _heads_norm(self, x, norm, ctx):
        """``norm`` over all heads' features at a position: (B, n, T, dh) -> (B, n, T, dh)."""
        B, n, T, dh = x.shape
        flat = self._norm(x.transpose(1, 2).reshape(B, T, n * dh), norm, ctx)  # (B, T, n * dh)
        return flat.view(B, T, n, dh).transpose(1, 2)

    def attention(self, layer, x, ctx):
        block = self.body.layers[layer]
        attn = block.self_attn
        q, k, v = project_group(x.to(ctx.dtype), self.projections(attn))  # no pre-norm; (B, H|G, T, dh)
        q, k = self._heads_norm(q, attn.q_norm, ctx), self._heads_norm(k, attn.k_norm, ctx)
        cos, sin = ctx.extra["rotary"]  # fp32 in HF's OLMo-2: it rotates in fp32 and casts back, as here
        q, k = rotary(q, cos, sin).to(q.dtype), rotary(k, cos, sin).to(k.dtype)
        out = attention(q, k, v, ctx, attn.scaling)  # (B, H, T, dh)
        heads = head_outputs(out, attn.o_proj.weight.t(), ctx)  # (H, B, T, D)
        norm = block.post_attention_layernorm
        return post_norm_shares(heads, norm.weight.float(), norm.variance_epsilon)

    def mlp(self, layer, x, ctx):
        block = self.body.layers[layer]
        return self._norm(block.mlp(x.to(ctx.dtype)), block.post_feedforward_layernorm, ctx)

    def readout(self, x, ctx):
        return self.hf.lm_head(self._norm(x, self.body.norm, ctx))
