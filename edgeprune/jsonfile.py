"""Reading a JSON file edgeprune consumes, with errors that name the file, line and column; the bare
[writer, reader] entries of an ``edges.json``-format file (``read_edge_pairs``)."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, what: str = ""):
    """The parsed content of ``path``; ValueError naming the file (and ``what`` it should be: "not a
    circuit: ") and the line and column of invalid JSON, or the byte of text that is not UTF-8."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what}invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what}not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_edge_pairs(path: str | Path, spans: bool = False) -> list[tuple[int, list]]:
    """The entries of an ``edges.json``-format file (a JSON list of [writer, reader] name pairs) as
    ``(index, [writer, reader])``, checked for shape only; errors (ValueError) name the file and entry.
    With ``spans`` the entries may instead all be [writer, reader, span] triples (position-aware; the
    span a string), as entry 0 decides: a file mixing both shapes is an error naming the first misfit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edges file {path} does not exist (or is not a file)")
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of [writer, reader] pairs, got a JSON {_json_type(data)}")
    width = len(data[0]) if spans and data and isinstance(data[0], list) and len(data[0]) in (2, 3) else 2
    for i, entry in enumerate(data):
        shown = shorten(json.dumps(entry))
        if width == 3 and isinstance(entry, list) and len(entry) == 3 and not isinstance(entry[2], str):
            raise ValueError(f"{path}: entry {i} is {shown}; the span (third element) must be a string, "
                             'a span name such as "IO" or "END"')
        if not (isinstance(entry, list) and len(entry) == width and all(isinstance(n, str) for n in entry)):
            mixed = (" like entry 0 (a file holds [writer, reader] pairs or [writer, reader, span] triples, "
                     "not both)") if spans and isinstance(entry, list) and len(entry) == 5 - width else ""
            expected = ('a [writer, reader] pair of node names' + (mixed or ', e.g. ["a0.h1", "m2"]')
                        if width == 2 else
                        'a [writer, reader, span] triple' + (mixed or ', e.g. ["a0.h1", "m2", "END"]'))
            raise ValueError(f"{path}: entry {i} is {shown}; expected {expected}")
    return list(enumerate(data))


def _json_type(value) -> str:
    names = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
