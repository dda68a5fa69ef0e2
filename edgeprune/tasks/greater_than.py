"""Greater-than: "The war lasted from the year 1743 to the year 17" -> a two-digit year above 43.

The end year of a span must be later than its start; a model that does the task puts its
probability on the two-digit continuations YY' > YY. The corrupted prompt sets the start year's last
two digits to 01, which says nothing about which end years are plausible.

Years are kept only where the tokenizer writes " CCYY" as exactly two tokens, " CC" then "YY" (and
" CC01" likewise), so the start year, the corrupted start year and the predicted end year all have
the same shape, and where all 100 two-digit strings "00".."99" are single tokens (the metric reads
them). The ``<predict>`` span is one valid answer (a random YY' > YY); the metric does not depend
on which.

Spans (for position-aware circuits): ``YY`` (the start year's two-digit token, "43" in " 17" "43";
"01" in the corrupted prompt) and ``END`` (the last prompt token, the century " 17" whose logits
predict the end year's digits).

Record fields: ``year`` (e.g. 1743), ``century`` (17), ``yy`` (43), ``noun``, ``template``.
Metric: ``prob_diff`` = sum of p(YY') over YY' > YY minus the sum over YY' <= YY, with p the
softmax over the whole vocabulary, restricted to the 100 two-digit tokens; ``accuracy`` =
``prob_diff > 0``.
"""

from __future__ import annotations

import random

import torch

from .common import (TaskData, TaskMetric, check_counts, check_pair, draw_splits, mark, mark_end, record,
                     reject_options, require_count, single_token_id, span_ids)
from .jsonl import strip_spans
from .words import SPANS

TEMPLATES = (
    "The {noun} lasted from the year {start} to the year {cc}",
    "The {noun} began in the year {start} and ended in the year {cc}",
    "The {noun} ran from {start} until {cc}",
    "The {noun} started in {start} and was over by {cc}",
    "Historians agree that the {noun} went on from {start} to {cc}",
    "The {noun} continued from the year {start} through the year {cc}",
    "According to the records, the {noun} stretched from {start} to {cc}",
)
CENTURIES = tuple(range(11, 19))
CORRUPT_YY = 1
MIN_YEARS = 20


def two_digit_ids(tokenizer) -> list[int]:
    """Token ids of "00".."99" in order; ValueError naming how many are single tokens if not all."""
    found = [len(span_ids(tokenizer, f"{yy:02d}")) == 1 for yy in range(100)]
    if not all(found):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"tokenizer {name!r} writes {sum(found)} of the 100 two-digit strings "
                         f"'00'..'99' as one token; the greater-than task needs all 100")
    return [single_token_id(tokenizer, f"{yy:02d}") for yy in range(100)]


def valid_years(tokenizer, digits: list[int]) -> list[int]:
    """Years CCYY (YY in 02..98) tokenized " CC" + "YY", whose century also takes " CC" + "01"."""
    years = []
    for cc in CENTURIES:
        head = span_ids(tokenizer, f" {cc}")
        if len(head) != 1:
            continue
        if span_ids(tokenizer, f" {cc}{CORRUPT_YY:02d}") != head + [digits[CORRUPT_YY]]:
            continue
        years += [cc * 100 + yy for yy in range(2, 99)
                  if span_ids(tokenizer, f" {cc}{yy:02d}") == head + [digits[yy]]]
    return years


def generate(tokenizer, *, n_train: int, n_val: int, n_test: int, seed: int, **options) -> TaskData:
    """Greater-than pairs for ``tokenizer``; all splits share templates, never an example."""
    reject_options("gt", options)
    counts = check_counts(n_train, n_val, n_test)
    years = valid_years(tokenizer, two_digit_ids(tokenizer))
    require_count("years (' CC' + 'YY' as two tokens)", years, MIN_YEARS, tokenizer,
                  len(CENTURIES) * 97)

    def sample(rng: random.Random, split: str, index: int) -> dict | None:
        template, noun, year = rng.randrange(len(TEMPLATES)), rng.choice(SPANS), rng.choice(years)
        cc, yy = divmod(year, 100)
        later = rng.randrange(yy + 1, 100)

        def text(start_yy: int) -> str:
            start = f"{cc}" + mark("YY", f"{start_yy:02d}")
            return mark_end(TEMPLATES[template].format(noun=noun, start=start, cc=cc))

        clean, corrupted = (text(yy), f"{later:02d}"), (text(CORRUPT_YY), f"{later:02d}")
        if not check_pair(tokenizer, *((strip_spans(t)[0], span) for t, span in (clean, corrupted))):
            return None
        return record(split, clean, corrupted, year=year, century=cc, yy=yy, noun=noun,
                      template=template)

    splits = draw_splits(sample, counts, random.Random(seed), tokenizer)
    templates = {k: sorted({r["template"] for r in rows}) for k, rows in splits.items()}
    return TaskData(splits, templates)


def metric(tokenizer) -> TaskMetric:
    """``metric(logits (N, V), extras) -> {"prob_diff": (N,), "accuracy": (N,)}``.

    Its check: ``yy`` is an integer 0..99 and the line predicts one two-digit token later than it."""
    ids = two_digit_ids(tokenizer)
    digits = torch.tensor(ids)
    value_of = {token: yy for yy, token in enumerate(ids)}

    def gt_metric(logits: torch.Tensor, extras: list[dict]) -> dict[str, torch.Tensor]:
        assert logits.dim() == 2 and logits.shape[0] == len(extras), (tuple(logits.shape), len(extras))
        probs = logits.float().softmax(dim=-1)[:, digits.to(logits.device)]  # (N, 100)
        yy = torch.tensor([int(e["yy"]) for e in extras], device=logits.device)
        later = torch.arange(100, device=logits.device)[None, :] > yy[:, None]  # (N, 100)
        diff = (probs * later).sum(-1) - (probs * ~later).sum(-1)
        return {"prob_diff": diff, "accuracy": (diff > 0).float()}

    def check(ex) -> str | None:
        yy = ex.extra.get("yy")
        if isinstance(yy, bool) or not isinstance(yy, int) or not 0 <= yy <= 99:
            return f"field 'yy' must be the start year's last two digits, an integer 0..99, got {yy!r}"
        target = ex.target_ids[0]
        if target not in value_of:
            return (f"the line predicts {tokenizer.decode([target])!r} (id {target}), not one of the "
                    f"two-digit tokens '00'..'99' the metric scores")
        if value_of[target] <= yy:
            return (f"the line predicts {value_of[target]:02d}, not a year later than yy = {yy:02d}: "
                    f"the span must be one valid answer")
        return None

    return TaskMetric("gt", "prob_diff", gt_metric, check)
