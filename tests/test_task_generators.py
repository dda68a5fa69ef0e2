"""Task generators (ioi, gt, gp, boolean), their metrics, the `data` CLI and the shipped datasets."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from edgeprune.cli import data as cli_data
from edgeprune.tasks import boolean_expressions, greater_than, ioi, read_jsonl_task
from edgeprune.tasks.common import split_text
from edgeprune.tasks.registry import GENERATORS, METRICS, generate, get_metric

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
STORIES = SHARED / "models" / "stories260K"
TASKS = ("ioi", "gt", "gp", "boolean")
DATASETS = Path(__file__).resolve().parents[1] / "data" / "datasets"
SMALL = dict(n_train=12, n_val=6, n_test=12)
SMALL_COUNTS = {"train": 12, "validation": 6, "test": 12}
FIELDS = {
    "ioi": {"io", "s", "template", "order", "place", "object"},
    "gt": {"year", "century", "yy", "noun", "template"},
    "gp": {"name", "gender", "pronoun", "wrong", "job", "template"},
    "boolean": {"expression", "answer", "wrong", "flipped", "format"},
}


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these checks need the real tokenizers in ../shared")
    return path


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(str(require_shared(GPT2_TOKENIZER)))


@pytest.fixture(scope="module")
def stories():
    return AutoTokenizer.from_pretrained(str(require_shared(STORIES)))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("task", TASKS)
def test_generator_is_deterministic_per_seed(gpt2, task):
    first = GENERATORS[task](gpt2, seed=3, **SMALL).splits
    assert first == GENERATORS[task](gpt2, seed=3, **SMALL).splits
    assert first != GENERATORS[task](gpt2, seed=4, **SMALL).splits


@pytest.mark.parametrize("task", TASKS)
def test_gpt2_pairs_have_equal_prefix_lengths_and_one_token_targets(gpt2, task):
    data = GENERATORS[task](gpt2, seed=0, **SMALL)
    for split, rows in data.splits.items():
        assert len(rows) == SMALL_COUNTS[split]
        for row in rows:
            assert row["split"] == split and FIELDS[task] <= row.keys()
            (cp, cs), (xp, xs) = split_text(row["clean"]), split_text(row["corrupted"])
            assert len(gpt2(cp)["input_ids"]) == len(gpt2(xp)["input_ids"]), row
            assert len(ids(gpt2, cs)) == 1 and len(ids(gpt2, xs)) == 1, row
            assert gpt2(cp + cs)["input_ids"] == gpt2(cp)["input_ids"] + ids(gpt2, cs), row


@pytest.mark.parametrize("task", TASKS)
def test_generated_files_read_back_through_the_task_reader(gpt2, task, tmp_path):
    paths = generate(task, gpt2, tmp_path, seed=0, **SMALL)
    for split, path in paths.items():
        examples = read_jsonl_task(path, gpt2, split=split)
        assert all(len(ex.target_ids) == 1 for ex in examples)
        assert all(len(ex.input_ids) == len(ex.corrupted_input_ids) for ex in examples)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["task"] == task and meta["seed"] == 0
    assert meta["counts"] == SMALL_COUNTS
    assert set(meta["templates"]) == {"train", "validation", "test"}


@pytest.mark.parametrize("task, message", [
    ("ioi", r"has 3 usable names .*needs at least 10"),
    ("gt", r"writes 0 of the 100 two-digit strings"),
    ("gp", r"has 1 usable female names .*needs at least 4"),
    ("boolean", r"' True' is 4 tokens"),
])
def test_stories260k_vocab_is_too_small_and_says_so(stories, task, message):
    """512 tokens: only Lily, Tim and Timmy are one-token names, digits and True are split."""
    with pytest.raises(ValueError, match=message):
        GENERATORS[task](stories, seed=0, **SMALL)


def test_ioi_test_split_uses_held_out_templates(gpt2):
    assert set(ioi.TEST_TEMPLATES).isdisjoint(ioi.TRAIN_TEMPLATES)
    assert len(ioi.TRAIN_TEMPLATES) + len(ioi.TEST_TEMPLATES) >= 15  # each in both orders
    data = ioi.generate(gpt2, seed=0, n_train=40, n_val=10, n_test=40)
    test = {r["template"] for r in data.splits["test"]}
    seen = {r["template"] for s in ("train", "validation") for r in data.splits[s]}
    assert test and test <= set(ioi.TEST_TEMPLATES) and test.isdisjoint(seen)
    assert data.templates["test"] == sorted(test)
    assert {r["order"] for r in data.splits["train"]} == {"ABBA", "BABA"}


def test_ioi_corruption_uses_three_fresh_names(gpt2):
    for row in ioi.generate(gpt2, seed=1, **SMALL).splits["train"]:
        clean, corrupted = split_text(row["clean"])[0], split_text(row["corrupted"])[0]
        assert clean.count(row["s"].strip()) == 2 and clean.count(row["io"].strip()) == 1
        assert row["io"].strip() not in corrupted and row["s"].strip() not in corrupted


def test_gt_corruption_sets_the_start_year_to_01_and_the_target_is_later(gpt2):
    for row in greater_than.generate(gpt2, seed=0, **SMALL).splits["train"]:
        (clean, span), (corrupted, _) = split_text(row["clean"]), split_text(row["corrupted"])
        assert str(row["year"]) in clean and f"{row['century']}01" in corrupted
        assert int(span) > row["yy"]


def test_gp_corruption_swaps_in_a_name_of_the_other_gender(gpt2):
    for row in GENERATORS["gp"](gpt2, seed=0, **SMALL).splits["train"]:
        assert split_text(row["corrupted"])[1] == row["wrong"] != row["pronoun"]
        assert row["name"].strip() not in split_text(row["corrupted"])[0]


@pytest.mark.parametrize("fmt", ["fewshot", "instruct"])
def test_boolean_corruption_flips_one_operand_and_the_answer(gpt2, fmt):
    rows = boolean_expressions.generate(gpt2, seed=0, format=fmt, **SMALL).splits["train"]
    assert {r["answer"] for r in rows} == {" True", " False"}
    for row in rows:
        (clean, span), (corrupted, corrupt_span) = split_text(row["clean"]), split_text(row["corrupted"])
        *head, question = clean.split("\n")
        if fmt == "fewshot":
            assert len(head) == boolean_expressions.N_SHOTS
            assert all(line.endswith((" is True.", " is False.")) for line in head)
        else:
            assert clean.startswith(boolean_expressions.INSTRUCTION) and len(head) == 1
        assert question == row["expression"] + " is" and span == row["answer"] != corrupt_span
        assert corrupted.split("\n")[:-1] == head
        words, flipped = question.split()[:-1], corrupted.split("\n")[-1].split()[:-1]
        assert len(words) == len(flipped) and sum(a != b for a, b in zip(words, flipped)) == 1
        assert boolean_expressions.evaluate(words) != boolean_expressions.evaluate(flipped)


def test_boolean_evaluator_follows_python_precedence():
    rng = random.Random(0)
    for _ in range(300):
        words = boolean_expressions.sample_expression(rng, 3)
        assert boolean_expressions.evaluate(words) == eval(" ".join(words))  # our own words only


def test_unknown_option_and_task_are_named(gpt2, tmp_path):
    with pytest.raises(ValueError, match="no option"):
        GENERATORS["ioi"](gpt2, seed=0, format="fewshot", **SMALL)
    with pytest.raises(ValueError, match="format must be one of"):
        GENERATORS["boolean"](gpt2, seed=0, format="chat", **SMALL)
    with pytest.raises(ValueError, match="unknown task 'sva'"):
        generate("sva", gpt2, tmp_path, seed=0, **SMALL)


def _logits(tok, n, entries, fill=-30.0):
    """(n, V) logits of ``fill`` except the given {(row, text): value} entries."""
    logits = torch.full((n, len(tok)), fill)
    for (row, text), value in entries.items():
        logits[row, ids(tok, text)[0]] = value
    return logits


def test_ioi_metric_is_io_minus_s_logit(gpt2):
    extras = [{"io": " Mary", "s": " John"}, {"io": " Anna", "s": " Tom"}]
    logits = _logits(gpt2, 2, {(0, " Mary"): 3.0, (0, " John"): 1.0, (1, " Anna"): 0.5, (1, " Tom"): 2.0})
    out = METRICS["ioi"](gpt2)(logits, extras)
    assert torch.allclose(out["logit_diff"], torch.tensor([2.0, -1.5]))
    assert out["accuracy"].tolist() == [1.0, 0.0]


def test_gp_metric_is_right_minus_wrong_pronoun(gpt2):
    extras = [{"pronoun": " she", "wrong": " he"}, {"pronoun": " he", "wrong": " she"}]
    logits = _logits(gpt2, 2, {(0, " she"): 4.0, (0, " he"): 1.0, (1, " she"): 4.0, (1, " he"): 1.0})
    out = get_metric("gp", gpt2)(logits, extras)
    assert torch.allclose(out["logit_diff"], torch.tensor([3.0, -3.0]))
    assert out["accuracy"].tolist() == [1.0, 0.0]


def test_boolean_metric_is_answer_minus_wrong(gpt2):
    extras = [{"answer": " False", "wrong": " True"}]
    logits = _logits(gpt2, 1, {(0, " False"): 2.5, (0, " True"): 2.0})
    out = METRICS["boolean"](gpt2)(logits, extras)
    assert torch.allclose(out["logit_diff"], torch.tensor([0.5]))
    assert out["accuracy"].tolist() == [1.0]


def test_gt_metric_is_probability_above_minus_at_or_below(gpt2):
    # p("60") = 0.75, p("30") = 0.25, nothing else: above 43 -> 0.75 - 0.25; above 70 -> 0 - 1;
    # above 30 -> 0.75 - 0.25 (30 itself counts as "not later").
    entries = {(r, "60"): math.log(3.0) for r in range(3)} | {(r, "30"): 0.0 for r in range(3)}
    logits = _logits(gpt2, 3, entries, fill=-1e4)  # no mass outside the two years
    out = METRICS["gt"](gpt2)(logits, [{"yy": 43}, {"yy": 70}, {"yy": 30}])
    assert torch.allclose(out["prob_diff"], torch.tensor([0.5, -1.0, 0.5]), atol=1e-6)
    assert out["accuracy"].tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("task", TASKS)
def test_metric_rewards_the_clean_span_read_by_the_task_reader(gpt2, task, tmp_path):
    """Field names agree end to end: a model that puts all its weight on the clean span wins."""
    generate(task, gpt2, tmp_path, seed=0, **SMALL)
    examples = read_jsonl_task(tmp_path / "validation.jsonl", gpt2)
    logits = torch.zeros(len(examples), len(gpt2))
    logits[torch.arange(len(examples)), [ex.target_ids[0] for ex in examples]] = 30.0
    out = METRICS[task](gpt2)(logits, [ex.extra for ex in examples])
    assert all(v.shape == (len(examples),) for v in out.values())
    assert out["accuracy"].tolist() == [1.0] * len(examples)


def test_cli_writes_the_splits_and_says_where(gpt2, tmp_path, capsys):
    out = tmp_path / "bool"
    rc = cli_data.main(["boolean", "--tokenizer", str(GPT2_TOKENIZER), "-o", str(out),
                        "--n-train", "4", "--n-val", "2", "--n-test", "2", "--format", "instruct"])
    assert rc == 0 and str(out / "train.jsonl") in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["options"]["format"] == "instruct"
    assert cli_data.main(["gt", "--tokenizer", str(GPT2_TOKENIZER), "-o", str(tmp_path / "gt"),
                          "--format", "fewshot"]) == 2
    assert "boolean task only" in capsys.readouterr().err


@pytest.mark.parametrize("task", TASKS)
def test_shipped_dataset_parses_with_the_required_fields(task):
    folder = DATASETS / task
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["task"] == task and meta["tokenizer"].endswith("gpt2")
    for split in ("train", "validation", "test"):
        lines = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == meta["counts"][split] > 0
        for line in lines:
            row = json.loads(line)
            assert row["split"] == split and FIELDS[task] <= row.keys()
            assert row["clean"].count("<predict>") == row["corrupted"].count("</predict>") == 1
    if task == "boolean":
        assert meta["options"]["format"] == "fewshot"


@pytest.mark.parametrize("task", TASKS)
def test_shipped_validation_split_meets_the_reader_contract_for_gpt2(gpt2, task):
    examples = read_jsonl_task(DATASETS / task / "validation.jsonl", gpt2, split="validation")
    assert all(len(ex.target_ids) == 1 for ex in examples)


def test_asking_for_more_examples_than_exist_is_a_clear_error(gpt2):
    with pytest.raises(ValueError, match=r"could make only \d+ of the 60 train examples"):
        boolean_expressions.generate(gpt2, seed=0, n_train=60, n_val=0, n_test=0,
                                     format="instruct", max_operands=2, max_depth=1)
