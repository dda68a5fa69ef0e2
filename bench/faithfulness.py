"""How close is the edge-masked model (all masks 1) to HF's own forward, per family and dtype?

    python bench/faithfulness.py            # GPT-2-small-size, Llama GQA, Gemma(-2/3), OLMo-2, Pythia, Phi-3,
                                            # Qwen3, Llama-3 rope, Mistral configs, random weights
    python bench/faithfulness.py --small    # tiny configs (seconds)

Prints max/mean |logit difference| against HF fp32 for: our fp32 and bf16 forwards, HF's own bf16
forward (the bf16 noise floor) and HF eager vs sdpa attention in fp32 (the fp32 noise floor; not for
Gemma-2, whose only HF attention here is eager, for its soft-cap). Weights are random with non-zero
biases and non-unit norm weights (Gemma's norms scale by 1 + w: its weights are centred at 0).
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                          GemmaForCausalLM, Olmo2Config, Olmo2ForCausalLM)

from edgeprune import EdgeModel


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm_center = 0.0 if type(model).__name__.startswith("Gemma") else 1.0  # Gemma: (1 + w) norms
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(norm_center + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model.eval()


def configs(small: bool):
    if small:
        yield "gpt2", GPT2LMHeadModel, GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=512)
        yield "llama-gqa", LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, hidden_size=64,
                                                         intermediate_size=128, vocab_size=512)
        yield "qwen2", Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, hidden_size=64,
                                                     intermediate_size=128, vocab_size=512)
        yield from _gemma_olmo(dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                    head_dim=16, intermediate_size=128, vocab_size=512), window=5)
        yield from _pythia_phi3_qwen3(dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           hidden_size=64, intermediate_size=128, vocab_size=512),
                                      head_dim=16, window=5)
        return
    yield "gpt2-small", GPT2LMHeadModel, GPT2Config()
    yield "llama-gqa", LlamaForCausalLM, LlamaConfig(num_hidden_layers=8, num_attention_heads=16,
                                                     num_key_value_heads=4, hidden_size=1024,
                                                     intermediate_size=2816, vocab_size=32000)
    yield "qwen2", Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=8, num_attention_heads=16,
                                                 num_key_value_heads=4, hidden_size=1024,
                                                 intermediate_size=2816, vocab_size=32000)
    yield from _gemma_olmo(dict(num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, hidden_size=1024,
                                head_dim=64, intermediate_size=2816, vocab_size=32000), window=16)
    yield from _pythia_phi3_qwen3(dict(num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                       hidden_size=1024, intermediate_size=2816, vocab_size=32000),
                                  head_dim=64, window=16)


def _pythia_phi3_qwen3(shape: dict, head_dim: int, window: int):
    """Pythia (parallel residual, partial rotary), Phi-3 (fused projections), Qwen3 (q/k norms, one
    sliding-window layer), Llama-3.x rotary scaling and Mistral's sliding window, of one shape; the
    windows are shorter than the default sequence."""
    neox = {k: v for k, v in shape.items() if k != "num_key_value_heads"}
    yield "pythia", GPTNeoXForCausalLM, GPTNeoXConfig(**neox, rotary_pct=0.25, use_parallel_residual=True,
                                                      bos_token_id=0, eos_token_id=0)
    yield "phi3", Phi3ForCausalLM, Phi3Config(**shape, partial_rotary_factor=0.5, sliding_window=window,
                                              pad_token_id=None, bos_token_id=None, eos_token_id=None)
    yield "qwen3", Qwen3ForCausalLM, Qwen3Config(**shape, head_dim=head_dim, use_sliding_window=True,
                                                 sliding_window=window, max_window_layers=1)
    yield "llama3-rope", LlamaForCausalLM, LlamaConfig(**shape, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})
    yield "mistral", MistralForCausalLM, MistralConfig(**shape, sliding_window=window)


def _gemma_olmo(shape: dict, window: int):
    """Gemma, Gemma-2 (soft-caps on, alternating sliding-window layers), Gemma-3 (q/k norms, local rotary
    base) and OLMo-2 of one shape; the window is shorter than the default sequence."""
    yield "gemma", GemmaForCausalLM, GemmaConfig(**shape)
    yield "gemma2", Gemma2ForCausalLM, Gemma2Config(**shape, sliding_window=window, query_pre_attn_scalar=64,
                                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    yield "gemma3", Gemma3ForCausalLM, Gemma3TextConfig(**shape, sliding_window=window, query_pre_attn_scalar=64,
                                                        sliding_window_pattern=2)
    yield "olmo2", Olmo2ForCausalLM, Olmo2Config(**shape, tie_word_embeddings=False)


def stats(x, ref):
    d = (x.float() - ref).abs()
    return d.max().item(), d.mean().item()


def measure(name, cls, cfg, batch: int, seq: int, device: str | torch.device = "cpu") -> list[tuple]:
    """Rows (model, forward, dtype, max, mean) of |logit - HF fp32 logit| for one family on ``device``:
    HF eager vs sdpa (fp32 floor, where HF has sdpa), ours fp32, HF bf16 (the bf16 floor), ours bf16.
    Weights are randomised on CPU (same values on every device), then moved."""
    torch.manual_seed(0)
    hf32 = randomize(cls(cfg)).to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    corrupted = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    rows = []
    with torch.no_grad():
        ref = hf32(ids).logits
        if hf32.config._attn_implementation != "eager":
            eager = copy.deepcopy(hf32)
            eager.config._attn_implementation = "eager"
            rows.append((name, "HF eager vs sdpa", "fp32", *stats(eager(ids).logits, ref)))
            del eager
        rows.append((name, "edgeprune", "fp32",
                     *stats(EdgeModel.from_hf(hf32)(ids, corrupted_input_ids=corrupted).logits, ref)))
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        rows.append((name, "HF", "bf16", *stats(hf16(ids).logits, ref)))
        rows.append((name, "edgeprune", "bf16",
                     *stats(EdgeModel.from_hf(hf16)(ids, corrupted_input_ids=corrupted).logits, ref)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for name, cls, cfg in configs(args.small):
        rows.extend(measure(name, cls, cfg, args.batch, args.seq))
    print(f"batch {args.batch} x seq {args.seq}; |logit - HF fp32 logit|")
    print(f"{'model':<12} {'forward':<18} {'dtype':<6} {'max':>10} {'mean':>10}")
    for r in rows:
        print(f"{r[0]:<12} {r[1]:<18} {r[2]:<6} {r[3]:>10.3e} {r[4]:>10.3e}")


if __name__ == "__main__":
    main()
