"""Reaching the target (sparsity control, the ramp), warm starts, candidates, early stop, warnings, stability."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, build, require_shared
from edgeprune.baselines.scores import Scores, save_scores
from edgeprune.circuit import threshold_to_sparsity
from edgeprune.cli import main
from edgeprune.config import ConfigError, from_dict, load_config
from edgeprune.control import expected_sparsity_of, project, solve_shift
from edgeprune.masks import HardConcreteMasks, deterministic, prob_nonzero
from edgeprune.prune import SparsityRamp, prune
from edgeprune.warmstart import rank_log_alpha, rank_order

TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "stories_names.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small random-init Llama (GQA, 2 layers) with the stories260K tokenizer, saved like a checkpoint."""
    require_shared(STORIES)
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("tiny")
    build("llama", vocab_size=512, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4).save_pretrained(path)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(path)
    return path


def config(model_path, out, run=None, **prune_kw):
    prune_cfg = dict(edge_target=0.9, steps=12, warmup_steps=8, batch_size=4)
    prune_cfg.update(prune_kw)
    run_cfg = {"output_dir": str(out), "seed": 0, "eval_every": 0, "save_every": 0, "log_every": 1,
               "eval_batches": 1}
    run_cfg.update(run or {})
    return from_dict({"model": {"name_or_path": str(model_path), "device": "cpu"},
                      "data": {"path": str(TASK), "max_length": 64}, "prune": prune_cfg, "run": run_cfg}).validate()


def test_ramp_reaches_target_at_last_warmup_step():
    ramp = SparsityRamp(0.9, warmup=4)
    values = []
    for _ in range(6):
        values.append(ramp.value())
        ramp.step += 1
    assert values == pytest.approx([0.225, 0.45, 0.675, 0.9, 0.9, 0.9])


def test_project_control_reaches_target_within_0_005_with_a_real_circuit(tiny, tmp_path):
    result = prune(config(tiny, tmp_path / "run", edge_target=0.95, steps=46, warmup_steps=40,
                          sparsity_control="project"), progress=False)
    log_alpha = load_file(str(tmp_path / "run" / "masks.safetensors"))["edge_log_alpha"]
    assert log_alpha.std() > 0.1, "every mask moved in lockstep: the masks learned nothing"
    at_warmup = result.history[39]  # the record of step 40, the last warm-up step: the ramp is at its target
    assert at_warmup["step"] == 40 and at_warmup["edges_target"] == 0.95
    assert abs(at_warmup["edges_sparsity"] - 0.95) <= 0.005, at_warmup
    assert max(abs(r["edges_gap"]) for r in result.history[5:40]) <= 0.005  # it follows the ramp all along
    assert abs(result.history[-1]["edges_sparsity"] - 0.95) <= 0.005
    assert result.warning is None


def test_lagrangian_misses_the_target_and_says_so(tiny, tmp_path, capsys):
    out = tmp_path / "lag"
    result = prune(config(tiny, out, sparsity_control="lagrangian", lr_masks=0.01, lr_lambdas=0.01, steps=4,
                          warmup_steps=2), progress=False)
    assert result.warning and "missed the target 0.9000" in result.warning
    assert any("warning" in json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    assert main(["eval", str(out), "--split", "validation", "--no-progress"]) == 0
    assert "warning: the learned edge sparsity" in capsys.readouterr().out
    assert "missed the target" in json.loads((out / "metrics.json").read_text())["warnings"][0]


def test_shift_lands_exactly_on_the_target_and_keeps_every_difference():
    """On 30k edges: the common shift puts the expected sparsity on the target to 1e-6, leaves the
    differences between masks (their order and spacing) as they were, and leaves held masks alone."""
    gen = torch.Generator().manual_seed(0)
    la = torch.randn(30_000, generator=gen) * 3 + 2
    free = torch.rand(30_000, generator=gen) > 0.1
    la[~free] = -30.0
    before = la.clone()
    for target in (0.2, 0.9, 0.99):
        c = project(la, target, free)
        assert abs(expected_sparsity_of(la) - target) < 1e-6
        assert torch.allclose(la[free] - before[free], torch.full_like(la[free], la[free][0] - before[free][0]))
        assert torch.equal(la[~free], before[~free]) and c != 0.0
    assert abs(solve_shift(la, 0.05, free)) == pytest.approx(60.0, abs=1e-6)  # held masks alone exceed 0.05


def test_rank_map_keeps_the_top_set_and_starts_at_the_target():
    key = torch.tensor([0.3, 5.0, -1.0, 2.0, 2.0, 0.0])
    order = rank_order(key)
    assert order.tolist() == [1, 3, 4, 0, 5, 2]  # ties keep edge order
    la = rank_log_alpha(order, n_keep=2, init_log_alpha=3.0, target=0.6)
    assert la[1] > la[3] > la[4] > la[0] > la[5] > la[2]
    assert bool((deterministic(la[[1, 3]]) == 1.0).all()) and bool((deterministic(la[[4, 0, 5, 2]]) == 0.0).all())
    assert expected_sparsity_of(la) == pytest.approx(0.6, abs=1e-6)  # the first step needs no shift
    big = rank_log_alpha(rank_order(torch.randn(5000, generator=torch.Generator().manual_seed(0))), 500, 3.0, 0.9)
    assert expected_sparsity_of(big) == pytest.approx(0.9, abs=1e-6) and float(big.max()) == pytest.approx(4.0)


def _scores_file(model_path, path, seed=0):
    from edgeprune.model import EdgeModel
    model = EdgeModel.from_pretrained(str(model_path))
    values = torch.randn(model.graph.num_edges, generator=torch.Generator().manual_seed(seed))
    save_scores(Scores("eap-ig", values, model.graph.edges, model.graph_fingerprint(), model_id=model.model_id), path)
    return values


def test_warm_start_from_eap_ig_scores_keeps_their_top_set_at_the_first_step(tiny, tmp_path):
    values = _scores_file(tiny, tmp_path / "scores_eap-ig.safetensors")
    top = torch.argsort(values.abs(), descending=True, stable=True)
    out = tmp_path / "warm"
    # one step with a vanishing mask learning rate: the first step's masks are the initial ones
    prune(config(tiny, out, init_from=str(tmp_path / "scores_eap-ig.safetensors"), steps=1, warmup_steps=1,
                 lr_masks=1e-7, sparsity_control="lagrangian"), progress=False)
    la = load_file(str(out / "masks.safetensors"))["edge_log_alpha"]
    for k in (1, 10, 100, int(0.1 * la.numel()), la.numel() // 2):
        ours = set(torch.argsort(la, descending=True, stable=True)[:k].tolist())
        assert ours == set(top[:k].tolist()), k
    kept = threshold_to_sparsity(la).kept  # the circuit at the learned sparsity: a top set of the scores too
    assert set(kept.nonzero().flatten().tolist()) == set(top[:int(kept.sum())].tolist())


def test_warm_starts_skip_the_ramp_from_zero(tiny, tmp_path):
    """A scores warm start is built at the target: every step's target is the target and the expected
    sparsity is on it from step 1; a run warm start ramps from that run's sparsity to the new target."""
    _scores_file(tiny, tmp_path / "scores.safetensors")
    result = prune(config(tiny, tmp_path / "warm", init_from=str(tmp_path / "scores.safetensors"), steps=4,
                          warmup_steps=3), progress=False)
    assert [r["edges_target"] for r in result.history] == [0.9] * 4
    assert abs(result.history[0]["edges_sparsity"] - 0.9) <= 1e-4
    low = prune(config(tiny, tmp_path / "low", edge_target=0.5, steps=4, warmup_steps=2), progress=False)
    s_low = low.history[-1]["edges_sparsity"]
    high = prune(config(tiny, tmp_path / "high", init_from=str(tmp_path / "low"), steps=4, warmup_steps=2),
                 progress=False)
    targets = [r["edges_target"] for r in high.history]
    assert targets[0] == pytest.approx(s_low + (0.9 - s_low) / 2, abs=1e-3) and targets[1:] == [0.9] * 3


def test_candidates_leave_the_other_masks_exactly_zero_throughout(tiny, tmp_path, monkeypatch):
    values = _scores_file(tiny, tmp_path / "scores.safetensors", seed=1)
    n_cand = 40
    outside = torch.argsort(values.abs(), descending=True, stable=True)[n_cand:]
    seen = []
    real_values = HardConcreteMasks.values_and_support  # what the model's forward and forward() call

    def recording(self):
        out, support = real_values(self)
        if out.numel() == values.numel():
            seen.append(out.detach().clone())
        return out, support

    monkeypatch.setattr(HardConcreteMasks, "values_and_support", recording)
    result = prune(config(tiny, tmp_path / "cand", init_from=str(tmp_path / "scores.safetensors"), candidates=n_cand,
                          edge_target=0.95, run={"eval_every": 3}), progress=False)
    assert len(seen) >= result.step  # sampled masks of every step and the validations' deterministic ones
    for z in seen:
        assert torch.count_nonzero(z[outside]) == 0
    assert bool((z[:n_cand].sum() >= 0))
    la = load_file(str(tmp_path / "cand" / "masks.safetensors"))["edge_log_alpha"]
    assert float(prob_nonzero(la[outside]).max()) < 1e-12


def _early(tiny, out):
    # masks barely learn after the warm-up, so the validation KL is flat once the target is reached
    return config(tiny, out, steps=60, warmup_steps=4, lr_masks=0.3, early_stop=2, sparsity_control="project",
                  run={"eval_every": 2, "save_every": 2})


def test_early_stop_ends_a_run_whose_target_is_reached_and_kl_is_flat(tiny, tmp_path, monkeypatch):
    import edgeprune.prune as prune_module
    monkeypatch.setattr(prune_module, "evaluate", _flat_evaluate(prune_module.evaluate))
    out = tmp_path / "es"
    result = prune(_early(tiny, out), progress=False)
    assert result.finished and result.stopped and "target reached" in result.stopped
    assert result.step < 60
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("early_stop" in r for r in log) and (out / "masks.safetensors").is_file()

    # killed before the stop, resumed: the same stop, the same masks
    cfg = _early(tiny, tmp_path / "es2")
    first = prune(cfg, progress=False, stop_after=5)
    assert not first.finished
    second = prune(cfg, resume=True, progress=False)
    assert second.stopped == result.stopped and second.step == result.step
    a = load_file(str(out / "masks.safetensors"))["edge_log_alpha"]
    b = load_file(str(tmp_path / "es2" / "masks.safetensors"))["edge_log_alpha"]
    assert torch.equal(a, b)
    # resuming a run that stopped does not train on
    third = prune(cfg, resume=True, progress=False)
    assert third.step == result.step and third.stopped == result.stopped


def _flat_evaluate(real):
    """The real evaluation, with the KL rounded to 2 digits: flat after a few evaluations."""
    def evaluate(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics["kl"] = round(metrics["kl"], 2)
        return metrics
    return evaluate


def test_config_refuses_candidates_without_init_from_and_project_past_one(tiny, tmp_path):
    with pytest.raises(ConfigError, match="prune.candidates: needs prune.init_from"):
        config(tiny, tmp_path, candidates=5)
    with pytest.raises(ConfigError, match="prune.sparsity_control: project .* target >= 1"):
        config(tiny, tmp_path, edge_target=1.0, sparsity_control="project")
    with pytest.raises(ConfigError, match="prune.early_stop: needs validations"):
        config(tiny, tmp_path, early_stop=2)


def test_warm_start_from_a_lower_targets_run_and_missing_source(tiny, tmp_path):
    low = tmp_path / "low"
    prune(config(tiny, low, edge_target=0.5, steps=4, warmup_steps=2), progress=False)
    la_low = load_file(str(low / "masks.safetensors"))["edge_log_alpha"]
    out = tmp_path / "high"
    prune(config(tiny, out, init_from=str(low), steps=1, warmup_steps=1, lr_masks=1e-7,
                 sparsity_control="lagrangian"), progress=False)
    la = load_file(str(out / "masks.safetensors"))["edge_log_alpha"]
    assert torch.allclose(la, la_low, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="prune.init_from: .*nothing-here"):
        prune(config(tiny, tmp_path / "x", init_from=str(tmp_path / "nothing-here")), progress=False)


def test_stability_cli_reports_iou_shared_edges_and_frequency(tiny, tmp_path, capsys):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = config(tiny, tmp_path / name, steps=4, warmup_steps=2, edge_target=0.8)
        cfg.run.seed = seed
        prune(cfg, progress=False)
        runs.append(str(tmp_path / name))
    out = tmp_path / "stability.json"
    assert main(["stability", *runs, "--bootstrap", "2", "-o", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pairwise edge IoU at equal size" in printed and "edges kept by every run" in printed
    report = json.loads(out.read_text())
    assert report["pairwise_iou"]["0,1"] == 1.0  # the same seed: the same circuit
    assert 0.0 <= report["pairwise_iou"]["0,2"] < 1.0
    assert len(report["kept_by_every_run"]) <= report["equal_size"] == min(report["circuit_edges"])
    assert sum(report["histogram"].values()) == len(report["keep_frequency"])
    assert set(report["bootstrap"]["per_run"]) == set(runs)
    assert main(["stability", runs[0]]) == 2  # one run: a one-line error


def test_init_from_eap_equals_a_warm_start_from_edgeprune_attribute(tmp_path):
    """``prune.init_from: eap`` computes the very scores ``edgeprune attribute --method eap`` writes
    (training split, file order, prune.batch_size), stores them in the run, and starts from them;
    a killed run resumes from the stored file to the same masks."""
    require_shared(STORIES)
    config = TASK.parents[2] / "configs" / "stories_names.yaml"
    common = ["--steps", "8", "--no-progress", "--set", "run.eval_every=0"]
    assert main(["prune", str(config), "--output-dir", str(tmp_path / "own"), "--set", "prune.init_from=eap",
                 *common]) == 0
    assert (tmp_path / "own" / "scores_eap.safetensors").is_file()
    scores = tmp_path / "attr" / "scores_eap.safetensors"
    assert main(["attribute", str(config), "--method", "eap", "-o", str(scores), "--no-progress"]) == 0
    assert main(["prune", str(config), "--output-dir", str(tmp_path / "file"), "--set",
                 f"prune.init_from={scores}", *common]) == 0
    own = load_file(str(tmp_path / "own" / "masks.safetensors"))["edge_log_alpha"]
    assert torch.equal(own, load_file(str(tmp_path / "file" / "masks.safetensors"))["edge_log_alpha"])
    cfg = load_config(config)
    cfg.run.output_dir, cfg.prune.steps, cfg.prune.warmup_steps = str(tmp_path / "killed"), 8, 8
    cfg.prune.init_from, cfg.run.eval_every = "eap", 0
    prune(cfg, progress=False, stop_after=3)
    prune(cfg, resume=True, progress=False)
    assert torch.equal(own, load_file(str(tmp_path / "killed" / "masks.safetensors"))["edge_log_alpha"])


def test_bench_real_model_runs_end_to_end_at_toy_size(tiny, tmp_path, capsys):
    """``bench/real_model.py`` (the time-to-circuit figures of docs/scale.md) runs through: the graph, a
    step against HF with ``bench/step.py``'s own options, then the default path and ``compare``."""
    import importlib.util
    import sys

    from edgeprune.config import save_config

    cfg_path = tmp_path / "config.yaml"
    save_config(config(tiny, tmp_path / "unused", init_from="auto", batch_size=8), cfg_path)
    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench_dir))
    threads = torch.get_num_threads()
    try:
        spec = importlib.util.spec_from_file_location("bench_real_model", bench_dir / "real_model.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        assert bench.main(["--model", str(tiny), "--config", str(cfg_path), "--paths", "default", "--warm-steps", "2",
                           "--ig-steps", "1", "--shape", "2x8", "--repeats", "1", "--no-memory", "--out",
                           str(tmp_path / "out"), "--json", str(tmp_path / "report.json")]) == 0
    finally:
        sys.path.remove(str(bench_dir))
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["step"]["ratio"] > 0 and report["graph"].endswith("edges")
    (run,) = report["runs"]
    assert run["steps"] == 2 and {r["method"] for r in run["compare"]["rows"]} == {"edge-pruning", "eap-ig"}
    assert "| default (prune.init_from: auto) | 2 |" in capsys.readouterr().out
