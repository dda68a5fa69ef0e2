"""What is this path? The one recogniser of every file and directory edgeprune reads or writes.

``identify(path)`` looks at what a path holds, not only at its name, and returns its kind:

| kind | what |
|---|---|
| ``run`` | a run directory (``edgeprune prune``): ``masks.safetensors`` or ``checkpoint/`` (and its ``config.yaml``) |
| ``reference-run`` | a run of the reference Edge Pruning implementation: ``config.json`` and safetensors with ``*log_alpha*`` tensors |
| ``scores`` | an attribution scores file (``edgeprune attribute``; safetensors, metadata format ``edgeprune.scores/1``) |
| ``masks`` | a run's ``masks.safetensors`` on its own (``edge_log_alpha``) |
| ``edges`` | an ``edges.json``: a JSON list of ``[writer, reader]`` pairs or ``[writer, reader, span]`` triples |
| ``circuit`` | a ``circuit.json`` (``edgeprune export``): an object with ``graph`` and ``edges_file`` |
| ``eap-ig-graph`` | an EAP-IG / MIB graph file: an object with ``cfg``, ``nodes`` and ``edges`` |
| ``curve`` | a ``curve.json`` (``edgeprune curve``): an object with ``methods`` |

Anything else is an ``ArtifactError`` naming the path and what it looked like; ``expect(path, kinds,
what)`` adds what the command wanted. Commands open their inputs through it, so "a run, a scores
file, a circuit, an EAP-IG graph?" is decided in one place.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from .jsonfile import read_json

SCORES_FORMAT = "edgeprune.scores/1"
KINDS = ("run", "reference-run", "scores", "masks", "edges", "circuit", "eap-ig-graph", "curve")


class ArtifactError(ValueError):
    """A path that is not what a command can read; the message names it."""


def identify(path: str | Path) -> str:
    """The kind of ``path`` (one of ``KINDS``); ArtifactError / FileNotFoundError naming it otherwise."""
    path = Path(path)
    if path.is_dir():
        return _directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors":
        return _safetensors(path)
    if path.suffix == ".json":
        return _json(path)
    raise ArtifactError(f"{path}: not an edgeprune file (expected a run directory, a .safetensors scores or masks "
                        "file, or an edges.json / circuit.json / EAP-IG graph .json)")


def expect(path: str | Path, kinds: tuple[str, ...], what: str) -> str:
    """``identify(path)``, refused unless it is one of ``kinds``; ``what`` says what the command wants."""
    kind = identify(path)
    if kind not in kinds:
        raise ArtifactError(f"{path}: this is {_article(kind)}, but {what}")
    return kind


def _directory(path: Path) -> str:
    if (path / "masks.safetensors").is_file() or (path / "checkpoint").is_dir():
        return "run"  # its config.yaml is what commands that rebuild the model read; converters need only masks
    if (path / "config.json").is_file() and any(_has_log_alphas(p) for p in sorted(path.glob("*.safetensors"))):
        return "reference-run"
    if (path / "config.yaml").is_file():
        raise ArtifactError(f"{path}: a run directory without masks.safetensors or checkpoint/ (a run that has "
                            "not saved yet?)")
    raise ArtifactError(f"{path}: not a run directory (no masks.safetensors or checkpoint/) "
                        "and not a reference Edge Pruning run (no config.json with log_alpha tensors)")


def _safetensors(path: Path) -> str:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    if meta.get("format") == SCORES_FORMAT:
        return "scores"
    if "edge_log_alpha" in keys:
        return "masks"
    if any("log_alpha" in k for k in keys):
        return "reference-run"
    raise ArtifactError(f"{path}: a safetensors file that is neither an edgeprune scores file (metadata format "
                        f"{SCORES_FORMAT!r}) nor masks (edge_log_alpha); tensors: {', '.join(sorted(keys)[:5])}")


def _has_log_alphas(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return any("log_alpha" in k for k in f.keys())
    except (SafetensorError, OSError):
        return False


def _json(path: Path) -> str:
    try:
        data = read_json(path)
    except ValueError as err:
        raise ArtifactError(str(err)) from None
    if isinstance(data, list):
        return "edges"
    if isinstance(data, dict):
        if {"cfg", "nodes", "edges"} <= set(data):
            return "eap-ig-graph"
        if "graph" in data and "edges_file" in data:
            return "circuit"
        if "methods" in data:
            return "curve"
        raise ArtifactError(f"{path}: not a circuit or other edgeprune file: a JSON object with keys "
                            f"{', '.join(sorted(data)[:6])}, not an edges.json "
                            "(a list of [writer, reader] pairs), a circuit.json (graph, edges_file), an EAP-IG "
                            "graph (cfg, nodes, edges) or a curve.json (methods)")
    raise ArtifactError(f"{path}: a JSON {type(data).__name__}, not an edgeprune file")


def _article(kind: str) -> str:
    names = {"run": "a run directory", "reference-run": "a reference Edge Pruning run", "scores": "a scores file",
             "masks": "a masks file", "edges": "an edges.json", "circuit": "a circuit.json",
             "eap-ig-graph": "an EAP-IG graph file", "curve": "a curve.json"}
    return names[kind]
