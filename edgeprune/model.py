"""``EdgeModel``: a transformers causal LM with a learnable mask on every edge of its graph.

The forward (DESIGN.md section 3): writer states are computed once and kept once, in one buffer
filled per writer group (embeddings, a layer's heads, a layer's MLP; ``mixing.WriterStates``).
Every reader's input is

    x_r = c_r + sum_{w < r} z_rw s_w + (1 - z_rw) s~_w

where c_r are the layer constants before r (attention output biases), s the writer states of the
input, s~ their ablated values: the states of the corrupted input (``interchange``, default), zero
(``zero``) or a dataset mean per writer (``mean``). The mix accumulates in fp32. With every mask 1
this is the HF model; with every mask 0 under interchange it is the HF model on the corrupted input.
With a parallel residual (``GraphSpec.parallel_residual``, GPT-NeoX) a layer's MLP reads the stream
its attention reads: neither that layer's heads nor its attention output bias.

Each decoder layer runs through ``self.runner`` (``checkpointing.LayerRunner``): directly, under
activation checkpointing, or through its FSDP module when ``distributed.shard_model`` sharded it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import generate as generation
from . import identity
from .checkpointing import LayerRunner
from .graph import Graph, edges_to_mask, span_edges
from .hub import loading
from .masks import HardConcreteMasks
from .mixing import DeferredInput, GroupRebuild, WriterStates, dense_masks, recompute_saved
from .models import Family, family_for
from .models.tracr import is_tracr_artifact, load_tracr

ABLATIONS = ("interchange", "zero", "mean")
# On CPU the Q/K/V inputs of the deepest layers are kept for the backward rather than rebuilt from
# the mix, up to this share of the writer states' size (``EdgeModel.keep_inputs``, ``prune.keep_inputs``):
# a layer's rebuild reads every earlier writer, so the deepest are the dearest (SmolLM2-135M: the last
# 3 of 30 layers, 19% of the rebuilding). 0.15 keeps the step's peak within HF's + 2 writer states on
# the models measured (Llama-3.2-1B at 4x32, the tightest: 0.25 took it to 2.02). GPUs rebuild them all.
KEEP_INPUTS = 0.15
# layers mix in groups of this many (``EdgeModel._masked_layer``; 1: each alone); None: per model shape
# (``layer_group_size``): pairs, or each alone where pairs do not pay
GROUP_LAYERS: int | None = None
# pairs pay where the writers a pair's first layer reads number, on average over the pairs, at least
# this many times a layer's readers (``layer_group_size``)
PAIR_MIN_RATIO = 4.0
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# from_pretrained kwargs that also make sense for the config look-up
_CONFIG_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "gguf_file",
                  "subfolder")


@dataclass
class EdgeOutput:
    logits: torch.Tensor  # (B, T, V) in the model's dtype; (N, V) at the N positions of ``select``
    states: torch.Tensor | None = None  # (W, B, T, D) writer states in graph order, when asked for


class EdgeModel(nn.Module):
    """Edge-masked wrapper around a loaded HF causal LM (weights frozen, shared, never copied)."""

    def __init__(self, family: Family, *, ablation: str = "interchange", node_masks: bool = False,
                 model_id: str | None = None):
        super().__init__()
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        if family.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"model dtype {family.dtype} is not supported: the writer mix handles "
                             f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}; load with dtype=torch.float32 "
                             "or torch.bfloat16")
        self.family = family
        self.family.hf.eval()
        self.family.hf.requires_grad_(False)
        self.graph = Graph(family.spec)
        self.ablation = ablation
        self.model_id = model_id
        self.edge_masks = HardConcreteMasks(self.graph.num_edges)
        self.spans: tuple[str, ...] | None = None  # position-aware masks: one set per span (set_spans)
        self.span_mode: str | None = None
        self.span_info: list[dict] | None = None
        self.node_masks = HardConcreteMasks(self.graph.num_writers) if node_masks else None
        self.mean_states: torch.Tensor | None = None  # (W, D) for ablation="mean"
        self.runner = LayerRunner()  # per-layer calls: activation checkpointing, FSDP (edgeprune.distributed)
        self.mask_grad_reduce = None  # edgeprune.distributed: sums dL/dz (fp64, in place) over processes
        # share of the writer states' size the deepest layers' Q/K/V inputs may keep for the backward
        # instead of rebuilding them; None: KEEP_INPUTS on CPU, 0 elsewhere
        self.keep_inputs: float | None = None
        self.to(family.device)
        self.eval()  # like HF's from_pretrained: deterministic masks until train() is called

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, ablation: str | None = None, node_masks: bool = False,
                        **hf_kwargs) -> "EdgeModel":
        """Load any supported checkpoint with transformers (hub id or local dir) and wrap it.

        ``hf_kwargs`` pass through to ``AutoModelForCausalLM.from_pretrained`` (dtype, revision,
        device_map, gguf_file, ...). The architecture is checked from the config before any
        weights are loaded. ``ablation`` defaults to ``"interchange"``; a compiled Tracr folder
        (``config.json`` with ``"model_type": "tracr"``) loads with ``models.tracr.load_tracr``
        (kwargs: dtype, device) and defaults to ``"zero"``.
        """
        if is_tracr_artifact(name_or_path):
            return cls.from_hf(load_tracr(name_or_path, **hf_kwargs), node_masks=node_masks,
                               ablation="zero" if ablation is None else ablation, model_id=str(name_or_path))
        ablation = "interchange" if ablation is None else ablation
        from transformers import AutoConfig, AutoModelForCausalLM  # heavy: loaded only for HF checkpoints

        if "torch_dtype" in hf_kwargs:  # HF's old name for dtype: honoured, never silently overridden
            if "dtype" in hf_kwargs:
                raise ValueError("from_pretrained: give dtype or torch_dtype (its deprecated name), not both")
            warnings.warn("torch_dtype is deprecated: use dtype=", FutureWarning, stacklevel=2)
            hf_kwargs["dtype"] = hf_kwargs.pop("torch_dtype")
        cfg_kwargs = {k: v for k, v in hf_kwargs.items() if k in _CONFIG_KWARGS}
        with loading(name_or_path, "model"):
            config = AutoConfig.from_pretrained(name_or_path, **cfg_kwargs)
        family_for(config.model_type)
        hf_kwargs.setdefault("dtype", torch.float32)
        with loading(name_or_path, "model"):
            hf = AutoModelForCausalLM.from_pretrained(name_or_path, **hf_kwargs)
        return cls.from_hf(hf, ablation=ablation, node_masks=node_masks, model_id=str(name_or_path))

    @classmethod
    def from_hf(cls, hf_model: nn.Module, **kwargs) -> "EdgeModel":
        """Wrap an HF model object already in memory (shares its weights)."""
        family = family_for(hf_model.config.model_type)(hf_model)
        kwargs.setdefault("model_id", getattr(hf_model.config, "_name_or_path", None) or None)
        return cls(family, **kwargs)

    @property
    def hf(self) -> nn.Module:
        return self.family.hf

    @property
    def device(self) -> torch.device:
        return self.family.device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.dtype

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each decoder layer's activations in the backward instead of keeping them."""
        return self.runner.checkpoint

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.runner.checkpoint = bool(on)

    def use_step_settings(self, prune) -> None:
        """Take the ``prune.*`` settings that change what a step keeps and recomputes, not what it
        computes: ``activation_checkpointing`` and ``keep_inputs`` (``prune``: a ``PruneConfig``). One
        place for the run, its ``edgeprune estimate`` and the meta copy ``check_fits`` traces."""
        self.activation_checkpointing = prune.activation_checkpointing
        self.keep_inputs = prune.keep_inputs

    def train(self, mode: bool = True) -> "EdgeModel":
        """Masks sample in training mode; the frozen HF model always stays in eval (no dropout)."""
        super().train(mode)
        self.family.hf.eval()
        return self

    # ------------------------------------------------------------------ identity
    def graph_fingerprint(self) -> dict:
        """The graph identity of this model's masks: ``Graph.fingerprint`` with its spans, if position-aware."""
        return self.graph.fingerprint(self.spans, self.span_mode if self.spans is not None else None)

    def fingerprint(self, version: int = identity.VERSION) -> dict:
        """What the model *is*, independent of the path it was loaded from
        (``edgeprune.identity.model_fingerprint``). Computed once per version, before any FSDP
        sharding (``edgeprune.prune`` asks for it first). Older versions are computed only to
        recognise runs written before the current one."""
        cache = self.__dict__.setdefault("_fingerprints", {})
        if version not in cache:
            cache[version] = identity.model_fingerprint(self.hf, version)
        return dict(cache[version])

    # ------------------------------------------------------------------ masks
    def set_spans(self, names, mode: str = "spans", info: list[dict] | None = None) -> None:
        """Position-aware masks: one mask per (edge, span) for these span names (None: one per edge,
        shared by every position). The edge masks are re-made, every mask 1; their flat order is
        span-major, span s's masks at ``[s * E, (s + 1) * E)``. Every forward then takes ``span_ids``.
        ``mode``: spans (named spans) or positions (raw token positions); ``info``: per span its token
        counts (``spans.describe_spans``), written with the masks."""
        if names is not None:
            names = tuple(str(n) for n in names)
            if not names or len(set(names)) != len(names):
                raise ValueError(f"span names must be distinct and at least one, got {list(names)}")
        old = self.edge_masks
        self.spans = names
        self.span_mode = None if names is None else mode
        self.span_info = None if names is None else info
        self.edge_masks = HardConcreteMasks(self.graph.num_edges * (1 if names is None else len(names)), old.init)
        self.edge_masks.to(old.log_alpha.device)
        self.edge_masks.train(old.training)

    @property
    def n_spans(self) -> int | None:
        return None if self.spans is None else len(self.spans)

    @property
    def edge_names(self) -> list[tuple]:
        """The names of the edge masks in order: (writer, reader) pairs, or (writer, reader, span)
        triples for position-aware masks (``graph.span_edges``)."""
        return span_edges(self.graph, self.spans)

    def mask_values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Current (E,) edge and (W,) node mask values (sampled in training, else deterministic)."""
        return self.edge_masks(), None if self.node_masks is None else self.node_masks()

    def set_edges(self, edges) -> None:
        """Keep exactly these (writer, reader) edges (mask 1), ablate every other (mask 0). Position-aware
        models take (writer, reader, span) triples."""
        self.edge_masks.set_values(edges_to_mask(self.graph, edges, self.spans).float())
        if self.node_masks is not None:
            self.node_masks.set_values(torch.ones(self.graph.num_writers))

    def reset_masks(self) -> None:
        """Every mask exactly 1 again (clears set_edges and re-initialises learned masks)."""
        self.edge_masks.reset()
        if self.node_masks is not None:
            self.node_masks.reset()

    # ------------------------------------------------------------------ forward passes
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                corrupted_input_ids: torch.Tensor | None = None,
                corrupted_attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None,
                corrupted_states: torch.Tensor | list[torch.Tensor] | None = None,
                edge_values: torch.Tensor | None = None, node_values: torch.Tensor | None = None,
                return_states: bool = False, select: torch.Tensor | None = None,
                past_key_values=None, span_ids: torch.Tensor | None = None) -> EdgeOutput:
        """The edge-masked forward. input_ids (B, T) -> logits (B, T, V).

        Under interchange ablation give ``corrupted_input_ids`` (same shape; its writer states are
        computed without grad from the same weights) or precomputed ``corrupted_states`` ((W, B, T, D)
        from ``full_forward(..., return_states=True)``, or a list of writer groups). ``edge_values``/
        ``node_values`` override the masks for this call (e.g. a tensor that requires grad, for
        attribution). ``select`` ((B, T) bool) computes the logits only at those positions and returns
        them as (N, V), ordered like ``logits[select]`` (the read-out is a large part of the cost).
        ``past_key_values`` (``kvcache.EdgeKVCache``): input_ids are the new tokens only, attention_mask
        covers past and new (B, past + T), ablated states come as ``corrupted_states`` of the new columns.
        ``span_ids`` ((B, T) long, the span index of every position): required with position-aware
        masks (``set_spans``), where position p of row b mixes its inputs with span ``span_ids[b, p]``'s masks.
        """
        position_ids = self._check_cached(input_ids, attention_mask, position_ids, past_key_values,
                                          corrupted_input_ids)
        ablated = self._ablated_states(input_ids, corrupted_input_ids, corrupted_attention_mask,
                                       corrupted_states, position_ids)
        support = None  # the masks dL/dz is needed for (None: every one)
        if edge_values is None:
            edge_values, support = self.edge_masks.values_and_support()
            default_nodes = None if self.node_masks is None else self.node_masks()
            node_values = default_nodes if node_values is None else node_values
        if edge_values.shape != (self.edge_masks.n,):
            raise ValueError(f"edge mask values must have shape ({self.edge_masks.n},), "
                             f"got {tuple(edge_values.shape)}")
        span_ids = self._check_spans(span_ids, input_ids, past_key_values)
        if node_values is not None and node_values.shape != (self.graph.num_writers,):
            raise ValueError(f"node mask values must have shape ({self.graph.num_writers},), "
                             f"got {tuple(node_values.shape)}")
        z = dense_masks(self.graph, edge_values.float(), None if node_values is None else node_values.float(),
                        self.n_spans)
        if support is not None and node_values is None:  # (a node mask's gradient reads every edge's)
            support = dense_masks(self.graph, support.float(), None, self.n_spans) > 0
        else:
            support = None
        return self._run(input_ids, attention_mask, position_ids, z, ablated, return_states, select,
                         past=past_key_values, span_ids=span_ids, support=support)

    def full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     position_ids: torch.Tensor | None = None, return_states: bool = False,
                     select: torch.Tensor | None = None, states_rows: slice | None = None,
                     past_key_values=None, embeds: torch.Tensor | None = None, taps=None,
                     sink=None, path=None) -> EdgeOutput:
        """The unmasked model (every edge kept), optionally returning its writer states.

        ``select`` as in ``forward``; ``states_rows`` keeps the states of these batch rows only
        (the reference pass runs clean and corrupted inputs as one batch and keeps the corrupted half).
        ``embeds`` ((E, B, T, D), the embedding writers' states) replaces the embedding of input_ids
        (EAP-IG's inputs variant runs on interpolated embeddings); ``taps`` (``taps.ReaderTaps``) records
        the gradient at every reader's own input in the backward (``baselines/ig_inputs.py``); ``sink``
        (``mixing.StateSink``) takes the writer states (of rows ``states_rows``) instead of a new buffer;
        ``path`` (``mixing.UniformMix``) makes every reader read a uniform mix of this pass's writers and
        the ablated ones, the masked model at z = alpha on every edge (``baselines/ig_masks.py``).
        """
        position_ids = self._check_cached(input_ids, attention_mask, position_ids, past_key_values, None)
        if embeds is not None and tuple(embeds.shape[1:3]) != tuple(input_ids.shape):
            raise ValueError(f"embeds must have shape (embedding writers, batch, seq, d_model) with (batch, seq) = "
                             f"{tuple(input_ids.shape)}, got {tuple(embeds.shape)}")
        if sink is not None and return_states:
            raise ValueError("full_forward: give return_states or a sink, not both")
        return self._run(input_ids, attention_mask, position_ids, None, None, return_states, select, states_rows,
                         past=past_key_values, embeds=embeds, taps=taps, sink=sink, path=path)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Continue (B, T) prompts with the current circuit (deterministic masks): see ``edgeprune.generate``."""
        return generation.generate(self, input_ids, attention_mask, **kwargs)

    @torch.no_grad()
    def compute_mean_states(self, batches) -> torch.Tensor:
        """(W, D) mean writer state over the real tokens of ``batches`` of (input_ids, attention_mask)."""
        total, count = None, 0
        for ids, mask in batches:
            ids = ids.to(self.device)
            mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
            states = self.full_forward(ids, mask, return_states=True).states  # (W, B, T, D)
            weights = mask.float()[None, :, :, None]
            part = (states.float() * weights).sum(dim=(1, 2))
            total = part if total is None else total + part
            count += int(mask.sum())
        if total is None or count == 0:
            raise ValueError("compute_mean_states got no tokens")
        return total / count

    def set_mean_states(self, states: torch.Tensor) -> None:
        expected = (self.graph.num_writers, self.hf.config.hidden_size)
        if tuple(states.shape) != expected:
            raise ValueError(f"mean states must have shape {expected} (writers, d_model), got {tuple(states.shape)}")
        self.mean_states = states.float().to(self.device)

    def fixed_ablated_states(self) -> torch.Tensor | None:
        """The ablated states of zero and mean ablation, which do not depend on the input: None (zero) or
        the mean states as (W, 1, 1, D); an error for mean ablation without mean states."""
        if self.ablation == "zero":
            return None
        if self.mean_states is None:
            raise ValueError("ablation='mean' needs mean states: call model.set_mean_states("
                             "model.compute_mean_states(batches)) first")
        return self.mean_states[:, None, None, :]

    # ------------------------------------------------------------------ internals
    def _check_spans(self, span_ids, ids, past):
        if self.spans is None:
            if span_ids is not None:
                raise ValueError("span_ids given, but this model's masks are shared by every position "
                                 "(model.set_spans / model.positions makes them position-aware)")
            return None
        if past is not None:
            raise ValueError("a position-aware circuit has masks per span of a task's prompts: generation "
                             "(past_key_values) has no spans for new tokens")
        if not isinstance(span_ids, torch.Tensor) or tuple(span_ids.shape) != tuple(ids.shape) \
                or span_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"position-aware masks ({len(self.spans)} spans: {', '.join(self.spans)}) need "
                             f"span_ids, a (batch, seq) integer tensor shaped like input_ids {tuple(ids.shape)}, "
                             f"got {type(span_ids).__name__} {tuple(getattr(span_ids, 'shape', ()))}")
        if span_ids.numel() and (int(span_ids.min()) < 0 or int(span_ids.max()) >= len(self.spans)):
            raise ValueError(f"span_ids must be in [0, {len(self.spans)}) (spans {', '.join(self.spans)}), got "
                             f"values {int(span_ids.min())}..{int(span_ids.max())}")
        return span_ids

    def _check_ids(self, ids, mask, name):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"{name} must be a (batch, seq) integer tensor, got "
                             f"{type(ids).__name__} {getattr(ids, 'shape', '')}")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask for {name} must have shape {tuple(ids.shape)}, got {tuple(mask.shape)}")

    def _check_cached(self, ids, mask, position_ids, past, corrupted_ids):
        """Check the inputs (a cached step: against the cache); the position ids to use."""
        if past is None:
            self._check_ids(ids, mask, "input_ids")
            return position_ids
        self._check_ids(ids, None, "input_ids")
        past.check_inputs(ids, mask)
        if corrupted_ids is not None:
            raise ValueError("with past_key_values give the ablated states of the new columns as corrupted_states "
                             "(edgeprune.generate does), not corrupted_input_ids")
        return past.next_positions(ids, mask) if position_ids is None else position_ids

    def _ablated_states(self, ids, corrupted_ids, corrupted_mask, corrupted_states, position_ids):
        """The ablated writer states (W, B, T, D) or (W, 1, 1, D), or None for zero ablation."""
        if self.ablation != "interchange":
            return self.fixed_ablated_states()
        if corrupted_states is not None:
            if isinstance(corrupted_states, (list, tuple)):  # writer groups, as older callers keep them
                corrupted_states = torch.cat(list(corrupted_states))
            expected = (self.graph.num_writers, *ids.shape)
            if tuple(corrupted_states.shape[:3]) != expected:
                raise ValueError(f"corrupted_states must have shape (writers, batch, seq, d_model) with "
                                 f"(writers, batch, seq) = {expected}, got {tuple(corrupted_states.shape)}")
            return corrupted_states
        if corrupted_ids is None:
            raise ValueError("interchange ablation needs corrupted_input_ids (same shape as input_ids) or "
                             "corrupted_states; use full_forward() for the unmasked model, or ablation='zero'")
        if tuple(corrupted_ids.shape) != tuple(ids.shape):
            raise ValueError(f"corrupted_input_ids must have the shape of input_ids {tuple(ids.shape)}, "
                             f"got {tuple(corrupted_ids.shape)}")
        self._check_ids(corrupted_ids, corrupted_mask, "corrupted_input_ids")
        with torch.no_grad():
            return self.full_forward(corrupted_ids, corrupted_mask, position_ids=position_ids,
                                     return_states=True).states

    def _run(self, input_ids, attention_mask, position_ids, z, ablated, return_states, select=None,
             states_rows=None, past=None, span_ids=None, embeds=None, taps=None, support=None,
             sink=None, path=None) -> EdgeOutput:
        """One pass: z None = unmasked (a plain residual stream), else the masked mix.

        z: (readers, writers) fp32 dense masks; ablated: see ``_ablated_states``; support: like z, bool,
        the masks whose dL/dz is needed (the others are clamped), or None for all
        (``WriterStates.grad_support``); sink: where the unmasked pass writes its states
        (``full_forward``). Each decoder layer runs through ``self.runner`` (activation
        checkpointing, FSDP), the whole pass through its root.
        """
        return self.runner.root(self._pass, input_ids, attention_mask, position_ids, z, ablated, return_states,
                                select, states_rows, past, span_ids, embeds, taps, support, sink, path)

    def _pass(self, input_ids, attention_mask, position_ids, z, ablated, return_states, select, states_rows,
              past=None, span_ids=None, embeds=None, taps=None, support=None, sink=None, path=None):
        fam, graph = self.family, self.graph
        ctx = fam.context(input_ids, attention_mask, position_ids)
        if past is not None:  # incremental decoding: the families' attention extends the cache
            past.begin(ctx)
        emb = fam.embed(input_ids, ctx) if embeds is None else embeds  # (E, B, T, D) model dtype
        if z is None:  # the plain residual stream, in fp32; writer states only if asked for
            keep = slice(None) if states_rows is None else states_rows
            # reader taps without states: only the sum of a layer's heads is needed (one GEMM, as HF)
            store = sink
            ctx.extra["heads_summed"] = taps is not None and not return_states and store is None
            if return_states:
                store = WriterStates(graph.num_writers, emb[:, keep].shape[1:], emb.dtype, emb.device)
            if store is not None:
                store.write(emb[:, keep], 0)
            resid = emb.float().sum(0)  # (B, T, D)
            for layer in range(graph.spec.n_layers):
                resid = self.runner.layer(layer, self._full_layer, layer, ctx, resid, store, keep, taps, path)
            if path is not None:
                resid = path.read(resid, graph.n_writers_before[-1])
            if taps is not None:  # resid_post, the last reader
                resid = taps.tap(resid, self.graph.reader_blocks[-1].slice)[0]
            logits = self._readout(resid, select, ctx)
            return EdgeOutput(logits=logits, states=store.states(None, emb.dtype) if return_states else None)

        # the masked mix over fp32 differences; tokens carry gradients to the states (mixing.WriterStates)
        store = WriterStates(graph.num_writers, emb.shape[1:], torch.float32, emb.device, ablated,
                             self.mask_grad_reduce, span_ids, pool="mix", grad_support=support)
        tokens = [t for t in [store.write(emb, 0)] if t is not None]
        base = None  # (D,) fp32: the layer constants every later reader sees
        carried = None  # (partial mixes, ...): the first layer of a group mixed the later layers' readers too
        for layer, blocks in enumerate(self.graph.layer_readers):
            base, carried, *new = self.runner.layer(layer, self._masked_layer, layer, ctx, z, store, base, blocks,
                                                    carried, *tokens)
            tokens.extend(new)
        final = self._reader_input(z, graph.reader_blocks[-1].slice, store, base, tokens)[0]  # resid_post
        store.seal()  # the ablated states are not needed past here
        logits = self._readout(final, select, ctx)
        return EdgeOutput(logits=logits, states=store.states(ablated, emb.dtype) if return_states else None)

    @property
    def _kept_inputs(self) -> frozenset:
        """The layers whose Q/K/V inputs the backward keeps instead of rebuilding: the deepest, while
        their readers number at most ``keep_inputs`` x the writers (each input is as large as a
        writer's state in the mix's fp32)."""
        share = self.keep_inputs
        if share is None:
            share = KEEP_INPUTS if self.device.type == "cpu" else 0.0
        kept, rows = set(), 0
        for layer in reversed(range(self.graph.spec.n_layers)):
            q_blk, v_blk = self.graph.layer_readers[layer][0], self.graph.layer_readers[layer][2]
            rows += v_blk.stop - q_blk.start
            if rows > share * self.graph.num_writers:
                break
            kept.add(layer)
        return frozenset(kept)

    @functools.cached_property
    def _writer_starts(self) -> list[tuple[int, ...]]:
        """Per layer: the first writer row of its heads (and of its MLP)."""
        starts = {}
        for blk in self.graph.writer_blocks:
            if blk.layer is not None:
                starts.setdefault(blk.layer, []).append(blk.start)
        return [tuple(starts[l]) for l in range(self.graph.spec.n_layers)]

    def _readout(self, final, select, ctx):
        if select is None:
            return self.family.readout(final, ctx)  # (B, T, V)
        return self.family.readout(final[select], ctx)  # (N, V): the read-out is per position

    def _full_layer(self, layer, ctx, resid, store, keep, taps=None, path=None):
        """One layer of the unmasked model on the fp32 residual stream (B, T, D); the states of batch
        rows ``keep`` go to ``store`` (if any). With ``taps`` every reader gets its own (stride-0) view of
        its input, so the backward gives each its own gradient (``edgeprune.taps``). With ``path``
        (``mixing.UniformMix``) the readers read its mix of the stream instead of the stream."""
        fam, starts, blocks = self.family, self._writer_starts[layer], self.graph.layer_readers[layer]
        before = self.graph.n_writers_before
        attn_in = resid if path is None else path.read(resid, before[blocks[0].start])
        if taps is None:
            heads = fam.attention(layer, attn_in[None], ctx)  # (H, B, T, D)
        else:  # the Q, K and V readers of the layer, in graph order
            heads = fam.attention(layer, taps.tap(attn_in, slice(blocks[0].start, blocks[2].stop)), ctx)
        if store is not None:
            store.write(heads[:, keep], starts[0])
        layer_in = resid  # what a parallel-residual MLP reads: the stream before this layer's attention
        resid = resid + heads.float().sum(0)
        const = fam.attn_constant(layer)
        if const is not None:
            resid = resid + const.float()
        if self.graph.spec.mlp:
            mlp_in = layer_in if self.graph.spec.parallel_residual else resid
            if path is not None:
                mlp_in = path.read(mlp_in, before[blocks[3].start])
            if taps is not None:
                mlp_in = taps.tap(mlp_in, blocks[3].slice)[0]
            out = fam.mlp(layer, mlp_in, ctx)  # (B, T, D)
            if store is not None:
                store.write(out[None, keep], starts[1])
            resid = resid + out.float()
        return resid

    def _masked_layer(self, layer, ctx, z, store, base, blocks, carried, *tokens):
        """One layer of the masked model: mix its readers' inputs, write its heads' and MLP's states.

        The MLP reads the writers the Q/K/V readers read plus this layer's heads (none of them with a
        parallel residual): its mix over the former is one more row of the Q/K/V mix, so the states
        before the layer are read once for all its readers (forward, rebuild, dL/dz and dL/ds alike:
        the mix is bound by that memory traffic at depth), and this layer's heads are added as a
        range mix once they are written.

        Layers go in groups for the same reason (``_layer_group``; pairs by default): the first of a
        group also mixes the later layers' readers over the writers it reads (one product with their
        rows too, one dL/dz and one dL/ds pass for all) and hands those partial mixes on
        (``carried``: the partials still to take, (P, R_i, D) each, the group's
        ``mixing.GroupRebuild``, and the group's own constants so far); a later layer mixes only
        the group's writers before it and adds its partial. In the backward the group's inputs
        are rebuilt with one pass too (``GroupRebuild``). Returns the layer constants so far, what
        it carries to the next layer (or None), and the tokens of the groups it wrote.
        """
        fam, starts, graph = self.family, self._writer_starts[layer], self.graph
        q_blk, v_blk = blocks[0], blocks[2]
        tokens = list(tokens)
        mlp = graph.spec.mlp
        group = self._group(layer)
        n_w = graph.n_writers_before[group.start]
        split = (v_blk.stop - q_blk.start, 1) if mlp else (v_blk.stop - q_blk.start,)
        rebuilt = self._rebuilds(layer, split[0])  # the Q/K/V inputs rebuilt in the backward, not kept
        first, last = self._layer_group(layer)
        deferred = None  # a layer alone: its mix's backward rebuilds those inputs itself (mixing.DeferredInput)
        own_consts = None  # the group's own constants before this layer: what its range mix adds
        if carried is not None:  # a later layer of a group: its mix over the writers before the group came with it
            partials, rebuilds, own_consts = carried
            n_first = graph.n_writers_before[self._group(first).start]
            z_rows = z[..., group, n_first:n_w]
            mixed = store.mix(z_rows, own_consts, tokens, start=n_first, split=split, rows=group,
                              partial=partials[0])
            mixed, partials = mixed if mlp else (mixed,), partials[1:]
            rebuild = functools.partial(rebuilds.later, layer - first, z_rows.detach(), own_consts)
        elif last > layer:  # the first of a group: the later layers' readers ride on this mix
            later = [self._group(other) for other in range(layer + 1, last + 1)]
            rows = slice(group.start, later[-1].stop)
            mixed = store.mix(z[..., rows, :n_w], base, tokens, split=(*split, *(g.stop - g.start for g in later)),
                              rows=rows, carry=len(later))
            mixed, partials = mixed[:len(split)], mixed[len(split):]
            offsets = (0, *(g.start - group.start for g in later))
            rebuilds = GroupRebuild(store, z[..., rows, :n_w].detach(), base, offsets, rebuilt)
            rebuild = rebuilds.first
        else:
            deferred = DeferredInput(split[0]) if rebuilt else None
            mixed = store.mix(z[..., group, :n_w], base, tokens, split=split, rows=group, deferred=deferred)
            mixed = mixed if mlp else (mixed,)
            rebuild = functools.partial(store.rebuild, z[..., group, :n_w].detach(), base)
        x, mlp_part = mixed if mlp else (mixed[0], None)  # x: the Q + K + V readers
        with recompute_saved(x, rebuild, deferred) if rebuilt else contextlib.nullcontext():
            heads = fam.attention(layer, x, ctx)  # (H, B, T, D)
        del x, mixed
        new = [store.write(heads, starts[0])]
        const = fam.attn_constant(layer)
        if const is not None:  # a new tensor, never a view of a (possibly sharded) parameter
            base = const.float().clone() if base is None else base + const.float()
        if mlp:
            m_row = blocks[3].slice
            n_m = graph.n_writers_before[m_row.start]
            if n_m == n_w:  # parallel residual: the MLP reads what the heads read (graph: no a{l} -> m{l})
                x = mlp_part.clone()  # its own storage: the norm keeps it, not the whole group's mix
            else:  # + this layer's heads and its attention output bias
                heads_mix = store.mix(z[..., m_row, n_w:n_m], None if const is None else const.float(),
                                      [t for t in new if t is not None], start=n_w, rows=m_row)
                x = mlp_part + heads_mix
            out = fam.mlp(layer, x[0], ctx)  # (B, T, D)
            new.append(store.write(out[None], starts[1]))
        carry = None
        if layer < last:  # the group's constants travel as a new tensor: the next layer may not read this
            # one's (possibly sharded) parameters
            if const is not None:
                own_consts = const.float().clone() if own_consts is None else own_consts + const.float()
            carry = (partials, rebuilds, own_consts)
        return (base, carry, *[t for t in new if t is not None])

    def _group(self, layer: int) -> slice:
        """The reader rows of a layer's mix: its Q, K, V (and MLP) readers."""
        blocks = self.graph.layer_readers[layer]
        return slice(blocks[0].start, blocks[3].stop if self.graph.spec.mlp else blocks[2].stop)

    @property
    def group_layers(self) -> int:
        """How many consecutive layers mix together: ``GROUP_LAYERS``, or ``layer_group_size``'s choice."""
        return max(1, int(GROUP_LAYERS if GROUP_LAYERS is not None else layer_group_size(self.graph)))

    def _layer_group(self, layer: int) -> tuple[int, int]:
        """The first and last layer of the group ``layer`` mixes with: ``group_layers`` consecutive
        layers (0-1, 2-3, ... for pairs; the last group may be shorter)."""
        size = self.group_layers
        first = layer - layer % size
        return first, min(first + size, self.graph.spec.n_layers) - 1

    def _reader_input(self, z, rows: slice, store, const, tokens):
        """(R, B, T, D) fp32 inputs of the readers ``rows``: the mix over the writers before them."""
        n_w = self.graph.n_writers_before[rows.start]
        return store.mix(z[..., rows, :n_w], const, tokens, rows=rows)  # z (R, W) or position-aware (S, R, W)

    def _rebuilds(self, layer: int, readers: int) -> bool:
        """Whether the norms of a layer's ``readers`` Q/K/V readers are kept from saving their input, the
        backward rebuilding it from the mix (``recompute_saved``): not for the layers of
        ``_kept_inputs``, nor for one reader (keeping its input costs less), nor under activation
        checkpointing (it recomputes the whole layer anyway)."""
        return not (self.runner.checkpoint or readers == 1 or layer in self._kept_inputs)


def layer_group_size(graph: Graph) -> int:
    """How many consecutive layers mix together (``EdgeModel._masked_layer``) for this model shape: 2
    (pairs) or 1 (each layer alone). A pair makes one pass over the differences of the writers before
    it where two layers alone make two, and pays for it by carrying the second layer's partial mix
    (its readers' rows, B x T x D each) and adding it. So pairs pay where the writers a pair's first
    layer reads are many against a layer's readers, i.e. deep models with few heads a layer
    (``PAIR_MIN_RATIO``). Measured in one process (``bench/step.py --vs-groups``, cached steps, 2 CPU
    threads), the time of layers alone against pairs: GPT-2 small 0.87-0.88x at 8x32 and 0.88-0.89x at
    32x64 (ratio 1.8: alone), a 12-layer Llama with 12 / 4 heads 0.94x and 1.01x (3.1: alone),
    Llama-3.2-1B 1.11x at 4x32 (4.7: pairs), Qwen2.5-0.5B 1.06x (8.7), SmolLM2-135M 1.08x at 8x32 and
    1.03x at 32x64 (8.8). A function of the graph's shape only, so every process of a run groups alike."""
    layers = graph.layer_readers
    readers = sum(b.size for layer in layers for b in layer) / len(layers)
    firsts = [graph.n_writers_before[layers[l][0].start] for l in range(0, len(layers) - 1, 2)]
    if not firsts:
        return 1
    return 2 if sum(firsts) / len(firsts) >= PAIR_MIN_RATIO * readers else 1
