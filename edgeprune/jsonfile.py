"""Reading a JSON file edgeprune consumes, with errors that name the file, line and column."""

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
