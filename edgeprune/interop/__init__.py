"""Interop with other circuit tools: one module per foreign format.

- ``eap_ig``: the graph JSON of the EAP-IG library and of MIB submissions (``to_json``/``from_json``),
  and the naming map between its nodes/edges and ours (``MibMap``).
- ``ep_reference``: runs of the Edge Pruning reference implementation (mask ``log_alpha`` tensors in
  an HF ``save_pretrained`` checkpoint, its ``edges.json``).
- ``mib``: ``mib-export``: a MIB circuit-localization submission (one circuit per edge budget).
- ``cli``: the ``convert`` and ``mib-export`` sub-commands.

See docs/interop.md for the naming table and the sign conventions.
"""

from .common import InteropError
from .eap_ig import MibMap, read_eap_ig, to_eap_ig, write_eap_ig
from .ep_reference import read_reference

__all__ = ["InteropError", "MibMap", "read_eap_ig", "to_eap_ig", "write_eap_ig", "read_reference"]
