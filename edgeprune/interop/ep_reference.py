"""Runs of the Edge Pruning reference implementation (princeton-nlp/Edge-Pruning) -> our masks.

A reference run is an HF ``save_pretrained`` directory whose state dict holds, besides the frozen
weights, the mask parameters (read here from ``*.safetensors`` only, never unpickled):

GPT-2 (``FPT2LMHeadModel``, keys under ``transformer.``) / Llama (``FLlamaForCausalLM``, under ``model.``)::

    h.{l}.q_read_log_alphas / layers.{l}.q_read_log_alphas   (W, H)    rows = writers, cols = query heads
    ...k_read_log_alphas, ...v_read_log_alphas                (W, H)    GPT-2; (W, KV) Llama (per KV head)
    ...mlp_read_log_alphas                                    (W,)
    ...attn_write_log_alphas (H,), ...mlp_write_log_alphas (1,)         node (writer) masks
    final_read_log_alphas                                     (W,)      the read-out (our resid_post)
    token_write_log_alpha (1,), pos_write_log_alpha (1,)                only with embedding nodes

Writers are in forward order, as ours: [tok_embeds, pos_embeds (GPT-2) | embeds (Llama)] when the run
had embedding nodes, then per layer its heads and its MLP. Only the first ``offset`` rows of a
layer's read matrices are used (the writers before that reader); the rest is ignored.
Without embedding nodes the reference never masks the embeddings: our embedding edges (and nodes)
get log_alpha ``ALWAYS_ON`` so they are kept, as they were in the reference's forward.

The circuit our ``eval`` extracts uses our threshold rule (one global log_alpha threshold at the
masks' expected sparsity); the reference binarises per parameter tensor, so the two can differ at
the margin. The reference's own circuit is its ``edges.json``: ``convert_reference_edges`` maps its
names (``embeds`` -> ``tok_embeds``; under GQA the reference calls KV head g ``a{l}.h{g}.k``, we call
it ``a{l}.g{g}.k``), and ``edgeprune eval OUT --edges OUT/edges.json`` evaluates exactly that circuit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..graph import Graph, GraphSpec, edges_to_mask
from ..jsonfile import read_edge_pairs
from ..names import parse_node
from .common import InteropError

ALWAYS_ON = 10.0  # masks.INIT_LOG_ALPHA: a deterministic mask of exactly 1
_LAYER = re.compile(r"(?:^|.*\.)(?P<stack>h|layers)\.(?P<layer>\d+)\.(?P<name>q_read_log_alphas|k_read_log_alphas|"
                    r"v_read_log_alphas|mlp_read_log_alphas|attn_write_log_alphas|mlp_write_log_alphas)$")
_TOP = re.compile(r"(?:^|.*\.)(?P<name>final_read_log_alphas|token_write_log_alpha|pos_write_log_alpha)$")
LAYER_TENSORS = ("q_read_log_alphas", "k_read_log_alphas", "v_read_log_alphas", "mlp_read_log_alphas",
                 "attn_write_log_alphas", "mlp_write_log_alphas")
PICKLES = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
RESAVE = ("edgeprune never unpickles checkpoints. Re-save it as safetensors where the reference code is "
          "installed, e.g. `python -c \"import torch; from safetensors.torch import save_file; "
          "sd = torch.load('RUN/pytorch_model.bin', map_location='cpu'); "
          "save_file({k: v.contiguous() for k, v in sd.items() if 'log_alpha' in k}, 'RUN/masks.safetensors')\"` "
          "(or `Model.from_pretrained(RUN).save_pretrained(RUN, safe_serialization=True)`)")


@dataclass
class ReferenceMasks:
    edge_log_alpha: torch.Tensor  # (E,) float32 in our edge order
    node_log_alpha: torch.Tensor  # (W,) float32 in our writer order
    graph: Graph
    family: str  # "gpt2" | "llama"
    embedding_nodes: bool
    model_id: str | None  # the reference config's _name_or_path, if any
    source: str  # the file(s) read


def _mask_tensors(run_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every ``*log_alpha*`` tensor of the run's safetensors files (lazily: weights are not read)."""
    if run_dir.is_file():
        files = [run_dir]
    elif run_dir.is_dir():
        files = sorted(run_dir.glob("*.safetensors"))
    else:
        raise FileNotFoundError(f"{run_dir}: no such reference run directory")
    if not files:
        pickles = [p.name for pat in PICKLES for p in sorted(run_dir.glob(pat))]
        if pickles:
            raise InteropError(f"{run_dir}: the run is only a pickle ({', '.join(dict.fromkeys(pickles))}); {RESAVE}")
        raise InteropError(f"{run_dir}: no *.safetensors file (an HF save_pretrained directory of an Edge "
                           "Pruning reference run has model.safetensors)")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if "log_alpha" in key:
                        tensors[key] = st.get_tensor(key).float()
        except (SafetensorError, OSError) as err:
            raise InteropError(f"{f}: not a readable safetensors file ({err})") from None
    where = str(files[0]) if len(files) == 1 else f"{run_dir} ({len(files)} safetensors files)"
    if not tensors:
        raise InteropError(f"{where}: no mask tensors (keys ending in '_log_alphas'): not an Edge Pruning "
                           "reference run")
    return tensors, where


def read_reference(run_dir: str | Path, graph: Graph | None = None) -> ReferenceMasks:
    """The reference run's masks as our (E,) edge and (W,) node log_alpha.

    ``graph``: the model to convert for; its shape must be the run's (else an error naming both).
    Errors name the file and the first missing or mis-shaped key; nothing is written here.
    """
    run_dir = Path(run_dir)
    tensors, where = _mask_tensors(run_dir)
    ref = _group_tensors(tensors, where)
    graph = _graph_of(ref, graph, where)
    _check_shapes(ref, graph, where)
    return ReferenceMasks(_edge_log_alpha(ref, graph), _node_log_alpha(ref, graph), graph, ref.family,
                          ref.embedding_nodes, _model_id(run_dir), where)


@dataclass
class _Reference:
    """The reference run's mask tensors by layer and name, ``(key, tensor)`` each, and the shape they imply."""
    layers: dict[int, dict[str, tuple[str, torch.Tensor]]]
    top: dict[str, tuple[str, torch.Tensor]]  # final_read / token_write / pos_write
    family: str  # "gpt2" | "llama"
    n_heads: int
    kv: int | None  # K/V read matrices with a column per KV head (Llama), else None
    n_writers: int  # rows of every read matrix
    n_emb: int  # embedding writers among them (0: the run has no embedding nodes)

    @property
    def n_layers(self) -> int:
        return max(self.layers) + 1

    @property
    def embedding_nodes(self) -> bool:
        return self.n_emb > 0

    @property
    def emb_names(self) -> tuple[str, ...]:
        return ("token_write_log_alpha", "pos_write_log_alpha") if self.family == "gpt2" else ("token_write_log_alpha",)

    def spec(self) -> GraphSpec:
        return GraphSpec(n_layers=self.n_layers, n_heads=self.n_heads,
                         n_kv_heads=self.kv if self.family == "llama" else None, pos_embeds=self.family == "gpt2")


def _group_tensors(tensors: dict[str, torch.Tensor], where: str) -> _Reference:
    """Sort the mask tensors into layers and top-level ones, checking every expected one is there."""
    layers: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    top: dict[str, tuple[str, torch.Tensor]] = {}
    stacks, prefix = set(), None
    for key, t in tensors.items():
        m = _LAYER.fullmatch(key)
        if m:
            stacks.add(m["stack"])
            layers.setdefault(int(m["layer"]), {})[m["name"]] = (key, t)
            prefix = prefix or key[: m.start("stack")]
            continue
        m = _TOP.fullmatch(key)
        if m:
            top[m["name"]] = (key, t)
    if not layers:
        raise InteropError(f"{where}: no per-layer mask tensors ('h.{{l}}.q_read_log_alphas' or "
                           "'layers.{l}.q_read_log_alphas'): not an Edge Pruning reference run")
    if len(stacks) > 1:
        raise InteropError(f"{where}: both GPT-2 ('h.') and Llama ('layers.') mask keys: not one reference run")
    family = "gpt2" if stacks == {"h"} else "llama"
    _check_present(layers, top, family, prefix, where)
    n_heads = layers[0]["attn_write_log_alphas"][1].numel()
    k_read = layers[0]["k_read_log_alphas"][1]
    n_writers = top["final_read_log_alphas"][1].numel()
    ref = _Reference(layers, top, family, n_heads, k_read.shape[-1] if k_read.dim() == 2 else None, n_writers,
                     n_emb=n_writers - (max(layers) + 1) * (n_heads + 1))
    if ref.n_emb not in (0, len(ref.emb_names)):
        raise InteropError(f"{where}: '{top['final_read_log_alphas'][0]}' has {n_writers} writers, but "
                           f"{ref.n_layers} layers of {n_heads} heads + MLP make {ref.n_layers * (n_heads + 1)} "
                           f"(+{len(ref.emb_names)} embedding nodes)")
    for name in ref.emb_names if ref.embedding_nodes else ():
        if name not in top:
            raise InteropError(f"{where}: missing mask tensor '{prefix}{name}' (the run has embedding nodes)")
    return ref


def _check_present(layers, top, family: str, prefix: str, where: str) -> None:
    """Every layer's six mask tensors and the read-out's are there (errors name the first missing key)."""
    stack = "h" if family == "gpt2" else "layers"
    n_layers = max(layers) + 1
    for l in range(n_layers):
        for name in LAYER_TENSORS:
            if name not in layers.get(l, {}):
                raise InteropError(f"{where}: missing mask tensor '{prefix}{stack}.{l}.{name}' "
                                   f"(the run has layers 0..{n_layers - 1})")
    if "final_read_log_alphas" not in top:
        raise InteropError(f"{where}: missing mask tensor '{prefix}final_read_log_alphas'")


def _graph_of(ref: _Reference, graph: Graph | None, where: str) -> Graph:
    """The run's graph, or ``graph`` when its shape is the run's (else an error naming both)."""
    spec = ref.spec()
    if graph is None:
        return Graph(spec)
    s = graph.spec
    if (s.n_layers, s.n_heads, s.kv_heads, s.pos_embeds) != (spec.n_layers, spec.n_heads, spec.kv_heads,
                                                             spec.pos_embeds):
        raise InteropError(f"{where}: the reference run is a {ref.family} graph of {spec.n_layers} layers x "
                           f"{spec.n_heads} heads ({spec.kv_heads} KV heads), the model has {s.n_layers} x "
                           f"{s.n_heads} ({s.kv_heads} KV heads, "
                           f"{'with' if s.pos_embeds else 'without'} position embeddings)")
    return graph


def _check_shapes(ref: _Reference, graph: Graph, where: str) -> None:
    """Every read matrix has a row per reference writer (and a column per head / KV head)."""
    kv = graph.spec.kv_heads
    for l in range(ref.n_layers):
        for name in LAYER_TENSORS:
            key, t = ref.layers[l][name]
            cols = {"q_read_log_alphas": ref.n_heads, "k_read_log_alphas": kv, "v_read_log_alphas": kv}.get(name)
            want = {"mlp_read_log_alphas": (ref.n_writers,), "attn_write_log_alphas": (ref.n_heads,),
                    "mlp_write_log_alphas": (1,)}.get(name, (ref.n_writers, cols))
            if tuple(t.shape) != want:
                raise InteropError(f"{where}: '{key}' has shape {tuple(t.shape)}, expected {want}")
    for name, (key, t) in ref.top.items():
        want = (ref.n_writers,) if name == "final_read_log_alphas" else (1,)
        if tuple(t.shape) != want:
            raise InteropError(f"{where}: '{key}' has shape {tuple(t.shape)}, expected {want}")


def _edge_log_alpha(ref: _Reference, graph: Graph) -> torch.Tensor:
    """(E,) in our edge order: each reader's column of its reference read matrix, row by writer."""
    n_ours_emb = 2 if graph.spec.pos_embeds else 1

    def ref_row(w: int) -> int | None:
        """Row of our writer w in the reference matrices (None: an embedding the reference never masks)."""
        if w < n_ours_emb:
            return w if ref.embedding_nodes else None
        return w - n_ours_emb + ref.n_emb

    rows = [ref_row(w) for w in range(graph.num_writers)]
    edge = torch.empty(graph.num_edges)
    for r, reader in enumerate(graph.readers):
        start, n = graph.edge_offsets[r], graph.n_writers_before[r]
        if reader == "resid_post":
            col = ref.top["final_read_log_alphas"][1]
        else:
            layer = int(reader.split(".")[0][1:]) if reader.startswith("a") else int(reader[1:])
            if reader.startswith("m"):
                col = ref.layers[layer]["mlp_read_log_alphas"][1]
            else:
                _, unit, part = reader.split(".")
                col = ref.layers[layer][f"{part}_read_log_alphas"][1][:, int(unit[1:])]
        for i in range(n):
            edge[start + i] = ALWAYS_ON if rows[i] is None else col[rows[i]]
    return edge.float()


def _node_log_alpha(ref: _Reference, graph: Graph) -> torch.Tensor:
    """(W,) in our writer order: the reference's write masks (embeddings without one: always on)."""
    n_ours_emb = 2 if graph.spec.pos_embeds else 1
    node = torch.empty(graph.num_writers)
    for w, writer in enumerate(graph.writers):
        if w < n_ours_emb:
            node[w] = ref.top[ref.emb_names[w]][1][0] if ref.embedding_nodes else ALWAYS_ON
        elif writer.startswith("m"):
            node[w] = ref.layers[int(writer[1:])]["mlp_write_log_alphas"][1][0]
        else:
            l, h = writer.split(".")
            node[w] = ref.layers[int(l[1:])]["attn_write_log_alphas"][1][int(h[1:])]
    return node.float()


def _model_id(run_dir: Path) -> str | None:
    """The ``_name_or_path`` of the reference run's config.json, if it has one."""
    cfg_path = (run_dir if run_dir.is_dir() else run_dir.parent) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        return json.loads(cfg_path.read_text()).get("_name_or_path") or None
    except (json.JSONDecodeError, AttributeError):
        return None


def convert_reference_edges(path: str | Path, graph: Graph) -> list[list[str]]:
    """A reference ``edges.json`` in our names (checked against ``graph``); errors name the entry."""
    try:
        pairs = read_edge_pairs(path)
    except ValueError as err:
        raise InteropError(str(err)) from None
    out = []
    for _, (w, r) in pairs:
        w = "tok_embeds" if w == "embeds" else w
        try:
            node = parse_node(r)
        except ValueError:  # edges_to_mask below names it
            node = None
        if graph.spec.grouped and node is not None and node.kind in ("k", "v") and node.head is not None:
            r = f"a{node.layer}.g{node.head}.{node.kind}"  # the reference names KV head g 'a{l}.h{g}.k
        out.append([w, r])
    try:
        edges_to_mask(graph, out)
    except ValueError as err:
        raise InteropError(f"{path}: {err} (after mapping the reference's names)") from None
    return out
