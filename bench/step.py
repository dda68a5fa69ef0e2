"""Time and memory of one pruning step against plain HF forward+backward on the same batch.

    python bench/step.py                      # GPT-2-small and Llama-GQA size, batch 8x32 and 32x64
    python bench/step.py --quick              # GPT-2 small, 8x32, few repeats, no 32x64
    python bench/step.py --models gpt2 --shapes 8x32 --repeats 7 --no-memory

Models are random-init at realistic size (nothing is downloaded): ``gpt2`` is GPT-2 small
(12 layers, 12 heads, d 768, vocab 50257); ``llama`` a Llama of similar size with grouped-query
attention (12 layers, 12 query / 4 KV heads, d 768, MLP 2048, vocab 32000); ``pythia`` Pythia-160M
(12 layers, 12 heads, d 768, MLP 3072, vocab 50304, parallel residual, rotary on a quarter of each
head); ``qwen3`` the Llama shape with Qwen3's per-head q/k norms (head_dim 64); ``phi3`` the Llama
shape with Phi-3's fused qkv_proj / gate_up_proj, 12 KV heads (multi-head, as Phi-3-mini), vocab 32064;
``gemma2`` the Llama shape as Gemma-2 (head_dim 64, post-norms, attention and final-logit soft-caps,
alternating sliding-window layers of window 4096, tied embeddings); ``smollm2`` SmolLM2-135M's config
(30 layers, 9 query / 3 KV heads, d 576, MLP 1536, vocab 49152, tied); ``qwen2.5-0.5b`` and
``llama3.2-1b`` those checkpoints' shapes (for ``--shapes 4x32`` checks of ``edgeprune estimate``);
``--config DIR`` any HF config.json (a checkpoint directory: its shape with random weights).

Time: in one process, the medians over ``--repeats`` of (a) a full pruning step as ``edgeprune
prune`` runs it (reference + corrupted pass, masked forward with sampled masks and the loss,
backward, clipping and both optimisers) and (b) HF's own forward+backward of the same batch with
gradient flowing to the input embeddings (``inputs_embeds.requires_grad_()``, weights frozen,
next-token cross-entropy over every position). The two are interleaved so machine noise hits both
alike; the ratio is step / HF. Beside it: the ratio of each side's fastest run (on a shared machine
other tenants only ever add time, so the minima are the steadier estimate of the intrinsic ratio),
and the step's backward against HF's. The step's parts are timed inside the same steps.

Memory: each figure comes from a fresh subprocess that builds the model, runs two steps and
reports the peak above the process after loading the model and the batch: peak RSS on CPU
(``VmHWM`` reset through ``/proc/self/clear_refs``), ``torch.cuda.max_memory_allocated`` on GPU.
On CPU the subprocesses run with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``): by default glibc raises it up to 32 MiB as blocks are freed, keeps
freed tensors of that size in its heap, and RSS then counts fragmentation rather than live tensors
(it inflates both figures; ``--malloc-default`` measures that way).
Time and memory are measured with PyTorch's large CPU allocations on transparent huge pages, as the
CLI runs (``edgeprune.buffers.use_huge_pages``); ``--no-huge-pages`` measures without (4 KiB pages:
the mix's fresh per-layer tensors fault page by page). Time is measured with glibc carving every
block from its heap and keeping its free top, as the CLI runs (``edgeprune.buffers.keep_freed_heap``:
HF's step gains from it as much as ours); ``--no-keep-heap`` measures with glibc's own policy, and any
``MALLOC_*`` threshold in the environment with that one. The system CPU time and page faults of each
are printed beside the times.
``writers`` is the analytical size of one copy of the writer states, writers x B x T x D x bytes;
the target is ``step peak <= HF peak + 2 x writers``. ``estimate`` is what ``edgeprune estimate``
reports for the same step, traced on the meta device without weights (``edgeprune/estimate.py``):
the measured peak checks it.

FLOPs: each part of the step and HF's fwd+bwd are counted by ``torch.utils.flop_counter`` on the meta
device; step FLOPs / HF FLOPs is the time ratio the step would have if it ran at HF's FLOP rate (the
mix's skinny GEMMs run at a lower rate than HF's large ones), the rates are printed beside.

The loss sits on the last position of every example (one predicted token, as in IOI-style tasks).

``--positions spans`` also times the position-aware step (``model.positions: spans``; one mask per
(edge, span), ``--spans`` spans of equal length over the T positions) against the shared-mask step on
the same batch, interleaved, and measures its peak memory the same way: the ratios printed are
position-aware / shared.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeprune import EdgeModel, buffers, mixing  # noqa: E402
from edgeprune import model as edge_model  # noqa: E402
from edgeprune.models import common  # noqa: E402
from edgeprune.cache import ReferenceCache  # noqa: E402
from edgeprune.estimate import trace_hf, trace_step  # noqa: E402
from edgeprune.model import KEEP_INPUTS  # noqa: E402
from edgeprune.eval import kl_divergence, reference_and_corrupted  # noqa: E402
from edgeprune.control import lagrangian  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODELS = ("gpt2", "llama", "pythia", "qwen3", "phi3", "gemma2", "smollm2", "qwen2.5-0.5b", "llama3.2-1b")


def build_hf(kind: str, layers: int | None, dtype: torch.dtype, device: torch.device, tiny: bool = False):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg, cls = GPT2Config(n_layer=layers or 12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024), \
            GPT2LMHeadModel
    elif kind == "llama":
        cfg, cls = LlamaConfig(num_hidden_layers=layers or 12, num_attention_heads=12, num_key_value_heads=4,
                               hidden_size=768, intermediate_size=2048, vocab_size=32000,
                               max_position_embeddings=1024, tie_word_embeddings=False), LlamaForCausalLM
    elif kind == "pythia":  # Pythia-160M
        cfg, cls = GPTNeoXConfig(num_hidden_layers=layers or 12, num_attention_heads=12, hidden_size=768,
                                 intermediate_size=3072, vocab_size=50304, max_position_embeddings=2048,
                                 rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False), \
            GPTNeoXForCausalLM
    elif kind == "qwen3":
        cfg, cls = Qwen3Config(num_hidden_layers=layers or 12, num_attention_heads=12, num_key_value_heads=4,
                               head_dim=64, hidden_size=768, intermediate_size=2048, vocab_size=32000,
                               max_position_embeddings=1024, tie_word_embeddings=False), Qwen3ForCausalLM
    elif kind == "phi3":  # multi-head like Phi-3-mini
        cfg, cls = Phi3Config(num_hidden_layers=layers or 12, num_attention_heads=12, num_key_value_heads=12,
                              hidden_size=768, intermediate_size=2048, vocab_size=32064, max_position_embeddings=1024,
                              pad_token_id=None, bos_token_id=None, eos_token_id=None,
                              tie_word_embeddings=False), Phi3ForCausalLM
    elif kind == "gemma2":  # soft-capped attention: explicit scores (common.softcap_attention), HF eager
        from transformers import Gemma2Config, Gemma2ForCausalLM
        cfg, cls = Gemma2Config(num_hidden_layers=layers or 12, num_attention_heads=12, num_key_value_heads=4,
                                head_dim=64, hidden_size=768, intermediate_size=2048, vocab_size=32000,
                                max_position_embeddings=1024, query_pre_attn_scalar=64, sliding_window=4096,
                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0), Gemma2ForCausalLM
    elif kind == "smollm2":  # SmolLM2-135M's config (30 layers, 9 query / 3 KV heads, d 576; 70,651 edges)
        cfg, cls = LlamaConfig(num_hidden_layers=layers or 30, num_attention_heads=9, num_key_value_heads=3,
                               hidden_size=576, intermediate_size=1536, vocab_size=49152,
                               max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                               tie_word_embeddings=True), LlamaForCausalLM
    elif kind == "qwen2.5-0.5b":  # Qwen2.5-0.5B's shape (24 layers, 14 query / 2 KV heads, d 896, q/k/v biases)
        from transformers import Qwen2Config, Qwen2ForCausalLM
        cfg, cls = Qwen2Config(num_hidden_layers=layers or 24, num_attention_heads=14, num_key_value_heads=2,
                               hidden_size=896, intermediate_size=4864, vocab_size=151936,
                               max_position_embeddings=32768, tie_word_embeddings=True), Qwen2ForCausalLM
    elif kind == "llama3.2-1b":  # Llama-3.2-1B's shape (16 layers, 32 query / 8 KV heads, d 2048)
        cfg, cls = LlamaConfig(num_hidden_layers=layers or 16, num_attention_heads=32, num_key_value_heads=8,
                               hidden_size=2048, intermediate_size=8192, vocab_size=128256,
                               max_position_embeddings=8192, rope_theta=500000.0, head_dim=64,
                               tie_word_embeddings=True), LlamaForCausalLM
    elif Path(kind).exists():  # a checkpoint directory or its config.json: its shape, random weights
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.from_pretrained(kind)
        if layers:
            cfg.num_hidden_layers = layers
        with torch.device("meta" if device.type == "meta" else "cpu"):
            model = AutoModelForCausalLM.from_config(shrink(cfg) if tiny else cfg)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    else:
        raise ValueError(f"unknown model {kind!r} ({', '.join(MODELS)}, or a directory with a config.json)")
    if tiny:
        cfg = shrink(cfg)
    with torch.device("meta" if device.type == "meta" else "cpu"):  # meta: no weights (the estimate)
        model = cls(cfg)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def shrink(cfg):
    """The same architecture at d 64, 4 heads (2 KV heads where grouped), head_dim 16, MLP 128, vocab 512:
    ``--tiny``, a dry run of the code (``bench/gpu_check.py --device cpu``), not a figure."""
    data = cfg.to_dict()
    if data["model_type"] == "gpt2":
        data.update(n_embd=64, n_head=4, vocab_size=512)
    else:
        kv = data.get("num_key_value_heads") or data["num_attention_heads"]
        data.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=4 if kv == data["num_attention_heads"]
                    else 2, head_dim=16, intermediate_size=128, vocab_size=512)
        if "query_pre_attn_scalar" in data:
            data["query_pre_attn_scalar"] = 16
    data.pop("model_type", None)
    return type(cfg)(**data)


def count_flops(kind: str, shape: tuple[int, int], args) -> dict:
    """FLOPs of each part of the step and of HF's fwd+bwd, counted by ``torch.utils.flop_counter`` on the
    meta device (matmuls and attention: what the time goes into). Their ratio is the step/HF time ratio
    the step would reach at HF's own FLOP rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from edgeprune.estimate import SyntheticBatch
    from edgeprune.memtrace import LiveTensors

    B, T = shape
    hf = build_hf(kind, args.layers, DTYPES[args.dtype], torch.device("meta"), getattr(args, "tiny", False))
    model = EdgeModel.from_hf(hf).train()
    model.activation_checkpointing = args.checkpointing  # its recomputation counts too
    batch = SyntheticBatch(B, T, 1, torch.device("meta"))
    out = {}
    with LiveTensors(selected_rows=B):  # answers the loss mask's row count on meta
        with FlopCounterMode(display=False) as fc:
            ref, corrupted = reference_and_corrupted(model, batch, batch.loss_mask)
        out["reference"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            logits = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted,
                           select=batch.loss_mask).logits
            loss = kl_divergence(ref, logits).mean()
        out["masked_fwd"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            loss.backward()
        out["backward"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        HFStep(hf, batch)(lambda: 0.0, item=False)
    out["hf"] = fc.get_total_flops()
    return out


def estimate_peaks(kind: str, shape: tuple[int, int], args) -> tuple[int, int]:
    """``edgeprune estimate``'s traced peaks (meta device, no weights) of the step and of HF's fwd+bwd."""
    hf = build_hf(kind, args.layers, DTYPES[args.dtype], torch.device("meta"), getattr(args, "tiny", False))
    model = EdgeModel.from_hf(hf)
    model.activation_checkpointing = args.checkpointing
    if torch.device(args.device).type == "cpu":  # the run measured keeps what a CPU run keeps
        model.keep_inputs = KEEP_INPUTS
    return trace_step(model, *shape), trace_hf(hf, *shape)


class Batch:
    """What the pruning loop reads from a task batch; random tokens, the loss on the last position."""

    def __init__(self, B: int, T: int, vocab: int, device: torch.device):
        gen = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)
        self.corrupted_input_ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)
        self.attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
        self.corrupted_attention_mask = self.attention_mask.clone()
        self.loss_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.loss_mask[:, -1] = True
        self.span_ids = None  # set_spans: (B, T) long, for position-aware masks


def span_names(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def positional(model: EdgeModel, batch: Batch, n_spans: int) -> EdgeModel:
    """``model`` with position-aware masks: ``n_spans`` spans of (nearly) equal length over the positions."""
    B, T = batch.input_ids.shape
    model.set_spans(span_names(n_spans))
    batch.span_ids = (torch.arange(T, device=batch.input_ids.device) * n_spans // T).expand(B, T).contiguous()
    return model


class PruneStep:
    """The body of the loop in ``edgeprune.prune.prune``, timed per part."""

    def __init__(self, model: EdgeModel, batch: Batch, cache: bool = False, checkpointing: bool = False,
                 sparsity: float | str | None = None):
        self.model, self.batch = model, batch
        self.reference = ReferenceCache(enabled=cache)  # warm after the first step: later epochs' cost
        model.activation_checkpointing = checkpointing
        model.train()
        model.edge_masks.generator = torch.Generator(device=model.device).manual_seed(0)
        with torch.no_grad():
            model.edge_masks.log_alpha.fill_(3.0)
            if isinstance(sparsity, str):  # a run's masks.safetensors: its learned log-alphas
                saved = load_file(sparsity)
                if saved.get("edge_log_alpha", torch.empty(0)).shape != model.edge_masks.log_alpha.shape:
                    raise SystemExit(f"--masks {sparsity}: no edge_log_alpha of shape "
                                     f"{tuple(model.edge_masks.log_alpha.shape)} (another model's run?)")
                model.edge_masks.log_alpha.copy_(saved["edge_log_alpha"])
            elif sparsity:  # a pruned state: a random (1 - sparsity) of the edges kept, the rest far below 0
                gen = torch.Generator().manual_seed(3)
                pruned = torch.rand(model.edge_masks.log_alpha.shape, generator=gen) < sparsity
                model.edge_masks.log_alpha[pruned.to(model.device)] = -10.0
        self.lam = torch.nn.Parameter(torch.zeros(2, device=model.device))
        self.opt = torch.optim.AdamW([model.edge_masks.log_alpha], lr=0.1)
        self.lambda_opt = torch.optim.AdamW([self.lam], lr=0.1, maximize=True)

    def __call__(self, clock) -> dict:
        model, batch = self.model, self.batch
        t = {}
        sel = batch.loss_mask
        ref_logits, corrupted = self.reference(model, batch, sel)  # (N, V) at the loss positions
        t["reference"] = clock()
        logits = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted, select=sel,
                       span_ids=batch.span_ids if model.spans is not None else None).logits
        del corrupted  # the backward does not need the corrupted states
        fit = kl_divergence(ref_logits, logits).mean()
        loss = fit + lagrangian(model.edge_masks.expected_sparsity(), 0.5, self.lam)
        loss.item()
        t["masked_fwd"] = clock()
        self.opt.zero_grad(set_to_none=True)
        self.lambda_opt.zero_grad(set_to_none=True)
        loss.backward()
        t["backward"] = clock()
        torch.nn.utils.clip_grad_norm_([model.edge_masks.log_alpha], 1.0)
        self.opt.step()
        self.lambda_opt.step()
        t["optimiser"] = clock()
        return t


class WithSetting:
    """``step`` run with ``owner.name`` set to ``value`` (restored after each step): the same step with
    one of the mix's paths switched, to time interleaved against it. ``--vs-dense-mix``:
    ``mixing.SPARSE_MIN`` = inf, every writer mixed and every dL/dz computed; ``--vs-groups K``:
    ``model.GROUP_LAYERS`` = K, layers mixing in groups of K (1: each alone); ``--vs-keep SHARE``:
    the EdgeModel's ``keep_inputs`` = SHARE (0: every layer's Q/K/V inputs rebuilt in the backward,
    as on a GPU; a large share: none); ``--vs-unfused``: ``mixing.FUSE_MIN`` = inf, the backward's passes
    over the differences made apart (``mixing.WriterStates._fused_grad``); ``--vs MODULE.NAME=VALUE``:
    any setting of an edgeprune module (``parse_setting``)."""

    def __init__(self, step, owner, name: str, value):
        self.step, self.owner, self.name, self.value = step, owner, name, value

    def __call__(self, clock) -> dict:
        saved = getattr(self.owner, self.name)
        setattr(self.owner, self.name, self.value)
        try:
            return self.step(clock)
        finally:
            setattr(self.owner, self.name, saved)


class HFStep:
    """HF forward+backward with gradient to the input embeddings (the weights stay frozen)."""

    def __init__(self, hf, batch: Batch):
        self.hf, self.batch = hf, batch

    def __call__(self, clock, item: bool = True) -> dict:
        ids = self.batch.input_ids
        emb = self.hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        mask = self.batch.attention_mask if item else None  # (on meta: no data to look at; all ones anyway)
        logits = self.hf(inputs_embeds=emb, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if item:
            loss.item()
        t = {"forward": clock()}
        loss.backward()
        t["backward"] = clock()
        return t


def device_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA is synchronised first)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def make_clock(device: torch.device):
    last = [time.perf_counter()]

    def clock() -> float:
        now = device_time(device)
        dt, last[0] = now - last[0], now
        return dt

    return clock


def setup(kind, shape, args, device):
    B, T = shape
    hf = build_hf(kind, args.layers, DTYPES[args.dtype], device, getattr(args, "tiny", False))
    batch = Batch(B, T, hf.config.vocab_size, device)
    return hf, batch


def time_one(kind: str, shape: tuple[int, int], args, device, flops: bool = True) -> dict:
    hf, batch = setup(kind, shape, args, device)
    model = EdgeModel.from_hf(hf)
    prune_step, hf_step = PruneStep(model, batch, args.cache, args.checkpointing, args.masks or args.sparsity), HFStep(hf, batch)
    out = time_steps(prune_step, hf_step, args, device)
    if flops:
        out["flops"] = count_flops(kind, shape, args)
    g = model.graph
    d = hf.config.hidden_size
    out["writers_bytes"] = g.num_writers * shape[0] * shape[1] * d * torch.finfo(DTYPES[args.dtype]).bits // 8
    out["graph"] = g.describe()
    out["group"] = model.group_layers  # layers a mix takes together
    if getattr(args, "vs_dense_mix", False):  # the same step, the mix over every writer, interleaved
        dense = WithSetting(PruneStep(model, batch, args.cache, args.checkpointing, args.masks or args.sparsity),
                            mixing, "SPARSE_MIN", math.inf)
        out["dense_mix"] = time_steps(dense, prune_step, args, device)  # ratio: dense / live-writers mix
    if getattr(args, "vs_groups", None):  # the same step, layers mixing in groups of another size, interleaved
        other = WithSetting(prune_step, edge_model, "GROUP_LAYERS", args.vs_groups)
        out["groups"] = time_steps(other, prune_step, args, device)  # other size / default
    if getattr(args, "vs_keep", None) is not None:  # the same step, another share of inputs kept, interleaved
        other = WithSetting(prune_step, model, "keep_inputs", args.vs_keep)
        out["keep"] = time_steps(other, prune_step, args, device)  # that share / the default
    if getattr(args, "vs_fresh_scratch", False):  # the same step, the sparse paths' temporaries fresh
        other = WithSetting(prune_step, mixing, "KEEP_SCRATCH", False)
        out["fresh_scratch"] = time_steps(other, prune_step, args, device)  # fresh / kept
    if getattr(args, "vs_unfused", False):  # the same step, the backward's passes over the differences apart
        other = WithSetting(prune_step, mixing, "FUSE_MIN", math.inf)
        out["unfused"] = time_steps(other, prune_step, args, device)  # apart / made as one
    if getattr(args, "vs", None):  # the same step, any one module setting switched, interleaved
        owner, name, value = parse_setting(args.vs)
        out["setting"] = time_steps(WithSetting(prune_step, owner, name, value), prune_step, args, device)
    if getattr(args, "backward_parts", False):
        out["backward_parts"] = backward_parts(prune_step, device)
    if getattr(args, "backward_nodes", False):
        out["backward_nodes"] = {"prune": backward_nodes(prune_step, device), "hf": backward_nodes(hf_step, device)}
    if getattr(args, "positions", None):
        shared = PruneStep(model, batch, args.cache, args.checkpointing)
        pos = PruneStep(positional(EdgeModel.from_hf(hf), batch, args.spans), batch, args.cache, args.checkpointing)
        out["positions"] = time_steps(pos, shared, args, device)  # ratio: position-aware / shared
    return out


# the backward's pieces ``--backward-parts`` times: (owner, function name, label); the rebuild of a pair's inputs
# runs inside the norms' backward (when autograd unpacks the saved input), so its time is part of theirs too
BACKWARD_PARTS = ((mixing._Mix, "backward", "mix backward"), (mixing.WriterStates, "_add_grad", "  dL/ds"),
                  (mixing.WriterStates, "_grad_z", "  dL/dz"),
                  (mixing.WriterStates, "_fused_grad", "  a lone layer's rebuild with its dL/dz"),
                  (common._NormProjection, "backward", "the norms' backward"),
                  (mixing.GroupRebuild, "_mix", "  a pair's rebuild"))


def backward_parts(prune_step: PruneStep, device) -> dict:
    """Seconds of each of ``BACKWARD_PARTS`` in one more step (each function wrapped with a clock for
    that step only; no profiler, whose own allocations move page faults into whichever product
    touches fresh memory), with the step's own parts."""
    spent = dict.fromkeys((label for _, _, label in BACKWARD_PARTS), 0.0)
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in BACKWARD_PARTS]

    def timed(fn, label):
        def run(*a, **kw):
            t0 = device_time(device)
            try:
                return fn(*a, **kw)
            finally:
                spent[label] += device_time(device) - t0
        return run

    try:
        for (owner, name, fn), (_, _, label) in zip(originals, BACKWARD_PARTS):
            inner = fn.__func__ if isinstance(fn, staticmethod) else fn
            wrapped = timed(inner, label)
            setattr(owner, name, staticmethod(wrapped) if isinstance(fn, staticmethod) else wrapped)
        clock = make_clock(device)
        parts = prune_step(clock)
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    return {"step": parts, "parts": spent}


def _graph_nodes(root) -> list:
    """Every autograd node reachable from ``root`` (a grad_fn), once each."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return list(seen)


def backward_nodes(step, device) -> dict:
    """Seconds of one more run of ``step``'s backward by autograd node kind (``_MixBackward``,
    ``MmBackward0``, ...): a clock read before and after every node (``Node.register_prehook`` /
    ``register_hook``; the engine runs a CPU graph's nodes one at a time), the backward itself
    timed around. Wall clocks, not ``torch.profiler``, whose split between calls of one operator
    does not match them here (speed-log.md). -> {"backward": s, "nodes": {kind: [s, calls]}}."""
    spent: dict = {}
    start = [0.0]
    total = [0.0]
    original = torch.Tensor.backward

    def before(_grads):
        start[0] = device_time(device)

    def backward(tensor, *a, **kw):
        handles = []
        for node in _graph_nodes(tensor.grad_fn):
            kind = type(node).__name__

            def after(_inputs, _outputs, kind=kind):
                entry = spent.setdefault(kind, [0.0, 0])
                entry[0] += device_time(device) - start[0]
                entry[1] += 1

            handles += [node.register_prehook(before), node.register_hook(after)]
        t0 = device_time(device)
        try:
            return original(tensor, *a, **kw)
        finally:
            total[0] += device_time(device) - t0
            for h in handles:
                h.remove()

    torch.Tensor.backward = backward
    try:
        step(make_clock(device))
    finally:
        torch.Tensor.backward = original
    return {"backward": total[0], "nodes": spent}


def print_nodes(q: dict, top: int = 8) -> None:
    """``--backward-nodes``: each backward's node kinds by seconds, the step's beside HF's."""
    for name, label in (("prune", "step"), ("hf", "HF")):
        nodes = sorted(q[name]["nodes"].items(), key=lambda kv: -kv[1][0])
        shown = ", ".join(f"{kind} {sec:.3f} s ({calls})" for kind, (sec, calls) in nodes[:top])
        rest = sum(sec for _, (sec, _) in nodes[top:])
        print(f"  {label} backward by node kind ({q[name]['backward']:.3f} s; seconds, calls): {shown}, "
              f"the rest {rest:.3f} s")


def time_steps(prune_step: PruneStep, hf_step: HFStep, args, device) -> dict:
    """Medians over ``args.repeats`` interleaved runs (after ``args.warmup``) of both steps, with parts
    and the ratio step / HF; timings synchronise CUDA before each reading (``make_clock``)."""
    clock = make_clock(device)
    for _ in range(args.warmup):
        clock()
        prune_step(clock)
        hf_step(clock)
    parts = {"prune": [], "hf": []}
    kernel = {"prune": [], "hf": []}  # (system CPU seconds, minor page faults) of each run
    for _ in range(args.repeats):
        for name, fn in (("hf", hf_step), ("prune", prune_step)):
            before = resource.getrusage(resource.RUSAGE_SELF)
            clock()
            parts[name].append(fn(clock))
            after = resource.getrusage(resource.RUSAGE_SELF)
            kernel[name].append((after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    out = {}
    for name, runs in parts.items():
        totals = [sum(r.values()) for r in runs]
        out[name] = {"median_s": statistics.median(totals), "min_s": min(totals),
                     "parts": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
                     "sys_s": statistics.median(k[0] for k in kernel[name]),
                     "page_faults": statistics.median(k[1] for k in kernel[name])}
    out["ratio"] = out["prune"]["median_s"] / out["hf"]["median_s"]
    return out


# ---------------------------------------------------------------------------- memory (subprocess)
def _rss_status() -> tuple[int, int]:
    text = Path("/proc/self/status").read_text()
    get = lambda key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def measure_memory(kind: str, shape: tuple[int, int], which: str, args, device) -> int:
    """Peak bytes above the loaded model during two steps of ``which`` (run in a fresh process)."""
    hf, batch = setup(kind, shape, args, device)
    if which == "hf":
        return peak_above_now(HFStep(hf, batch), device)
    model = EdgeModel.from_hf(hf)
    if which == "prune_spans":
        positional(model, batch, args.spans)
    return peak_above_now(PruneStep(model, batch, args.cache, args.checkpointing), device)


def peak_above_now(step, device, steps: int = 2) -> int:
    """Peak bytes above the current allocation during ``steps`` calls of ``step``: on CUDA
    ``torch.cuda.max_memory_allocated`` (exact in any process), on CPU peak RSS (meaningful only in a
    fresh process: ``memory_in_subprocess``)."""
    import gc

    clock = make_clock(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _rss_status()[0]
    for _ in range(steps):
        step(clock)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _rss_status()[1] - base


def memory_in_subprocess(kind, shape, which, args) -> int | None:
    cmd = [sys.executable, __file__, "--_memory", f"{kind}:{shape[0]}x{shape[1]}:{which}",
           "--dtype", args.dtype, "--device", args.device]
    cmd += (["--cache"] if args.cache else []) + (["--checkpointing"] if args.checkpointing else [])
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--spans", str(args.spans)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    env = dict(os.environ)
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  memory run {kind} {shape} {which} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report
def parse_setting(text: str) -> tuple:
    """``--vs MODULE.NAME=VALUE`` -> (the edgeprune module, NAME, VALUE): a Python literal, or inf."""
    name, sep, value = text.partition("=")
    module, _, attr = name.rpartition(".")
    try:
        owner = importlib.import_module(f"edgeprune.{module}")
    except ImportError:
        raise SystemExit(f"--vs {text}: no module edgeprune.{module}")
    if not sep or not hasattr(owner, attr):
        raise SystemExit(f"--vs {text}: edgeprune.{module} has no setting {attr!r} (MODULE.NAME=VALUE)")
    try:
        parsed = math.inf if value.strip() == "inf" else ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise SystemExit(f"--vs {text}: {value!r} is not a Python literal or inf")
    return owner, attr, parsed


def print_vs(r: dict, key: str, other: str, default: str) -> None:
    """One line: the step with a setting switched (``r[key]``, timed interleaved against the default)."""
    q = r[key]
    print(f"  {other}: step {q['prune']['median_s']:.3f} s (backward {q['prune']['parts']['backward']:.3f} s) vs "
          f"{default} {q['hf']['median_s']:.3f} s (backward {q['hf']['parts']['backward']:.3f} s): ratio "
          f"{q['ratio']:.2f}x; {other} / HF {q['prune']['median_s'] / r['hf']['median_s']:.2f}x, its backward / "
          f"HF's {q['prune']['parts']['backward'] / r['hf']['parts']['backward']:.2f}x")


def heap_policy() -> str:
    """How glibc's heap was set for the timings (``buffers.keep_freed_heap``, or the environment's)."""
    chosen = [f"{name}={os.environ[name]}" for name in buffers.HEAP_ENV if name in os.environ]
    if chosen:
        return "heap: " + " ".join(chosen)
    return "heap: glibc's own" if os.environ.get(buffers.KEEP_HEAP) == "0" else "heap: kept, nothing mmapped"


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def parse_shape(text: str) -> tuple[int, int]:
    b, _, t = text.partition("x")
    return int(b), int(t)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--config", action="append", default=[], metavar="DIR",
                        help="also a model of this HF config (a checkpoint directory or config.json; random weights)")
    parser.add_argument("--shapes", default="8x32,32x64", help="comma-separated BxT")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="PyTorch's CPU allocations on 4 KiB pages (THP_MEM_ALLOC_ENABLE=0), as without "
                             "edgeprune.buffers.use_huge_pages, which the CLI and this benchmark turn on")
    parser.add_argument("--no-keep-heap", action="store_true",
                        help="leave glibc's heap trimming as it is (buffers.keep_freed_heap off: "
                             "EDGEPRUNE_KEEP_HEAP=0), to time the step without it")
    parser.add_argument("--malloc-default", action="store_true",
                        help="measure RSS with glibc's default (dynamic) mmap threshold")
    parser.add_argument("--quick", action="store_true", help="gpt2, 8x32, 3 repeats")
    parser.add_argument("--tiny", action="store_true", help="d 64, 4 heads, vocab 512: checks the code, no figures")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="time a step of a pruned state: this fraction of the edges at log_alpha -10 "
                             "(random), the rest at 3 (default: every edge at 3, the start of a cold run)")
    parser.add_argument("--masks", help="time a step at a run's learned masks: its masks.safetensors (same graph)")
    parser.add_argument("--dense-mix", action="store_true",
                        help="mix every writer and compute every dL/dz, zero or clamped masks or not "
                             "(mixing.SPARSE_MIN set to infinity: live_writers and needed_writers off)")
    parser.add_argument("--vs-dense-mix", action="store_true",
                        help="also time the step with --dense-mix's mix, interleaved in the same process")
    parser.add_argument("--vs-keep", type=float, metavar="SHARE",
                        help="also time the step with prune.keep_inputs SHARE (0: every layer's Q/K/V inputs "
                             "rebuilt in the backward, as on GPUs; 10: none), interleaved in the same process")
    parser.add_argument("--vs-groups", type=int, metavar="K",
                        help="also time the step with layers mixing in groups of K (model.GROUP_LAYERS; "
                             "1: each alone), interleaved")
    parser.add_argument("--vs-fresh-scratch", action="store_true",
                        help="also time the step with the sparse paths' temporaries (gathers, dL/ds's live rows) "
                             "fresh (mixing.KEEP_SCRATCH off), interleaved; with --masks or --sparsity")
    parser.add_argument("--vs-unfused", action="store_true",
                        help="also time the step with each pass of the backward over the differences made apart "
                             "(mixing.FUSE_MIN = inf: inputs rebuilt whole, then dL/dz), interleaved")
    parser.add_argument("--vs", metavar="MODULE.NAME=VALUE",
                        help="also time the step with one setting of an edgeprune module switched, interleaved: "
                             "e.g. mixing.GRAD_ROWS=0 (dL/ds's update as one product), "
                             "mixing.FUSE_MIN=inf; VALUE a Python literal or inf")
    parser.add_argument("--backward-nodes", action="store_true",
                        help="also time one more backward of each (the step's, HF's) by autograd node kind, "
                             "wall clocks around every node, side by side")
    parser.add_argument("--backward-parts", action="store_true",
                        help="also time the mix's and the norms' backward pieces inside one more step")
    parser.add_argument("--cache", action="store_true",
                        help="prune.cache_corrupted: time steps whose reference pass is served from the cache")
    parser.add_argument("--checkpointing", action="store_true", help="prune.activation_checkpointing")
    parser.add_argument("--positions", choices=["spans"], help="also time the position-aware step (see above)")
    parser.add_argument("--spans", type=int, default=8, help="spans for --positions (default 8)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    return parser


def options(**overrides) -> argparse.Namespace:
    """This benchmark's options at their defaults, with ``overrides``: what another benchmark passes to
    ``time_one`` (``bench/real_model.py``), so that an option added here never breaks it."""
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"bench/step.py has no option {key!r}")
        setattr(args, key, value)
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vs:
        parse_setting(args.vs)  # a bad setting stops here, before any model is built
    if args.no_huge_pages:  # (the memory subprocesses inherit the choice)
        os.environ[buffers.HUGE_PAGES] = "0"
    if args.no_keep_heap:
        os.environ[buffers.KEEP_HEAP] = "0"
    buffers.tune_cpu_allocator()  # before any model is loaded: PyTorch reads the huge-page switch once
    if args.vs_keep is not None and not args.vs_keep >= 0:
        parser.error(f"--vs-keep {args.vs_keep}: a share of the writer states' size, >= 0")
    if args.vs_groups is not None and args.vs_groups < 1:
        parser.error(f"--vs-groups {args.vs_groups}: layers per group, >= 1")
    if args.masks and not Path(args.masks).is_file():
        parser.error(f"--masks {args.masks}: no such file (a run directory's masks.safetensors)")
    if args.dense_mix:
        mixing.SPARSE_MIN = math.inf
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args._memory:
        kind, shape, which = args._memory.split(":")
        print(measure_memory(kind, parse_shape(shape), which, args, device))
        return 0
    if args.quick:
        args.models, args.shapes, args.repeats = "gpt2", "8x32", 3
    kinds = [k for k in args.models.split(",") if k] + args.config

    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (after {args.warmup} warm-up)"
          + (", reference pass cached" if args.cache else "") + (", activation checkpointing" if args.checkpointing else ""))
    results = []
    for kind in kinds:
        for shape_text in args.shapes.split(","):
            shape = parse_shape(shape_text)
            r = time_one(kind, shape, args, device)
            if not args.no_memory:
                r["hf"]["peak_bytes"] = memory_in_subprocess(kind, shape, "hf", args)
                r["prune"]["peak_bytes"] = memory_in_subprocess(kind, shape, "prune", args)
                if not args.cache:  # the estimate traces a step without the cache
                    r["prune"]["estimate_bytes"], r["hf"]["estimate_bytes"] = estimate_peaks(kind, shape, args)
            if args.positions and not args.no_memory:
                r["positions"]["peak_bytes"] = memory_in_subprocess(kind, shape, "prune_spans", args)
            r.update(model=kind, shape=shape_text)
            results.append(r)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["prune"]["parts"].items())
            hf_parts = ", ".join(f"{k} {v:.3f}" for k, v in r["hf"]["parts"].items())
            grouping = "layers mixing alone" if r["group"] == 1 else f"layers mixing in groups of {r['group']}"
            print(f"\n{kind} {shape_text} ({r['graph']}; {grouping})")
            print(f"  time  step {r['prune']['median_s']:.3f} s  HF fwd+bwd {r['hf']['median_s']:.3f} s  "
                  f"ratio {r['ratio']:.2f}x (fastest runs {r['prune']['min_s'] / r['hf']['min_s']:.2f}x); backward "
                  f"/ HF's backward {r['prune']['parts']['backward'] / r['hf']['parts']['backward']:.2f}x")
            print(f"        step parts: {parts}")
            print(f"        HF parts:   {hf_parts}")
            print(f"  kernel: step {r['prune']['sys_s']:.2f} s system CPU, {r['prune']['page_faults'] / 1e3:.0f}k page "
                  f"faults; HF {r['hf']['sys_s']:.2f} s, {r['hf']['page_faults'] / 1e3:.0f}k (huge pages "
                  f"{'off' if args.no_huge_pages else 'on'}, {heap_policy()}); this process's peak RSS so far "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
            f = r["flops"]
            step_flops = (0 if args.cache else f["reference"]) + f["masked_fwd"] + f["backward"]  # cache: no pass
            print(f"  FLOPs step {step_flops / 1e9:.1f} G (reference {f['reference'] / 1e9:.1f}, masked fwd "
                  f"{f['masked_fwd'] / 1e9:.1f}, backward {f['backward'] / 1e9:.1f})  HF {f['hf'] / 1e9:.1f} G  "
                  f"ratio {step_flops / f['hf']:.2f}x  rate step {step_flops / r['prune']['median_s'] / 1e9:.0f} "
                  f"GFLOP/s, HF {f['hf'] / r['hf']['median_s'] / 1e9:.0f} GFLOP/s")
            if not args.no_memory:
                hp, pp, w = r["hf"]["peak_bytes"], r["prune"]["peak_bytes"], r["writers_bytes"]
                extra = "" if hp is None or pp is None else f"  (step - HF) / writers {(pp - hp) / w:.2f}"
                print(f"  memory step {gib(pp)} GiB  HF {gib(hp)} GiB  writers {gib(w)} GiB{extra}")
                if "estimate_bytes" in r["prune"]:
                    print(f"        edgeprune estimate (traced on meta): step {gib(r['prune']['estimate_bytes'])} GiB  "
                          f"HF {gib(r['hf']['estimate_bytes'])} GiB")

            if args.vs_dense_mix:
                print_vs(r, "dense_mix", "dense mix", "live-writers mix")
            if args.vs_groups:
                print_vs(r, "groups", f"layers mixing in groups of {args.vs_groups}", f"groups of {r['group']}")
            if args.vs_keep is not None:
                print_vs(r, "keep", f"keep_inputs {args.vs_keep:g}", "the default")
            if args.vs_fresh_scratch:
                print_vs(r, "fresh_scratch", "sparse paths' temporaries fresh", "kept")
            if args.vs_unfused:
                print_vs(r, "unfused", "backward passes apart", "made as one")
            if args.vs:
                owner, name, _ = parse_setting(args.vs)
                print_vs(r, "setting", args.vs, f"the default ({name} = {getattr(owner, name)!r})")
            if args.backward_parts:
                q = r["backward_parts"]
                print(f"  backward pieces, one step (backward {q['step']['backward']:.3f} s; HF's "
                      f"{r['hf']['parts']['backward']:.3f} s): "
                      + ", ".join(f"{label.strip()} {sec:.3f} s" for label, sec in q["parts"].items()))
            if args.backward_nodes:
                print_nodes(r["backward_nodes"])
            if args.positions:
                q = r["positions"]
                pp, sp = q.get("peak_bytes"), r["prune"].get("peak_bytes")
                mem = "" if pp is None or sp is None else f"; memory {gib(pp)} GiB vs {gib(sp)} GiB, ratio {pp / sp:.2f}x"
                print(f"  position-aware ({args.spans} spans): step {q['prune']['median_s']:.3f} s vs shared "
                      f"{q['hf']['median_s']:.3f} s, ratio {q['ratio']:.2f}x{mem}")

    print("\n| model | B x T | step (s) | HF fwd+bwd (s) | ratio | step peak (GiB) | estimate (GiB) | HF peak (GiB) "
          "| writer states (GiB) | (step - HF) / writers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        hp, pp, w = r["hf"].get("peak_bytes"), r["prune"].get("peak_bytes"), r["writers_bytes"]
        rel = "-" if hp is None or pp is None else f"{(pp - hp) / w:.2f}"
        print(f"| {r['model']} | {r['shape']} | {r['prune']['median_s']:.3f} | {r['hf']['median_s']:.3f} | "
              f"{r['ratio']:.2f}x | {gib(pp)} | {gib(r['prune'].get('estimate_bytes'))} | {gib(hp)} | {gib(w)} | {rel} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
