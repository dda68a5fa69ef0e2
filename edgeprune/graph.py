"""The computation graph of an edge-masked transformer: writers, readers and the edges between them.

Writers put something into the residual stream: ``tok_embeds``, ``pos_embeds`` (absent for rotary
models), every attention head ``a{l}.h{h}`` and every MLP ``m{l}``. Readers take a mixture of
earlier writers as input: ``a{l}.h{h}.q``, the key/value inputs ``a{l}.h{h}.k`` / ``.v`` (or, under
grouped-query attention, one per KV head: ``a{l}.g{g}.k`` / ``.v``), the MLP input ``m{l}`` and the
final read-out ``resid_post``. An edge (writer, reader) exists when the writer comes before the
reader: the MLP of layer l reads the heads of layer l (sequential residual), attention readers of
layer l read everything up to the MLP of layer l-1. With a parallel residual (GPT-NeoX / Pythia:
attention and MLP of a layer read the same residual stream) the MLP of layer l reads only what the
heads of layer l read, so the same-layer edges ``a{l}.h{h} -> m{l}`` do not exist.

Ordering is fixed and shared by masks, checkpoints and ``edges.json``: writers in forward order,
readers in forward order (per layer: all Q, then K, then V, then the MLP), edges reader-major.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from .names import parse_node


@dataclass(frozen=True)
class GraphSpec:
    """What the graph depends on: the shape of the model, not its weights."""

    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    pos_embeds: bool = True  # False for rotary / position-free models
    mlp: bool = True
    parallel_residual: bool = False  # True: m{l} reads the residual before layer l's heads (GPT-NeoX)

    def __post_init__(self):
        kv = self.kv_heads
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(f"GraphSpec needs n_layers >= 1 and n_heads >= 1, got {self}")
        if kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def grouped(self) -> bool:
        return self.kv_heads != self.n_heads


@dataclass(frozen=True)
class Block:
    """A contiguous run of writers or readers that the forward handles together."""

    kind: str  # writers: "embeds" | "heads" | "mlp"; readers: "q" | "k" | "v" | "mlp" | "out"
    layer: int | None
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass
class Graph:
    """Writers, readers and valid edges of one model shape, with index maps both ways.

    ``n_writers_before[r]`` is how many writers reader ``r`` can see; since writers are in forward
    order, reader r reads exactly writers ``0 .. n_writers_before[r] - 1``.
    """

    spec: GraphSpec
    writers: list[str] = field(init=False)
    readers: list[str] = field(init=False)
    writer_blocks: list[Block] = field(init=False)
    reader_blocks: list[Block] = field(init=False)
    n_writers_before: list[int] = field(init=False)

    def __post_init__(self):
        s = self.spec
        self.writers, self.writer_blocks = [], []
        self.readers, self.reader_blocks, self.n_writers_before = [], [], []

        def add_writers(kind, layer, names):
            self.writer_blocks.append(Block(kind, layer, len(self.writers), len(self.writers) + len(names)))
            self.writers.extend(names)

        def add_readers(kind, layer, names, n_before=None):
            self.reader_blocks.append(Block(kind, layer, len(self.readers), len(self.readers) + len(names)))
            self.readers.extend(names)
            self.n_writers_before.extend([len(self.writers) if n_before is None else n_before] * len(names))

        add_writers("embeds", None, ["tok_embeds", "pos_embeds"] if s.pos_embeds else ["tok_embeds"])
        for l in range(s.n_layers):
            kv = "g" if s.grouped else "h"
            add_readers("q", l, [f"a{l}.h{h}.q" for h in range(s.n_heads)])
            add_readers("k", l, [f"a{l}.{kv}{g}.k" for g in range(s.kv_heads)])
            add_readers("v", l, [f"a{l}.{kv}{g}.v" for g in range(s.kv_heads)])
            before_heads = len(self.writers)
            add_writers("heads", l, [f"a{l}.h{h}" for h in range(s.n_heads)])
            if s.mlp:
                add_readers("mlp", l, [f"m{l}"], before_heads if s.parallel_residual else None)
                add_writers("mlp", l, [f"m{l}"])
        add_readers("out", None, ["resid_post"])

    @classmethod
    def from_spec(cls, **kwargs) -> "Graph":
        return cls(GraphSpec(**kwargs))

    @cached_property
    def layer_readers(self) -> list[list[Block]]:
        """Per layer: its reader blocks (Q, K, V and, with MLPs, the MLP), in graph order."""
        per_layer = 4 if self.spec.mlp else 3
        return [self.reader_blocks[l * per_layer:(l + 1) * per_layer] for l in range(self.spec.n_layers)]

    # ------------------------------------------------------------------ counts and indices
    @property
    def num_writers(self) -> int:
        return len(self.writers)

    @property
    def num_readers(self) -> int:
        return len(self.readers)

    @property
    def num_edges(self) -> int:
        return sum(self.n_writers_before)

    @cached_property
    def writer_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.writers)}

    @cached_property
    def reader_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.readers)}

    @cached_property
    def edge_offsets(self) -> list[int]:
        """``edge_offsets[r]``: index of reader r's first edge in the flat edge order."""
        offsets, total = [], 0
        for n in self.n_writers_before:
            offsets.append(total)
            total += n
        return offsets

    @cached_property
    def edges(self) -> list[tuple[str, str]]:
        """All valid (writer, reader) pairs, reader-major."""
        return [(self.writers[w], r) for r, n in zip(self.readers, self.n_writers_before) for w in range(n)]

    def edge_index(self, writer: str, reader: str) -> int:
        """Flat index of an edge; a clear error for unknown names or an edge that does not exist."""
        if writer not in self.writer_index:
            raise KeyError(f"unknown writer {writer!r} (writers look like 'tok_embeds', 'a0.h1', 'm2')")
        if reader not in self.reader_index:
            raise KeyError(f"unknown reader {reader!r} ({self._reader_hint(reader)})")
        w, r = self.writer_index[writer], self.reader_index[reader]
        if w >= self.n_writers_before[r]:
            why = "the writer does not come before the reader"
            if self.spec.parallel_residual and reader.startswith("m") and w < self.writer_index[reader]:
                why = "with a parallel residual the MLP of a layer does not read that layer's heads"
            raise KeyError(f"no edge {writer} -> {reader}: {why}")
        return self.edge_offsets[r] + w

    def _reader_hint(self, reader: str) -> str:
        """What to write instead of an unknown reader name: its grouped/ungrouped K/V spelling."""
        s = self.spec
        try:
            node = parse_node(reader)
        except ValueError:
            node = None
        if node is not None and node.kind in "qkv" and node.layer < s.n_layers:
            layer, part = node.layer, node.kind
            kind, index = ("h", node.head) if node.head is not None else ("g", node.group)
            if s.grouped and kind == "h" and part in "kv" and index < s.n_heads:
                g = index // (s.n_heads // s.kv_heads)
                return (f"this model has grouped-query attention ({s.n_heads} query heads, {s.kv_heads} KV "
                        f"heads): the {part.upper()} input of head {index} is 'a{layer}.g{g}.{part}'")
            if not s.grouped and kind == "g" and index < s.n_heads:
                return f"this model has no grouped-query attention: write 'a{layer}.h{index}.{part}'"
        kv = "a1.g0.k" if s.grouped else "a1.h0.k"
        return f"readers look like 'a1.h0.q', '{kv}', 'm2', 'resid_post'"

    @cached_property
    def dense_index(self) -> torch.Tensor:
        """(E,) long: position of each edge in a row-major (readers, writers) matrix."""
        idx = [r * self.num_writers + w for r, n in enumerate(self.n_writers_before) for w in range(n)]
        return torch.tensor(idx, dtype=torch.long)

    def describe(self) -> str:
        return f"{self.num_writers} writers, {self.num_readers} readers, {self.num_edges} edges"

    # ------------------------------------------------------------------ identity
    def fingerprint(self, spans: list[str] | None = None, positions: str | None = None) -> dict:
        """The graph's identity as runs, scores and graph files record it (JSON): its shape and counts,
        and for position-aware masks the span names (mask order) and their mode."""
        s = self.spec
        fp = {"n_layers": s.n_layers, "n_heads": s.n_heads, "n_kv_heads": s.kv_heads, "pos_embeds": s.pos_embeds,
              "mlp": s.mlp, "num_edges": self.num_edges, "num_writers": self.num_writers}
        if s.parallel_residual:
            fp["parallel_residual"] = True
        if spans is not None:
            fp.update(spans=list(spans), positions=positions)
        return fp

    @classmethod
    def from_fingerprint(cls, fp: dict, where: str) -> "Graph":
        """The graph a saved fingerprint describes (the only place one is rebuilt). ValueError naming
        ``where`` when a field is missing or the record does not rebuild its own edge count.
        ``n_kv_heads`` absent or null: no grouped-query attention; ``pos_embeds``/``mlp`` absent: true,
        ``parallel_residual`` absent: false (what records written before those fields meant)."""
        try:
            graph = cls(GraphSpec(n_layers=int(fp["n_layers"]), n_heads=int(fp["n_heads"]),
                                  n_kv_heads=int(fp.get("n_kv_heads") or fp["n_heads"]),
                                  pos_embeds=bool(fp.get("pos_embeds", True)), mlp=bool(fp.get("mlp", True)),
                                  parallel_residual=bool(fp.get("parallel_residual", False))))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where}: not a usable graph fingerprint ({type(err).__name__}: {err}): {fp!r}") from None
        if "num_edges" in fp and graph.num_edges != fp["num_edges"]:
            raise ValueError(f"{where}: the graph fingerprint says {fp['num_edges']} edges but rebuilds "
                             f"{graph.describe()} (GPT-NeoX/Pythia records need 'parallel_residual')")
        return graph


def span_edges(graph: Graph, spans) -> list[tuple[str, ...]]:
    """The names of the edge masks in their flat order: (writer, reader, span) triples of
    position-aware masks (span-major), or the graph's (writer, reader) pairs when ``spans`` is None."""
    if spans is None:
        return list(graph.edges)
    return [(w, r, s) for s in spans for w, r in graph.edges]


def edges_to_mask(graph: Graph, edges, spans=None) -> torch.Tensor:
    """(E,) bool of a list of [writer, reader] pairs; position-aware (``spans``: the span names),
    (S * E,) of [writer, reader, span] triples. Errors name the bad entry."""
    E = graph.num_edges
    span_index = None if spans is None else {s: i for i, s in enumerate(spans)}
    kept = torch.zeros(E * (1 if spans is None else len(spans)), dtype=torch.bool)
    for i, entry in enumerate(edges):
        if spans is None and not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            hint = " (a [writer, reader, span] triple is for position-aware models)" \
                if isinstance(entry, (list, tuple)) and len(entry) == 3 else ""
            raise ValueError(f"edge {i}: expected a [writer, reader] pair, got {entry!r}{hint}")
        if spans is not None and not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ValueError(f"edge {i}: position-aware masks take [writer, reader, span] triples, got {entry!r}")
        offset = 0
        if spans is not None:
            if entry[2] not in span_index:
                raise ValueError(f"edge {i}: unknown span {entry[2]!r}; the spans are {', '.join(spans)}")
            offset = span_index[entry[2]] * E
        try:
            kept[offset + graph.edge_index(entry[0], entry[1])] = True
        except KeyError as err:
            raise ValueError(f"edge {i}: {err.args[0]} ({graph.describe()})") from None
    return kept
