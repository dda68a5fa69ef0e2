"""Position-aware circuits end to end: EAP/EAP-IG per span against the shared-mask scores, and
prune -> eval -> export -> draw -> attribute on the real stories260K with spans marked in its task."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import STORIES, build, require_shared
from test_baselines import random_batch
from edgeprune import EdgeModel
from edgeprune.baselines import eap_ig_scores, eap_scores, load_scores
from edgeprune.cli import main
from edgeprune.config import from_dict
from edgeprune.prune import prune
from edgeprune.rundir import load_masks

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "data" / "tasks" / "stories_names.jsonl"
SPANS = ("other", "IO", "END")


def _batch(batch=3, seq=10, span=3, seed=1):
    """Random tokens, the last ``span`` teacher-forced; spans: IO at 2-3, END at the first predicting
    position, other elsewhere."""
    out = random_batch(batch, seq, span, seed)
    span_ids = torch.zeros(batch, seq, dtype=torch.long)
    span_ids[:, 2:4] = 1
    span_ids[:, seq - span - 1] = 2
    out.span_ids = span_ids
    return out


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_attribution_per_span_sums_to_the_shared_score(method):
    hf = build("gpt2", seed=2)
    shared, positional = EdgeModel.from_hf(hf), EdgeModel.from_hf(hf)
    positional.set_spans(SPANS)
    batches = [_batch(seed=3), _batch(batch=2, seq=8, span=2, seed=4)]
    score = eap_scores if method == "eap" else (lambda m, b: eap_ig_scores(m, b, steps=3))
    plain = [dataclasses.replace(b, span_ids=None) for b in batches]  # a shared-mask model takes no span ids
    ref, per_span = score(shared, plain), score(positional, batches).view(len(SPANS), -1)
    assert per_span.shape[1] == shared.graph.num_edges
    assert (per_span[1].abs() > 0).any() and (per_span[2].abs() > 0).any()  # the spans carry their own scores
    # fp32 rounding of sums over B*T*D terms, split three ways instead of one
    assert torch.allclose(per_span.sum(0), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


# ---------------------------------------------------------------------------- stories260K, end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shipped names task marks NAME (where the character is named) and END (the last prompt token)."""
    require_shared(STORIES)
    tmp = tmp_path_factory.mktemp("positions")
    config = {"model": {"name_or_path": str(STORIES), "device": "cpu", "positions": "spans"},
              "data": {"path": str(TASK), "max_length": 64},
              "prune": {"edge_target": 0.9, "steps": 12, "warmup_steps": 8, "batch_size": 8},
              "run": {"output_dir": str(tmp / "run"), "seed": 0, "eval_every": 6, "save_every": 6,
                      "log_every": 1, "eval_batches": 2}}
    (tmp / "config.yaml").write_text(json.dumps(config))
    result = prune(from_dict(config).validate(), progress=False)
    return tmp, result


def test_prune_eval_export_draw_position_aware(run, capsys):
    tmp, result = run
    out = tmp / "run"
    assert result.finished
    masks = load_masks(out)
    assert masks.spans == ["other", "NAME", "END", "predict"]  # by first token; BOS is other
    from edgeprune.experiment import load_model
    from edgeprune.config import load_config
    n_edges = load_model(load_config(out / "config.yaml").model).graph.num_edges
    assert masks.edge_log_alpha.numel() == 4 * n_edges
    assert [s["name"] for s in masks.span_info] == masks.spans

    assert main(["eval", str(out), "--split", "test", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["counts"]["edges"] <= metrics["counts"]["edges_before_dangling"] < 4 * n_edges

    assert main(["export", str(out), "-o", str(out / "edges.json")]) == 0
    edges = json.loads((out / "edges.json").read_text())
    circuit = json.loads((out / "circuit.json").read_text())
    assert len(edges) == circuit["counts"]["edges"] == metrics["counts"]["edges"]
    assert all(len(e) == 3 and e[2] in masks.spans for e in edges)
    assert [s["name"] for s in circuit["spans"]] == masks.spans
    counts = {s["name"]: s for s in circuit["spans"]}
    assert counts["END"]["min"] == counts["END"]["max"] == 1  # one token per line
    assert counts["NAME"]["min"] == counts["NAME"]["max"] == 1 and counts["predict"]["min"] >= 1
    # the predicted position's logits are all that the loss sees: the read-out elsewhere is never kept
    assert {e[2] for e in edges if e[1] == "resid_post"} <= {"END", "predict"}

    # the exported triples read back reproduce the metrics
    assert main(["eval", str(out), "--split", "test", "--edges", str(out / "edges.json"), "--no-progress"]) == 0
    assert json.loads((out / "metrics_edges.json").read_text())["metrics"] == metrics["metrics"]

    assert main(["draw", str(out / "edges.json"), "-o", str(out / "circuit.pdf")]) == 0
    dot = (out / "circuit.dot").read_text()
    assert all(re.search(rf"\b{name}\b", dot) for name in {e[2] for e in edges})
    capsys.readouterr()


def test_attribute_cli_on_a_position_aware_config(run, capsys):
    tmp, _ = run
    scores_path = tmp / "scores_eap.safetensors"
    assert main(["attribute", str(tmp / "config.yaml"), "--method", "eap", "--batches", "1",
                 "-o", str(scores_path), "--no-progress"]) == 0
    scores = load_scores(scores_path)
    assert all(len(e) == 3 for e in scores.edges) and {e[2] for e in scores.edges} == {"NAME", "other", "END",
                                                                                     "predict"}


# ---------------------------------------------------------------------------- Tracr reverse, raw positions
def test_tracr_reverse_with_raw_positions_reads_the_positions_its_attention_reads(tmp_path, capsys):
    """``reverse`` (length 4, BOS at p0): the length head a0.h0 aggregates the BOS indicator, so its V
    is read at p0 only; the reversing head a3.h0 reads the tokens (V) and the key positions (K) at
    p1..p4, never at the BOS (no query matches it), and is read out at p1..p4 only: p0's logits are
    no output of the program. Target mode (prune.mode faithful has no positional masks yet)."""
    torch.set_num_threads(1)
    config = {"model": {"name_or_path": str(ROOT / "data" / "tracr_models" / "reverse"), "ablation": "zero",
                        "device": "cpu", "positions": "positions"},
              "data": {"path": "tracr", "loss": "kl", "max_length": None},
              "prune": {"edge_target": 0.8, "sparsity_control": "lagrangian", "init_log_alpha": 6.0,
                        "lr_masks": 0.05, "lr_lambdas": 0.1, "steps": 300, "warmup_steps": 200, "batch_size": 81},
              "run": {"output_dir": str(tmp_path / "run"), "seed": 0, "eval_every": 100, "save_every": 300,
                      "log_every": 25}}
    result = prune(from_dict(config).validate(), progress=False)
    out = result.output_dir
    assert load_masks(out).spans == [f"p{t}" for t in range(5)]
    assert main(["eval", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy_circuit"] > 0.8 and metrics["kl"] < 0.1, metrics
    assert main(["export", str(out), "-o", str(out / "edges.json")]) == 0
    edges = json.loads((out / "edges.json").read_text())

    def at(writer, reader):
        return sorted(span for w, r, span in edges if (w, r) == (writer, reader))

    outputs = ["p1", "p2", "p3", "p4"]
    assert at("tok_embeds", "a0.h0.v") == ["p0"]
    assert at("tok_embeds", "a3.h0.v") == outputs and at("pos_embeds", "a3.h0.k") == outputs
    assert at("m2", "a3.h0.q") == outputs and at("a3.h0", "resid_post") == outputs
    assert sorted(span for _, r, span in edges if r == "resid_post") == outputs
    capsys.readouterr()


def _config_of(tmp: Path, out: Path, **prune_kw) -> dict:
    config = json.loads((tmp / "config.yaml").read_text())
    config["prune"].update(prune_kw)
    config["run"]["output_dir"] = str(out)
    return config


def test_warm_start_from_per_span_scores_and_stability_of_position_aware_runs(run, tmp_path, capsys):
    tmp, _ = run
    scores_path = tmp_path / "scores.safetensors"
    assert main(["attribute", str(tmp / "config.yaml"), "--method", "eap", "--batches", "1",
                 "-o", str(scores_path), "--no-progress"]) == 0
    scores = load_scores(scores_path)
    top = torch.argsort(scores.ranking_key(), descending=True, stable=True)
    # one step with a vanishing mask learning rate: the first step's masks are the warm start's
    warm = tmp_path / "warm"
    prune(from_dict(_config_of(tmp, warm, init_from=str(scores_path), steps=1, warmup_steps=1, lr_masks=1e-7,
                               sparsity_control="lagrangian")).validate(), progress=False)
    la = load_masks(warm).edge_log_alpha
    assert la.numel() == len(scores.edges)
    for k in (1, 10, 100, la.numel() // 3):
        assert set(torch.argsort(la, descending=True, stable=True)[:k].tolist()) == set(top[:k].tolist()), k

    other = tmp_path / "seed1"
    cfg = _config_of(tmp, other)
    cfg["run"]["seed"] = 1
    prune(from_dict(cfg).validate(), progress=False)
    report_path = tmp_path / "stability.json"
    assert main(["stability", str(tmp / "run"), str(other), "--bootstrap", "2", "-o", str(report_path),
                 "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    assert report["total_edges"] == len(scores.edges)
    assert all(len(e["edge"]) == 3 for e in report["keep_frequency"])
    assert all(len(e) == 3 for e in report["kept_by_every_run"])
    assert set(report["bootstrap"]["per_run"]) == {str(tmp / "run"), str(other)}
    capsys.readouterr()


def test_compare_and_curve_per_edge_and_span(run, tmp_path, capsys):
    """compare/curve select score circuits per (edge, span) and count (edge, span) pairs; the run's
    own row is its eval circuit."""
    tmp, _ = run
    out = tmp / "run"
    scores_path = tmp_path / "scores.safetensors"
    assert main(["attribute", str(tmp / "config.yaml"), "--method", "eap", "-o", str(scores_path),
                 "--no-progress"]) == 0
    assert main(["eval", str(out), "--split", "test", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["compare", str(out), str(scores_path), "-o", str(tmp_path / "cmp"), "--split", "test",
                 "--no-progress"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    n_masks = len(load_scores(scores_path).edges)
    assert result["total_edges"] == n_masks == metrics["counts"]["total_edges"]
    ours, eap = result["rows"]
    assert ours["edges"] == metrics["counts"]["edges"] and 0 < eap["edges"] <= ours["edges"]
    assert ours["kl"] == pytest.approx(metrics["metrics"]["kl"], rel=1e-4, abs=1e-6)
    assert main(["curve", str(out), str(scores_path), "-o", str(tmp_path / "curve"), "--budgets", "1,5,20",
                 "--split", "test", "--no-progress"]) == 0
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    sizes = [p["edges"] for p in curve["methods"]["eap"]["points"]]
    assert sizes == sorted(sizes) and all(s <= b * n_masks / 100 for s, b in zip(sizes, (1, 5, 20)))
    assert main(["compare", str(out), str(scores_path), "-o", str(tmp_path / "g"), "--selection", "greedy",
                 "--split", "test", "--no-progress"]) == 0
    greedy = json.loads((tmp_path / "g" / "compare.json").read_text())["rows"][1]
    assert 0 < greedy["edges"] <= ours["edges"]
    capsys.readouterr()


def test_commands_without_position_aware_support_refuse_in_one_line(run, tmp_path, capsys):
    tmp, _ = run
    out = str(tmp / "run")
    if not (tmp / "run" / "edges.json").is_file():
        assert main(["export", out, "-o", str(tmp / "run" / "edges.json")]) == 0
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a cat.\n")
    for view in (out, str(tmp / "run" / "edges.json")):  # the viewer draws a column per span
        assert main(["view", view, "-o", str(tmp_path / "v.html")]) == 0
        assert "resid_post@END" in (tmp_path / "v.html").read_text()
    capsys.readouterr()
    for argv in (["convert", out, "--to", "eap-ig", "-o", str(tmp_path / "g.json")],
                 ["generate", out, "--prompt", "Once upon a time", "--no-progress"],
                 ["eval", out, "--text", str(text), "--no-progress"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "does not support position-aware circuits yet" in err and err.count("\n") == 1, (argv, err)


def test_two_process_torchrun_prunes_position_aware_like_one_process(run, tmp_path):
    """The per-span masks' dL/dz is all-reduced like the shared one: two ranks = one process."""
    import os
    import subprocess
    import sys

    tmp, _ = run
    out = tmp_path / "dist"
    config = _config_of(tmp, out)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "edgeprune", "prune", str(path), "--no-progress"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ours, ref = load_masks(out), load_masks(tmp / "run")
    assert ours.spans == ref.spans and ours.span_info == ref.span_info
    assert (ours.edge_log_alpha - ref.edge_log_alpha).abs().max() <= 1e-5


def test_tracr_reverse_faithful_positions_from_a_shared_run_is_the_positional_ground_truth(tmp_path, capsys):
    """Target-free: the shared faithful run recovers reverse's 11 edges; as the warm start of a
    position-aware faithful run (each mask in every span), the selection keeps each edge only where
    the program needs it. Expected from the program, not from a run: every edge at the four output
    positions p1..p4, except the length head's value input, which reads the BOS indicator at p0 only."""
    torch.set_num_threads(1)
    config = str(ROOT / "configs" / "tracr_faithful.yaml")
    shared, positional = tmp_path / "shared", tmp_path / "positional"
    assert main(["prune", config, "--output-dir", str(shared), "--no-progress"]) == 0
    assert main(["prune", config, "--output-dir", str(positional), "--no-progress", "--set", "model.positions=positions",
                 "--set", f"prune.init_from={shared}", "--set", "prune.steps=20"]) == 0
    assert main(["eval", str(positional), "--no-progress"]) == 0
    assert json.loads((positional / "metrics.json").read_text())["metrics"]["exact_match"] == 1.0
    assert main(["export", str(positional), "-o", str(positional / "edges.json")]) == 0
    truth = json.loads((ROOT / "data" / "tracr_models" / "reverse" / "ground_truth.json").read_text())
    length_value = ["tok_embeds", "a0.h0.v"]
    want = {(w, r, f"p{t}") for w, r in truth if [w, r] != length_value for t in range(1, 5)}
    want.add((*length_value, "p0"))
    assert {tuple(e) for e in json.loads((positional / "edges.json").read_text())} == want
    capsys.readouterr()


def test_acdc_per_edge_and_span_keeps_an_edge_iff_its_effect_is_over_tau():
    """ACDC over (edge, span): each tested pair stays iff its effect >= tau, the removals' effects add
    up to the final KL (each measured against the circuit of the moment), an independent evaluation
    of the decisions reproduces it, and a single-span model decides exactly as the shared one."""
    import math

    from edgeprune.baselines import acdc
    from edgeprune.eval import evaluate

    hf = build("gpt2", seed=4)
    positional, shared = EdgeModel.from_hf(hf), EdgeModel.from_hf(hf)
    positional.set_spans(SPANS)
    batch = _batch(seed=7)
    tau = 0.01
    r = acdc(positional, [batch], tau=tau)
    assert r.effects.numel() == len(SPANS) * positional.graph.num_edges
    assert torch.equal(r.decisions[r.tested], r.effects[r.tested] >= tau)
    assert 0 < int(r.decisions.sum()) < int(r.tested.sum())
    removed = r.tested & ~r.decisions
    assert math.isclose(float(r.effects[removed].sum()), r.metric_final, rel_tol=1e-4, abs_tol=1e-6)
    positional.set_edges([e for e, k in zip(positional.edge_names, r.decisions.tolist()) if k])
    assert math.isclose(evaluate(positional, [batch])["kl"], r.metric_final, rel_tol=1e-4, abs_tol=1e-6)

    one = EdgeModel.from_hf(hf)
    one.set_spans(["all"])
    single = dataclasses.replace(batch, span_ids=torch.zeros_like(batch.span_ids))
    a, b = acdc(one, [single], tau=tau), acdc(shared, [dataclasses.replace(batch, span_ids=None)], tau=tau)
    assert torch.equal(a.decisions, b.decisions) and torch.equal(a.kept, b.kept)
