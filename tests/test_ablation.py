"""One ablation for every command: prune's closing circuit figure, eval, compare, stability and
generate see the same ablated states, for interchange, zero and mean ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import STORIES, require_shared
from edgeprune.ablation import MEAN_STATES, load_mean_states, mean_states
from edgeprune.cli import main
from edgeprune.experiment import load_model, load_split
from edgeprune.rundir import load_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["interchange", "zero", "mean"])
def run(request, tmp_path_factory):
    require_shared(STORIES)
    out = tmp_path_factory.mktemp(request.param) / "run"
    assert main(["prune", str(ROOT / "configs" / "stories_names.yaml"), "--steps", "6", "--output-dir", str(out),
                 "--set", f"model.ablation={request.param}", "--set", "run.eval_batches=1", "--no-progress"]) == 0
    return request.param, out


def _circuit_kl(run_dir: Path) -> float:
    """The binary circuit's validation KL that prune printed and logged at the end."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "circuit_val_kl" in r][-1]["circuit_val_kl"]


def test_prune_eval_and_compare_agree_on_the_circuit_kl(run, tmp_path):
    kind, out = run
    assert main(["eval", str(out), "--split", "validation", "-o", str(tmp_path / "m.json"), "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["ablation"]["ablation"] == kind
    assert evaluated["metrics"]["kl"] == pytest.approx(_circuit_kl(out), rel=1e-5)
    assert main(["compare", str(out), "-o", str(tmp_path / "cmp"), "--split", "validation", "--no-progress"]) == 0
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert compared["ablation"]["ablation"] == kind
    assert compared["rows"][0]["kl"] == pytest.approx(_circuit_kl(out), rel=1e-5)


def test_stability_bootstrap_measures_each_run_under_its_own_ablation(run, tmp_path):
    kind, out = run
    assert main(["stability", str(out), str(out), "--bootstrap", "2", "-o", str(tmp_path / "s.json"),
                 "--no-progress"]) == 0
    per_run = json.loads((tmp_path / "s.json").read_text())["bootstrap"]["per_run"][str(out)]
    assert per_run["ablation"]["ablation"] == kind and per_run["kl"]["mean"] >= 0
    if kind == "mean":
        assert per_run["ablation"]["source"] == str(out / MEAN_STATES)


def test_mean_states_are_stored_once_and_generate_uses_them(run):
    kind, out = run
    if kind != "mean":
        assert not (out / MEAN_STATES).exists()
        return
    cfg = load_run_config(out)
    model = load_model(cfg.model)
    stored = load_mean_states(out / MEAN_STATES, model)
    # the definition: every real token of the whole training split, whatever the seed or batch size
    train = load_split(cfg.data, model, cfg.data.train_split)
    assert torch.allclose(stored, mean_states(model, train), atol=1e-6)
    from edgeprune.rundir import load_circuit_model
    gen_model, info, _ = load_circuit_model(out)  # what generate loads
    assert info["ablation"]["source"] == str(out / MEAN_STATES)
    assert torch.equal(gen_model.mean_states.cpu(), stored)


def test_overwrite_replaces_a_mean_run_and_its_stored_states(tmp_path):
    require_shared(STORIES)
    out = tmp_path / "run"
    argv = ["prune", str(ROOT / "configs" / "stories_names.yaml"), "--steps", "2", "--output-dir", str(out),
            "--set", "model.ablation=mean", "--no-progress"]
    assert main(argv) == 0 and (out / MEAN_STATES).is_file()
    (out / MEAN_STATES).write_bytes(b"stale")  # an --overwrite must not read the replaced run's states
    assert main([*argv, "--overwrite"]) == 0
    cfg = load_run_config(out)
    load_mean_states(out / MEAN_STATES, load_model(cfg.model))  # rewritten, readable
