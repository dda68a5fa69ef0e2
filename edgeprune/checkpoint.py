"""Checkpoints as safetensors + JSON (never pickle, never model weights), written atomically.

A checkpoint is a directory holding ``state.safetensors`` (every tensor: masks, lambdas,
optimiser moments, RNG states) and ``state.json`` (everything else, with tensors replaced by
``{"__tensor__": key}`` references). Nested state dicts (an optimiser's) are flattened on save and
rebuilt on load. A new checkpoint is written beside the old one and swapped in with renames, so a
kill at any moment leaves the last good checkpoint readable.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or from another model/graph."""


def _flatten(obj, prefix: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if any(not isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot store dict keys of type other than str/int at {prefix!r}")
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def _unflatten(obj, tensors: dict, where: str):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"{where}: tensor {key!r} missing from state.safetensors")
            return tensors[key]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors, where) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors, where) for v in obj["__list__"]]
        return {k: _unflatten(v, tensors, where) for k, v in obj.items()}
    return obj


def save_checkpoint(state: dict, directory: str | Path) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON scalars) atomically to ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "state": skeleton}))
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """A safetensors file with its header written in sorted key order, atomically (temporary file +
    rename), so that identical inputs give byte-identical files (``safetensors.save_file`` writes
    the metadata in a varying order). Readable by ``safetensors.safe_open`` / ``load_file``."""
    path = Path(path)
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"write_safetensors: {name} has unsupported dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)
    return path


def find_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint directory to resume from (or its previous copy if a swap was interrupted)."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / "state.json").is_file() and (candidate / "state.safetensors").is_file():
            return candidate
    return None


def load_checkpoint(directory: str | Path) -> dict:
    directory = Path(directory)
    meta_path, tensor_path = directory / "state.json", directory / "state.safetensors"
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {meta.get('format_version')!r} is not "
                              f"supported (expected {FORMAT_VERSION})")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{tensor_path}: cannot read safetensors ({err})") from None
    return _unflatten(meta["state"], tensors, str(directory))
