"""Architecture families: one file each, chosen by the HF config's ``model_type``."""

from __future__ import annotations

from .base import Family
from .gpt2 import GPT2Family
from .llama import LlamaFamily
from .tracr import TracrFamily

FAMILIES: tuple[type[Family], ...] = (GPT2Family, LlamaFamily, TracrFamily)


def family_for(model_type: str) -> type[Family]:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise ValueError(f"unsupported architecture: model_type {model_type!r}; supported: {supported}")


def check_supported(model_type: str) -> None:
    family_for(model_type)


__all__ = ["FAMILIES", "Family", "GPT2Family", "LlamaFamily", "TracrFamily", "family_for", "check_supported"]
