"""Spans in the task format (<span name=...>), per-token span names, span ids and their batching,
and the IOI / GT / GP generators' spans (position-aware circuits, issue 15)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import GPT2_TOKENIZER, STORIES, require_shared
from edgeprune.spans import assign_spans, describe_spans
from edgeprune.tasks import TaskFormatError, collate, read_jsonl_task
from edgeprune.tasks.common import split_text
from edgeprune.tasks.jsonl import Batch, Example, strip_spans
from edgeprune.tasks.registry import generate

ROOT = Path(__file__).resolve().parents[1]
IOI_CLEAN = ("When<span name=IO> Mary</span> and<span name=S1> John</span> went to the store,"
             "<span name=S2> John</span> gave a drink<span name=END> to</span><predict> Mary</predict>")
IOI_CORRUPTED = ("When<span name=IO> Anna</span> and<span name=S1> Tom</span> went to the store,"
                 "<span name=S2> Sam</span> gave a drink<span name=END> to</span><predict> Anna</predict>")


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(str(require_shared(GPT2_TOKENIZER)))


def write(tmp_path, *records, name="task.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rec(clean, corrupted=None, **fields):
    return {"clean": clean, "corrupted": clean if corrupted is None else corrupted, **fields}


def read(tmp_path, gpt2, *records):
    return read_jsonl_task(write(tmp_path, *records), gpt2)


def test_markup_gives_each_token_its_span_name(tmp_path, gpt2):
    ex, = read(tmp_path, gpt2, rec(IOI_CLEAN, IOI_CORRUPTED))
    tokens = gpt2.convert_ids_to_tokens(ex.input_ids)
    assert list(zip(tokens, ex.span_names)) == [
        ("When", "other"), ("ĠMary", "IO"), ("Ġand", "other"), ("ĠJohn", "S1"), ("Ġwent", "other"),
        ("Ġto", "other"), ("Ġthe", "other"), ("Ġstore", "other"), (",", "other"), ("ĠJohn", "S2"),
        ("Ġgave", "other"), ("Ġa", "other"), ("Ġdrink", "other"), ("Ġto", "END"), ("ĠMary", "predict")]
    assert ex.span_ids is None  # filled by assign_spans


def test_stripped_markup_gives_the_ids_of_the_plain_text(tmp_path, gpt2):
    marked = read(tmp_path, gpt2, rec(IOI_CLEAN, IOI_CORRUPTED))[0]
    plain = read(tmp_path, gpt2, rec(strip_spans(IOI_CLEAN)[0], strip_spans(IOI_CORRUPTED)[0]))[0]
    assert strip_spans(IOI_CLEAN)[0] == ("When Mary and John went to the store, John gave a drink to"
                                         "<predict> Mary</predict>")
    assert marked.input_ids == plain.input_ids == gpt2(strip_spans(IOI_CLEAN)[0].replace("<predict>", "")
                                                       .replace("</predict>", ""))["input_ids"]
    for field in ("corrupted_input_ids", "loss_positions", "target_ids", "corrupted_target_ids"):
        assert getattr(marked, field) == getattr(plain, field)
    assert plain.span_names == ["other"] * 13 + ["predict"] * 2  # no markup: the defaults only


def test_predict_covers_the_loss_positions_and_the_teacher_forced_tokens(tmp_path, gpt2):
    ex, = read(tmp_path, gpt2, rec("The cat sat on<span name=DET> the</span><predict> warm mat</predict>"))
    assert len(ex.input_ids) == 7 and ex.loss_positions == [4, 5]
    # the named span wins at the first loss position; the rest of the span is predict
    assert ex.span_names == ["other"] * 4 + ["DET", "predict", "predict"]


def test_bos_falls_in_other(tmp_path):
    sp = AutoTokenizer.from_pretrained(str(require_shared(STORIES)))
    ex, = read_jsonl_task(write(tmp_path, rec("One day<span name=NAME> Lily</span> went<predict>,</predict>")), sp)
    assert ex.input_ids[0] == sp.bos_token_id
    assert ex.span_names[0] == "other" and ex.span_names.count("NAME") == 1
    assert ex.span_names[-2:] == ["predict", "predict"]


def test_one_name_may_mark_several_pieces(tmp_path, gpt2):
    ex, = read(tmp_path, gpt2, rec("<span name=N>Mary</span> saw<span name=N> Mary</span> and<predict> ran</predict>"))
    assert ex.span_names == ["N", "other", "N", "predict", "predict"]


def test_quoted_name_reads_the_same(tmp_path, gpt2):
    a, = read(tmp_path, gpt2, rec('When<span name="IO"> Mary</span> left<predict> it</predict>'))
    assert a.span_names[1] == "IO"


def test_read_hf_dataset_strips_and_names_spans_too(tmp_path, gpt2):
    from edgeprune.tasks.jsonl import read_hf_dataset

    path = tmp_path / "records.json"
    path.write_text(json.dumps([rec(IOI_CLEAN, IOI_CORRUPTED)]))
    ex, = read_hf_dataset(path, gpt2)
    assert ex.span_names[1] == "IO" and ex.span_names[-2:] == ["END", "predict"]
    assert ex.input_ids == read(tmp_path, gpt2, rec(IOI_CLEAN, IOI_CORRUPTED))[0].input_ids


@pytest.mark.parametrize("clean, message", [
    ("When <span name=IO>Mary</span> left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': tokens merge across the <span name=IO> tag; put the tag on a token "
     r"boundary, e\.g\. 'When <span name=IO>Mary left' -> 'When<span name=IO> Mary left'"),
    ("When<span name=IO> Mary </span>left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': tokens merge across the </span> tag of span IO.*'When Mary</span> left'"),
    ("When M<span name=IO>ary</span> left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': tokens merge across the <span name=IO> tag.*splits a token"),
    ("When<span name=IO> Ma<span name=X>ry</span></span> left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': span X opens inside span IO; spans cannot nest"),
    ("When<span name=IO> Mary left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': span IO is never closed"),
    ("When Mary</span> left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': </span> without an opening"),
    ("When<span name=IO></span> Mary left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': span IO is empty"),
    ("When Mary left<predict><span name=A> it</span></predict>",
     r"task.jsonl:1: field 'clean': span tag '<span name=A>' after <predict>; spans may only mark the text before"),
    ("When Mary left<predict> it</predict><span name=A> x</span>",
     r"task.jsonl:1: field 'clean': span tag '<span name=A>' after <predict>"),
    ("When<span name=2IO> Mary</span> left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': malformed span tag '<span name=2IO>'"),
    ("When<span id=IO> Mary</span> left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': malformed span tag '<span id=IO>'"),
    ("When<span name=predict> Mary</span> left<predict> it</predict>",
     r"task.jsonl:1: field 'clean': span name 'predict' is reserved"),
])
def test_bad_markup_is_rejected_naming_line_field_and_span(tmp_path, gpt2, clean, message):
    with pytest.raises(TaskFormatError, match=message):
        read(tmp_path, gpt2, rec(clean, "When Mary left<predict> it</predict>"))


def test_span_with_other_token_counts_in_corrupted_is_rejected(tmp_path, gpt2):
    good = rec("When<span name=IO> Mary</span> left<predict> it</predict>")
    bad = rec("When<span name=IO> Mary</span> left<predict> it</predict>",
              "When<span name=IO> Mary Ann</span> left<predict> it</predict>")
    with pytest.raises(TaskFormatError, match=r"task.jsonl:2: fields 'clean' and 'corrupted': span IO covers "
                                              r"tokens 1-1 in 'clean' but 1-2 in 'corrupted'"):
        read(tmp_path, gpt2, good, bad)


def test_span_at_another_position_in_corrupted_is_rejected(tmp_path, gpt2):
    bad = rec("When<span name=IO> Mary</span> and Tom left<predict> it</predict>",
              "When Mary and<span name=IO> Tom</span> left<predict> it</predict>")
    with pytest.raises(TaskFormatError, match=r"task.jsonl:1: .*span IO covers tokens 1-1 in 'clean' but 3-3"):
        read(tmp_path, gpt2, bad)


def test_span_missing_from_corrupted_is_rejected(tmp_path, gpt2):
    bad = rec("When<span name=IO> Mary</span> left<predict> it</predict>", "When Anna left<predict> it</predict>")
    with pytest.raises(TaskFormatError, match=r"task.jsonl:1: .*span IO covers tokens 1-1 in 'clean' but is "
                                              r"absent from 'corrupted'"):
        read(tmp_path, gpt2, bad)


def ioi_like(io_first=True):
    a, b = ("IO", "S1") if io_first else ("S1", "IO")
    return rec(f"When<span name={a}> Mary</span> and<span name={b}> John</span> met,<span name=S2> John</span>"
               f" gave it<span name=END> to</span><predict> Mary</predict>")


def test_assign_spans_orders_by_first_occurrence_and_always_has_the_defaults(tmp_path, gpt2):
    examples = read(tmp_path, gpt2, ioi_like(True), ioi_like(False))
    names = assign_spans(examples, "spans", "task.jsonl")
    assert names == ["other", "IO", "S1", "S2", "END", "predict"]
    assert [names[i] for i in examples[1].span_ids] == examples[1].span_names
    assert examples[1].span_ids[:4] == [0, 2, 0, 1]  # BABA: S1 then IO
    # a first example with no token of the defaults: they go last, other then predict
    first = read(tmp_path, gpt2, rec("<span name=A>When</span><span name=B> Mary</span><span name=END> left"
                                     "</span><predict> it</predict>"))
    first[0].span_names[-1] = "END"  # no token left in the predict span
    assert assign_spans(first, "spans", "x") == ["A", "B", "END", "other", "predict"]
    assert first[0].span_ids == [0, 1, 2, 2]


def test_assign_spans_rejects_a_line_with_other_span_names(tmp_path, gpt2):
    missing = rec("When<span name=IO> Mary</span> and<span name=S1> John</span> met, John gave it"
                  "<span name=END> to</span><predict> Mary</predict>")
    examples = read_jsonl_task(write(tmp_path, ioi_like(), ioi_like(), missing, name="ioi.jsonl"), gpt2)
    with pytest.raises(TaskFormatError, match=r"ioi.jsonl:3: every line must name the same spans: line 3 has "
                                              r"spans IO, S1, END but line 1 has IO, S1, S2, END \(missing S2\)"):
        assign_spans(examples, "spans", str(tmp_path / "ioi.jsonl"))
    extra = rec("<span name=X>When</span><span name=IO> Mary</span> and<span name=S1> John</span> met,"
                "<span name=S2> John</span> gave it<span name=END> to</span><predict> Mary</predict>")
    examples = read(tmp_path, gpt2, ioi_like(), extra)
    with pytest.raises(TaskFormatError, match=r"task.jsonl:2: .*line 2 has spans X, IO, S1, S2, END .*\(extra X\)"):
        assign_spans(examples, "spans", "task.jsonl")


def test_positions_mode_numbers_the_tokens_and_needs_one_length(tmp_path, gpt2):
    same = read(tmp_path, gpt2, rec("The cat sat<predict> down</predict>"), rec("A dog ran<predict> off</predict>"))
    assert assign_spans(same, "positions", "task.jsonl") == ["p0", "p1", "p2", "p3"]
    assert same[1].span_ids == [0, 1, 2, 3]
    assert describe_spans(same, ["p0", "p1", "p2", "p3"])[0] == {"name": "p0", "tokens": 1.0, "min": 1, "max": 1}
    ragged = read(tmp_path, gpt2, rec("The cat sat<predict> down</predict>"), rec("A dog ran<predict> off</predict>"),
                  rec("The old dog ran<predict> off</predict>"))
    with pytest.raises(TaskFormatError, match=r"task.jsonl:3: model.positions: positions .* needs prompts of one "
                                              r"length: line 3 has 5 tokens, line 1 has 4; .*use model.positions: spans"):
        assign_spans(ragged, "positions", "task.jsonl")


def test_unknown_mode_is_rejected(tmp_path, gpt2):
    with pytest.raises(ValueError, match="span mode must be one of spans, positions"):
        assign_spans(read(tmp_path, gpt2, ioi_like()), "tokens", "x")


def test_describe_spans_counts_tokens_per_example(tmp_path, gpt2):
    examples = read(tmp_path, gpt2, rec("When<span name=N> Mary</span> left<predict> it</predict>"),
                    rec("When<span name=N> Mary Ann</span> left<predict> it</predict>"))
    names = assign_spans(examples, "spans", "x")
    info = {d["name"]: d for d in describe_spans(examples, names)}
    assert info["N"] == {"name": "N", "tokens": 1.5, "min": 1, "max": 2}
    assert info["other"] == {"name": "other", "tokens": 1.0, "min": 1, "max": 1}
    assert info["predict"] == {"name": "predict", "tokens": 2.0, "min": 2, "max": 2}


def test_collate_batches_span_ids_with_zero_at_padding(tmp_path, gpt2):
    examples = read(tmp_path, gpt2, rec("When<span name=N> Mary</span> left<predict> it</predict>"),
                    rec("When<span name=N> Mary Ann</span> left<predict> it</predict>"))
    assert collate(examples, pad_token_id=0).span_ids is None  # not assigned yet
    names = assign_spans(examples, "spans", "x")
    batch = collate(examples, pad_token_id=0)
    assert names == ["other", "N", "predict"]
    assert batch.span_ids.dtype == torch.long and batch.span_ids.tolist() == [[0, 1, 2, 2, 0], [0, 1, 1, 2, 2]]
    assert batch.to("cpu").span_ids.tolist() == batch.span_ids.tolist()
    examples[0].span_ids = None
    assert collate(examples, pad_token_id=0).span_ids is None


def test_batch_to_keeps_a_missing_span_ids():
    ex = Example([1, 2], [1, 3], [0], [2], [3], "train", 1)
    batch = collate([ex], pad_token_id=0)
    assert isinstance(batch, Batch) and batch.to("cpu").span_ids is None


def test_tracr_examples_take_raw_positions():
    from edgeprune.models.tracr import load_tracr
    from edgeprune.tasks.tracr import tracr_examples

    tracr = load_tracr(ROOT / "data" / "tracr_models" / "reverse")
    examples = tracr_examples(tracr)
    names = assign_spans(examples, "positions", "reverse")
    assert names == [f"p{t}" for t in range(len(examples[0].input_ids))]
    assert all(ex.span_ids == list(range(len(names))) for ex in examples)
    # without markup the spans mode has just the defaults: BOS is other, the outputs are predict
    assert assign_spans(examples, "spans", "reverse") == ["other", "predict"]
    assert examples[0].span_ids == [0] + [1] * (len(names) - 1)


@pytest.mark.parametrize("task, spans", [("ioi", {"IO", "S1", "S2", "END"}), ("gt", {"YY", "END"}),
                                         ("gp", {"NAME", "END"})])
def test_generators_emit_spans_that_parse(tmp_path, gpt2, task, spans):
    paths = generate(task, gpt2, tmp_path, n_train=8, n_val=2, n_test=4, seed=0)
    examples = read_jsonl_task(paths["train"], gpt2) + read_jsonl_task(paths["test"], gpt2)
    names = assign_spans(examples, "spans", str(paths["train"]))
    assert set(names) == spans | {"other", "predict"}
    for ex in examples:
        assert ex.span_names[ex.loss_positions[0]] == "END" and ex.span_names[-1] == "predict"
        assert all(ex.span_names.count(s) == 1 for s in spans)  # one token each


def test_ioi_spans_mark_the_name_slots(tmp_path, gpt2):
    rows = [json.loads(line) for line in
            generate("ioi", gpt2, tmp_path, n_train=6, n_val=0, n_test=0, seed=1)["train"].read_text().splitlines()]
    for row in rows:
        for text, io in ((row["clean"], row["io"]), (row["corrupted"], None)):
            assert text.count("<span name=S2>") == 1
            if io is not None:
                assert f"<span name=IO>{io}</span>" in text and f"<span name=S1>{row['s']}</span>" in text
                assert f"<span name=S2>{row['s']}</span>" in text
        # the corrupted IO slot holds the corrupted answer
        corrupted_io = split_text(row["corrupted"])[1]
        assert f"<span name=IO>{corrupted_io}</span>" in row["corrupted"]


def test_gt_and_gp_spans_mark_the_year_and_the_name(tmp_path, gpt2):
    gt = json.loads(generate("gt", gpt2, tmp_path / "gt", n_train=1, n_val=0, n_test=0, seed=0)["train"]
                    .read_text().splitlines()[0])
    assert f"{gt['century']}<span name=YY>{gt['yy']:02d}</span>" in gt["clean"]
    assert f"{gt['century']}<span name=YY>01</span>" in gt["corrupted"]
    assert gt["clean"].endswith(f"<span name=END> {gt['century']}</span>" + gt["clean"][gt["clean"].index("<predict>"):])
    gp = json.loads(generate("gp", gpt2, tmp_path / "gp", n_train=1, n_val=0, n_test=0, seed=0)["train"]
                    .read_text().splitlines()[0])
    assert f"<span name=NAME>{gp['name']}</span>" in gp["clean"]


@pytest.mark.parametrize("task", ["ioi", "gt", "gp"])
def test_shipped_gpt2_datasets_carry_spans(gpt2, task):
    path = ROOT / "data" / "datasets" / task / "validation.jsonl"
    examples = read_jsonl_task(path, gpt2)
    names = assign_spans(examples, "spans", str(path))
    assert "END" in names and len(names) == {"ioi": 6, "gt": 4, "gp": 4}[task]
