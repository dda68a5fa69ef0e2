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

Every malformed line raises ``TaskFormatError`` naming the file, the line and the field; nothing is
skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT = "train"
OPEN, CLOSE = "<predict>", "</predict>"
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


class TaskFormatError(ValueError):
    """A task file line that does not follow the format; the message says file:line and field."""


@dataclass
class Example:
    """One tokenized line. Lengths: input_ids and corrupted_input_ids (P + S,),
    loss_positions and target_ids (S,), corrupted_target_ids (S',) with S' the corrupted span's
    own length. ``line`` is the 1-based line number in the file."""

    input_ids: list[int]
    corrupted_input_ids: list[int]
    loss_positions: list[int]
    target_ids: list[int]
    corrupted_target_ids: list[int]
    split: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)


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

    clean_prefix, clean_span = _split_span(obj["clean"], f"{at}: field 'clean'")
    corr_prefix, corr_span = _split_span(obj["corrupted"], f"{at}: field 'corrupted'")
    prefix_ids, span_ids = _tokenize(tokenizer, clean_prefix, clean_span, f"{at}: field 'clean'")
    corr_prefix_ids, corr_span_ids = _tokenize(tokenizer, corr_prefix, corr_span,
                                               f"{at}: field 'corrupted'")
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
    )


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
    import datasets

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
    import datasets  # slow to import; only users of this helper pay for it

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
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        if len(ex.corrupted_input_ids) != n:
            raise ValueError(f"example from line {ex.line}: input_ids has {n} tokens but "
                             f"corrupted_input_ids has {len(ex.corrupted_input_ids)}")
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        corrupted[b, :n] = torch.tensor(ex.corrupted_input_ids)
        attention_mask[b, :n] = 1
        targets[b, ex.loss_positions] = torch.tensor(ex.target_ids)
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
