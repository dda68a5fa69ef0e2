"""Shared fixtures: small random-init HF models with non-trivial biases and norm weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
# The test models are tiny: thread start-up costs more than it saves, badly so on a loaded 2-core machine.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
VOCAB = 128


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> torch.nn.Module:
    """Random weights that expose bugs HF's init hides: non-zero biases, non-unit norm weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(scale * noise)
    return model.eval()


def gpt2_config(**kw) -> GPT2Config:
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                eos_token_id=0)
    base.update(kw)
    return GPT2Config(**base)


def llama_config(**kw) -> LlamaConfig:
    base = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                eos_token_id=0, pad_token_id=None, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def qwen2_config(**kw) -> Qwen2Config:
    base = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                eos_token_id=0, tie_word_embeddings=False)
    base.update(kw)
    return Qwen2Config(**base)


def build(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(**kw))
    elif kind == "llama":
        model = LlamaForCausalLM(llama_config(**kw))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(qwen2_config(**kw))
    else:
        raise ValueError(kind)
    return randomize(model, seed)


@pytest.fixture(params=["gpt2", "llama", "qwen2"])
def family_kind(request) -> str:
    return request.param


def token_batch(batch=3, seq=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the offline fixtures in ../shared are needed for this test")
    return path
