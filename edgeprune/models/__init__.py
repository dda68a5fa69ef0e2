"""Architecture families: one file each, chosen by the HF config's ``model_type``."""

from __future__ import annotations

from .base import Family
from .gemma import GemmaFamily
from .gpt2 import GPT2Family
from .gpt_neox import GPTNeoXFamily
from .llama import LlamaFamily
from .olmo2 import Olmo2Family
from .phi3 import Phi3Family
from .tracr import TracrFamily

FAMILIES: tuple[type[Family], ...] = (GPT2Family, GPTNeoXFamily, LlamaFamily, GemmaFamily, Olmo2Family, Phi3Family,
                                      TracrFamily)

NEW_FAMILY_HELP = ("a new family is one file under edgeprune/models/ with a subclass of models.base.Family "
                   "(model_types, spec, embed, attention, attn_constant, mlp, readout, decoder_layers; "
                   "gpt2.py and llama.py are short examples), listed in FAMILIES in edgeprune/models/__init__.py")


def family_for(model_type: str) -> type[Family]:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise ValueError(f"unsupported architecture: model_type {model_type!r}; supported: {supported}. "
                     f"To add one: {NEW_FAMILY_HELP}")


def check_supported(model_type: str) -> None:
    family_for(model_type)


__all__ = ["FAMILIES", "Family", "GPT2Family", "GemmaFamily", "GPTNeoXFamily", "LlamaFamily", "Olmo2Family",
           "Phi3Family", "TracrFamily", "family_for", "check_supported"]
