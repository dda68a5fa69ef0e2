"""Gendered pronoun: "So Mary is a nurse. When asked why," -> " she".

A sentence introduces one person by a first name, and the next word is the subject pronoun that
refers back to them. The corrupted prompt replaces the name with one of the other gender (the same
number of tokens), so the right pronoun flips. Contexts avoid gender-typed jobs and actions, so the
name is the only cue. Splits alternate female and male names.

Spans (for position-aware circuits): ``NAME`` (the name, " Mary"; the other-gender name in the
corrupted prompt) and ``END`` (the last prompt token, "," or the last word, whose logits predict the
pronoun).

Record fields: ``name`` (with its leading space), ``gender`` ("female" or "male"), ``pronoun`` (the
right one, " she" or " he"), ``wrong`` (the other), ``job`` (null where the template has none),
``template``.
Metric: ``logit_diff`` = logit(right pronoun) - logit(wrong pronoun); ``accuracy`` = it is > 0.
"""

from __future__ import annotations

import random


from .common import (TaskData, answer_logit_diff, check_counts, check_pair, draw_splits, mark, mark_end, record,
                     reject_options, require_count, single_token_id, single_token_words)
from .jsonl import strip_spans
from .words import FEMALE_NAMES, JOBS, MALE_NAMES

TEMPLATES = (
    "So {name} is a {job}. When asked why,",
    "Everyone knows that {name} works as a {job}. When asked about it,",
    "For years {name} has been a {job}. Whenever anyone asks,",
    "As a child, {name} wanted to be a {job}. Years later,",
    "Last night {name} went to bed early because",
    "This morning {name} looked out of the window and smiled, because",
    "When {name} finished the race,",
    "The letter for {name} arrived on Friday. After reading it,",
    "Nobody expected {name} to win, but in the end",
    "After the {job} left, {name} sat down and",
    "On Sunday {name} missed the bus, so",
    "Then {name} picked up the phone. A moment later,",
)
PRONOUNS = {"female": " she", "male": " he"}
GENDERS = ("female", "male")
MIN_NAMES_PER_GENDER = 4


def generate(tokenizer, *, n_train: int, n_val: int, n_test: int, seed: int, **options) -> TaskData:
    """Pronoun pairs for ``tokenizer``; all splits share templates, never an example."""
    reject_options("gp", options)
    counts = check_counts(n_train, n_val, n_test)
    for pronoun in PRONOUNS.values():
        single_token_id(tokenizer, pronoun)
    names = {"female": single_token_words(tokenizer, FEMALE_NAMES),
             "male": single_token_words(tokenizer, MALE_NAMES)}
    require_count("female names", names["female"], MIN_NAMES_PER_GENDER, tokenizer, len(FEMALE_NAMES))
    require_count("male names", names["male"], MIN_NAMES_PER_GENDER, tokenizer, len(MALE_NAMES))

    def sample(rng: random.Random, split: str, index: int) -> dict | None:
        gender = GENDERS[index % 2]
        other = GENDERS[1 - index % 2]
        template, job = rng.randrange(len(TEMPLATES)), rng.choice(JOBS)
        name, swap = rng.choice(names[gender]), rng.choice(names[other])
        marked = mark_end(TEMPLATES[template].replace(" {name}", mark("NAME", " {name}")))
        clean = (marked.format(name=name, job=job), PRONOUNS[gender])
        corrupted = (marked.format(name=swap, job=job), PRONOUNS[other])
        if not check_pair(tokenizer, *((strip_spans(t)[0], span) for t, span in (clean, corrupted))):
            return None
        job_used = job if "{job}" in TEMPLATES[template] else None
        return record(split, clean, corrupted, name=" " + name, gender=gender,
                      pronoun=PRONOUNS[gender], wrong=PRONOUNS[other], job=job_used,
                      template=template)

    splits = draw_splits(sample, counts, random.Random(seed), tokenizer)
    templates = {k: sorted({r["template"] for r in rows}) for k, rows in splits.items()}
    return TaskData(splits, templates)


def metric(tokenizer):
    """``metric(logits (N, V), extras) -> {"logit_diff": (N,), "accuracy": (N,)}``, right pronoun minus wrong."""
    return answer_logit_diff(tokenizer, "pronoun", "wrong", task="gp")
