"""The clean/corrupted JSONL task format: parsing, rejection messages, alignment, batching."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgeprune.tasks import (Batch, TaskFormatError, batches, collate, pad_token_id_for,
                             read_jsonl_task, to_hf_dataset)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
GPT2 = SHARED / "tokenizers" / "gpt2"
STORIES_TASK = REPO / "data" / "tasks" / "stories_names.jsonl"
BOS = 1


class WordTokenizer:
    """One token per word with its leading whitespace (' Lily'), like GPT-2 on plain words, so a
    trailing space before <predict> merges with the next word. Ids are assigned on first sight."""

    pad_token_id, eos_token_id = None, 2

    def __init__(self, bos: bool = True):
        self.bos = bos
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        words = re.findall(r"\s*\S+|\s+$", text)
        ids = [self.vocab.setdefault(w, len(self.vocab) + 3) for w in words]
        return {"input_ids": ([BOS] if self.bos and add_special_tokens else []) + ids}

    def ids(self, text):
        return self(text, add_special_tokens=False)["input_ids"]


def line(clean="The cat sat on the<predict> mat</predict>",
         corrupted="The dog sat on the<predict> rug</predict>", **fields):
    return json.dumps({"clean": clean, "corrupted": corrupted, **fields})


def write(tmp_path, *lines, name="task.jsonl"):
    path = tmp_path / name
    path.write_text("".join(text + "\n" for text in lines), encoding="utf-8")
    return path


@pytest.fixture
def tok():
    return WordTokenizer()


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the offline fixtures in ../shared are needed for this test")
    return path


def test_reads_every_line_with_split_line_number_and_extras(tmp_path, tok):
    path = write(tmp_path, line(split="test", io=" Mary"), "", line(split="validation"), line())
    examples = read_jsonl_task(path, tok)
    assert [(ex.split, ex.line) for ex in examples] == [("test", 1), ("validation", 3), ("train", 4)]
    assert examples[0].extra == {"io": " Mary"} and examples[2].extra == {}


def test_split_argument_keeps_only_that_split(tmp_path, tok):
    path = write(tmp_path, line(split="test"), line(), line(split="test"))
    assert [ex.line for ex in read_jsonl_task(path, tok, split="test")] == [1, 3]
    assert [ex.line for ex in read_jsonl_task(path, tok, split="train")] == [2]


def test_unknown_split_name_lists_the_available_splits(tmp_path, tok):
    path = write(tmp_path, line())
    with pytest.raises(ValueError, match="'dev'.*train, validation, test"):
        read_jsonl_task(path, tok, split="dev")


def test_empty_split_names_the_file_and_the_splits_present(tmp_path, tok):
    path = write(tmp_path, line(split="test"), line())
    with pytest.raises(ValueError) as err:
        read_jsonl_task(path, tok, split="validation")
    assert str(path) in str(err.value) and "train, test" in str(err.value)


def test_file_with_only_blank_lines_is_an_error(tmp_path, tok):
    with pytest.raises(ValueError, match="no examples"):
        read_jsonl_task(write(tmp_path, "", "  "), tok)


def test_loss_positions_predict_the_span_tokens(tmp_path, tok):
    path = write(tmp_path, line(clean="Once there was<predict> a big cat</predict> who sat",
                                corrupted="Once there were<predict> two</predict>"))
    ex = read_jsonl_task(path, tok)[0]
    P, span = 4, tok.ids(" a big cat")  # BOS Once there was
    assert ex.input_ids == [BOS] + tok.ids("Once there was") + span  # text after </predict> dropped
    assert ex.loss_positions == [P - 1, P, P + 1] and ex.target_ids == span
    assert [ex.input_ids[pos + 1] for pos in ex.loss_positions] == ex.target_ids


def test_corrupted_input_is_corrupted_prefix_then_clean_span(tmp_path, tok):
    path = write(tmp_path, line(clean="A cat named<predict> Tom Cat</predict>",
                                corrupted="A dog named<predict> Rex</predict>"))
    ex = read_jsonl_task(path, tok)[0]
    assert ex.corrupted_input_ids == [BOS] + tok.ids("A dog named") + tok.ids(" Tom Cat")
    assert ex.corrupted_target_ids == tok.ids(" Rex")
    assert len(ex.corrupted_input_ids) == len(ex.input_ids)


GOOD = line()
BAD_LINES = {
    "invalid_json": ('{"clean": "a<predict> b</predict>", ', ["invalid JSON"]),
    "not_an_object": ('["a", "b"]', ["JSON object", "list"]),
    "missing_clean": (json.dumps({"corrupted": "a<predict> b</predict>"}), ["'clean'", "missing"]),
    "missing_corrupted": (json.dumps({"clean": "a<predict> b</predict>"}), ["'corrupted'", "missing"]),
    "clean_not_a_string": (json.dumps({"clean": 5, "corrupted": "a<predict> b</predict>"}),
                           ["'clean'", "string", "int"]),
    "no_tags": (line(corrupted="The dog sat on the rug"), ["'corrupted'", "missing <predict>"]),
    "unclosed": (line(clean="The cat sat on the<predict> mat"), ["'clean'", "exactly one"]),
    "nested": (line(clean="The<predict> cat<predict> sat</predict></predict>"), ["'clean'", "exactly one"]),
    "repeated": (line(corrupted="The<predict> dog</predict> sat<predict> on</predict>"),
                 ["'corrupted'", "exactly one"]),
    "reversed": (line(clean="The cat</predict> sat<predict> on"), ["'clean'", "comes before"]),
    "empty_span": (line(clean="The cat sat on the<predict></predict>"), ["'clean'", "empty"]),
    "merge_across_tag": (line(clean="The cat sat on the <predict>mat</predict>"),
                         ["'clean'", "tokenizes differently"]),
    "unknown_split": (line(split="dev"), ["'split'", "'dev'", "train, validation, test"]),
    "split_not_a_string": (line(split=3), ["'split'", "3"]),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_names_file_line_and_field(tmp_path, tok, case):
    text, expected = BAD_LINES[case]
    path = write(tmp_path, GOOD, "", text)
    with pytest.raises(TaskFormatError) as err:
        read_jsonl_task(path, tok)
    assert str(err.value).startswith(f"{path}:3: ")
    for part in expected:
        assert part in str(err.value)


def test_bad_line_in_another_split_is_still_rejected(tmp_path, tok):
    path = write(tmp_path, GOOD, line(split="test", clean="no tags"))
    with pytest.raises(TaskFormatError, match=":2: "):
        read_jsonl_task(path, tok, split="train")


def test_prefix_length_mismatch_gives_both_lengths(tmp_path, tok):
    path = write(tmp_path, line(corrupted="The big dog sat on the<predict> rug</predict>"))
    with pytest.raises(TaskFormatError) as err:
        read_jsonl_task(path, tok)
    assert f"{path}:1: " in str(err.value)
    assert "'clean' and 'corrupted'" in str(err.value) and "clean 6 and corrupted 7" in str(err.value)


def test_longer_than_max_length_names_length_and_limit(tmp_path, tok):
    path = write(tmp_path, line())
    assert read_jsonl_task(path, tok, max_length=7)
    with pytest.raises(TaskFormatError, match=r":1: .*7 tokens \(prefix 6 \+ span 1\).*max_length=6"):
        read_jsonl_task(path, tok, max_length=6)


def test_empty_prefix_without_bos_is_rejected(tmp_path):
    path = write(tmp_path, line(clean="<predict>Once</predict>", corrupted="<predict>One</predict>"))
    assert read_jsonl_task(path, WordTokenizer(bos=True))[0].loss_positions == [0]
    with pytest.raises(TaskFormatError, match=":1: field 'clean'.*no BOS"):
        read_jsonl_task(path, WordTokenizer(bos=False))


def test_collate_right_pads_with_masks_and_targets(tmp_path, tok):
    path = write(tmp_path, line(), line(clean="A<predict> big cat</predict>",
                                        corrupted="A<predict> dog</predict>", io=" x"))
    long, short = read_jsonl_task(path, tok)
    batch = collate([long, short], pad_token_id=0)
    B, T = 2, len(long.input_ids)
    for t in (batch.input_ids, batch.attention_mask, batch.corrupted_input_ids,
              batch.corrupted_attention_mask, batch.loss_mask, batch.target_ids):
        assert t.shape == (B, T)
    n = len(short.input_ids)
    assert batch.input_ids[1].tolist() == short.input_ids + [0] * (T - n)
    assert batch.corrupted_input_ids[1].tolist() == short.corrupted_input_ids + [0] * (T - n)
    assert batch.attention_mask.tolist() == [[1] * T, [1] * n + [0] * (T - n)]
    assert torch.equal(batch.corrupted_attention_mask, batch.attention_mask)
    assert batch.loss_mask.dtype == torch.bool and batch.target_ids.dtype == torch.long
    assert batch.loss_mask[1].nonzero().flatten().tolist() == short.loss_positions == [1, 2]
    assert batch.target_ids[1].tolist() == [-100] + short.target_ids + [-100] * (T - 3)
    assert (batch.target_ids[~batch.loss_mask] == -100).all()
    assert batch.corrupted_target_ids.tolist() == [long.corrupted_target_ids[0], tok.ids(" dog")[0]]
    assert batch.first_loss_position.tolist() == [T - 2, 1]
    assert batch.extras == [{}, {"io": " x"}]


def test_batch_to_returns_a_new_batch(tmp_path, tok):
    batch = collate(read_jsonl_task(write(tmp_path, line()), tok), pad_token_id=0)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved is not batch
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.extras == batch.extras


def _lines(batch_list):
    return [ex["i"] for b in batch_list for ex in b.extras]


@pytest.fixture
def ten_examples(tmp_path, tok):
    return read_jsonl_task(write(tmp_path, *(line(i=i) for i in range(10))), tok)


def test_batches_in_order_without_shuffle(ten_examples):
    out = list(batches(ten_examples, 4, 0))
    assert [b.input_ids.shape[0] for b in out] == [4, 4, 2] and _lines(out) == list(range(10))
    assert [b.input_ids.shape[0] for b in batches(ten_examples, 4, 0, drop_last=True)] == [4, 4]


def test_batches_shuffle_is_fixed_by_seed_and_epoch(ten_examples):
    def order(**kw):
        return _lines(batches(ten_examples, 3, 0, shuffle=True, **kw))

    assert order(seed=5, epoch=2) == order(seed=5, epoch=2)
    assert sorted(order(seed=5, epoch=2)) == list(range(10))
    assert order(seed=5, epoch=2) != order(seed=5, epoch=3)
    assert order(seed=0, epoch=1) != order(seed=1, epoch=0)


def test_pad_token_id_falls_back_to_eos_then_zero():
    assert pad_token_id_for(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert pad_token_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_to_hf_dataset_keeps_every_field(tmp_path, tok):
    examples = read_jsonl_task(write(tmp_path, line(io=" a"), line(split="test", n=3)), tok)
    ds = to_hf_dataset(examples)
    assert len(ds) == 2 and ds[1]["split"] == "test" and ds[1]["line"] == 2
    assert ds[0]["input_ids"] == examples[0].input_ids
    assert [json.loads(e) for e in ds["extra"]] == [{"io": " a"}, {"n": 3}]


def test_gpt2_rejects_a_space_left_before_the_tag(tmp_path):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(str(require(GPT2)))
    good = write(tmp_path, line(), name="good.jsonl")
    ex = read_jsonl_task(good, gpt2)[0]
    assert ex.target_ids == gpt2(" mat")["input_ids"] and ex.input_ids[0] != gpt2.bos_token_id
    bad = write(tmp_path, line(clean="The cat sat on the <predict>mat</predict>"), name="bad.jsonl")
    with pytest.raises(TaskFormatError, match="bad.jsonl:1: field 'clean'.*tokenizes differently"):
        read_jsonl_task(bad, gpt2)


def test_sentencepiece_span_has_no_dummy_prefix_and_prefix_gets_bos(tmp_path):
    """stories260K tokenizes "," alone as ['▁', ','], but after "One day" it is one token."""
    from transformers import AutoTokenizer

    sp = AutoTokenizer.from_pretrained(str(require(STORIES)))
    path = write(tmp_path, line(clean="One day<predict>,</predict>", corrupted="One day<predict>.</predict>"))
    ex = read_jsonl_task(path, sp)[0]
    assert ex.input_ids == sp("One day,")["input_ids"] and ex.input_ids[0] == sp.bos_token_id
    assert ex.target_ids == sp.convert_tokens_to_ids([","])
    assert len(sp(",", add_special_tokens=False)["input_ids"]) == 2


def test_shipped_stories_task_loads_with_all_splits_non_empty():
    from transformers import AutoTokenizer

    sp = AutoTokenizer.from_pretrained(str(require(STORIES)))
    examples = read_jsonl_task(STORIES_TASK, sp, max_length=64)
    counts = {s: sum(ex.split == s for ex in examples) for s in ("train", "validation", "test")}
    assert counts == {"train": 200, "validation": 50, "test": 50}
    assert all(len(ex.target_ids) == 1 and len(ex.corrupted_target_ids) == 1 for ex in examples)
    assert all(ex.target_ids != ex.corrupted_target_ids for ex in examples)
