"""Node names: the one parser of the graph's names (``tok_embeds``, ``a3.h5``, ``a3.h5.q``, ``a3.g1.k``,
``m4``, ``resid_post``), used by files, drawings, the viewer and every check of an edge list.
A name used in a file, a log line and a drawing is the same name (STYLE.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

ACCEPTED_NAMES = ("'tok_embeds', 'pos_embeds', 'a{l}.h{h}', 'a{l}.h{h}.q|k|v', 'a{l}.g{g}.k|v', "
                  "'m{l}', 'resid_post'")
WRITER_KINDS = ("embed", "head", "mlp")
READER_KINDS = ("q", "k", "v", "mlp", "output")
NUMBER = r"(?:0|[1-9][0-9]*)"  # no leading zeros: 'a01.h1' would be a second name for 'a1.h1'
PATTERNS = (  # (pattern, kind); kind None: the name's last letter is the kind
    (re.compile(r"(?:tok|pos)_embeds"), "embed"),
    (re.compile(r"resid_post"), "output"),
    (re.compile(rf"m(?P<layer>{NUMBER})"), "mlp"),
    (re.compile(rf"a(?P<layer>{NUMBER})\.h(?P<head>{NUMBER})"), "head"),
    (re.compile(rf"a(?P<layer>{NUMBER})\.h(?P<head>{NUMBER})\.(?P<kind>[qkv])"), None),
    (re.compile(rf"a(?P<layer>{NUMBER})\.g(?P<group>{NUMBER})\.(?P<kind>[kv])"), None),
)


@dataclass(frozen=True)
class NodeName:
    """A parsed node name: what kind of node it is and where it sits in the model."""

    kind: str  # "embed" | "head" | "mlp" | "q" | "k" | "v" | "output"
    layer: int | None  # None for the embeddings and the output
    head: int | None  # set for a{l}.h{h} and a{l}.h{h}.q|k|v
    group: int | None  # set for a{l}.g{g}.k|v
    name: str

    @property
    def is_writer(self) -> bool:
        return self.kind in WRITER_KINDS

    @property
    def is_reader(self) -> bool:
        return self.kind in READER_KINDS


def parse_node(name: str) -> NodeName:
    """Parse a node name as written in ``edges.json``; ValueError for anything else."""
    if isinstance(name, str):
        for pattern, kind in PATTERNS:
            if match := pattern.fullmatch(name):
                parts = match.groupdict()
                layer, head, group = (None if parts.get(key) is None else int(parts[key])
                                      for key in ("layer", "head", "group"))
                return NodeName(kind or parts["kind"], layer, head, group, name)
    raise ValueError(f"unknown node name {name!r}: expected one of {ACCEPTED_NAMES}")


def parse_edge(writer: str, reader: str) -> tuple[NodeName, NodeName]:
    """Parse both ends of an edge and check that each name can play its role."""
    w, r = parse_node(writer), parse_node(reader)
    if not w.is_writer:
        raise ValueError(f"{writer!r} is a reader and cannot be the writer (first element) of an "
                         "edge; writers are 'tok_embeds', 'pos_embeds', 'a{l}.h{h}', 'm{l}'")
    if not r.is_reader:
        raise ValueError(f"{reader!r} only writes and cannot be the reader (second element) of an "
                         "edge; readers are 'a{l}.h{h}.q|k|v', 'a{l}.g{g}.k|v', 'm{l}', 'resid_post'")
    return w, r
