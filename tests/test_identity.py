"""Run identity at any size: exact integer sample indices, and runs written before version 2 still
resume, evaluate and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from edgeprune.cli import main
from edgeprune.identity import VERSION, FingerprintError, fingerprint_version, model_fingerprint, sample_indices

from conftest import STORIES, require_shared

REPO = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "fixtures" / "legacy_run_v1"  # `edgeprune prune configs/stories_names.yaml --steps 6` before version 2


@pytest.mark.parametrize("n", [1, 2, 1023, 1024, 1025, 2**24 - 1, 2**24 + 1, 38_597_376, 2**40 + 3])
def test_sample_indices_are_exact_at_any_size(n):
    idx = sample_indices(n)
    assert idx.dtype == torch.int64 and len(idx) == min(n, 1024)
    assert int(idx[0]) == 0 and int(idx[-1]) == n - 1
    assert bool((idx.diff() > 0).all())
    # exactly i * (n - 1) // 1023, independent of any float arithmetic
    i = len(idx) // 2
    assert len(idx) == 1 or int(idx[i]) == i * (n - 1) // (len(idx) - 1)


def test_version1_indices_are_refused_where_float32_rounds_past_the_end():
    with pytest.raises(FingerprintError, match="38,597,376"):
        sample_indices(38_597_376, version=1)


def test_fingerprint_of_a_gpt2_small_sized_embedding():
    hf = torch.nn.Module()
    hf.emb = torch.nn.Parameter(torch.arange(50_257 * 768, dtype=torch.float32).reshape(50_257, 768), requires_grad=False)
    hf.config = SimpleNamespace(vocab_size=50_257)
    fp = model_fingerprint(hf)
    assert fp["version"] == VERSION == fingerprint_version(fp)
    with torch.no_grad():
        hf.emb[-1, -1] += 1e6  # the last element is sampled
    assert model_fingerprint(hf)["weights"] != fp["weights"]


def _legacy_copy(tmp_path: Path) -> Path:
    require_shared(STORIES)
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(STORIES)
    cfg["data"]["path"] = str(REPO / "data" / "tasks" / "stories_names.jsonl")
    cfg["run"]["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


def test_a_version1_run_still_evaluates_exports_and_resumes(tmp_path):
    run = _legacy_copy(tmp_path)
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["metrics"]["kl"] >= 0
    assert main(["export", str(run), "-o", str(run / "edges.json")]) == 0
    assert json.loads((run / "edges.json").read_text())
    assert main(["prune", str(run / "config.yaml"), "--resume", "--set", "prune.steps=8", "--no-progress"]) == 0
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == 8


def test_a_version1_run_of_another_model_is_still_refused(tmp_path, capsys):
    run = _legacy_copy(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    fp = json.loads((run / "checkpoint" / "state.json").read_text())
    assert "version" not in json.dumps(fp["state"]["__dict__"][2])  # the fixture is a version-1 run
    (run / "masks.safetensors").unlink()
    state = (run / "checkpoint" / "state.json").read_text().replace(
        '"e31114db508e8023a5f12fcbcafaaf757259c83e067114ca3058f9ae6b8f4dd8"', '"' + "0" * 64 + '"')
    (run / "checkpoint" / "state.json").write_text(state)
    assert cfg["model"]["name_or_path"] == str(STORIES)
    assert main(["eval", str(run), "--no-progress"]) == 2
    assert "another model" in capsys.readouterr().err
