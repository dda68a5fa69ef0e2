"""prune.mode: faithful (edgeprune/faithful.py) and the Tracr task's input set (edgeprune/tasks/tracr.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import STORIES, require_shared
from edgeprune import EdgeModel
from edgeprune.config import ConfigError, from_dict
from edgeprune.faithful import (LAMBDA_MAX, RHO_BOUND, circuit_fit, constraint, project_multiplier, select_circuit,
                                start_multiplier)
from edgeprune.tasks.jsonl import batches
from edgeprune.tasks.tracr import read_inputs_file, tracr_examples

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "data" / "tracr_models"


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field,value,message", [
    ("mode", "fast", "prune.mode: must be target or faithful, got 'fast'"),
    ("faithful_tolerance", 0.0, "prune.faithful_tolerance: must be > 0"),
])
def test_bad_faithful_fields_are_named(field, value, message):
    cfg = {"model": {"name_or_path": "x"}, "data": {"path": "tracr"}, "prune": {"mode": "faithful", field: value}}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(cfg).validate("t.yaml")


# ------------------------------------------------------------------------------ the multiplier
def test_constraint_is_zero_at_the_tolerance_signed_and_free_of_the_fits_units():
    for tol in (1e-3, 1e-8):  # a KL tolerance and a squared-error one
        assert constraint(torch.tensor(tol), tol).item() == pytest.approx(0.0, abs=1e-6)
        assert constraint(torch.tensor(0.0), tol).item() == pytest.approx(-0.6931, abs=1e-4)  # -log 2 at fit 0
        assert constraint(torch.tensor(10 * tol), tol).item() > 0
        assert constraint(torch.tensor(0.5 * tol), tol).item() < 0
    f = torch.tensor([3e-3, 1.0])
    assert torch.allclose(constraint(f, 1e-3), constraint(f * 1e-5, 1e-8))  # same constraint in other units
    huge = torch.tensor(1e6, requires_grad=True)  # however far off, a bounded gradient
    constraint(huge, 1e-3).backward()
    assert 0 < huge.grad.item() <= 1e-6 * 1.01


def test_multiplier_starts_at_its_bound_and_cannot_run_away():
    lambdas = {"edges": torch.nn.Parameter(torch.zeros(2))}
    start_multiplier(lambdas)
    assert lambdas["edges"][0].exp().item() == pytest.approx(LAMBDA_MAX)
    with torch.no_grad():
        lambdas["edges"][0] += 50.0  # what an unbounded ascent did on a constraint no mask could meet
    project_multiplier(lambdas)
    assert lambdas["edges"][0].item() == pytest.approx(RHO_BOUND)
    with torch.no_grad():
        lambdas["edges"][0] -= 100.0
    project_multiplier(lambdas)
    assert lambdas["edges"][0].item() == pytest.approx(-RHO_BOUND)


# ------------------------------------------------------------------------------ input set
def test_program_defined_on_distinct_tokens_uses_its_own_input_set():
    model = EdgeModel.from_pretrained(ARTIFACTS / "sort_unique")
    examples = tracr_examples(model.hf)
    inputs = [tuple(e.extra["input"]) for e in examples]
    assert len(inputs) == 5 * 4 * 3 * 2 and all(len(set(s)) == 4 for s in inputs)
    assert len(model.hf.all_inputs()) == 5 ** 4  # what enumerating the vocabulary would have given


def test_positions_whose_output_is_undefined_are_not_scored(tmp_path):
    art = Path(shutil.copytree(ARTIFACTS / "length", tmp_path / "length"))
    ref = json.loads((art / "reference_outputs.json").read_text())
    for case in ref["cases"]:
        if case["input"] == ["a", "b", "c", "a"]:
            case["output"][1] = None
    (art / "reference_outputs.json").write_text(json.dumps(ref))
    examples = {tuple(e.extra["input"]): e for e in tracr_examples(EdgeModel.from_pretrained(art).hf)}
    assert examples[("a", "b", "c", "a")].loss_positions == [1, 3, 4]
    assert len(examples[("a", "b", "c", "a")].target_ids) == 3
    assert examples[("a", "a", "a", "a")].loss_positions == [1, 2, 3, 4]


def test_inputs_file_in_the_artifact_sets_the_input_set(tmp_path):
    art = Path(shutil.copytree(ARTIFACTS / "reverse", tmp_path / "reverse"))
    (art / "inputs.json").write_text(json.dumps([[1, 2, 3, 1], [3, 3, 2, 1], [1, 2]]))
    examples = tracr_examples(EdgeModel.from_pretrained(art).hf)
    assert [e.extra["input"] for e in examples] == [[1, 2, 3, 1], [3, 3, 2, 1]]  # the task length only


def test_inputs_file_errors_name_the_line(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text('[1, 2, 3]\n{"input": [1, 7, 2]}\n')
    with pytest.raises(ValueError, match=r"inputs\.jsonl:2: tokens \[7\] are not in the vocabulary"):
        read_inputs_file(path, [1, 2, 3])
    path.write_text('[1, 2]\nnot json\n')
    with pytest.raises(ValueError, match=r"inputs\.jsonl:2: not valid JSON"):
        read_inputs_file(path, [1, 2, 3])
    (tmp_path / "ok.json").write_text('[[3, 1], {"input": [2]}]')
    assert read_inputs_file(tmp_path / "ok.json", [1, 2, 3]) == [(3, 1), (2,)]


# ------------------------------------------------------------------------------ selection
def _select(model, log_alpha):
    examples = tracr_examples(model.hf)
    model.eval()
    return select_circuit(model, lambda: batches(examples, len(examples), model.hf.bos_id), log_alpha,
                          loss="kl", tolerance=1e-3, per_position=True), examples


def test_selection_is_faithful_and_every_kept_edge_is_needed():
    model = EdgeModel.from_pretrained(ARTIFACTS / "hist")
    la = torch.randn(model.graph.num_edges, generator=torch.Generator().manual_seed(0))  # an arbitrary order
    sel, examples = _select(model, la)
    fit = lambda kept: (model.edge_masks.set_values(kept.float()),
                        circuit_fit(model, [next(iter(batches(examples, len(examples), model.hf.bos_id)))], "kl"))[1][1]
    try:
        assert fit(sel.kept) <= 1e-3
        for e in sel.kept.nonzero().flatten().tolist():
            trial = sel.kept.clone()
            trial[e] = False
            assert fit(trial) > 1e-3, f"{model.graph.edges[e]} could be removed"
    finally:
        model.reset_masks()
    assert model.edge_masks.override is None  # the search leaves the learned masks in place


def test_a_good_order_needs_few_evaluations():
    model = EdgeModel.from_pretrained(ARTIFACTS / "reverse")
    truth = {tuple(e) for e in model.hf.ground_truth}
    la = torch.tensor([5.0 if e in truth else -5.0 for e in model.graph.edges]) + \
        torch.rand(model.graph.num_edges, generator=torch.Generator().manual_seed(0))
    sel, _ = _select(model, la)
    assert {e for e, k in zip(model.graph.edges, sel.kept.tolist()) if k} == truth
    assert sel.evaluations <= 8 + len(truth)  # bisection over 94 edges, then one try per kept edge


# ------------------------------------------------------------------------------ real models
def test_faithful_mode_on_a_real_model_keeps_its_circuit_under_the_tolerance(tmp_path, monkeypatch):
    require_shared(STORIES)
    import edgeprune.faithful
    monkeypatch.setattr(edgeprune.faithful, "PRUNE_BACK_BUDGET_S", 0.0)  # bisection only: the prune-back is tested on Tracr
    from edgeprune.eval import evaluate
    from edgeprune.experiment import load_split
    from edgeprune.export import export_run
    from edgeprune.prune import prune

    task = ROOT / "data" / "tasks" / "stories_names.jsonl"
    out = tmp_path / "run"
    cfg = from_dict({
        "model": {"name_or_path": str(STORIES), "device": "cpu"},
        "data": {"path": str(task), "max_length": 64},
        "prune": {"mode": "faithful", "faithful_tolerance": 0.3, "steps": 4, "warmup_steps": 0, "batch_size": 16,
                  "lr_masks": 0.5, "lr_lambdas": 0.5},
        "run": {"output_dir": str(out), "seed": 0, "eval_every": 0, "save_every": 4, "log_every": 1,
                "eval_batches": 1},
    }).validate()
    result = prune(cfg, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("faithful_fit" in r for r in records if "loss" in r)
    selection = json.loads((out / "circuit_selection.json").read_text())
    circuit, _ = export_run(out, out / "edges.json")
    assert circuit.counts["edges"] == selection["edges"] < circuit.counts["total_edges"]
    model = EdgeModel.from_pretrained(STORIES)
    model.set_edges(circuit.edges)
    val = load_split(cfg.data, model, "validation")
    metrics = evaluate(model, [next(iter(batches(val.examples, 16, val.pad_token_id)))], empty=False)  # as selected
    assert metrics["kl"] <= 0.3 + 1e-6 and result.warning is None
