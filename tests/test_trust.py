"""No silently wrong number, no destroyed run, every error one clear line (issue 11).

Each test feeds the bad input a user met and checks the refusal: exit status 2 and one line naming
the file, line or field; outputs left untouched.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import GPT2_TOKENIZER, STORIES, build, require_shared
from edgeprune.checkpoint import CheckpointError
from edgeprune.cli import main
from edgeprune.config import from_dict
from edgeprune.prune import PruneError, SparsityRamp, prune

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "data" / "tasks" / "stories_names.jsonl"


def config(out: Path, model=None, steps: int = 4, **run):
    return from_dict({
        "model": {"name_or_path": str(model or STORIES), "device": "cpu"},
        "data": {"path": str(TASK), "max_length": 64},
        "prune": {"edge_target": 0.5, "steps": steps, "warmup_steps": 2, "batch_size": 4},
        "run": {"output_dir": str(out), "seed": 0, "eval_every": 0, "save_every": 2, "log_every": 1,
                "eval_batches": 1, **run},
    }).validate()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    require_shared(STORIES)
    out = tmp_path_factory.mktemp("trust") / "run"
    prune(config(out), progress=False)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------ 1. answer fields vs predicted span
@pytest.fixture(scope="module")
def gpt2_tok():
    require_shared(GPT2_TOKENIZER)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


IOI_GOOD = {"clean": "When Mary and John went to the store, John gave a drink to<predict> Mary</predict>",
            "corrupted": "When Anna and Paul went to the store, Mark gave a drink to<predict> Anna</predict>",
            "io": " Mary", "s": " John"}


def _examples(tmp_path, tok, rows):
    from edgeprune.tasks.jsonl import read_jsonl_task
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, read_jsonl_task(path, tok)


def test_ioi_metric_refuses_a_foreign_files_unspaced_answer_field_naming_the_line(tmp_path, gpt2_tok):
    from edgeprune.tasks.jsonl import TaskFormatError
    from edgeprune.tasks.registry import METRICS

    path, examples = _examples(tmp_path, gpt2_tok, [IOI_GOOD, {**IOI_GOOD, "io": "Mary", "s": "John"}])
    metric = METRICS["ioi"](gpt2_tok)
    with pytest.raises(TaskFormatError, match=r"task.jsonl:2: field 'io' is 'Mary'.*leading space.*' Mary'"):
        metric.check(examples, str(path))
    metric.check(examples[:1], str(path))  # the spaced line is fine


def test_ioi_metric_refuses_an_answer_field_that_is_not_the_predicted_token(tmp_path, gpt2_tok):
    from edgeprune.tasks.jsonl import TaskFormatError
    from edgeprune.tasks.registry import METRICS

    path, examples = _examples(tmp_path, gpt2_tok, [{**IOI_GOOD, "io": " John", "s": " Mary"}])
    with pytest.raises(TaskFormatError, match=r":1: field 'io' is ' John'.*but the line predicts ' Mary'"):
        METRICS["ioi"](gpt2_tok).check(examples, str(path))


def test_gt_metric_refuses_a_span_that_is_not_a_later_year(tmp_path, gpt2_tok):
    from edgeprune.tasks.jsonl import TaskFormatError
    from edgeprune.tasks.registry import METRICS

    row = {"clean": "The war lasted from 1743 to 17<predict>50</predict>",
           "corrupted": "The war lasted from 1701 to 17<predict>50</predict>", "yy": 43}
    path, examples = _examples(tmp_path, gpt2_tok, [row, {**row, "yy": 60}, {**row, "yy": "43"}])
    metric = METRICS["gt"](gpt2_tok)
    metric.check(examples[:1], str(path))
    with pytest.raises(TaskFormatError, match=r":2: the line predicts 50, not a year later than yy = 60"):
        metric.check(examples[:2], str(path))
    with pytest.raises(TaskFormatError, match=r":3: field 'yy' must be .* an integer"):
        metric.check(examples[2:], str(path))


# ------------------------------------------------------------------ 3. normalised faithfulness
def test_faithfulness_is_normalised_zero_for_the_empty_circuit_one_for_the_full_model():
    from edgeprune import EdgeModel
    from edgeprune.eval import evaluate
    from edgeprune.tasks.jsonl import Example, batches

    model = EdgeModel.from_hf(build("gpt2"))
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(6):
        ids = torch.randint(0, 128, (9,), generator=gen).tolist()
        corr = torch.randint(0, 128, (9,), generator=gen).tolist()
        examples.append(Example(ids, corr[:8] + ids[8:], [7], ids[8:], [corr[8]], "test", i + 1))
    data = list(batches(examples, 3, 0))
    full = evaluate(model, data)
    model.set_edges([])
    empty = evaluate(model, data)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-5)
    model.set_edges(model.graph.edges[: model.graph.num_edges // 2])
    half = evaluate(model, data)
    ld = {k: half[f"logit_diff_{k}"] for k in ("full", "circuit", "empty")}
    assert half["faithfulness"] == pytest.approx((ld["circuit"] - ld["empty"]) / (ld["full"] - ld["empty"]))
    assert half["logit_diff_ratio"] == pytest.approx(ld["circuit"] / ld["full"])


# ------------------------------------------------------------------ 4. models identified by content
def test_eval_refuses_masks_learned_on_another_model_of_the_same_shape(finished, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    other = tmp_path / "other"
    hf = AutoModelForCausalLM.from_pretrained(STORIES)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hf.save_pretrained(other)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(other)
    run = copy_run(finished, tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", str(run), "--set", f"model.name_or_path={other}", "--no-progress"]) == 2
    one_line_error(capsys, "masks.safetensors", "another model", "--allow-other-model")
    with pytest.warns(UserWarning, match="applying them anyway"):
        assert main(["eval", str(run), "--set", f"model.name_or_path={other}", "--allow-other-model",
                     "--no-progress", "-o", str(tmp_path / "m.json")]) == 0


def test_resume_accepts_the_same_model_under_another_path(finished, tmp_path):
    run = tmp_path / "run"
    first = prune(config(run, steps=6), progress=False, stop_after=2)
    assert not first.finished
    moved = shutil.copytree(STORIES, tmp_path / "same_model_elsewhere")
    assert prune(config(run, model=moved, steps=6), resume=True, progress=False).finished


# ------------------------------------------------------------------ 6. the ramp and up-front validation
def test_ramp_reaches_the_target_at_the_last_warmup_step():
    ramp = SparsityRamp(0.9, warmup=4)
    values = []
    for _ in range(6):
        values.append(ramp.value())
        ramp.step += 1
    assert values[3] == pytest.approx(0.9) and values[2] < 0.9 and values[0] == pytest.approx(0.9 / 4)


@pytest.mark.parametrize("argv, needle", [
    (["prune", "CFG", "--steps", "-1"], "command line (--steps): prune.steps: must be >= 1"),
    (["prune", "CFG", "--set", "prune.edge_target=1.5"], "allow_overshoot"),
    (["prune", "CFG", "--set", "data.output_scale=.nan"], "data.output_scale: must be a finite number"),
    (["estimate", "CFG", "--seq-len", "0"], "--seq-len: must be at least 1"),
])
def test_bad_values_exit_2_naming_the_field_and_its_source(argv, needle, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {STORIES}}}\ndata: {{path: {TASK}}}\n"
                   "prune: {steps: 10, warmup_steps: 5}\n" + f"run: {{output_dir: {tmp_path / 'out'}}}\n")
    assert main([str(cfg) if a == "CFG" else a for a in argv]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()


def test_eval_batch_size_zero_is_refused(finished, capsys):
    assert main(["eval", str(finished), "--batch-size", "0"]) == 2
    one_line_error(capsys, "--batch-size: must be at least 1")


# ------------------------------------------------------------------ 7. scores and curve points
def test_nan_scores_are_refused_naming_an_edge():
    from edgeprune.baselines.scores import Scores, ScoresError
    values = torch.tensor([0.1, float("nan"), 0.3])
    with pytest.raises(ScoresError, match=r"1 of 3 scores are NaN.*a -> b"):
        Scores("eap", values, [("x", "y"), ("a", "b"), ("c", "d")], {})


def test_curve_marks_anchors_and_warns_for_a_method_with_one_point(tmp_path):
    from edgeprune import EdgeModel
    from edgeprune.baselines.curve import faithfulness_curve
    from edgeprune.baselines.scores import Scores
    from edgeprune.tasks.jsonl import Example, batches

    model = EdgeModel.from_hf(build("gpt2"))
    gen = torch.Generator().manual_seed(1)
    ex = [Example(torch.randint(0, 128, (6,), generator=gen).tolist(), torch.randint(0, 128, (6,), generator=gen).tolist(),
                  [4], [3], [5], "test", i + 1) for i in range(4)]
    for e in ex:
        e.corrupted_input_ids[-1] = e.input_ids[-1] = 3
    scores = Scores("eap", torch.randn(model.graph.num_edges, generator=gen), model.graph.edges,
                    model.graph_fingerprint())
    with pytest.warns(UserWarning, match="only 1 measured point"):
        result = faithfulness_curve(model, list(batches(ex, 4, 0)), scores=[scores], budgets=[5])
    entry = result["methods"]["eap"]
    assert entry["measured_points"] == 1 and entry["anchors"] == [(0.0, 0.0), (1.0, 1.0)]


# ------------------------------------------------------------------ 8-11. run directories
def test_refused_resume_leaves_the_run_directory_untouched(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # damaged mid-file
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"log.jsonl:2: damaged log line"):
        prune(config(run), resume=True, progress=False)
    assert snapshot(run) == before
    other = tmp_path / "other_model"
    build("llama").save_pretrained(other)
    with pytest.raises(CheckpointError, match="another graph"):
        prune(config(run, model=other), resume=True, progress=False)
    assert snapshot(run) == before


def test_plain_prune_into_a_finished_run_is_refused_and_overwrite_replaces_it(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    shutil.rmtree(run / "checkpoint")
    (run / "edges.json").write_text("[]")
    before = snapshot(run)
    with pytest.raises(PruneError, match="already holds .*--overwrite"):
        prune(config(run), progress=False)
    assert snapshot(run) == before
    prune(config(run), overwrite=True, progress=False)
    assert not (run / "edges.json").exists() and (run / "masks.safetensors").is_file()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(PruneError, match="notes.txt is not an edgeprune output"):
        prune(config(run), overwrite=True, progress=False)


def test_partial_last_log_line_is_dropped_on_resume(tmp_path, capsys):
    require_shared(STORIES)
    run = tmp_path / "run"
    prune(config(run, steps=6), progress=False, stop_after=2)
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # killed during the append
    result = prune(config(run, steps=6), resume=True, progress=False)
    assert result.finished
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "dropped a partial last line" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_an_error_naming_the_directory(tmp_path):
    require_shared(STORIES)
    with pytest.raises(PruneError, match=rf"--resume: {tmp_path / 'new'} has no checkpoint"):
        prune(config(tmp_path / "new"), resume=True, progress=False)
    assert not (tmp_path / "new").exists()
    assert prune(config(tmp_path / "new"), resume_or_start=True, progress=False).finished


def test_data_refuses_to_overwrite_an_existing_dataset(tmp_path, capsys):
    require_shared(GPT2_TOKENIZER)
    args = ["data", "ioi", "--tokenizer", str(GPT2_TOKENIZER), "-o", str(tmp_path), "--n-train", "4",
            "--n-val", "2", "--n-test", "2"]
    assert main(args) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(args + ["--seed", "1"]) == 2
    one_line_error(capsys, "already holds a dataset", "--overwrite")
    assert snapshot(tmp_path) == before
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert main(args + ["--n-train", "-3", "--overwrite"]) == 2  # bad values: 2, not 1


# ------------------------------------------------------------------ 13. loading errors are one line
def test_missing_model_path_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {tmp_path / 'nope' / 'model'}}}\ndata: {{path: {TASK}}}\n"
                   "prune: {steps: 2, warmup_steps: 1}\n" + f"run: {{output_dir: {tmp_path / 'out'}}}\n")
    assert main(["prune", str(cfg), "--no-progress"]) == 2
    one_line_error(capsys, "does not exist", str(tmp_path / "nope"))


def test_damaged_masks_file_is_one_line_for_eval_and_export(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    (run / "masks.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["eval", str(run), "--no-progress"]) == 2
    one_line_error(capsys, "masks.safetensors", "damaged")
    assert main(["export", str(run), "-o", str(run / "edges.json")]) == 2
    one_line_error(capsys, "masks.safetensors", "damaged")


def test_pickled_checkpoint_gets_a_resave_hint(tmp_path):
    from edgeprune import EdgeModel
    from edgeprune.hub import LoadError
    build("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()

    class NotWeights:  # what a weights-only unpickle refuses
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model.embed_tokens.weight": NotWeights()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LoadError, match=r"cannot load model .*weights-only load refuses.*re-save it as safetensors"):
        EdgeModel.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------ 15. torchrun: one line from rank 0
def test_ranks_other_than_zero_stay_silent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["prune", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == ""


def test_torchrun_launcher_refuses_an_existing_run_directory_in_one_line(finished, tmp_path):
    import subprocess
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {STORIES}}}\ndata: {{path: {TASK}}}\n"
                   "prune: {steps: 2, warmup_steps: 1}\n" + f"run: {{output_dir: {finished}}}\n")
    proc = subprocess.run(["bash", str(ROOT / "run_scripts" / "torchrun.sh"), str(cfg)], capture_output=True,
                          text=True, env={"PATH": __import__("os").environ["PATH"], "NPROC": "2", "DEVICE": "cpu"},
                          timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "already holds a run" in lines[0], proc.stderr


# ------------------------------------------------------------------ 17. edges files
def test_eval_edges_error_names_the_file_and_suggests_the_grouped_name(finished, tmp_path, capsys):
    edges = tmp_path / "mine.json"
    edges.write_text(json.dumps([["tok_embeds", "a1.h0.k"]]))
    assert main(["eval", str(finished), "--edges", str(edges), "--no-progress"]) == 2
    one_line_error(capsys, "mine.json", "'a1.g0.k'")


# ------------------------------------------------------------------ smaller things
def test_masks_files_are_byte_identical_for_identical_runs(finished, tmp_path):
    again = tmp_path / "again"
    prune(config(again), progress=False)
    assert (again / "masks.safetensors").read_bytes() == (finished / "masks.safetensors").read_bytes()


def test_torch_dtype_keyword_is_honoured(tmp_path):
    from edgeprune import EdgeModel
    build("llama").save_pretrained(tmp_path)
    with pytest.warns(FutureWarning, match="torch_dtype is deprecated"):
        model = EdgeModel.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_tasks_load_from_a_datasets_directory_with_the_same_validation(tmp_path):
    require_shared(STORIES)
    import datasets
    from edgeprune.config import DataConfig
    from edgeprune.experiment import load_split
    from edgeprune import EdgeModel
    from edgeprune.tasks.jsonl import TaskFormatError

    rows = [json.loads(line) for line in TASK.read_text().splitlines()[:6]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    model = EdgeModel.from_pretrained(str(STORIES))
    split = rows[0]["split"]
    data = load_split(DataConfig(path=str(tmp_path / "ds")), model, split)
    assert len(data.examples) == sum(r["split"] == split for r in rows)
    bad = rows[:2] + [{**rows[2], "clean": "no span here"}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(TaskFormatError, match=r"bad.parquet:3: field 'clean': missing <predict>"):
        load_split(DataConfig(path=str(tmp_path / "bad.parquet")), model, split)
