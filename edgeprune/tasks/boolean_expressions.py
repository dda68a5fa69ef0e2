"""Boolean expressions: "not ( True or False ) and True is" -> " False".

Random expressions over True, False, ``and``, ``or``, ``not`` and parentheses, with Python's
precedence (``not`` binds tightest, then ``and``, then ``or``), at most ``max_operands`` operands
and ``max_depth`` levels of nested binary operators. Words are separated by spaces, parentheses
included, so each word is its own token for BPE tokenizers. The corrupted prompt flips one operand
chosen so that the answer flips; everything else (the few-shot examples too) is unchanged. Answers
alternate True/False within each split.

Formats (option ``format``):
- ``fewshot`` (default): three solved examples, one per line ("... is True."), then the question.
- ``instruct``: one instruction line, then the question.

Record fields: ``expression``, ``answer`` (" True" or " False"), ``wrong`` (the other),
``flipped`` (index of the flipped operand, counting operands from 0), ``format``.
Metric: ``logit_diff`` = logit(answer) - logit(wrong); ``accuracy`` = it is > 0.
"""

from __future__ import annotations

import random


from .common import (TaskData, answer_logit_diff, check_counts, check_pair, draw_splits, record, reject_options,
                     single_token_id)

FORMATS = ("fewshot", "instruct")
INSTRUCTION = "Evaluate the boolean expression and answer True or False.\n"
N_SHOTS = 3
ANSWERS = {True: " True", False: " False"}
OPERANDS = ("True", "False")


def evaluate(words: list[str]) -> bool:
    """Value of a space-split expression: or < and < not < parentheses, as in Python."""
    pos = 0

    def peek() -> str | None:
        return words[pos] if pos < len(words) else None

    def take(expected: str | None = None) -> str:
        nonlocal pos
        word = peek()
        if word is None or (expected is not None and word != expected):
            raise ValueError(f"bad boolean expression {' '.join(words)!r} at word {pos}")
        pos += 1
        return word

    def disjunction() -> bool:
        value = conjunction()
        while peek() == "or":
            take()
            right = conjunction()  # parse before combining: `or` would skip the right side
            value = value or right
        return value

    def conjunction() -> bool:
        value = negation()
        while peek() == "and":
            take()
            right = negation()
            value = value and right
        return value

    def negation() -> bool:
        if peek() == "not":
            take()
            return not negation()
        if peek() == "(":
            take()
            value = disjunction()
            take(")")
            return value
        word = take()
        if word not in OPERANDS:
            raise ValueError(f"bad boolean expression {' '.join(words)!r}: {word!r} is no operand")
        return word == "True"

    value = disjunction()
    if pos != len(words):
        raise ValueError(f"bad boolean expression {' '.join(words)!r}: trailing {words[pos:]}")
    return value


def sample_expression(rng: random.Random, max_depth: int, top: bool = True) -> list[str]:
    """A random expression as a list of words; nested binary operators at most ``max_depth`` deep."""
    if max_depth == 0 or (not top and rng.random() < 0.4):
        operand = [rng.choice(OPERANDS)]
        return ["not", *operand] if rng.random() < 0.25 else operand
    words = [*sample_expression(rng, max_depth - 1, top=False), rng.choice(("and", "or")),
             *sample_expression(rng, max_depth - 1, top=False)]
    if not top and rng.random() < 0.6:
        words = ["(", *words, ")"]
        if rng.random() < 0.3:
            words = ["not", *words]
    return words


def _operand_positions(words: list[str]) -> list[int]:
    return [i for i, w in enumerate(words) if w in OPERANDS]


def _flip(words: list[str], i: int) -> list[str]:
    return words[:i] + ["False" if words[i] == "True" else "True"] + words[i + 1:]


def generate(tokenizer, *, n_train: int, n_val: int, n_test: int, seed: int,
             format: str = "fewshot", max_operands: int = 4, max_depth: int = 2,
             **options) -> TaskData:
    """Boolean-expression pairs for ``tokenizer``; no expression is asked in two splits."""
    reject_options("boolean", options, ("format", "max_operands", "max_depth"))
    counts = check_counts(n_train, n_val, n_test)
    if format not in FORMATS:
        raise ValueError(f"boolean format must be one of {list(FORMATS)}, got {format!r}")
    if max_operands < 2 or max_depth < 1:
        raise ValueError(f"boolean expressions need max_operands >= 2 and max_depth >= 1, "
                         f"got max_operands={max_operands}, max_depth={max_depth}")
    for answer in ANSWERS.values():
        single_token_id(tokenizer, answer)

    def draw(rng: random.Random) -> list[str]:
        while True:
            words = sample_expression(rng, max_depth)
            if 2 <= len(_operand_positions(words)) <= max_operands:
                return words

    def header(rng: random.Random, query: str) -> str:
        if format == "instruct":
            return INSTRUCTION
        while True:
            shots = [draw(rng) for _ in range(N_SHOTS)]
            values = [evaluate(s) for s in shots]
            if len(set(values)) == 2 and query not in {" ".join(s) for s in shots}:
                return "".join(f"{' '.join(s)} is {v}.\n" for s, v in zip(shots, values))

    def sample(rng: random.Random, split: str, index: int) -> dict | None:
        want = index % 2 == 0
        words = draw(rng)
        if evaluate(words) != want:
            return None
        flips = [i for i in _operand_positions(words) if evaluate(_flip(words, i)) != want]
        if not flips:
            return None
        flip = rng.choice(flips)
        flipped = _flip(words, flip)
        expression = " ".join(words)
        head = header(rng, expression)
        clean = (f"{head}{expression} is", ANSWERS[want])
        corrupted = (f"{head}{' '.join(flipped)} is", ANSWERS[not want])
        if not check_pair(tokenizer, clean, corrupted):
            return None
        return record(split, clean, corrupted, expression=expression, answer=ANSWERS[want],
                      wrong=ANSWERS[not want], flipped=_operand_positions(words).index(flip),
                      format=format)

    splits = draw_splits(sample, counts, random.Random(seed), tokenizer,
                         key=lambda r: r["expression"])
    options_used = {"format": format, "max_operands": max_operands, "max_depth": max_depth}
    return TaskData(splits, {k: [format] for k in splits}, options_used)


def metric(tokenizer):
    """``metric(logits (N, V), extras) -> {"logit_diff": (N,), "accuracy": (N,)}``, right answer minus wrong."""
    return answer_logit_diff(tokenizer, "answer", "wrong", task="boolean")
