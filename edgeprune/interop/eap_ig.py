"""The EAP-IG library's graph JSON (also MIB's submission format), both ways.

File layout (what ``eap.graph.Graph.to_json`` writes and ``from_json`` reads)::

    {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": bool, "d_model": D, ...},
     "nodes": {"input": {"in_graph": bool}, "a0.h0": {...}, "m0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": float, "in_graph": bool}, "a0.h3->m1": {...}, ...}}

Names, ours -> theirs (``MibMap``; docs/interop.md has the table):
- writers: ``tok_embeds`` and ``pos_embeds`` are both MIB's one ``input`` node; heads and MLPs keep
  their names;
- readers: ``a{l}.h{h}.q`` -> ``a{l}.h{h}<q>`` (same for k, v); ``m{l}`` -> ``m{l}``; ``resid_post``
  -> ``logits``; under grouped-query attention our K/V reader ``a{l}.g{g}.k`` is MIB's ``<k>`` input
  of every query head of group g (MIB ungroups K/V per query head).
So one of our edges is one MIB edge, or (GQA K/V) one per query head of its group; one MIB edge is
one of ours, or (from ``input`` in a model with position embeddings) two.

Aggregation where several edges become one: ``in_graph`` is *any*; the score is the score of the
edge that ranks highest (largest ``|score|`` for EAP / EAP-IG, largest score for ACDC and Edge
Pruning log_alpha), so a top-n on either side ranks the merged edge where its best member ranked.
Where one edge becomes several, each copy gets its score and ``in_graph``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..circuit import EMBEDDINGS
from ..graph import Graph
from .common import InteropError, write_json

FORMAT_NOTE = "EAP-IG / MIB graph JSON"
_NODE = re.compile(r"input|logits|a(\d+)\.h(\d+)|m(\d+)")
_EDGE = re.compile(r"(?P<src>[^<>\-]+)->(?P<dst>[^<>\-]+?)(?:<(?P<qkv>[qkv])>)?")


@dataclass
class MibMap:
    """The many-to-many map between our edges and MIB's for one graph.

    ``names``: MIB edge names in EAP-IG's construction order per reader; ``pairs``: (mib index, our
    edge index) for every correspondence.
    """

    graph: Graph
    names: list[str] = field(init=False)
    pairs: list[tuple[int, int]] = field(init=False)
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        s = self.graph.spec
        if not s.mlp:
            raise InteropError(f"this model's graph has no MLP nodes ({self.graph.describe()}); the EAP-IG/MIB "
                               "graph has an m{l} node in every layer and cannot describe it")
        per = s.n_heads // s.kv_heads
        self.names, self.pairs, self.index = [], [], {}
        for e, (w, r) in enumerate(self.graph.edges):
            src = "input" if w in EMBEDDINGS else w
            for dst in self._dsts(r, per):
                name = f"{src}->{dst}"
                if name not in self.index:
                    self.index[name] = len(self.names)
                    self.names.append(name)
                self.pairs.append((self.index[name], e))

    @staticmethod
    def _dsts(reader: str, per: int) -> list[str]:
        if reader == "resid_post":
            return ["logits"]
        if reader.startswith("m"):
            return [reader]
        layer, unit, part = reader.split(".")
        if unit.startswith("g"):
            g = int(unit[1:])
            return [f"{layer}.h{h}<{part}>" for h in range(g * per, (g + 1) * per)]
        return [f"{layer}.{unit}<{part}>"]

    @property
    def num_edges(self) -> int:
        return len(self.names)

    def node_names(self) -> list[str]:
        s = self.graph.spec
        out = ["input"]
        for l in range(s.n_layers):
            out += [f"a{l}.h{h}" for h in range(s.n_heads)] + [f"m{l}"]
        return out + ["logits"]

    # ---------------------------------------------------------------- ours -> MIB
    def to_mib(self, values: torch.Tensor, kept: torch.Tensor, signed: bool) -> tuple[list[float], list[bool]]:
        """Our (E,) scores and (E,) bool -> per MIB edge (score of the best-ranked member; ``in_graph``
        from ``mib_in_graph``)."""
        vals = values.double().tolist()
        score: list[float | None] = [None] * self.num_edges
        for m, e in self.pairs:
            v = vals[e]
            if score[m] is None or _key(v, signed) > _key(score[m], signed):
                score[m] = v
        return [float(v) for v in score], self.mib_in_graph(kept)

    def mib_in_graph(self, kept: torch.Tensor) -> list[bool]:
        """Per MIB edge: in the graph, for a circuit of ours (E,) bool.

        A grouped K/V edge of ours is copied only to the query heads of its group that are in the
        circuit (that write a kept edge): a copy into a head with no way out is one the EAP-IG
        library's ``prune()`` removes. The set is then pruned by the library's rule
        (``library_prune``), so the library evaluates exactly the edges counted here."""
        keep = kept.bool().tolist()
        writing = {self.graph.edges[e][0] for e in range(len(keep)) if keep[e]}
        in_graph = [False] * self.num_edges
        for m, e in self.pairs:
            if keep[e] and not in_graph[m]:
                reader = self.graph.edges[e][1]
                head = self.names[m].split("->")[1].split("<")[0]
                in_graph[m] = ".g" not in reader or head in writing
        return library_prune(self.names, in_graph)

    def mib_count(self, kept: torch.Tensor) -> int:
        """How many MIB edges a circuit of ours (E,) bool is (MIB's own edge count, after its pruning)."""
        return sum(self.mib_in_graph(kept))

    # ---------------------------------------------------------------- MIB -> ours
    def to_ours(self, scores: dict[int, float], in_graph: dict[int, bool], signed: bool):
        """Per MIB edge index -> our (E,) float32 scores and (E,) bool (best-ranked member, any).

        Returns (values, kept, n_missing): our edges none of whose MIB edges is in the file get score
        0 and are not kept."""
        E = self.graph.num_edges
        best: list[float | None] = [None] * E
        keep = [False] * E
        for m, e in self.pairs:
            if m in scores:
                v = scores[m]
                if best[e] is None or _key(v, signed) > _key(best[e], signed):
                    best[e] = v
                keep[e] = keep[e] or in_graph.get(m, False)
        missing = sum(b is None for b in best)
        values = torch.tensor([0.0 if b is None else b for b in best], dtype=torch.float64)
        return values.float(), torch.tensor(keep, dtype=torch.bool), missing


def library_prune(names: list[str], in_graph: list[bool]) -> list[bool]:
    """The EAP-IG library's ``Graph.prune`` rule on MIB edge names: repeatedly, a node stays only if
    it has an in-graph edge out and one in (``input`` needs none in; ``logits`` always stays), and an
    edge stays only if both its nodes do; until nothing changes."""
    keep = list(in_graph)
    ends = [(n.split("->")[0], n.split("->")[1].split("<")[0]) for n in names]
    while True:
        out_of = {src for (src, _), k in zip(ends, keep) if k}
        into = {dst for (_, dst), k in zip(ends, keep) if k}
        alive = lambda n: n == "logits" or (n in out_of and (n == "input" or n in into))  # noqa: E731
        new = [k and alive(src) and alive(dst) for (src, dst), k in zip(ends, keep)]
        if new == keep:
            return keep
        keep = new


def _key(v: float, signed: bool) -> float:
    return v if signed else abs(v)


def node_in_graph(mmap: MibMap, edge_in_graph: list[bool]) -> dict[str, bool]:
    """A node is in the graph when it has an in-graph edge out and (unless ``input``) one in; ``logits``
    always is (the EAP-IG library's rule after pruning)."""
    out_of, into = set(), set()
    for name, keep in zip(mmap.names, edge_in_graph):
        if keep:
            src, dst = name.split("->")
            out_of.add(src)
            into.add(dst.split("<")[0])
    return {n: (n == "logits") or (n in out_of and (n == "input" or n in into)) for n in mmap.node_names()}


def to_eap_ig(graph: Graph, values: torch.Tensor, kept: torch.Tensor, *, signed: bool, d_model: int,
              provenance: dict | None = None) -> dict:
    """The EAP-IG graph dict of our (E,) scores and (E,) bool circuit.

    ``cfg`` holds the keys the EAP-IG library reads (n_layers, n_heads, parallel_attn_mlp, d_model)
    plus ``n_key_value_heads`` and, under ``edgeprune``, where the file came from (``provenance``):
    the library ignores keys it does not know."""
    if values.shape != (graph.num_edges,) or kept.shape != (graph.num_edges,):
        raise ValueError(f"scores {tuple(values.shape)} / circuit {tuple(kept.shape)} do not match the graph's "
                         f"({graph.num_edges},) edges")
    mmap = MibMap(graph)
    scores, in_graph = mmap.to_mib(values, kept, signed)
    s = graph.spec
    cfg = {"n_layers": s.n_layers, "n_heads": s.n_heads, "parallel_attn_mlp": bool(s.parallel_residual),
           "d_model": int(d_model), "n_key_value_heads": s.kv_heads}
    if provenance:
        cfg["edgeprune"] = provenance
    nodes = {n: {"in_graph": v} for n, v in node_in_graph(mmap, in_graph).items()}
    edges = {n: {"score": sc, "in_graph": ig} for n, sc, ig in zip(mmap.names, scores, in_graph)}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def write_eap_ig(data: dict, path: str | Path) -> Path:
    return write_json(data, path)


# -------------------------------------------------------------------- reading
@dataclass
class EapIgFile:
    cfg: dict
    values: torch.Tensor  # (E,) float32, our edge order
    kept: torch.Tensor  # (E,) bool
    missing: int  # our edges with no MIB edge in the file
    mib_edges: int  # edges in the file
    mib_in_graph: int  # of them, in the graph
    provenance: dict | None


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError as err:
        raise InteropError(f"{path}: not a text JSON file ({err.reason})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object with keys 'cfg', 'nodes', 'edges', got "
                           f"{type(data).__name__}")
    for key in ("cfg", "nodes", "edges"):
        if not isinstance(data.get(key), dict):
            what = "missing" if key not in data else f"not an object ({type(data[key]).__name__})"
            raise InteropError(f"{path}: key '{key}' is {what} (an {FORMAT_NOTE} has 'cfg', 'nodes', 'edges')")
    return data


def check_cfg(cfg: dict, graph: Graph, path) -> None:
    """The file's model shape must be this graph's: an error naming the first field that differs."""
    s = graph.spec
    want = {"n_layers": s.n_layers, "n_heads": s.n_heads}
    for key, ours in want.items():
        if key not in cfg:
            raise InteropError(f"{path}: cfg.{key} is missing")
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] != ours:
            raise InteropError(f"{path}: cfg.{key} is {cfg[key]!r} but the model has {ours} "
                               f"({graph.describe()}): the file is for another model")
    if "parallel_attn_mlp" in cfg and bool(cfg["parallel_attn_mlp"]) != bool(s.parallel_residual):
        raise InteropError(f"{path}: cfg.parallel_attn_mlp is {cfg['parallel_attn_mlp']!r} but the model "
                           f"{'has' if s.parallel_residual else 'does not have'} a parallel residual")
    if "n_key_value_heads" in cfg and cfg["n_key_value_heads"] not in (None, s.kv_heads):
        raise InteropError(f"{path}: cfg.n_key_value_heads is {cfg['n_key_value_heads']!r} but the model has "
                           f"{s.kv_heads} KV heads")


def _bad_name(name: str, graph: Graph) -> str:
    """Why an edge name is not in this graph: an unknown node, or a pair that is no edge."""
    s = graph.spec
    m = _EDGE.fullmatch(name)
    if not m:
        return "not an edge name (expected 'SRC->DST' or 'SRC->a{l}.h{h}<q|k|v>')"
    for role, node in (("source", m["src"]), ("destination", m["dst"])):
        nm = _NODE.fullmatch(node)
        if not nm:
            return (f"unknown {role} node {node!r} (nodes are 'input', 'a{{l}}.h{{h}}', 'm{{l}}', 'logits'; this "
                    f"model has {s.n_layers} layers of {s.n_heads} heads)")
        layer = nm[1] or nm[3]
        if layer is not None and int(layer) >= s.n_layers:
            return f"unknown {role} node {node!r}: layer {layer} (this model has {s.n_layers} layers)"
        if nm[2] is not None and int(nm[2]) >= s.n_heads:
            return f"unknown {role} node {node!r}: head {nm[2]} (this model has {s.n_heads} heads per layer)"
    if m["dst"].startswith("a") and m["qkv"] is None:
        return "an edge into an attention head needs its input: '<q>', '<k>' or '<v>'"
    return "no such edge in this graph (the source does not come before the destination)"


def read_eap_ig(path: str | Path, graph: Graph, *, signed: bool = False) -> EapIgFile:
    """An EAP-IG / MIB graph file as our (E,) scores and (E,) circuit; every check runs before any
    result is returned, and errors name the file and the first offending key."""
    data = load_json(path)
    check_cfg(data["cfg"], graph, path)
    mmap = MibMap(graph)
    known_nodes = set(mmap.node_names())
    for name, entry in data["nodes"].items():
        if name not in known_nodes:
            nm = _NODE.fullmatch(name)
            hint = "" if nm else " (nodes are 'input', 'a{l}.h{h}', 'm{l}', 'logits')"
            raise InteropError(f"{path}: nodes[{name!r}]: unknown node for this model ({graph.describe()}){hint}")
        if not isinstance(entry, dict) or not isinstance(entry.get("in_graph", False), bool):
            raise InteropError(f"{path}: nodes[{name!r}]: expected an object with a boolean 'in_graph'")
    provenance = data["cfg"].get("edgeprune") if isinstance(data["cfg"].get("edgeprune"), dict) else None
    offset = float(provenance.get("score_offset", 0.0)) if provenance else 0.0
    scores, in_graph = {}, {}
    for name, entry in data["edges"].items():
        m = mmap.index.get(name)
        if m is None:
            raise InteropError(f"{path}: edges[{name!r}]: {_bad_name(name, graph)}")
        if not isinstance(entry, dict):
            raise InteropError(f"{path}: edges[{name!r}]: expected an object with 'score' and 'in_graph'")
        score = entry.get("score", 0.0)
        if score is None:
            score = 0.0
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise InteropError(f"{path}: edges[{name!r}].score is {score!r}, expected a finite number")
        ig = entry.get("in_graph", False)
        if not isinstance(ig, bool):
            raise InteropError(f"{path}: edges[{name!r}].in_graph is {ig!r}, expected true or false")
        scores[m], in_graph[m] = float(score) + offset, ig
    values, kept, missing = mmap.to_ours(scores, in_graph, signed)
    return EapIgFile(cfg=data["cfg"], values=values, kept=kept, missing=missing, mib_edges=len(scores),
                     mib_in_graph=sum(in_graph.values()), provenance=provenance)
