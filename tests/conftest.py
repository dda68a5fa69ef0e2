"""Shared fixtures: small random-init HF models with non-trivial biases and norm weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                          GemmaForCausalLM, Olmo2Config, Olmo2ForCausalLM)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
# The test models are tiny: thread start-up costs more than it saves, badly so on a loaded 2-core machine.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
VOCAB = 128


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.15,
              norm_center: float = 1.0) -> torch.nn.Module:
    """Random weights that expose bugs HF's init hides: non-zero biases, non-unit norm weights.

    Norm weights are ``norm_center + 0.3 * noise``; Gemma's norms scale by ``1 + w``, so its
    builders centre them at 0 (scales 1 +- 0.3, as for the other families, and a norm that forgot
    the 1 would be off by a factor of ~3)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(norm_center + 0.3 * noise)
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


def gpt_neox_config(**kw) -> GPTNeoXConfig:
    """Pythia-like: parallel residual, partial rotary (a quarter of each head), biases everywhere."""
    base = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=96,
                vocab_size=VOCAB, max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True,
                bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    base.update(kw)
    return GPTNeoXConfig(**base)


def phi3_config(**kw) -> Phi3Config:
    """Phi-3 with GQA, partial rotary and a sliding window shorter than the test sequences."""
    base = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, partial_rotary_factor=0.5,
                sliding_window=6, bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=False)
    base.update(kw)
    return Phi3Config(**base)


def qwen3_config(**kw) -> Qwen3Config:
    """Qwen3 with GQA, q/k norms, and layer 1 a sliding-window layer (``layer_types``)."""
    base = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, use_sliding_window=True,
                sliding_window=5, max_window_layers=1, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    base.update(kw)
    return Qwen3Config(**base)


def mistral_config(**kw) -> MistralConfig:
    base = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=5,
                bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    base.update(kw)
    return MistralConfig(**base)


NEW_FAMILY_BUILDERS = {  # kind -> (config builder, model class); tests/test_families.py
    "gpt_neox": (gpt_neox_config, GPTNeoXForCausalLM),
    "phi3": (phi3_config, Phi3ForCausalLM),
    "qwen3": (qwen3_config, Qwen3ForCausalLM),
    "mistral": (mistral_config, MistralForCausalLM),
}


_GQA_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=16,
                  intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)


def _alternating(kw) -> list[str]:
    n = kw.get("num_hidden_layers", _GQA_SMALL["num_hidden_layers"])
    return ["full_attention" if l % 2 else "sliding_attention" for l in range(n)]


def gemma_config(**kw) -> GemmaConfig:
    return GemmaConfig(**{**_GQA_SMALL, **kw})


def gemma2_config(**kw) -> Gemma2Config:
    """Gemma-2 with attention and final-logit soft-caps, query_pre_attn_scalar != head_dim, and even layers
    sliding-window layers (window 5, shorter than the test sequences)."""
    base = dict(_GQA_SMALL, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                sliding_window=5, layer_types=_alternating(kw))
    return Gemma2Config(**{**base, **kw})


def gemma3_text_config(**kw) -> Gemma3TextConfig:
    """Gemma-3 (text) with q/k norms, even layers sliding-window layers (window 5) and a local rotary base
    (100) far from the global one (10000)."""
    base = dict(_GQA_SMALL, query_pre_attn_scalar=24, sliding_window=5, layer_types=_alternating(kw),
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return Gemma3TextConfig(**{**base, **kw})


def olmo2_config(**kw) -> Olmo2Config:
    return Olmo2Config(**{**_GQA_SMALL, "tie_word_embeddings": False, **kw})


# kind -> (config builder, model class, norm weight centre); tests/test_families_gemma_olmo.py
GEMMA_OLMO_BUILDERS = {
    "gemma": (gemma_config, GemmaForCausalLM, 0.0),
    "gemma2": (gemma2_config, Gemma2ForCausalLM, 0.0),
    "gemma3_text": (gemma3_text_config, Gemma3ForCausalLM, 0.0),
    "olmo2": (olmo2_config, Olmo2ForCausalLM, 1.0),
}


def build(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(**kw))
    elif kind == "llama":
        model = LlamaForCausalLM(llama_config(**kw))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(qwen2_config(**kw))
    elif kind in NEW_FAMILY_BUILDERS:
        config, cls = NEW_FAMILY_BUILDERS[kind]
        model = cls(config(**kw))
    elif kind in GEMMA_OLMO_BUILDERS:
        config, cls, center = GEMMA_OLMO_BUILDERS[kind]
        return randomize(cls(config(**kw)), seed, norm_center=center)
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


def prune_tiny(hf_model: torch.nn.Module, tmp_path: Path, name: str):
    """Save ``hf_model`` (vocabulary 512) with the stories260K tokenizer and prune it for 3 steps on
    the stories names task; returns the PruneResult (run directory ``tmp_path / "run"``)."""
    require_shared(STORIES)
    from transformers import AutoTokenizer

    from edgeprune.config import from_dict
    from edgeprune.prune import prune

    path = tmp_path / name
    hf_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(path)
    task = Path(__file__).resolve().parents[1] / "data" / "tasks" / "stories_names.jsonl"
    cfg = from_dict({
        "model": {"name_or_path": str(path), "device": "cpu"},
        "data": {"path": str(task), "max_length": 64},
        "prune": {"edge_target": 0.5, "steps": 3, "warmup_steps": 2, "batch_size": 4},
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0, "eval_every": 3, "save_every": 3,
                "log_every": 1, "eval_batches": 1},
    }).validate()
    return prune(cfg, progress=False)
