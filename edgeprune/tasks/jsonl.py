"""The generic clean/corrupted task format: one JSON object per line.

    {"clean": "... named Lily. One day,<predict> Lily</predict>",
     "corrupted": "... named Tim. One day,<predict> Tim</predict>",
     "split": "test", "kind": "girl"}

- ``clean`` and ``corrupted`` (strings, required) each hold exactly one ``<predict>...</predict>``
  span: the tokens the model must predict. The span text may differ between the two (the corrupted
  span names the answer the corrupted prompt points to, used by metrics such as logit difference).
- ``split`` (optional): one of ``train``, ``validation``, ``test``. A line without it is ``train``.
- Every other field is kept, unchanged, in ``Example.extra`` for task-specific metrics.
- Blank lines are skipped (they still count for line numbers). Text after ``</predict>`` is ignored.

Tokenization. The prefix (text before ``<predict>``) is tokenized with the tokenizer's normal
special tokens (a BOS if it adds one). The span's tokens are those that the whole text
``prefix + span`` has after the prefix's own tokens, so the model sees the span tokenized as it
would be in running text. For GPT-2-style tokenizers and a span that starts with a space this is
the same as tokenizing the span alone; for SentencePiece-style tokenizers it also drops the
"dummy prefix" a lone span would get (stories260K tokenizes "," alone as ['▁', ',']). A line whose
prefix tokens change once the span follows (a merge across the ``<predict>`` boundary, e.g. a
trailing space before the tag with GPT-2) is rejected: move the boundary, e.g. ``day,<predict>
Lily</predict>``.

Alignment. With prefix length P and span length S:
    input_ids           = clean prefix + clean span                       (P + S tokens)
    corrupted_input_ids = corrupted prefix + the *clean* span tokens      (same length)
    loss_positions      = [P-1, ..., P+S-2]   (the logits there predict the span, teacher-forced)
    target_ids          = clean span tokens
    corrupted_target_ids = corrupted span tokens (metrics use the first)
Clean and corrupted prefixes must have the same number of tokens, so an interchange ablation
patches position t of the clean run with position t of the corrupted run.

Spans (position-aware circuits). The text before ``<predict>`` may name spans of the prompt:
``"When<span name=IO> Mary</span> and<span name=S1> John</span> went ..."``. NAME matches
``[A-Za-z_][A-Za-z0-9_]*`` (``name="IO"`` with quotes is read the same); spans do not nest, are not
empty, and may not appear in or after ``<predict>``; one name may mark several pieces of a prompt
(they form one span). The markup is always stripped before tokenization, so a run with shared masks
sees exactly the text without tags. Each tag must sit on a token boundary: the text up to the tag
tokenizes (without special tokens) to a prefix of the whole prefix's tokens; with GPT-2-style
tokenizers a space belongs to the word after it, so write ``and<span name=IO> Mary</span>``, not
``and <span name=IO>Mary</span>``. ``Example.span_names`` gives every input token its span: the
named span covering it, else ``predict`` for the loss positions and the teacher-forced span tokens
after them (positions P-1 .. P+S-1), else ``other`` (a BOS included). A named span wins over
``predict``: IOI's ``END`` on the last prefix token ``" to"`` makes position P-1 ``END``. The
corrupted text must give the same list (the same spans over the same token positions), else the line
is rejected naming the first span that differs. ``other`` and ``predict`` are reserved names.
``edgeprune.spans.assign_spans`` turns the names into the ids a position-aware model uses.

Every malformed line raises ``TaskFormatError`` naming the file, the line and the field; nothing is
skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT = "train"
OPEN, CLOSE = "<predict>", "</predict>"
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
OTHER_SPAN, PREDICT_SPAN = "other", "predict"  # the default spans of tokens outside named ones
DEFAULT_SPANS = (OTHER_SPAN, PREDICT_SPAN)
SPAN_CLOSE = "</span>"
_SPAN_TAG = re.compile(r"</?span\b[^<>]*>?")  # anything that looks like a span tag, well formed or not
_SPAN_OPEN = re.compile(r"<span\s+name=(?P<q>[\"']?)(?P<name>[^\s\"'<>]*)(?P=q)\s*>")
_SPAN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TaskFormatError(ValueError):
    """A task file line that does not follow the format; the message says file:line and field."""


@dataclass
class Example:
    """One tokenized line. Lengths: input_ids and corrupted_input_ids (P + S,),
    loss_positions and target_ids (S,), corrupted_target_ids (S',) with S' the corrupted span's
    own length. ``line`` is the 1-based line number in the file.

    ``span_names`` (P + S,): each input token's span (see the module docstring); None for examples
    not read from a task file (Tracr). ``span_ids`` (P + S,): the span index of each token, filled
    by ``edgeprune.spans.assign_spans``; None until then."""

    input_ids: list[int]
    corrupted_input_ids: list[int]
    loss_positions: list[int]
    target_ids: list[int]
    corrupted_target_ids: list[int]
    split: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)
    span_names: list[str] | None = None
    span_ids: list[int] | None = None


@dataclass(frozen=True)
class MarkedSpan:
    """One marked piece of a prompt: character offsets [start, end) in the text without markup."""

    name: str
    start: int
    end: int


def strip_spans(text: str, where: str = "text") -> tuple[str, list[MarkedSpan]]:
    """(text without span markup, the marked pieces in order); TaskFormatError naming ``where`` for a
    malformed, nested, unclosed, empty or reserved-name span."""
    plain: list[str] = []
    spans: list[MarkedSpan] = []
    pos = length = 0
    opened: tuple[str, int] | None = None
    for m in _SPAN_TAG.finditer(text):
        plain.append(text[pos:m.start()])
        length += m.start() - pos
        pos = m.end()
        tag = m.group(0)
        if tag.startswith("</"):
            if tag != SPAN_CLOSE:
                raise TaskFormatError(f"{where}: malformed closing tag {tag!r}; expected {SPAN_CLOSE}")
            if opened is None:
                raise TaskFormatError(f"{where}: {SPAN_CLOSE} without an opening <span name=NAME>")
            name, start = opened
            if length == start:
                raise TaskFormatError(f"{where}: span {name} is empty; put the text it names between "
                                      f"<span name={name}> and {SPAN_CLOSE}")
            spans.append(MarkedSpan(name, start, length))
            opened = None
            continue
        om = _SPAN_OPEN.fullmatch(tag)
        if om is None or not _SPAN_NAME.fullmatch(om["name"]):
            raise TaskFormatError(f"{where}: malformed span tag {tag!r}; expected <span name=NAME> with "
                                  f"NAME made of letters, digits and _ and not starting with a digit "
                                  f"(e.g. <span name=IO>)")
        name = om["name"]
        if opened is not None:
            raise TaskFormatError(f"{where}: span {name} opens inside span {opened[0]}; spans cannot "
                                  f"nest (close {opened[0]} with {SPAN_CLOSE} first)")
        if name in DEFAULT_SPANS:
            raise TaskFormatError(f"{where}: span name {name!r} is reserved for the default spans "
                                  f"({', '.join(DEFAULT_SPANS)}); choose another name")
        opened = (name, length)
    if opened is not None:
        raise TaskFormatError(f"{where}: span {opened[0]} is never closed; end it with {SPAN_CLOSE}")
    plain.append(text[pos:])
    return "".join(plain), spans


def _split_span(text: str, where: str) -> tuple[str, str]:
    """(prefix, span) of a text with exactly one <predict>...</predict>; text after it is ignored."""
    n_open, n_close = text.count(OPEN), text.count(CLOSE)
    if n_open == 0 and n_close == 0:
        raise TaskFormatError(f"{where}: missing {OPEN}...{CLOSE} around the tokens to predict")
    if n_open != 1 or n_close != 1:
        raise TaskFormatError(f"{where}: expected exactly one {OPEN} and one {CLOSE}, found "
                              f"{n_open} and {n_close} (unbalanced, nested or repeated tags)")
    start, end = text.index(OPEN), text.index(CLOSE)
    if end < start:
        raise TaskFormatError(f"{where}: {CLOSE} comes before {OPEN}")
    span = text[start + len(OPEN):end]
    if not span:
        raise TaskFormatError(f"{where}: the {OPEN}{CLOSE} span is empty")
    return text[:start], span


def _split_marked(text: str, where: str) -> tuple[str, list[MarkedSpan], str]:
    """(prefix without span markup, its marked pieces, the <predict> span) of a line's text."""
    prefix, span = _split_span(text, where)
    late = _SPAN_TAG.search(text, len(prefix))
    if late is not None:
        raise TaskFormatError(f"{where}: span tag {late.group(0)!r} after {OPEN}; spans may only mark "
                              f"the text before {OPEN} (the predicted tokens are the 'predict' span)")
    plain, spans = strip_spans(prefix, where)
    return plain, spans, span


def _boundary_example(plain: str, at: int, tag: str) -> str:
    """The text around a misplaced tag, and where to put it instead, for the error message."""
    before, after = plain[max(0, at - 12):at], plain[at:at + 12]
    shown = f"{before}{tag}{after}"
    word = before.rstrip()
    if len(word) < len(before):  # GPT-2 style: the space belongs to the word after it
        return f"e.g. {shown!r} -> {word + tag + before[len(word):] + after!r}"
    return (f"here {shown!r} splits a token; move the tag between two words (before the space that "
            f"starts a word)")


def _span_tokens(tokenizer, plain: str, spans: list[MarkedSpan], plain_ids: list[int], offset: int,
                 where: str) -> list[tuple[str, int, int]]:
    """Each marked piece as (name, first token, end token) in the prefix ids with special tokens
    (``offset`` of them first); TaskFormatError where a tag is not on a token boundary."""
    cache: dict[int, int] = {}

    def boundary(at: int, tag: str, name: str) -> int:
        if at not in cache:
            ids = list(tokenizer(plain[:at], add_special_tokens=False)["input_ids"])
            if plain_ids[:len(ids)] != ids:
                what = f"the {tag} tag" if tag != SPAN_CLOSE else f"the {SPAN_CLOSE} tag of span {name}"
                raise TaskFormatError(f"{where}: tokens merge across {what}; put the tag on a token "
                                      f"boundary, {_boundary_example(plain, at, tag)}")
            cache[at] = offset + len(ids)
        return cache[at]

    out = []
    for sp in spans:
        start = boundary(sp.start, f"<span name={sp.name}>", sp.name)
        end = boundary(sp.end, SPAN_CLOSE, sp.name)
        if end <= start:
            raise TaskFormatError(f"{where}: span {sp.name} ({plain[sp.start:sp.end]!r}) has no tokens "
                                  f"of its own")
        out.append((sp.name, start, end))
    return out


def span_names_for(n_tokens: int, loss_positions: Sequence[int],
                   pieces: Sequence[tuple[str, int, int]] = ()) -> list[str]:
    """Per token: the named piece covering it, else ``predict`` for the loss positions and the
    teacher-forced token after the last one, else ``other``. ``pieces``: (name, start, end) token
    ranges."""
    names = [OTHER_SPAN] * n_tokens
    if loss_positions:
        for p in range(min(loss_positions), min(max(loss_positions) + 2, n_tokens)):
            names[p] = PREDICT_SPAN
    for name, start, end in pieces:
        names[start:end] = [name] * (end - start)
    return names


def _ranges(pieces: Sequence[tuple[str, int, int]]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for name, start, end in pieces:
        out.setdefault(name, []).append((start, end))
    return out


def _show_ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}-{b - 1}" for a, b in ranges)


def _check_same_spans(clean: Sequence[tuple[str, int, int]], corrupted: Sequence[tuple[str, int, int]],
                      at: str) -> None:
    """TaskFormatError naming the first span whose token ranges differ between the two texts."""
    a, b = _ranges(clean), _ranges(corrupted)
    for name in list(a) + [n for n in b if n not in a]:
        if a.get(name) == b.get(name):
            continue
        if name in a and name in b:
            joint = f"covers tokens {_show_ranges(a[name])} in 'clean' but {_show_ranges(b[name])} in 'corrupted'"
        elif name in a:
            joint = f"covers tokens {_show_ranges(a[name])} in 'clean' but is absent from 'corrupted'"
        else:
            joint = f"covers tokens {_show_ranges(b[name])} in 'corrupted' but is absent from 'clean'"
        raise TaskFormatError(f"{at}: fields 'clean' and 'corrupted': span {name} {joint}; both texts "
                              f"must mark the same spans over the same token positions")


def _tokenize(tokenizer, prefix: str, span: str, where: str) -> tuple[list[int], list[int]]:
    """(prefix ids with the tokenizer's special tokens, span ids as they follow that prefix)."""
    with_special = list(tokenizer(prefix)["input_ids"])
    plain = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    joint = list(tokenizer(prefix + span, add_special_tokens=False)["input_ids"])
    if plain and with_special[len(with_special) - len(plain):] != plain:
        raise TaskFormatError(f"{where}: the tokenizer adds special tokens after the text (e.g. "
                              f"EOS), so a prefix would end the sequence; load it without them "
                              f"(e.g. add_eos_token=False)")
    if joint[:len(plain)] != plain:
        raise TaskFormatError(f"{where}: the text before {OPEN} tokenizes differently once the "
                              f"span follows it (tokens merge across the tag); put the tag on a "
                              f"token boundary, e.g. 'day,{OPEN} Lily{CLOSE}' rather than "
                              f"'day, {OPEN}Lily{CLOSE}'")
    span_ids = joint[len(plain):]
    if not span_ids:
        raise TaskFormatError(f"{where}: the {OPEN} span {span!r} has no tokens of its own")
    if not with_special:
        raise TaskFormatError(f"{where}: nothing before {OPEN} (and the tokenizer adds no BOS), "
                              f"so no position predicts the first span token")
    return with_special, span_ids


def _parse_line(text: str, tokenizer, path: Path, line: int,
                max_length: int | None) -> Example:
    at = f"{path}:{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{at}: invalid JSON: {e.msg} (column {e.colno})") from None
    return parse_record(obj, tokenizer, at, line, max_length)


def parse_record(obj, tokenizer, at: str, line: int, max_length: int | None) -> Example:
    """One task record (a JSONL line's object, or a ``datasets`` row) -> Example; ``at`` names it
    in errors (``file:line``)."""
    if not isinstance(obj, dict):
        raise TaskFormatError(f"{at}: expected a JSON object with 'clean' and 'corrupted' strings, "
                              f"got a JSON {type(obj).__name__}")
    for name in ("clean", "corrupted"):
        if name not in obj:
            raise TaskFormatError(f"{at}: field '{name}' is missing")
        if not isinstance(obj[name], str):
            raise TaskFormatError(f"{at}: field '{name}' must be a string, got "
                                  f"{type(obj[name]).__name__}")
    split = obj.get("split", DEFAULT_SPLIT)
    if split not in SPLITS:
        raise TaskFormatError(f"{at}: field 'split' must be one of {', '.join(SPLITS)}, "
                              f"got {split!r}")

    clean_prefix, clean_marks, clean_span = _split_marked(obj["clean"], f"{at}: field 'clean'")
    corr_prefix, corr_marks, corr_span = _split_marked(obj["corrupted"], f"{at}: field 'corrupted'")
    prefix_ids, span_ids = _tokenize(tokenizer, clean_prefix, clean_span, f"{at}: field 'clean'")
    corr_prefix_ids, corr_span_ids = _tokenize(tokenizer, corr_prefix, corr_span,
                                               f"{at}: field 'corrupted'")
    pieces = _marked_tokens(tokenizer, clean_prefix, clean_marks, prefix_ids, f"{at}: field 'clean'")
    corr_pieces = _marked_tokens(tokenizer, corr_prefix, corr_marks, corr_prefix_ids,
                                 f"{at}: field 'corrupted'")
    _check_same_spans(pieces, corr_pieces, at)
    P, S = len(prefix_ids), len(span_ids)
    if len(corr_prefix_ids) != P:
        raise TaskFormatError(f"{at}: fields 'clean' and 'corrupted': the text before {OPEN} must "
                              f"have the same number of tokens, got clean {P} and corrupted "
                              f"{len(corr_prefix_ids)}")
    if max_length is not None and P + S > max_length:
        raise TaskFormatError(f"{at}: field 'clean': {P + S} tokens (prefix {P} + span {S}) is "
                              f"longer than max_length={max_length}")
    extra = {k: v for k, v in obj.items() if k not in ("clean", "corrupted", "split")}
    return Example(
        input_ids=prefix_ids + span_ids,
        corrupted_input_ids=corr_prefix_ids + span_ids,
        loss_positions=list(range(P - 1, P + S - 1)),
        target_ids=span_ids,
        corrupted_target_ids=corr_span_ids,
        split=split,
        line=line,
        extra=extra,
        span_names=span_names_for(P + S, range(P - 1, P + S - 1), pieces),
    )


def _marked_tokens(tokenizer, plain: str, marks: list[MarkedSpan], prefix_ids: list[int],
                   where: str) -> list[tuple[str, int, int]]:
    """The marked pieces of a prefix as token ranges of ``prefix_ids`` (special tokens included)."""
    if not marks:
        return []
    plain_ids = list(tokenizer(plain, add_special_tokens=False)["input_ids"])
    return _span_tokens(tokenizer, plain, marks, plain_ids, len(prefix_ids) - len(plain_ids), where)


def read_jsonl_task(path: str | Path, tokenizer, split: str | None = None,
                    max_length: int | None = None) -> list[Example]:
    """Read and tokenize a task file; ``split=None`` returns every line, in file order.

    ``tokenizer`` is a transformers tokenizer. Every line is validated, whichever split is asked
    for. Raises TaskFormatError for a bad line, ValueError for an unknown split name or a split
    (or file) with no examples.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; available splits: {', '.join(SPLITS)}")
    examples = []
    with path.open(encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                examples.append(_parse_line(text, tokenizer, path, line, max_length))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty or only has blank lines)")
    if split is None:
        return examples
    chosen = [ex for ex in examples if ex.split == split]
    if not chosen:
        present = sorted({ex.split for ex in examples}, key=SPLITS.index)
        raise ValueError(f"{path}: no examples in split {split!r}; splits present: "
                         f"{', '.join(present)}")
    return chosen


def read_hf_dataset(path: str | Path, tokenizer, split: str | None = None,
                    max_length: int | None = None) -> list[Example]:
    """Task records from the ``datasets`` library, validated line by line like a JSONL file.

    ``path``: a ``save_to_disk`` directory (a ``Dataset`` whose rows carry ``split``, or a
    ``DatasetDict`` whose keys are the splits), or a ``.parquet`` / ``.json`` file of records. Each
    row has the JSONL fields (``clean``, ``corrupted``, optional ``split``, task fields); errors name
    ``path:row`` (1-based).
    """
    import datasets  # heavy: slow to import; only datasets-backed splits pay for it

    path = Path(path)
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet":
            data = datasets.Dataset.from_parquet(str(path))
        else:
            data = datasets.Dataset.from_json(str(path))
    except Exception as err:  # datasets raises many types for a damaged or foreign directory
        raise TaskFormatError(f"{path}: not a readable datasets dataset ({type(err).__name__}: {err})") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{path}: a DatasetDict needs a split ({', '.join(data)})")
        if split not in data:
            raise ValueError(f"{path}: no split {split!r} (splits present: {', '.join(data)})")
        rows = [{**r, "split": r.get("split") or split} for r in data[split]]
        where = f"{path}[{split}]"
        examples = [parse_record(r, tokenizer, f"{where}:{i}", i, max_length) for i, r in enumerate(rows, 1)]
        return [ex for ex in examples if ex.split == split]
    examples = [parse_record({k: v for k, v in r.items() if v is not None}, tokenizer, f"{path}:{i}", i, max_length)
                for i, r in enumerate(data, 1)]
    if not examples:
        raise ValueError(f"{path}: no examples")
    if split is None:
        return examples
    chosen = [ex for ex in examples if ex.split == split]
    if not chosen:
        raise ValueError(f"{path}: no examples in split {split!r}")
    return chosen


def is_hf_dataset(path: str | Path) -> bool:
    """A ``save_to_disk`` directory, or a Parquet / JSON (not JSONL) file of records."""
    path = Path(path)
    if path.is_dir():
        return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    return path.is_file() and path.suffix in (".parquet", ".json")


def to_hf_dataset(examples: Sequence[Example]):
    """A ``datasets.Dataset`` with one row per example and the Example fields as columns.

    ``extra`` is stored as a JSON string (extras may differ in keys and types from line to line,
    which an Arrow column cannot hold); ``json.loads`` it back.
    """
    import datasets  # heavy: slow to import; only users of this helper pay for it

    rows = {f.name: [getattr(ex, f.name) for ex in examples] for f in dataclasses.fields(Example)}
    rows["extra"] = [json.dumps(e, sort_keys=True) for e in rows["extra"]]
    return datasets.Dataset.from_dict(rows)


@dataclass
class Batch:
    """A right-padded batch of B examples, T = the longest example.

    input_ids, corrupted_input_ids:          (B, T) long, padded with the pad id
    attention_mask, corrupted_attention_mask: (B, T) long, 1 on real tokens (the two are equal)
    loss_mask:            (B, T) bool, True where the logits predict a span token
    target_ids:           (B, T) long, the next (span) token at loss positions, -100 elsewhere
    corrupted_target_ids: (B,) long, the first token of the corrupted span
    first_loss_position:  (B,) long, the position whose logits predict the first span token
    extras:               the examples' ``extra`` dicts
    span_ids:             (B, T) long, each token's span id (``edgeprune.spans.assign_spans``), 0 at
                          padding; None unless every example has span ids
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    corrupted_input_ids: torch.Tensor
    corrupted_attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    target_ids: torch.Tensor
    corrupted_target_ids: torch.Tensor
    first_loss_position: torch.Tensor
    extras: list[dict[str, Any]]
    span_ids: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "Batch":
        """A new Batch with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad ``examples`` to the longest one; shapes as in ``Batch``."""
    if not examples:
        raise ValueError("collate needs at least one example")
    B, T = len(examples), max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    corrupted = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    with_spans = all(ex.span_ids is not None for ex in examples)
    span_ids = torch.zeros((B, T), dtype=torch.long) if with_spans else None
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        if len(ex.corrupted_input_ids) != n:
            raise ValueError(f"example from line {ex.line}: input_ids has {n} tokens but "
                             f"corrupted_input_ids has {len(ex.corrupted_input_ids)}")
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        corrupted[b, :n] = torch.tensor(ex.corrupted_input_ids)
        attention_mask[b, :n] = 1
        targets[b, ex.loss_positions] = torch.tensor(ex.target_ids)
        if span_ids is not None:
            if len(ex.span_ids) != n:
                raise ValueError(f"example from line {ex.line}: input_ids has {n} tokens but "
                                 f"span_ids has {len(ex.span_ids)}")
            span_ids[b, :n] = torch.tensor(ex.span_ids)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        corrupted_input_ids=corrupted,
        corrupted_attention_mask=attention_mask.clone(),
        loss_mask=targets != IGNORE_INDEX,
        target_ids=targets,
        corrupted_target_ids=torch.tensor([ex.corrupted_target_ids[0] for ex in examples]),
        first_loss_position=torch.tensor([ex.loss_positions[0] for ex in examples]),
        extras=[ex.extra for ex in examples],
        span_ids=span_ids,
    )


def batches(examples: Sequence[Example], batch_size: int, pad_token_id: int, *,
            shuffle: bool = False, seed: int = 0, epoch: int = 0,
            drop_last: bool = False) -> Iterator[Batch]:
    """Batches in file order, or shuffled by a permutation fixed by (seed, epoch).

    The permutation comes from numpy's SeedSequence of the pair (seed, epoch), so (0, 1) and
    (1, 0) give unrelated orders (seed + epoch would make them equal).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.arange(len(examples))
    if shuffle:
        order = np.random.default_rng((seed, epoch)).permutation(len(examples))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_token_id)


def pad_token_id_for(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0. Padding is masked out, so any id works."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
