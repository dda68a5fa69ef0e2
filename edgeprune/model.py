"""``EdgeModel``: a transformers causal LM with a learnable mask on every edge of its graph.

The forward (DESIGN.md section 3): writer states are computed once and kept once, per writer
group (embeddings, a layer's heads, a layer's MLP). Every reader's input is

    x_r = c_r + sum_{w < r} z_rw s_w + (1 - z_rw) s~_w

where c_r are the layer constants before r (attention output biases), s the writer states of the
input, s~ their ablated values: the states of the corrupted input (``interchange``, default), zero
(``zero``) or a dataset mean per writer (``mean``). The mix accumulates in fp32. With every mask 1
this is the HF model; with every mask 0 under interchange it is the HF model on the corrupted input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .graph import Graph
from .masks import HardConcreteMasks
from .mixing import dense_masks, mix
from .models import Family, family_for

ABLATIONS = ("interchange", "zero", "mean")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# from_pretrained kwargs that also make sense for the config look-up
_CONFIG_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "gguf_file",
                  "subfolder")


@dataclass
class EdgeOutput:
    logits: torch.Tensor  # (B, T, V) in the model's dtype
    states: list[torch.Tensor] | None = None  # writer groups, each (g, B, T, D), when asked for


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
        self.node_masks = HardConcreteMasks(self.graph.num_writers) if node_masks else None
        self.mean_states: torch.Tensor | None = None  # (W, D) for ablation="mean"
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
        from .models.tracr import is_tracr_artifact, load_tracr

        if is_tracr_artifact(name_or_path):
            return cls.from_hf(load_tracr(name_or_path, **hf_kwargs), node_masks=node_masks,
                               ablation="zero" if ablation is None else ablation, model_id=str(name_or_path))
        ablation = "interchange" if ablation is None else ablation
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg_kwargs = {k: v for k, v in hf_kwargs.items() if k in _CONFIG_KWARGS}
        config = AutoConfig.from_pretrained(name_or_path, **cfg_kwargs)
        family_for(config.model_type)
        hf_kwargs.setdefault("dtype", torch.float32)
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

    def train(self, mode: bool = True) -> "EdgeModel":
        """Masks sample in training mode; the frozen HF model always stays in eval (no dropout)."""
        super().train(mode)
        self.family.hf.eval()
        return self

    # ------------------------------------------------------------------ masks
    def mask_values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Current (E,) edge and (W,) node mask values (sampled in training, else deterministic)."""
        return self.edge_masks(), None if self.node_masks is None else self.node_masks()

    def set_edges(self, edges) -> None:
        """Keep exactly these (writer, reader) edges (mask 1), ablate every other (mask 0)."""
        values = torch.zeros(self.graph.num_edges)
        for i, pair in enumerate(edges):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"edge {i}: expected a [writer, reader] pair, got {pair!r}")
            try:
                values[self.graph.edge_index(*pair)] = 1.0
            except KeyError as err:
                raise ValueError(f"edge {i}: {err.args[0]}") from None
        self.edge_masks.set_values(values)
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
                corrupted_states: list[torch.Tensor] | None = None,
                edge_values: torch.Tensor | None = None, node_values: torch.Tensor | None = None,
                return_states: bool = False) -> EdgeOutput:
        """The edge-masked forward. input_ids (B, T) -> logits (B, T, V).

        Under interchange ablation give ``corrupted_input_ids`` (same shape; its writer states are
        computed without grad from the same weights) or precomputed ``corrupted_states`` (from
        ``full_forward(..., return_states=True)``). ``edge_values``/``node_values`` override the
        masks for this call (e.g. a tensor that requires grad, for attribution).
        """
        self._check_ids(input_ids, attention_mask, "input_ids")
        ablated = self._ablated_states(input_ids, corrupted_input_ids, corrupted_attention_mask,
                                       corrupted_states, position_ids)
        if edge_values is None:
            edge_values, default_nodes = self.mask_values()
            node_values = default_nodes if node_values is None else node_values
        if edge_values.shape != (self.graph.num_edges,):
            raise ValueError(f"edge mask values must have shape ({self.graph.num_edges},), "
                             f"got {tuple(edge_values.shape)}")
        if node_values is not None and node_values.shape != (self.graph.num_writers,):
            raise ValueError(f"node mask values must have shape ({self.graph.num_writers},), "
                             f"got {tuple(node_values.shape)}")
        z = dense_masks(self.graph, edge_values.float(), None if node_values is None else node_values.float())
        return self._run(input_ids, attention_mask, position_ids, z, ablated, return_states)

    def full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     position_ids: torch.Tensor | None = None, return_states: bool = False) -> EdgeOutput:
        """The unmasked model (every edge kept), optionally returning its writer states."""
        self._check_ids(input_ids, attention_mask, "input_ids")
        return self._run(input_ids, attention_mask, position_ids, None, None, return_states)

    @torch.no_grad()
    def compute_mean_states(self, batches) -> torch.Tensor:
        """(W, D) mean writer state over the real tokens of ``batches`` of (input_ids, attention_mask)."""
        total, count = None, 0
        for ids, mask in batches:
            ids = ids.to(self.device)
            mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
            states = torch.cat(self.full_forward(ids, mask, return_states=True).states)  # (W, B, T, D)
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

    # ------------------------------------------------------------------ internals
    def _check_ids(self, ids, mask, name):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"{name} must be a (batch, seq) integer tensor, got "
                             f"{type(ids).__name__} {getattr(ids, 'shape', '')}")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask for {name} must have shape {tuple(ids.shape)}, got {tuple(mask.shape)}")

    def _ablated_states(self, ids, corrupted_ids, corrupted_mask, corrupted_states, position_ids):
        """Per writer group: the ablated states (g, B|1, T|1, D), or None for zero ablation."""
        groups = [b.size for b in self.graph.writer_blocks]
        if self.ablation == "zero":
            return [None] * len(groups)
        if self.ablation == "mean":
            if self.mean_states is None:
                raise ValueError("ablation='mean' needs mean states: call model.set_mean_states("
                                 "model.compute_mean_states(batches)) first")
            return [s[:, None, None, :] for s in self.mean_states.split(groups)]
        if corrupted_states is not None:
            if len(corrupted_states) != len(groups):
                raise ValueError(f"corrupted_states must have {len(groups)} writer groups, got {len(corrupted_states)}")
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

    def _run(self, input_ids, attention_mask, position_ids, z, ablated, return_states) -> EdgeOutput:
        """One pass: z None = unmasked (a plain residual stream), else the masked mix."""
        fam, graph = self.family, self.graph
        ctx = fam.context(input_ids, attention_mask, position_ids)
        states = [fam.embed(input_ids, ctx)]  # writer groups, model dtype
        resid = states[0].float().sum(0) if z is None else None  # (B, T, D) fp32 residual stream
        base = 0.0  # masked path: the layer constants every later reader sees
        readers = iter(graph.reader_blocks)
        n_groups = 1
        for layer in range(graph.spec.n_layers):
            q_blk, k_blk, v_blk = next(readers), next(readers), next(readers)
            const = fam.attn_constant(layer)
            if z is None:
                q_in = k_in = v_in = resid[None]
            else:
                rows = slice(q_blk.start, v_blk.stop)
                n_w = graph.n_writers_before[q_blk.start]
                x = base + mix(z[rows, :n_w], states[:n_groups], ablated[:n_groups])
                q_in, k_in, v_in = x.split([q_blk.size, k_blk.size, v_blk.size])
            heads = fam.attention(layer, q_in, k_in, v_in, ctx)  # (H, B, T, D)
            states.append(heads)
            n_groups += 1
            if z is None:
                resid = resid + heads.float().sum(0)
                if const is not None:
                    resid = resid + const.float()
            elif const is not None:
                base = base + const.float()
            if graph.spec.mlp:
                m_blk = next(readers)
                if z is None:
                    m_in = resid
                else:
                    n_w = graph.n_writers_before[m_blk.start]
                    m_in = (base + mix(z[m_blk.slice, :n_w], states[:n_groups], ablated[:n_groups]))[0]
                out = fam.mlp(layer, m_in, ctx)  # (B, T, D)
                states.append(out[None])
                n_groups += 1
                if z is None:
                    resid = resid + out.float()
        out_blk = next(readers)
        if z is None:
            final = resid
        else:
            final = (base + mix(z[out_blk.slice], states, ablated))[0]
        logits = fam.readout(final, ctx)
        return EdgeOutput(logits=logits, states=states if return_states else None)

