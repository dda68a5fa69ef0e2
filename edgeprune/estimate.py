"""How much memory a pruning run needs per GPU, from its config alone (``edgeprune estimate CONFIG``).

Nothing is downloaded but a config.json (and not even that for the architectures in
``KNOWN_CONFIGS``), no weights are loaded: the model is built on the meta device, and one pruning
step of it (reference pass, masked forward, loss, backward) runs there under
``memtrace.LiveTensors``, which adds up the tensors the real step would allocate, op by op, and
reports their peak. That is the same code as ``edgeprune prune`` runs, so the figure follows the
implementation rather than a formula that could drift from it.

Per GPU, for N processes (``prune.batch_size`` is the global batch; each rank takes ceil(B / N) rows):

- weights: the frozen model in its dtype; under FSDP2 (N > 1) the rank's 1/N shard, plus the root
  (embeddings, final norm, read-out: FSDP2 keeps the root unsharded from forward to backward) and
  two decoder layers all-gathered at a time (the running one and the prefetched one);
- masks: the mask parameters with AdamW's two fp32 states (their gradients are in the step);
- step: the traced peak of the step's own tensors, writer states and their gradients included;
- cache: with ``prune.cache_corrupted``, every training example's corrupted writer states (each
  rank ends up caching every example it has seen, which over several epochs is all of them).

Not included: the CUDA context and the caching allocator's slack (on GPU add ~0.5-1 GiB), and
NCCL buffers. On meta tensors the attention is PyTorch's math attention; on CPU and GPU fused
kernels run instead and keep other tensors for the backward (the difference is of the order of
B x H x T x T per layer: 8% of the whole at the tiny sizes of the tests, less at real sizes).
``bench/step.py`` prints this estimate beside the measured peak, and ``tests/test_estimate.py``
checks it against a measured run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import buffers
from .config import ExperimentConfig
from .control import lagrangian
from .eval import kl_divergence, reference_and_corrupted
from .experiment import DTYPES, split_path
from .memtrace import LiveTensors
from .model import EdgeModel
from .models.tracr import is_tracr_artifact, load_tracr
from .tasks.jsonl import DEFAULT_SPLIT
from .tasks.tracr import tracr_examples

# Architectures users prune most, so that `estimate` works offline for them. Values are those of the
# models' published config.json files (only what shapes the model).
_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}
_CODELLAMA = {"model_type": "llama", "vocab_size": 32016, "max_position_embeddings": 16384, "rope_theta": 1e6}
_PYTHIA = {"model_type": "gpt_neox", "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000,
           "use_parallel_residual": True, "tie_word_embeddings": False}
_QWEN = {"vocab_size": 151936, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
_GEMMA2 = {"model_type": "gemma2", "vocab_size": 256000, "max_position_embeddings": 8192, "head_dim": 256,
           "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
           "final_logit_softcapping": 30.0}
_LLAMA32 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "intermediate_size": 8192, "num_key_value_heads": 8, "tie_word_embeddings": True}
KNOWN_CONFIGS = {
    "gpt2": {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {**_GPT2, "n_layer": 48, "n_head": 25, "n_embd": 1600},
    "codellama/CodeLlama-7b-hf": {**_CODELLAMA, "hidden_size": 4096, "intermediate_size": 11008,
                                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "codellama/CodeLlama-13b-hf": {**_CODELLAMA, "hidden_size": 5120, "intermediate_size": 13824,
                                   "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "codellama/CodeLlama-34b-hf": {**_CODELLAMA, "vocab_size": 32000, "hidden_size": 8192,
                                   "intermediate_size": 22016, "num_hidden_layers": 48,
                                   "num_attention_heads": 64, "num_key_value_heads": 8},
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096,
                                 "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "meta-llama/Meta-Llama-3-8B": {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 8192,
                                   "rope_theta": 500000.0, "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    "meta-llama/Llama-3.2-1B": {**_LLAMA32, "hidden_size": 2048, "head_dim": 64, "num_hidden_layers": 16,
                                "num_attention_heads": 32},
    "meta-llama/Llama-3.2-3B": {**_LLAMA32, "hidden_size": 3072, "head_dim": 128, "num_hidden_layers": 28,
                                "num_attention_heads": 24},
    "meta-llama/Llama-3.1-8B": {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072,
                                "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}, "hidden_size": 4096,
                                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                "num_key_value_heads": 8},
    "EleutherAI/pythia-160m": {**_PYTHIA, "vocab_size": 50304, "hidden_size": 768, "intermediate_size": 3072,
                               "num_hidden_layers": 12, "num_attention_heads": 12},
    "EleutherAI/pythia-1.4b": {**_PYTHIA, "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 8192,
                               "num_hidden_layers": 24, "num_attention_heads": 16},
    "EleutherAI/pythia-6.9b": {**_PYTHIA, "vocab_size": 50432, "hidden_size": 4096, "intermediate_size": 16384,
                               "num_hidden_layers": 32, "num_attention_heads": 32},
    "Qwen/Qwen2.5-0.5B": {**_QWEN, "model_type": "qwen2", "max_position_embeddings": 32768, "hidden_size": 896,
                          "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                          "num_key_value_heads": 2, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B": {**_QWEN, "model_type": "qwen2", "vocab_size": 152064, "max_position_embeddings": 131072,
                        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "Qwen/Qwen3-0.6B": {**_QWEN, "model_type": "qwen3", "max_position_embeddings": 40960, "hidden_size": 1024,
                        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                        "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN, "model_type": "qwen3", "max_position_embeddings": 40960, "hidden_size": 4096,
                      "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
    "microsoft/Phi-3-mini-4k-instruct": {"model_type": "phi3", "vocab_size": 32064, "max_position_embeddings": 4096,
                                         "rope_theta": 10000.0, "sliding_window": 2047, "hidden_size": 3072,
                                         "intermediate_size": 8192, "num_hidden_layers": 32,
                                         "num_attention_heads": 32, "num_key_value_heads": 32,
                                         "tie_word_embeddings": False},
    "google/gemma-2-2b": {**_GEMMA2, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                          "num_attention_heads": 8, "num_key_value_heads": 4},
    "google/gemma-2-9b": {**_GEMMA2, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                          "num_attention_heads": 16, "num_key_value_heads": 8},
    "allenai/OLMo-2-1124-7B": {"model_type": "olmo2", "vocab_size": 100352, "max_position_embeddings": 4096,
                               "rope_theta": 500000.0, "hidden_size": 4096, "intermediate_size": 11008,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                               "tie_word_embeddings": False},
}
for _name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
    KNOWN_CONFIGS[f"openai-community/{_name}"] = KNOWN_CONFIGS[_name]


@dataclass
class Architecture:
    """An edge-masked model without weights (meta device; a compiled Tracr model is tiny and real)."""

    model: object  # EdgeModel
    source: str  # where the config came from
    params: int  # frozen parameters (tied ones once)
    layer_params: int  # the largest decoder layer
    root_params: int  # everything outside the decoder layers: embeddings, final norm, read-out


def hf_config(name_or_path: str):
    """The transformers config of a local directory, a config.json file, a known hub id, or (downloading
    config.json only) any other hub id. Returns (config, source)."""
    from transformers import AutoConfig  # heavy: only commands that read a config pay for transformers

    path = Path(name_or_path)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"{path}: a config.json needs a 'model_type' field")
        data = dict(data)
        return AutoConfig.for_model(data.pop("model_type"), **data), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json in this directory")
        return AutoConfig.from_pretrained(str(path)), str(path / "config.json")
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith(".json"):
        raise FileNotFoundError(f"{name_or_path}: no such file or directory (a model directory or a config.json)")
    if name_or_path in KNOWN_CONFIGS:
        data = dict(KNOWN_CONFIGS[name_or_path])
        return AutoConfig.for_model(data.pop("model_type"), **data), "edgeprune's table of known configs"
    try:
        return AutoConfig.from_pretrained(name_or_path), f"the hub ({name_or_path}/config.json)"
    except Exception as err:  # offline, private, or no such repository
        raise ValueError(f"model {name_or_path!r}: could not get its config.json ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). Pass a local directory or a "
                         f"config.json file with --model; known offline: {', '.join(sorted(KNOWN_CONFIGS))}") from None


def meta_model(config):
    """The HF causal LM of ``config`` on the meta device (no weights, no memory), built quietly."""
    # heavy: only commands that build a model pay for transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_architecture(cfg: ExperimentConfig) -> Architecture:
    """The model of ``cfg.model`` built on the meta device (no weights), wrapped as an EdgeModel."""
    m = cfg.model
    dtype = DTYPES[m.dtype]
    kwargs = {"node_masks": m.node_masks}
    if m.ablation is not None:
        kwargs["ablation"] = m.ablation
    if is_tracr_artifact(m.name_or_path):
        model = EdgeModel.from_hf(load_tracr(m.name_or_path, dtype=dtype), **{"ablation": "zero", **kwargs})
        source = str(Path(m.name_or_path) / "config.json")
    else:
        config, source = hf_config(m.name_or_path)
        model = EdgeModel.from_hf(meta_model(config).to(dtype), model_id=m.name_or_path, **kwargs)
    hf = model.hf
    params = sum(p.numel() for p in hf.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.family.decoder_layers()]
    return Architecture(model, source, params, max(layers, default=0), params - sum(layers))


class SyntheticBatch:
    """What the pruning step reads from a batch: B x T tokens (zeros, or ``tokens`` in every row),
    ``loss_positions`` per row at the end."""

    def __init__(self, B: int, T: int, loss_positions: int, device: torch.device, tokens: list[int] | None = None):
        if tokens is None:
            self.input_ids = torch.zeros(B, T, dtype=torch.long, device=device)
        else:
            self.input_ids = torch.tensor([tokens] * B, dtype=torch.long).to(device)
        self.corrupted_input_ids = torch.zeros_like(self.input_ids)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.corrupted_attention_mask = torch.ones_like(self.input_ids)
        self.loss_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        if device.type != "meta":  # (on meta the tracer is told how many rows the mask selects)
            self.loss_mask[:, T - loss_positions:] = True


def trace_step(model, B: int, T: int, *, loss_positions: int = 1, loss: str = "kl",
               tokens: list[int] | None = None) -> int:
    """Peak bytes of the tensors one pruning step allocates (``edgeprune.prune``'s step body) for a
    B x T batch with ``loss_positions`` loss positions per example. Runs on the model's device: meta
    traces for free; real tensors run the step for real (used to check the meta trace). The model is
    left in eval mode with no mask gradients."""
    if not 1 <= loss_positions <= T:
        raise ValueError(f"loss positions per example must be in 1..{T}, got {loss_positions}")
    batch = SyntheticBatch(B, T, loss_positions, model.device, tokens)
    model.train()
    generators = [(m, m.generator) for m in (model.edge_masks, model.node_masks) if m is not None]
    for masks, _ in generators:
        masks.generator = None  # the model's device may be meta: no seeded generator there
    buffers.clear()  # buffers kept from earlier steps are allocated again, inside the count
    try:
        with LiveTensors(selected_rows=B * loss_positions) as mem:
            ref, corrupted = reference_and_corrupted(model, batch, batch.loss_mask)
            logits = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted,
                           select=batch.loss_mask).logits
            del corrupted
            fit = (logits.float() - ref.float()).pow(2).mean() if loss == "mse" else kl_divergence(ref, logits).mean()
            lam = torch.zeros(2, device=model.device, requires_grad=True)
            total = fit + lagrangian(model.edge_masks.expected_sparsity(), 0.5, lam)
            total.backward()
            del total, fit, logits, ref
    finally:
        for masks, gen in generators:
            masks.generator, masks.log_alpha.grad = gen, None
        model.eval()
    return mem.peak


def trace_hf(hf, B: int, T: int) -> int:
    """Peak bytes of HF's own forward+backward of a B x T batch (gradient to the input embeddings,
    next-token loss on every position): the yardstick of ``bench/step.py``."""
    device = next(hf.parameters()).device
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    with LiveTensors() as mem:
        emb = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = hf(inputs_embeds=emb).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        del loss, logits, emb
    return mem.peak


@dataclass
class Row:
    gpus: int
    batch: int  # per GPU
    weights: int
    masks: int
    step: int
    cache: int | None
    writer_states: int  # one fp32 copy of this rank's writer states (the difference buffer)

    @property
    def total(self) -> int:
        return self.weights + self.masks + self.step + (self.cache or 0)


@dataclass
class Report:
    model: str
    source: str
    dtype: str
    params: int
    graph: str
    masks: int  # learned mask parameters (edges, + writers with node masks)
    batch: int  # global
    seq: int
    loss_positions: int
    ablation: str
    checkpointing: bool
    cache_examples: int | None
    seq_source: str = "data.max_length: an upper bound, batches are padded to their longest example"
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "rows"}
        out["rows"] = [{**r.__dict__, "total": r.total} for r in self.rows]
        return out


def _train_examples(cfg: ExperimentConfig) -> int | None:
    """How many training examples the config's data has (None where the data is not there): the lines
    of the split's file in a directory, or the lines of a single JSONL file that belong to the split."""
    try:
        path = split_path(cfg.data, cfg.data.train_split)
    except FileNotFoundError:
        return None
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    if Path(cfg.data.path).is_dir():
        return len(lines)
    split = cfg.data.train_split
    return sum(1 for line in lines if json.loads(line).get("split", DEFAULT_SPLIT) == split)


def _batch_shape(cfg: ExperimentConfig, arch: Architecture, seq_len: int | None, loss_positions: int | None,
                 examples: int | None) -> tuple[int, int, int | None, list | None, str | None]:
    """(tokens per example, loss positions, training examples, a real example's tokens where the model
    checks its input (Tracr: BOS first), where the length came from): given, or the Tracr task's own."""
    tokens = None
    seq_source = "--seq-len" if seq_len else None
    if cfg.data.path == "tracr":
        task = tracr_examples(arch.model.hf)
        seq_len = seq_len or len(task[0].input_ids)
        loss_positions = loss_positions or len(task[0].loss_positions)
        examples = examples or len(task)
        tokens = task[0].input_ids
        seq_source = seq_source or "the Tracr task's length, BOS included"
    T = seq_len or cfg.data.max_length
    if not T:
        raise ValueError("data.max_length is not set: give the sequence length with --seq-len")
    return T, loss_positions or 1, examples, tokens, seq_source


def _weight_bytes(arch: Architecture, n: int, nbytes: int) -> int:
    """Weights per GPU: all of them on one; on n, a 1/n shard plus the root and two gathered layers."""
    if n == 1:
        return arch.params * nbytes
    return math.ceil(arch.params / n) * nbytes + (arch.root_params + 2 * arch.layer_params) * nbytes


def estimate(cfg: ExperimentConfig, gpus: list[int], *, seq_len: int | None = None, loss_positions: int | None = None,
             examples: int | None = None, arch: Architecture | None = None, progress: bool = False) -> Report:
    """Per-GPU memory of ``edgeprune prune`` with ``cfg`` on each number of GPUs in ``gpus``.

    The batch shape: ``seq_len`` (default ``data.max_length``) tokens with ``loss_positions``
    (default 1) loss positions per example; for a Tracr task (``data.path: tracr``) both default to
    the task's own (every input has the same length, the loss is on every output position).
    """
    arch = arch or load_architecture(cfg)
    T, loss_positions, examples, tokens, seq_source = _batch_shape(cfg, arch, seq_len, loss_positions, examples)
    if any(n < 1 for n in gpus):
        raise ValueError(f"GPU counts must be >= 1, got {gpus}")
    model = arch.model
    model.use_step_settings(cfg.prune)
    g = model.graph
    D = model.hf.config.hidden_size
    vocab = getattr(model.hf.config, "vocab_size", None) or len(getattr(model.hf.config, "output_dims", []))
    nbytes = torch.finfo(model.dtype).bits // 8
    n_masks = g.num_edges + (g.num_writers if model.node_masks is not None else 0)
    cache_examples = None
    if cfg.prune.cache_corrupted:
        cache_examples = examples or _train_examples(cfg)
    report = Report(model=cfg.model.name_or_path, source=arch.source, dtype=cfg.model.dtype, params=arch.params,
                    graph=g.describe(), masks=n_masks, batch=cfg.prune.batch_size, seq=T,
                    loss_positions=loss_positions, ablation=model.ablation,
                    checkpointing=cfg.prune.activation_checkpointing, cache_examples=cache_examples)
    if seq_source:
        report.seq_source = seq_source
    traced: dict[int, int] = {}

    bar = tqdm(total=len({math.ceil(cfg.prune.batch_size / n) for n in gpus}), desc="estimate: tracing a step",
               unit="batch size", disable=not progress, leave=False)
    for n in gpus:
        b = math.ceil(cfg.prune.batch_size / n)
        if b not in traced:
            traced[b] = trace_step(model, b, T, loss_positions=loss_positions, loss=cfg.data.loss, tokens=tokens)
            bar.update(1)
        cache = None
        if cache_examples is not None:  # per example: its corrupted states (interchange) and reference logits
            states = g.num_writers * T * D if model.ablation == "interchange" else 0
            cache = cache_examples * (states + loss_positions * vocab) * nbytes
        report.rows.append(Row(gpus=n, batch=b, weights=_weight_bytes(arch, n, nbytes), masks=n_masks * 4 * 3,
                               step=traced[b], cache=cache, writer_states=g.num_writers * b * T * D * 4))
    bar.close()
    if cfg.prune.cache_corrupted and cache_examples is None:
        report.notes.append(f"prune.cache_corrupted: the cache needs the number of training examples "
                            f"({cfg.data.path} not found): give it with --examples; not counted")
    return report


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def format_report(r: Report) -> str:
    lines = [
        f"model        {r.model} ({f'{r.params / 1e6:,.1f}M' if r.params >= 1e6 else f'{r.params:,}'} parameters, "
        f"{r.dtype}; config from {r.source})",
        f"graph        {r.graph}",
        f"masks        {r.masks:,} learned mask parameters (fp32, AdamW)",
        f"step         global batch {r.batch} x {r.seq} tokens ({r.seq_source}), {r.loss_positions} loss "
        f"position(s) per example, "
        f"{r.ablation} ablation" + (", activation checkpointing" if r.checkpointing else ""),
        "",
        "| GPUs | batch / GPU | weights | masks + AdamW | step peak | (writer states, fp32) "
        + ("| corrupted cache " if r.cache_examples is not None else "") + "| total / GPU |",
        "|---:|---:|---:|---:|---:|---:|" + ("---:|" if r.cache_examples is not None else "") + "---:|",
    ]
    for row in r.rows:
        cache = f" {_size(row.cache)} |" if r.cache_examples is not None else ""
        lines.append(f"| {row.gpus} | {row.batch} | {_size(row.weights)} | {_size(row.masks)} | {_size(row.step)} | "
                     f"({_size(row.writer_states)}) |{cache} {_size(row.total)} |")
    lines += [
        "",
        "step peak: tensors of one pruning step (reference pass, masked forward, backward), traced op by op "
        "on the meta device; it includes the writer states in parentheses. Weights under FSDP2 (GPUs > 1): the "
        "rank's shard + the unsharded root + two gathered layers.",
        "Not included: CUDA context and allocator slack (add ~0.5-1 GiB per GPU), NCCL buffers.",
    ]
    if r.cache_examples is not None:
        lines.append(f"corrupted cache (prune.cache_corrupted): {r.cache_examples} training examples x (writers x "
                     f"{r.seq} tokens x d_model under interchange + the reference logits at the loss positions) "
                     f"in {r.dtype}, held on every rank.")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


class WontFit(RuntimeError):
    """A pruning run whose estimated memory exceeds what the device has free."""


KNOBS = ("lower prune.batch_size (now {batch})", "model.dtype: bfloat16 (now {dtype})",
         "prune.activation_checkpointing: true", "more GPUs (torchrun --nproc_per_node N: FSDP2 shards the weights)")


def advice(cfg: ExperimentConfig) -> str:
    """The knobs that lower a run's memory, with the config's current values."""
    knobs = [k.format(batch=cfg.prune.batch_size, dtype=cfg.model.dtype) for k in KNOBS]
    if cfg.prune.activation_checkpointing:
        knobs.remove("prune.activation_checkpointing: true")
    if cfg.model.dtype != "float32":
        knobs = [k for k in knobs if not k.startswith("model.dtype")]
    if cfg.prune.cache_corrupted:
        knobs.insert(0, "prune.cache_corrupted: false")
    return "; ".join(knobs)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors: CUDA's free device memory, or the host's MemAvailable (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(cfg: ExperimentConfig, model, device: torch.device, world_size: int = 1,
               free: int | None = None) -> int | None:
    """Refuse, before the first step, a run whose step cannot fit in the device's free memory.

    ``model``: the loaded EdgeModel (its weights already take their memory, so they are not counted
    again). On CUDA the step is traced on the meta device (``trace_step``, as ``edgeprune estimate``);
    on CPU the check is the analytic floor of three fp32 copies of the writer states (states, their
    gradients, one mix), since a traced estimate there costs more than the rare refusal saves.
    Returns the bytes the step was estimated to need (None when the free memory is unknown).
    Raises WontFit naming the knobs."""
    free = free_bytes(device) if free is None else free
    if free is None:
        return None
    B = math.ceil(cfg.prune.batch_size / world_size)
    T = cfg.data.max_length or 64
    g, D = model.graph, model.hf.config.hidden_size
    n_masks = model.edge_masks.n + (g.num_writers if model.node_masks is not None else 0)
    need = n_masks * 4 * 4  # masks, their gradients, AdamW's two moments
    if device.type == "cuda":
        need += trace_step(meta_copy(cfg, model), B, T, loss=cfg.data.loss)
    else:
        need += 3 * g.num_writers * B * T * D * 4
    if need > free:
        raise WontFit(f"this run needs about {need / 2**30:.2f} GiB for its step on {device} (batch {B} x {T} "
                      f"tokens, {g.describe()}) but {free / 2**30:.2f} GiB are free: {advice(cfg)}. "
                      f"`edgeprune estimate CONFIG` gives the figures per setting")
    return need


def meta_copy(cfg: ExperimentConfig, model):
    """``model``'s architecture on the meta device (no memory), with its masks' shape and settings."""
    arch = load_architecture(cfg)
    arch.model.use_step_settings(cfg.prune)
    if model.spans is not None:
        arch.model.set_spans(model.spans, mode=model.span_mode)
    return arch.model
