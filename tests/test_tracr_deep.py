"""Target-free pruning (prune.mode: faithful) on programs deeper than ``reverse``, compiled now from
tracr's own library (CI installs the compiler; without it, the shipped compiles of the same programs).

No per-program settings: each program runs with the default target-free config for its output kind
(``edgeprune.demo.default_config``). The bars (issue 28): every output reproduced, no kept edge
removable within the tolerance (checked independently of the selection), every kept edge in the
weight-level ground truth, and a multiplier that stays bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from edgeprune.cli import main
from edgeprune.demo import prune_and_check
from edgeprune.faithful import LAMBDA_MAX
from tracr_compile import fresh_compile, have_tracr, REQUIRED

ROOT = Path(__file__).resolve().parents[1]
DEEP = ("shuffle_dyck", "frac_dyck", "sort_freq")


def artifact(name: str) -> Path:
    return fresh_compile(name)[0] if have_tracr() or REQUIRED else ROOT / "data" / "tracr_models" / name


def all_zero_writers(path: Path) -> list[str]:
    """Heads and MLPs whose output weights are all zero (Tracr's padding and empty sublayers)."""
    out = []
    for key, w in load_file(str(path / "weights.safetensors")).items():
        layer = key.split(".")[1] if key.startswith("blocks.") else None
        if key.endswith("attn.W_O"):
            out += [f"a{layer}.h{h}" for h in range(w.shape[0]) if not w[h].any()]
        elif key.endswith("mlp.W_out") and not w.any():
            out.append(f"m{layer}")
    return out


def test_the_deep_programs_cover_depth_zero_sublayers_and_both_output_kinds():
    configs = {name: json.loads((artifact(name) / "config.json").read_text()) for name in DEEP}
    assert sum(c["n_layers"] >= 6 for c in configs.values()) >= 2
    assert {c["output_kind"] for c in configs.values()} == {"categorical", "numerical"}
    assert all(all_zero_writers(artifact(name)) for name in DEEP)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEEP)
def test_target_free_circuit_is_faithful_minimal_and_within_the_truth(name, tmp_path):
    r = prune_and_check(artifact(name), tmp_path / "run", ["run.seed=0"])
    assert r.outputs_correct, f"{name}: the circuit does not reproduce every output"
    assert r.removable == [], f"{name}: kept edges that could go: {r.removable}"
    assert r.found and r.found <= r.ground_truth, f"{name}: outside the truth: {sorted(r.found - r.ground_truth)}"
    zero = set(all_zero_writers(artifact(name)))
    assert not {w for w, _ in r.found} & zero, f"{name}: edges out of all-zero writers kept"
    records = [json.loads(line) for line in (r.run_dir / "log.jsonl").read_text().splitlines()]
    lambdas = [rec["edges_lambda1"] for rec in records if "edges_lambda1" in rec]
    assert lambdas and max(lambdas) <= LAMBDA_MAX * (1 + 1e-5)
    selection = json.loads((r.run_dir / "circuit_selection.json").read_text())
    assert selection["prune_back"].startswith("done")


@pytest.mark.slow
def test_demo_on_a_deep_program_says_inside_the_truth_and_succeeds(tmp_path, capsys):
    code = main(["demo", "--program", "shuffle_dyck", "--output-dir", str(tmp_path / "demo"), "--restarts", "1",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "precision 1.000" in printed and "inside the ground truth, every kept edge needed" in printed
