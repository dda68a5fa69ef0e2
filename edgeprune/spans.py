"""Span ids for position-aware circuits: which of an edge's masks each token position uses.

A position-aware model has S masks per edge, one per span; ``assign_spans`` fixes the S span names
of a task and gives every example's tokens their span index (``Example.span_ids``, which ``collate``
batches into ``Batch.span_ids`` (B, T)). Two modes, the values of ``model.positions``:

- ``spans``: the named spans of the task file (``<span name=IO>...</span>``, see
  ``edgeprune.tasks.jsonl``) plus the default spans ``other`` and ``predict``, which every task has,
  so S is fixed per task whichever lines a split holds. Every line must name the same set of spans.
  Order: by the first token at which each span occurs in the first example; ``other`` and
  ``predict``, if absent there, go last (in that order).
- ``positions``: raw token positions, names ``p0 .. p{T-1}`` and span id = position; every prompt
  must have the same number of tokens T (Tracr programs' inputs do).

Examples without ``span_names`` (Tracr's, built from a program's inputs) get the defaults: their loss
positions are ``predict`` and every other token is ``other``.
"""

from __future__ import annotations

from typing import Sequence

from .tasks.jsonl import DEFAULT_SPANS, OTHER_SPAN, PREDICT_SPAN, Example, TaskFormatError

MODES = ("spans", "positions")


def span_names_of(ex: Example) -> list[str]:
    """The span name of each input token of ``ex``: its ``span_names``, else the defaults."""
    if ex.span_names is not None:
        if len(ex.span_names) != len(ex.input_ids):
            raise ValueError(f"example from line {ex.line}: {len(ex.input_ids)} tokens but "
                             f"{len(ex.span_names)} span names")
        return ex.span_names
    loss = set(ex.loss_positions)
    return [PREDICT_SPAN if p in loss else OTHER_SPAN for p in range(len(ex.input_ids))]


def _named(names: Sequence[str]) -> list[str]:
    """The named (non-default) spans of one example, in order of first occurrence."""
    return [n for n in dict.fromkeys(names) if n not in DEFAULT_SPANS]


def _show(names: list[str]) -> str:
    return ", ".join(names) if names else "no named spans"


def assign_spans(examples: Sequence[Example], mode: str, where: str) -> list[str]:
    """Fill every example's ``span_ids`` (one int per input token); returns the span names, index =
    span id. ``where`` names the source in errors (``where:line``). Raises TaskFormatError for a line
    whose spans differ from the first line's (``spans``) or whose length differs (``positions``)."""
    if mode not in MODES:
        raise ValueError(f"span mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not examples:
        raise ValueError(f"{where}: no examples to assign spans to")
    first = examples[0]
    if mode == "positions":
        T = len(first.input_ids)
        for ex in examples:
            if len(ex.input_ids) != T:
                raise TaskFormatError(
                    f"{where}:{ex.line}: model.positions: positions (one mask per raw token position) "
                    f"needs prompts of one length: line {ex.line} has {len(ex.input_ids)} tokens, line "
                    f"{first.line} has {T}; mark spans in the task and use model.positions: spans instead")
        for ex in examples:
            ex.span_ids = list(range(T))
        return [f"p{t}" for t in range(T)]

    first_names = span_names_of(first)
    order = list(dict.fromkeys(first_names))
    order += [d for d in DEFAULT_SPANS if d not in order]
    index = {name: i for i, name in enumerate(order)}
    expected = _named(first_names)
    wanted = set(expected)
    for ex in examples:
        names = span_names_of(ex)
        have = _named(names)
        if set(have) != wanted:
            missing = [n for n in expected if n not in have]
            extra = [n for n in have if n not in wanted]
            detail = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                                f"extra {', '.join(extra)}" if extra else "") if part)
            raise TaskFormatError(f"{where}:{ex.line}: every line must name the same spans: line {ex.line} "
                                  f"has spans {_show(have)} but line {first.line} has {_show(expected)} "
                                  f"({detail})")
        ex.span_ids = [index[n] for n in names]
    return order


def refuse_positions(spans, where: str, what: str) -> None:
    """A clear error for the commands that do not take position-aware circuits yet (docs/positions.md)."""
    if spans:
        names = [s["name"] if isinstance(s, dict) else str(s) for s in spans]  # names or circuit.json records
        raise ValueError(f"{where}: a position-aware circuit ({len(names)} spans: {', '.join(names)}); {what} does "
                         "not support position-aware circuits yet (see docs/positions.md); prune, eval, export, "
                         "draw, view, attribute, curve and compare do")


def describe_spans(examples: Sequence[Example], names: Sequence[str]) -> list[dict]:
    """Per span, in ``names`` order: ``{"name", "tokens" (mean per example), "min", "max"}`` token
    counts over ``examples`` (whose ``span_ids`` index ``names``), for circuit.json."""
    counts = [[0] * len(examples) for _ in names]
    for e, ex in enumerate(examples):
        if ex.span_ids is None:
            raise ValueError(f"example from line {ex.line} has no span_ids; call assign_spans first")
        for s in ex.span_ids:
            if not 0 <= s < len(names):
                raise ValueError(f"example from line {ex.line}: span id {s} is not in [0, {len(names)})")
            counts[s][e] += 1
    return [{"name": name, "tokens": round(sum(c) / len(c), 4) if c else 0.0,
             "min": min(c, default=0), "max": max(c, default=0)}
            for name, c in zip(names, counts)]
