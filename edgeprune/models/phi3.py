"""Phi-3 (``Phi3ForCausalLM``) as an edge-masked model: a Llama-family decoder with fused projections.

The graph and every rule are Llama's (``llama.py``): each Q/K/V reader applies ``input_layernorm``
to its own mix, the MLP reader ``post_attention_layernorm``, ``resid_post`` the final ``norm``;
K and V readers are per KV head under grouped-query attention. What differs:

- ``qkv_proj`` fuses the three projections as [Q heads | K heads | V heads] along its output rows;
  each reader group gets its contiguous row slice (views of the one weight, nothing copied).
- ``gate_up_proj`` fuses the MLP's gate and up projections; the MLP is one reader (``m{l}``), so it
  runs as HF's module on that reader's normed input (no split needed), with no biases.
- Rotary may be partial (``partial_rotary_factor``): ``common.rotary`` turns only the first dims.
  Rotary scaling (``longrope``) is HF's own module.
- ``config.sliding_window`` (Phi-3-mini: 2047) applies to every layer, as in HF's mask.
"""

from __future__ import annotations

from .llama import LlamaFamily


class Phi3Family(LlamaFamily):
    model_types = ("phi3",)
    global_window_types = ("phi3",)

    def projections(self, attn) -> list:
        w = attn.qkv_proj.weight  # (H*dh + 2*G*dh, D)
        b = attn.qkv_proj.bias  # None in every released Phi-3
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        rows = [(0, nq, self.n_heads), (nq, nq + nkv, self.n_kv), (nq + nkv, nq + 2 * nkv, self.n_kv)]
        return [(w[lo:hi].t(), None if b is None else b[lo:hi], n) for lo, hi, n in rows]
