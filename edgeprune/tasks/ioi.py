"""Indirect object identification (IOI): "When Mary and John went to the store, John gave a
drink to" -> " Mary".

Two names are introduced; one of them (the subject, S) is repeated as the giver, and the model must
complete with the other (the indirect object, IO). Each base template comes in two orders: ABBA
(IO named first) and BABA (S named first). The corrupted prompt is the ABC distribution: the same
template with three fresh, distinct names, so nothing in it says which name should come next.

The test split uses base templates that train and validation never see (``TEST_TEMPLATES``), so a
circuit that passes the test generalises past the wording it was found on.

Spans (for position-aware circuits): ``IO`` (the indirect object in the first clause), ``S1`` (the
subject in the first clause), ``S2`` (the subject's repetition, the giver) and ``END`` (the last
prompt token, " to" or " for", whose logits predict the answer); the corrupted prompt marks the same
slots, which hold its fresh names. Every name is one token, so the spans have one token each.

Record fields: ``io`` and ``s`` (the names with their leading space, as the model predicts them),
``template`` (index into ``TEMPLATES``), ``order`` ("ABBA" or "BABA"), ``place``, ``object``.
Metric: ``logit_diff`` = logit(IO) - logit(S); ``accuracy`` = IO's logit above S's.
"""

from __future__ import annotations

import random


from .common import (TaskData, answer_logit_diff, check_counts, check_pair, draw_splits, mark, mark_end, record,
                     reject_options, require_count, single_token_words)
from .jsonl import strip_spans
from .words import FEMALE_NAMES, MALE_NAMES, OBJECTS, PLACES

# {A} and {B} are the two names of the first clause; {S} repeats one of them.
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {object} to",
    "While {A} and {B} were walking to the {place}, {S} passed a {object} to",
    "Yesterday {A} and {B} met at the {place}. Later, {S} gave a {object} to",
    "That afternoon {A} and {B} relaxed at the {place}, and then {S} offered a {object} to",
    "Once {A} and {B} had reached the {place}, {S} threw a {object} to",
    "Because {A} and {B} were hungry at the {place}, {S} brought a {object} to",
    "On Monday, {A} and {B} cleaned the {place}. Afterwards, {S} lent a {object} to",
    "One evening {A} and {B} were sitting in the {place} when {S} slid a {object} over to",
    "At the {place}, {A} and {B} talked for an hour. Then {S} showed a {object} to",
    "Early in the morning, {A} and {B} drove to the {place}, where {S} sold a {object} to",
    "The {place} was quiet when {A} and {B} came in, so {S} gave a {object} to",
    "Last week {A} and {B} visited the {place}, and {S} mailed a {object} to",
    "Since {A} and {B} both worked at the {place}, {S} left a {object} for",
    "During the party at the {place}, {A} and {B} laughed a lot, and {S} tossed a {object} to",
    "Somehow {A} and {B} got lost near the {place}. Eventually {S} returned the {object} to",
    "When the rain started, {A} and {B} ran into the {place}, and {S} handed the {object} to",
    "After a long day at the {place}, {A} and {B} sat down, and {S} passed the {object} to",
    # Held out for the test split.
    "Before {A} and {B} left the {place}, {S} wanted to give a {object} to",
    "In the {place}, {A} and {B} found a {object}, and {S} decided to give it to",
    "This summer {A} and {B} were planning a trip to the {place}. {S} sent a {object} to",
    "As {A} and {B} waited outside the {place}, {S} gave a {object} to",
    "It was late when {A} and {B} got back from the {place}, so {S} made a {object} for",
    "Then, {A} and {B} had lunch at the {place}, and {S} bought a {object} for",
)
TEST_TEMPLATES = tuple(range(18, len(TEMPLATES)))
TRAIN_TEMPLATES = tuple(i for i in range(len(TEMPLATES)) if i not in TEST_TEMPLATES)
ORDERS = ("ABBA", "BABA")

MIN_NAMES = 10  # two per prompt, three fresh ones for its corruption, and some variety
MIN_PLACES = 3
MIN_OBJECTS = 3


def marked_template(template: int, order: str) -> str:
    """``TEMPLATES[template]`` with its name slots and last word marked as the spans IO, S1, S2, END."""
    a, b = ("IO", "S1") if order == "ABBA" else ("S1", "IO")
    text = TEMPLATES[template]
    for slot, span in (("A", a), ("B", b), ("S", "S2")):
        text = text.replace(" {" + slot + "}", mark(span, " {" + slot + "}"))
    return mark_end(text)


def _fill(template: int, order: str, io: str, s: str, place: str, obj: str) -> str:
    a, b = (io, s) if order == "ABBA" else (s, io)
    return marked_template(template, order).format(A=a, B=b, S=s, place=place, object=obj)


def generate(tokenizer, *, n_train: int, n_val: int, n_test: int, seed: int, **options) -> TaskData:
    """IOI pairs for ``tokenizer``; orders alternate ABBA/BABA within each split."""
    reject_options("ioi", options)
    counts = check_counts(n_train, n_val, n_test)
    all_names = sorted(set(FEMALE_NAMES) | set(MALE_NAMES))
    names = single_token_words(tokenizer, all_names)
    places = single_token_words(tokenizer, PLACES)
    objects = single_token_words(tokenizer, OBJECTS)
    require_count("names", names, MIN_NAMES, tokenizer, len(all_names))
    require_count("places", places, MIN_PLACES, tokenizer, len(PLACES))
    require_count("objects", objects, MIN_OBJECTS, tokenizer, len(OBJECTS))

    def sample(rng: random.Random, split: str, index: int) -> dict | None:
        template = rng.choice(TEST_TEMPLATES if split == "test" else TRAIN_TEMPLATES)
        order = ORDERS[index % 2]
        io, s, a2, b2, c2 = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        clean = (_fill(template, order, io, s, place, obj), " " + io)
        # ABC: the corrupted prompt's "answer" is whichever fresh name sits where IO sat.
        corrupt_io = a2 if order == "ABBA" else b2
        corrupt_text = marked_template(template, order).format(A=a2, B=b2, S=c2, place=place, object=obj)
        corrupted = (corrupt_text, " " + corrupt_io)
        if not check_pair(tokenizer, *((strip_spans(text)[0], span) for text, span in (clean, corrupted))):
            return None
        return record(split, clean, corrupted, io=" " + io, s=" " + s, template=template,
                      order=order, place=place, object=obj)

    splits = draw_splits(sample, counts, random.Random(seed), tokenizer)
    templates = {k: sorted({r["template"] for r in rows}) for k, rows in splits.items()}
    return TaskData(splits, templates)


def metric(tokenizer):
    """``metric(logits (N, V), extras) -> {"logit_diff": (N,), "accuracy": (N,)}``, IO minus S."""
    return answer_logit_diff(tokenizer, "io", "s", task="ioi")
