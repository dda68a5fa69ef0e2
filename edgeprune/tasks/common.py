"""What every task generator shares: single-token word filtering, the pair check, split drawing.

A generated example is a clean and a corrupted text, each a prefix followed by a one-token span
marked ``<predict>...</predict>``. The pair check (``check_pair``) is the contract with the task
reader: both prefixes tokenize (``tokenizer(prefix)``, special tokens as the tokenizer adds them) to
the same length, each span is exactly one token (``add_special_tokens=False``), and appending the
span's token to the prefix's tokens gives what the tokenizer makes of the whole text, so the model
is scored on the tokenization it would see anyway.

Spans. The IOI, GT and GP generators mark the parts of the prompt a position-aware circuit names
(``mark("IO", " Mary")`` -> ``<span name=IO> Mary</span>``; format in ``jsonl``). The pair check
reads the texts without the markup (``split_text`` strips it), and ``draw_splits`` also parses
every marked record with the task reader, so a span that misses a token boundary or covers other
tokens in the corrupted text is a failed draw, never a line the reader rejects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .jsonl import SPLITS, TaskFormatError, parse_record, strip_spans


@dataclass
class TaskData:
    """A generator's output: per split, the JSONL records and the template ids they used."""

    splits: dict[str, list[dict]]
    templates: dict[str, list]
    options: dict = field(default_factory=dict)


def prefix_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def span_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def single_token_id(tokenizer, text: str) -> int:
    """The id of ``text`` as one token (no special tokens); ValueError if it is not one token."""
    ids = span_ids(tokenizer, text)
    if len(ids) != 1:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"{text!r} is {len(ids)} tokens for tokenizer {name!r}; "
                         f"this task needs it to be exactly one token")
    return ids[0]


def single_token_words(tokenizer, words: Iterable[str], prefix: str = " ") -> list[str]:
    """The words that are one token when written after ``prefix`` (a space by default), in order."""
    return [w for w in words if len(span_ids(tokenizer, prefix + w)) == 1]


def require_count(what: str, found: list, minimum: int, tokenizer, considered: int) -> None:
    """Raise the error a user sees when a tokenizer has too few usable words for a task."""
    if len(found) < minimum:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        shown = ", ".join(str(f).strip() for f in found[:10]) or "none"
        raise ValueError(f"tokenizer {name!r} has {len(found)} usable {what} among {considered} "
                         f"candidates ({shown}); this task needs at least {minimum}")


def check_pair(tokenizer, clean: tuple[str, str], corrupted: tuple[str, str]) -> bool:
    """True when (prefix, span) pairs meet the reader's contract (see the module docstring)."""
    lengths = set()
    for prefix, span in (clean, corrupted):
        p, s = prefix_ids(tokenizer, prefix), span_ids(tokenizer, span)
        if len(s) != 1 or prefix_ids(tokenizer, prefix + span) != p + s:
            return False
        lengths.add(len(p))
    return len(lengths) == 1


def predict_text(prefix: str, span: str) -> str:
    return f"{prefix}<predict>{span}</predict>"


def mark(name: str, text: str) -> str:
    """``text`` marked as the span ``name``; put a word's leading space inside (" Mary")."""
    return f"<span name={name}>{text}</span>"


def mark_end(prefix: str, name: str = "END") -> str:
    """``prefix`` with its last word (and the space before it) or its final punctuation mark marked
    as the span ``name``: the position whose logits predict the answer."""
    cut = len(prefix.rstrip())
    if cut and not prefix[cut - 1].isalnum():
        start = cut - 1
    else:
        start = cut
        while start and prefix[start - 1].isalnum():
            start -= 1
        while start and prefix[start - 1] == " ":
            start -= 1
    return prefix[:start] + mark(name, prefix[start:cut]) + prefix[cut:]


def spans_parse(tokenizer, rec: dict) -> bool:
    """True when a record's span markup meets the reader's contract (always, without markup)."""
    if "<span" not in rec["clean"] and "<span" not in rec["corrupted"]:
        return True
    try:
        parse_record(rec, tokenizer, "generated", 0, None)
    except TaskFormatError:
        return False
    return True


def record(split: str, clean: tuple[str, str], corrupted: tuple[str, str], **fields) -> dict:
    """One JSONL line: the marked clean and corrupted texts, the split, then the task fields."""
    return {"clean": predict_text(*clean), "corrupted": predict_text(*corrupted), "split": split,
            **fields}


def draw_splits(sample: Callable[[random.Random, str, int], dict | None], counts: dict[str, int],
                rng: random.Random, tokenizer, *, key: Callable[[dict], object] | None = None,
                max_misses: int = 1000) -> dict[str, list[dict]]:
    """Fill each split with ``counts[split]`` records from ``sample(rng, split, index)``.

    ``sample`` returns a record or None (a draw that failed a task-specific filter). Every record
    must pass ``check_pair`` (asserted: samplers filter on it, so a failure here is a bug) and no
    ``key`` (the clean text by default) may repeat across splits, so validation and test never
    contain a training example. ``max_misses`` draws in a row without a new record means the task
    has run out of distinct examples. Splits are drawn in SPLITS order, which keeps a seed's train
    split the same whatever the sizes of the later splits.
    """
    key = key or (lambda r: strip_spans(r["clean"])[0])
    seen: set = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows: list[dict] = []
        misses = 0
        while len(rows) < counts[split]:
            rec = sample(rng, split, len(rows))
            if rec is None or key(rec) in seen or not spans_parse(tokenizer, rec):
                misses += 1
                if misses >= max_misses:
                    raise ValueError(f"could make only {len(rows)} of the {counts[split]} {split} "
                                     f"examples asked for ({max_misses} draws in a row gave no new "
                                     f"one): the task's templates and word lists run out for this "
                                     f"tokenizer; ask for fewer")
                continue
            assert check_pair(tokenizer, split_text(rec["clean"]), split_text(rec["corrupted"])), rec
            misses = 0
            seen.add(key(rec))
            rows.append(rec)
        out[split] = rows
    return out


def split_text(text: str) -> tuple[str, str]:
    """(prefix, span) of a ``...<predict>span</predict>...`` text, without span markup (the text the
    model reads); what follows </predict> is dropped."""
    head, sep, rest = strip_spans(text)[0].partition("<predict>")
    span, sep2, _ = rest.partition("</predict>")
    if not sep or not sep2:
        raise ValueError(f"no <predict>...</predict> span in {text!r}")
    return head, span


def check_counts(n_train: int, n_val: int, n_test: int) -> dict[str, int]:
    counts = {"train": n_train, "validation": n_val, "test": n_test}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of {split} examples must be a non-negative integer, got {n!r}")
    return counts


def reject_options(task: str, options: dict, allowed: Iterable[str] = ()) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task {task!r} has no option(s) {unknown}; it takes "
                         f"{sorted(allowed) or 'none'}")


class TaskMetric:
    """A task's metric and the check that makes it safe to report.

    ``metric(logits (N, V), extras) -> {name: (N,)}`` scores each example at its first predicted
    position; ``check(examples, source)`` runs first, over every example, and rejects a line whose
    answer fields do not name the token the line predicts (e.g. an IOI file whose ``io`` lacks the
    leading space the model predicts: the metric would silently score another token).
    ``name`` namespaces the metrics (``ioi/logit_diff_full``); ``main`` is the metric that
    faithfulness is normalised on.
    """

    def __init__(self, name: str, main: str, fn: Callable, check_example: Callable):
        self.name, self.main, self._fn, self._check_example = name, main, fn, check_example

    def __call__(self, logits, extras: list[dict]) -> dict:
        return self._fn(logits, extras)

    def check(self, examples, source: str) -> None:
        """TaskFormatError naming ``source``, the line and the field, for the first bad example."""
        for ex in examples:
            problem = self._check_example(ex)
            if problem:
                raise TaskFormatError(f"{source}:{ex.line}: {problem} (task metric {self.name!r})")


def _describe_token(tokenizer, token_id: int) -> str:
    return f"{tokenizer.decode([token_id])!r} (id {token_id})"


def answer_logit_diff(tokenizer, right_key: str, wrong_key: str, task: str = "task") -> TaskMetric:
    """A metric ``(logits (N, V), extras) -> {"logit_diff": (N,), "accuracy": (N,)}``: the logit of the
    single-token answer named by ``extras[i][right_key]`` minus that of ``extras[i][wrong_key]``.

    Its check: both fields are strings of one token each, they differ, and the right answer's token
    is the token the line predicts (its span's first token)."""
    ids: dict[str, int] = {}

    def token(text: str) -> int:
        if text not in ids:
            ids[text] = single_token_id(tokenizer, text)
        return ids[text]

    def logit_diff(logits, extras: list[dict]) -> dict:
        if logits.dim() != 2 or logits.shape[0] != len(extras):
            raise ValueError(f"metric expects (N, V) logits for N = {len(extras)} examples, got {tuple(logits.shape)}")
        rows = torch.arange(len(extras), device=logits.device)
        right = torch.tensor([token(e[right_key]) for e in extras], device=logits.device)
        wrong = torch.tensor([token(e[wrong_key]) for e in extras], device=logits.device)
        diff = logits[rows, right].float() - logits[rows, wrong].float()
        return {"logit_diff": diff, "accuracy": (diff > 0).float()}

    def check(ex) -> str | None:
        found = {}
        for key in (right_key, wrong_key):
            value = ex.extra.get(key)
            if not isinstance(value, str) or not value:
                return (f"field {key!r} must be a non-empty string naming an answer token, got "
                        f"{value!r}")
            pieces = span_ids(tokenizer, value)
            if len(pieces) != 1:
                hint = ""
                if len(span_ids(tokenizer, " " + value)) == 1 and not value.startswith(" "):
                    hint = f"; with the leading space the model predicts it would be one: {' ' + value!r}"
                return f"field {key!r} is {value!r}, {len(pieces)} tokens; it must be one token{hint}"
            found[key] = pieces[0]
        target = ex.target_ids[0]
        if found[right_key] != target:
            text = ex.extra[right_key]
            hint = ""
            spaced = span_ids(tokenizer, " " + text)
            if not text.startswith(" ") and spaced == [target]:
                hint = (f"; the field lacks the leading space: write {' ' + text!r} (and the same for "
                        f"{wrong_key!r})")
            return (f"field {right_key!r} is {text!r} = token {_describe_token(tokenizer, found[right_key])}, "
                    f"but the line predicts {_describe_token(tokenizer, target)}; the metric would score "
                    f"another token than the one predicted{hint}")
        if found[wrong_key] == found[right_key]:
            return f"fields {right_key!r} and {wrong_key!r} name the same token {_describe_token(tokenizer, target)}"
        return None

    return TaskMetric(task, "logit_diff", logit_diff, check)
