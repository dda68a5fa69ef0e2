"""Compiled Tracr models (RASP programs compiled to exact weights) as edge-masked models.

A Tracr artifact is a folder written by ``run_scripts/compile_tracr.py``: ``config.json``
(``"model_type": "tracr"``), ``weights.safetensors`` (TransformerLens names, input-major: every map
is ``x @ W``), and optionally ``ground_truth.json`` (the known circuit, ``edges.json`` format) and
``reference_outputs.json`` (the compiled JAX model's outputs on every input). ``load_tracr`` reads
and validates it into a ``TracrModel``; ``EdgeModel.from_pretrained(folder)`` wraps that with
``TracrFamily`` and, unless told otherwise, zero ablation (every input of a Tracr task has the same
length, so the constant ``one``/BOS/position dims would be invisible to interchange ablation).

The forward is tracr's exactly (``tracr.transformer.model``, no layer norm): the residual stream
starts as token + position embedding (position 0 is BOS and has a zero position embedding); each
layer adds multi-head attention with logits ``(q . k) / sqrt(key_size)``, masked keys set to
-1e30 (causal models only), softmax, then adds a ReLU MLP. Tracr attends to the BOS key as the
default (its categorical attention gives the query's ``one`` dim half the match logit on BOS), which
lives in the weights, so nothing here special-cases it. Outputs: ``x @ W_U``, the projection onto the
output space: (B, T, n_out) scores for categorical programs (argmax decodes), (B, T, 1) values for
numerical ones. The output at position 0 (BOS) is meaningless and never decoded.

Edge-masking choices: q/k/v biases belong to their reader, ``b_O`` is a layer constant, MLP biases
belong to the MLP writer (all are zero in compiled models). No padding: a batch holds sequences of one
length (1..max_seq_len real tokens after BOS); batches of different lengths are fine.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..graph import Graph, GraphSpec
from ..jsonfile import read_edge_pairs
from .base import Family
from .common import Context, head_outputs, project

FORMAT_VERSIONS = (1,)
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.safetensors"
GROUND_TRUTH_FILE, REFERENCE_FILE = "ground_truth.json", "reference_outputs.json"
OUTPUT_KINDS = ("categorical", "numerical")


class TracrArtifactError(ValueError):
    """A Tracr artifact folder that cannot be loaded; the message names the file and field."""


# ------------------------------------------------------------------------------------------ config
@dataclass
class TracrConfig:
    """``config.json`` of a compiled Tracr model (see ``run_scripts/compile_tracr.py``)."""

    program: str
    n_layers: int
    n_heads: int  # every layer padded to this many heads (tracr pads with all-zero heads)
    d_model: int
    key_size: int
    mlp_hidden: int
    max_seq_len: int  # real tokens, BOS not counted
    causal: bool
    vocab: list
    bos_token: str
    input_encoding: dict  # token -> id, BOS and pad included
    output_kind: str  # "categorical" | "numerical"
    output_dims: list[int]  # residual dims of the output space
    residual_labels: list[str]
    attention_scale: float  # 1 / sqrt(key_size)
    mask_value: float = -1e30
    output_encoding: dict | None = None  # categorical: id -> value
    output_label: str | None = None  # numerical: residual label of the output dim
    pad_token: str | None = None
    task_length: int | None = None  # the sequence length a task uses by default
    heads_per_layer: list[int] | None = None
    mlp_active: list[bool] | None = None
    format_version: int = 1
    versions: dict = field(default_factory=dict)
    model_type: str = "tracr"
    _name_or_path: str = ""

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def n_ctx(self) -> int:
        return self.max_seq_len + 1

    @property
    def n_vocab(self) -> int:
        return len(self.input_encoding)

    @property
    def n_out(self) -> int:
        return len(self.output_dims)

    @classmethod
    def from_json(cls, path: str | Path) -> "TracrConfig":
        """Read and validate ``config.json``; errors name the file and the field."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise TracrArtifactError(f"{path} is missing (a Tracr artifact folder holds {CONFIG_FILE} and "
                                     f"{WEIGHTS_FILE}; run_scripts/compile_tracr.py writes them)") from None
        except json.JSONDecodeError as err:
            raise TracrArtifactError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        if not isinstance(raw, dict):
            raise TracrArtifactError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = CONFIG_FILE) -> "TracrConfig":
        f = _Fields(raw, source)
        kw = f.shapes(f.header())
        f.input_encoding(kw)
        f.outputs(kw)
        f.attention(kw)
        f.extras(kw)
        return cls(**kw)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of ``weights.safetensors`` with the shape this config implies."""
        D, H, dk, dm = self.d_model, self.n_heads, self.key_size, self.mlp_hidden
        shapes = {"embed.W_E": (self.n_vocab, D), "pos_embed.W_pos": (self.n_ctx, D),
                  "unembed.W_U": (D, self.n_out)}
        for l in range(self.n_layers):
            a, m = f"blocks.{l}.attn", f"blocks.{l}.mlp"
            for x in "QKV":
                shapes[f"{a}.W_{x}"], shapes[f"{a}.b_{x}"] = (H, D, dk), (H, dk)
            shapes[f"{a}.W_O"], shapes[f"{a}.b_O"] = (H, dk, D), (D,)
            shapes[f"{m}.W_in"], shapes[f"{m}.b_in"] = (D, dm), (dm,)
            shapes[f"{m}.W_out"], shapes[f"{m}.b_out"] = (dm, D), (D,)
        return shapes

    def explain_shape(self, name: str) -> str:
        """Which config fields a tensor's shape comes from (for error messages)."""
        short = name.rsplit(".", 1)[-1]
        why = {"W_E": "n_vocab (input_encoding), d_model", "W_pos": "max_seq_len + 1, d_model",
               "W_U": "d_model, len(output_dims)", "W_O": "n_heads, key_size, d_model", "b_O": "d_model",
               "W_in": "d_model, mlp_hidden", "b_in": "mlp_hidden", "W_out": "mlp_hidden, d_model",
               "b_out": "d_model"}
        return why.get(short, "n_heads, d_model, key_size" if short.startswith("W_") else "n_heads, key_size")



class _Fields:
    """The checks of ``TracrConfig.from_dict``, in order; every error names the file and the field."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def error(self, message: str) -> TracrArtifactError:
        return TracrArtifactError(f"{self.source}: {message}")

    def need(self, name, kind, check=None, expected=""):
        if name not in self.raw:
            raise self.error(f"missing field {name!r}")
        value = self.raw[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int or (
                check is not None and not check(value)):
            raise self.error(f"field {name!r} must be {expected or kind.__name__}, got {value!r}")
        return value

    def header(self) -> int:
        if self.raw.get("model_type") != "tracr":
            raise self.error(f"field 'model_type' must be 'tracr', got {self.raw.get('model_type')!r}")
        version = self.need("format_version", int)
        if version not in FORMAT_VERSIONS:
            raise self.error(f"field 'format_version' is {version}, but this edgeprune reads format_version "
                             f"{', '.join(map(str, FORMAT_VERSIONS))}; recompile with "
                             "run_scripts/compile_tracr.py or upgrade edgeprune")
        return version

    def shapes(self, version: int) -> dict[str, Any]:
        need = self.need
        positive = dict(check=lambda v: v > 0, expected="a positive integer")
        kw: dict[str, Any] = dict(
            program=need("program", str, lambda v: bool(v), "a non-empty string"),
            n_layers=need("n_layers", int, **positive), n_heads=need("n_heads", int, **positive),
            d_model=need("d_model", int, **positive), key_size=need("key_size", int, **positive),
            mlp_hidden=need("mlp_hidden", int, **positive), max_seq_len=need("max_seq_len", int, **positive),
            causal=need("causal", bool), vocab=need("vocab", list, lambda v: len(v) > 0, "a non-empty list"),
            bos_token=need("bos_token", str),
            output_kind=need("output_kind", str, lambda v: v in OUTPUT_KINDS, f"one of {OUTPUT_KINDS}"),
            residual_labels=need("residual_labels", list), format_version=version,
        )
        if len(kw["residual_labels"]) != kw["d_model"]:
            raise self.error(f"field 'residual_labels' has {len(kw['residual_labels'])} labels, expected "
                             f"d_model = {kw['d_model']}")
        return kw

    def input_encoding(self, kw: dict) -> None:
        pairs = self.need("input_encoding", list, _is_pairs, "a list of [token, id] pairs")
        kw["input_encoding"] = {tok: i for tok, i in pairs}
        ids = sorted(kw["input_encoding"].values())
        if ids != list(range(len(pairs))) or len(kw["input_encoding"]) != len(pairs):
            raise self.error(f"field 'input_encoding' must map distinct tokens to ids 0..{len(pairs) - 1}, "
                             f"got {pairs!r}")
        for tok in [kw["bos_token"], *kw["vocab"]]:
            if tok not in kw["input_encoding"]:
                raise self.error(f"field 'input_encoding' has no id for token {tok!r}")

    def outputs(self, kw: dict) -> None:
        kw["output_dims"] = self.need("output_dims", list, lambda v: len(v) > 0 and all(
            isinstance(d, int) and 0 <= d < kw["d_model"] for d in v), "a non-empty list of residual dims")
        n = len(kw["output_dims"])
        if kw["output_kind"] == "categorical":
            pairs = self.need("output_encoding", list, _is_pairs, "a list of [id, value] pairs")
            kw["output_encoding"] = {i: v for i, v in pairs}
            if sorted(kw["output_encoding"]) != list(range(n)):
                raise self.error(f"field 'output_encoding' must give a value for each of the {n} output dims "
                                 f"(ids 0..{n - 1})")
        else:
            if n != 1:
                raise self.error(f"field 'output_dims' must hold one dim for a numerical output, got "
                                 f"{kw['output_dims']}")
            kw["output_label"] = self.raw.get("output_label")

    def attention(self, kw: dict) -> None:
        attn = self.need("attention", dict)
        scale = attn.get("scale")
        if not isinstance(scale, (int, float)) or not math.isclose(scale, 1 / math.sqrt(kw["key_size"])):
            raise self.error(f"field 'attention.scale' must be 1/sqrt(key_size) = "
                             f"{1 / math.sqrt(kw['key_size']):.6g} (tracr's scaling), got {scale!r}")
        kw["attention_scale"] = float(scale)
        kw["mask_value"] = float(attn.get("mask_value", -1e30))

    def extras(self, kw: dict) -> None:
        raw = self.raw
        if raw.get("layer_norm", False) or raw.get("activation", "relu") != "relu":
            raise self.error(f"only tracr's layout is supported (fields 'layer_norm': false, 'activation': "
                             f"'relu'), got {raw.get('layer_norm')!r}, {raw.get('activation')!r}")
        task_length = raw.get("task_length")
        if task_length is not None and not (isinstance(task_length, int) and 1 <= task_length <= kw["max_seq_len"]):
            raise self.error(f"field 'task_length' must be in 1..max_seq_len, got {task_length!r}")
        for name in ("pad_token", "task_length", "heads_per_layer", "mlp_active", "versions"):
            if raw.get(name) is not None:
                kw.setdefault(name, raw[name])

def _is_pairs(value) -> bool:
    return all(isinstance(p, list) and len(p) == 2 for p in value)


# ------------------------------------------------------------------------------------------ model
def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class TracrEmbed(nn.Module):
    def __init__(self, n_vocab: int, d_model: int):
        super().__init__()
        self.W_E = _weight(n_vocab, d_model)


class TracrPosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = _weight(n_ctx, d_model)


class TracrUnembed(nn.Module):
    def __init__(self, d_model: int, n_out: int):
        super().__init__()
        self.W_U = _weight(d_model, n_out)


class TracrAttention(nn.Module):
    """Weights of one attention sublayer: per-head W_Q/W_K/W_V (H, D, dk), W_O (H, dk, D)."""

    def __init__(self, cfg: TracrConfig):
        super().__init__()
        H, D, dk = cfg.n_heads, cfg.d_model, cfg.key_size
        self.W_Q, self.W_K, self.W_V = _weight(H, D, dk), _weight(H, D, dk), _weight(H, D, dk)
        self.b_Q, self.b_K, self.b_V = _weight(H, dk), _weight(H, dk), _weight(H, dk)
        self.W_O, self.b_O = _weight(H, dk, D), _weight(D)


class TracrMLP(nn.Module):
    def __init__(self, cfg: TracrConfig):
        super().__init__()
        self.W_in, self.b_in = _weight(cfg.d_model, cfg.mlp_hidden), _weight(cfg.mlp_hidden)
        self.W_out, self.b_out = _weight(cfg.mlp_hidden, cfg.d_model), _weight(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): ReLU MLP, no norm."""
        return F.relu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class TracrBlock(nn.Module):
    def __init__(self, cfg: TracrConfig):
        super().__init__()
        self.attn = TracrAttention(cfg)
        self.mlp = TracrMLP(cfg)


class TracrModel(nn.Module):
    """A compiled Tracr model: frozen weights, tracr's forward, and what a task needs to use it.

    State-dict names are the names in ``weights.safetensors``. ``self.config`` is a ``TracrConfig``
    (``model_type = "tracr"``, ``hidden_size``), so ``EdgeModel`` wraps it like an HF model.
    """

    def __init__(self, config: TracrConfig):
        super().__init__()
        self.config = config
        self.embed = TracrEmbed(config.n_vocab, config.d_model)
        self.pos_embed = TracrPosEmbed(config.n_ctx, config.d_model)
        self.blocks = nn.ModuleList(TracrBlock(config) for _ in range(config.n_layers))
        self.unembed = TracrUnembed(config.d_model, config.n_out)
        self.path: Path | None = None
        self.ground_truth: list[tuple[str, str]] | None = None  # the known circuit, if shipped

    # ------------------------------------------------------------------ what a task needs
    @property
    def program(self) -> str:
        return self.config.program

    @property
    def vocab(self) -> list:
        return list(self.config.vocab)

    @property
    def bos_token(self) -> str:
        return self.config.bos_token

    @property
    def bos_id(self) -> int:
        return self.config.input_encoding[self.config.bos_token]

    @property
    def output_kind(self) -> str:
        return self.config.output_kind

    @property
    def max_seq_len(self) -> int:
        """Most real tokens per input (BOS not counted)."""
        return self.config.max_seq_len

    @property
    def task_length(self) -> int:
        return self.config.task_length or self.config.max_seq_len

    def all_inputs(self, length: int | None = None) -> list[tuple]:
        """Every input of ``length`` real tokens (default ``task_length``), in vocabulary order."""
        length = self.task_length if length is None else length
        if not 1 <= length <= self.max_seq_len:
            raise ValueError(f"length must be in 1..{self.max_seq_len} (max_seq_len of {self.program!r}), got {length}")
        return list(itertools.product(self.config.vocab, repeat=length))

    def encode(self, tokens: Sequence) -> torch.Tensor:
        """Token sequences (without BOS) -> input_ids (B, 1 + T) long, BOS first.

        ``tokens``: one sequence (B = 1) or a list of sequences of equal length; tokens are vocab
        values (``1``, ``"x"``), not ids.
        """
        seqs = [tokens] if len(tokens) == 0 or not isinstance(tokens[0], (list, tuple)) else list(tokens)
        lengths = {len(s) for s in seqs}
        if len(lengths) != 1:
            raise ValueError(f"Tracr inputs in one batch must have one length (no padding), got lengths {sorted(lengths)}")
        n = lengths.pop()
        if not 1 <= n <= self.max_seq_len:
            raise ValueError(f"{self.program!r} takes 1..{self.max_seq_len} tokens per input, got {n}")
        enc = self.config.input_encoding
        ids = []
        for seq in seqs:
            bad = [t for t in seq if t not in enc or t in (self.config.bos_token, self.config.pad_token)]
            if bad:
                raise ValueError(f"tokens {bad!r} are not in the vocabulary of {self.program!r}: {self.vocab!r}")
            ids.append([self.bos_id] + [enc[t] for t in seq])
        return torch.tensor(ids, dtype=torch.long, device=self.embed.W_E.device)

    def decode(self, outputs: torch.Tensor) -> list[list]:
        """(B, T, n_out) model outputs -> per input, the decoded outputs at positions 1..T-1.

        Categorical: the output value of the argmax dim; numerical: the float value.
        """
        if outputs.dim() != 3 or outputs.shape[-1] != self.config.n_out:
            raise ValueError(f"outputs must have shape (batch, seq, {self.config.n_out}), got {tuple(outputs.shape)}")
        body = outputs[:, 1:].detach().float().cpu()
        if self.output_kind == "numerical":
            return body[..., 0].tolist()
        values = self.config.output_encoding
        return [[values[i] for i in row] for row in body.argmax(-1).tolist()]

    def reference_outputs(self) -> list[dict]:
        """The compiled JAX model's outputs shipped with the artifact: [{"input": [...], "output": [...]}]."""
        if self.path is None or not (self.path / REFERENCE_FILE).is_file():
            raise FileNotFoundError(f"no {REFERENCE_FILE} next to this model ({self.path})")
        path = self.path / REFERENCE_FILE
        data = json.loads(path.read_text())
        if data.get("program") != self.program or not isinstance(data.get("cases"), list):
            raise TracrArtifactError(f"{path}: expected the 'cases' of program {self.program!r}")
        return data["cases"]

    # ------------------------------------------------------------------ the plain forward
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Tracr's forward on input_ids (B, T) (BOS first) -> outputs (B, T, n_out)."""
        B, T = input_ids.shape
        x = self.embed.W_E[input_ids] + self.pos_embed.W_pos[:T]  # (B, T, D)
        for block in self.blocks:
            a = block.attn
            q, k, v = (torch.einsum("btd,hde->bhte", x, w) + b[None, :, None] for w, b in
                       ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V)))  # (B, H, T, dk)
            z = attend(q, k, v, self.config)  # (B, H, T, dk)
            x = x + torch.einsum("bhte,hed->btd", z, a.W_O) + a.b_O
            x = x + block.mlp(x)
        return x @ self.unembed.W_U


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: TracrConfig) -> torch.Tensor:
    """Tracr's attention on (B, H, T, dk) q/k/v: logits / sqrt(key_size), -1e30 on masked keys
    (causal models), softmax. Returns (B, H, T, dk). Built for the current length only."""
    T = q.shape[-2]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.key_size)  # (B, H, T, T)
    if cfg.causal:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        logits = torch.where(allowed, logits, torch.full_like(logits, cfg.mask_value))
    return logits.softmax(dim=-1) @ v


# ------------------------------------------------------------------------------------------ loading
def is_tracr_artifact(path) -> bool:
    """Whether ``path`` is a local folder whose ``config.json`` says ``"model_type": "tracr"``."""
    try:
        cfg = Path(path) / CONFIG_FILE
        return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "tracr"
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def load_tracr(path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
               **unsupported) -> TracrModel:
    """Load and validate a Tracr artifact folder into a frozen ``TracrModel`` (eval mode).

    Checks, each with an error naming the file and the field or tensor: required files present,
    ``format_version`` known, config fields present and consistent, every tensor present with the
    shape the config implies (and no unknown tensors), ``ground_truth.json`` (if present) a list of
    [writer, reader] pairs that are edges of this model's graph.
    """
    if unsupported:
        raise TypeError(f"a Tracr artifact takes only dtype and device, got {', '.join(sorted(unsupported))}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"Tracr artifact folder {root} does not exist")
    config = TracrConfig.from_json(root / CONFIG_FILE)
    config._name_or_path = str(root)
    wpath = root / WEIGHTS_FILE
    if not wpath.is_file():
        raise TracrArtifactError(f"{wpath} is missing (run_scripts/compile_tracr.py writes it)")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError) as err:
        raise TracrArtifactError(f"{wpath}: cannot be read as safetensors ({err})") from None
    expected = config.weight_shapes()
    for name, shape in expected.items():
        if name not in tensors:
            raise TracrArtifactError(f"{wpath}: tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise TracrArtifactError(
                f"{wpath}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but {root / CONFIG_FILE} "
                f"implies {shape} ({config.explain_shape(name)})")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise TracrArtifactError(f"{wpath}: unexpected tensors {extra} for n_layers={config.n_layers}")
    model = TracrModel(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    model.path = root
    gt = root / GROUND_TRUTH_FILE
    if gt.is_file():
        model.ground_truth = load_ground_truth(gt, Graph(TracrFamily.spec_of(config)))
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def load_ground_truth(path, graph: Graph) -> list[tuple[str, str]]:
    """An ``edges.json``-format file: [[writer, reader], ...], every pair an edge of ``graph``."""
    try:
        pairs = read_edge_pairs(path)
    except ValueError as err:
        raise TracrArtifactError(str(err)) from None
    out = []
    for i, pair in pairs:
        try:
            graph.edge_index(*pair)
        except KeyError as err:
            raise TracrArtifactError(f"{path}: entry {i}: {err.args[0]}") from None
        out.append((pair[0], pair[1]))
    return out


# ------------------------------------------------------------------------------------------ family
class TracrFamily(Family):
    """The per-head pieces of tracr's forward for ``EdgeModel`` (no norms anywhere)."""

    model_types = ("tracr",)

    def __init__(self, hf_model: TracrModel):
        if not isinstance(hf_model, TracrModel):
            raise TypeError(f"TracrFamily wraps a TracrModel (see load_tracr), got {type(hf_model).__name__}")
        super().__init__(hf_model)
        self.cfg = hf_model.config

    @staticmethod
    def spec_of(cfg: TracrConfig) -> GraphSpec:
        return GraphSpec(n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, pos_embeds=True, mlp=True)

    @property
    def spec(self) -> GraphSpec:
        return self.spec_of(self.cfg)

    def context(self, input_ids, attention_mask, position_ids) -> Context:
        B, T = input_ids.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"Tracr model {self.cfg.program!r} takes at most {self.cfg.n_ctx} positions "
                             f"(BOS + max_seq_len {self.cfg.max_seq_len}), got {T}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("Tracr models have no padding: give batches of one length with attention_mask=None")
        if not bool((input_ids[:, 0] == self.hf.bos_id).all()):
            raise ValueError(f"Tracr inputs start with BOS (id {self.hf.bos_id}); build them with model.hf.encode(tokens)")
        return super().context(input_ids, None, position_ids)

    def decoder_layers(self):
        return list(self.hf.blocks)

    def embed(self, input_ids, ctx):
        tok = self.hf.embed.W_E[input_ids]  # (B, T, D)
        pos = self.hf.pos_embed.W_pos[ctx.position_ids].expand_as(tok)
        return torch.stack([tok, pos])  # (2, B, T, D)

    def attention(self, layer, x, ctx):
        a, H, D = self.hf.blocks[layer].attn, self.cfg.n_heads, self.cfg.d_model
        q_in, k_in, v_in = self.split_readers(x)  # no norm in Tracr models

        def proj(x, w, b):  # (R, B, T, D) fp32 mix -> (B, H, T, dk)
            return project(x.to(ctx.dtype), w.transpose(0, 1).reshape(D, -1), b.reshape(-1), H)

        q, k, v = proj(q_in, a.W_Q, a.b_Q), proj(k_in, a.W_K, a.b_K), proj(v_in, a.W_V, a.b_V)
        z = attend(q, k, v, self.cfg)  # (B, H, T, dk)
        return head_outputs(z, a.W_O.reshape(-1, D), ctx)  # (H, B, T, D)

    def attn_constant(self, layer):
        return self.hf.blocks[layer].attn.b_O

    def mlp(self, layer, x, ctx):
        return self.hf.blocks[layer].mlp(x.to(ctx.dtype))

    def readout(self, x, ctx):
        return x.to(ctx.dtype) @ self.hf.unembed.W_U  # (B, T, n_out)


__all__ = ["TracrArtifactError", "TracrConfig", "TracrFamily", "TracrModel", "attend", "is_tracr_artifact",
           "load_ground_truth", "load_tracr"]
