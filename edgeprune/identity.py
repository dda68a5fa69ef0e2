"""What a model *is*, independent of the path it was loaded from: a content fingerprint of its
config and weights, recorded in every run so masks are never applied to another model.

Sizes are exact integers throughout: a real checkpoint's embedding has more than 2**24 elements
(GPT-2 small: 50,257 x 768 = 38,597,376), which float32 cannot index.
"""

from __future__ import annotations

import hashlib
import json

import torch

VERSION = 2  # 1: float32 sample indices (wrong above 2**24 elements); 2: exact int64 indices
SAMPLES = 1024  # values hashed per parameter

# config keys that say how a model was loaded or run, not what it is
_UNIDENTIFYING = {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures", "name_or_path",
                  "output_attentions", "output_hidden_states", "return_dict", "attn_implementation"}


class FingerprintError(ValueError):
    """A fingerprint that cannot be computed (a version-1 fingerprint of a parameter above 2**24)."""


def sample_indices(n: int, k: int = SAMPLES, version: int = VERSION) -> torch.Tensor:
    """``min(n, k)`` evenly spaced indices into ``n`` elements, first and last included. (m,) int64.

    Version 2: ``i * (n - 1) // (m - 1)`` in exact integer arithmetic. Version 1: the float32
    ``linspace`` of runs written before it, kept only to recognise those runs."""
    m = min(n, k)
    if version == 1:
        idx = torch.linspace(0, n - 1, m).long()
        if m and int(idx[-1]) >= n:
            raise FingerprintError(f"a version-1 fingerprint cannot index a parameter of {n:,} elements")
        return idx
    if version != 2:
        raise FingerprintError(f"unknown fingerprint version {version!r} (this edgeprune writes {VERSION})")
    if m <= 1:
        return torch.zeros(m, dtype=torch.int64)
    return torch.arange(m, dtype=torch.int64) * (n - 1) // (m - 1)


def _canon(o):
    """String keys everywhere, so mixed-key dicts (Tracr encodings) sort."""
    if isinstance(o, dict):
        return {str(k): _canon(v) for k, v in o.items()}
    return [_canon(v) for v in o] if isinstance(o, (list, tuple)) else o


def model_fingerprint(hf: torch.nn.Module, version: int = VERSION) -> dict:
    """{"config": sha256 of the config (loading options left out), "weights": sha256 of ``SAMPLES``
    evenly spaced values of every parameter, rounded to bf16 so fp32 and bf16 loads agree}, plus
    "version" from version 2 on (version-1 fingerprints have no such key)."""
    cfg = hf.config.to_dict() if hasattr(hf.config, "to_dict") else dict(vars(hf.config))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _UNIDENTIFYING}
    config_hash = hashlib.sha256(json.dumps(_canon(cfg), sort_keys=True, default=str).encode()).hexdigest()
    h = hashlib.sha256()
    for name, p in sorted(hf.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        if p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        idx = sample_indices(flat.numel(), version=version).to(flat.device)
        h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes())
    fp = {"config": config_hash, "weights": h.hexdigest()}
    return fp if version == 1 else {"version": version, **fp}


def fingerprint_version(fp: dict) -> int:
    """The version a saved fingerprint was computed with (1 when it has no "version" key)."""
    return int(fp.get("version", 1))
