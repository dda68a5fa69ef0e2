"""How close is the edge-masked model (all masks 1) to HF's own forward, per family and dtype?

    python bench/faithfulness.py            # GPT-2-small-size and a Llama GQA config, random weights
    python bench/faithfulness.py --small    # tiny configs (seconds)

Prints max/mean |logit difference| against HF fp32 for: our fp32 and bf16 forwards, HF's own bf16
forward (the bf16 noise floor) and HF eager vs sdpa attention in fp32 (the fp32 noise floor).
Weights are random with non-zero biases and non-unit norm weights.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from edgeprune import EdgeModel


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
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
        return
    yield "gpt2-small", GPT2LMHeadModel, GPT2Config()
    yield "llama-gqa", LlamaForCausalLM, LlamaConfig(num_hidden_layers=8, num_attention_heads=16,
                                                     num_key_value_heads=4, hidden_size=1024,
                                                     intermediate_size=2816, vocab_size=32000)
    yield "qwen2", Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=8, num_attention_heads=16,
                                                 num_key_value_heads=4, hidden_size=1024,
                                                 intermediate_size=2816, vocab_size=32000)


def stats(x, ref):
    d = (x.float() - ref).abs()
    return d.max().item(), d.mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for name, cls, cfg in configs(args.small):
        torch.manual_seed(0)
        hf32 = randomize(cls(cfg))
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
        corrupted = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
        with torch.no_grad():
            ref = hf32(ids).logits
            eager = copy.deepcopy(hf32)
            eager.config._attn_implementation = "eager"
            rows.append((name, "HF eager vs sdpa", "fp32", *stats(eager(ids).logits, ref)))
            rows.append((name, "edgeprune", "fp32",
                         *stats(EdgeModel.from_hf(hf32)(ids, corrupted_input_ids=corrupted).logits, ref)))
            hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
            rows.append((name, "HF", "bf16", *stats(hf16(ids).logits, ref)))
            rows.append((name, "edgeprune", "bf16",
                         *stats(EdgeModel.from_hf(hf16)(ids, corrupted_input_ids=corrupted).logits, ref)))
    print(f"batch {args.batch} x seq {args.seq}; |logit - HF fp32 logit|")
    print(f"{'model':<12} {'forward':<18} {'dtype':<6} {'max':>10} {'mean':>10}")
    for r in rows:
        print(f"{r[0]:<12} {r[1]:<18} {r[2]:<6} {r[3]:>10.3e} {r[4]:>10.3e}")


if __name__ == "__main__":
    main()
