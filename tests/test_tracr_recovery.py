"""Target-free Edge Pruning (prune.mode: faithful) recovers the ground-truth circuit of every
shipped Tracr program exactly.

The ground truth comes from the compiled weights (data/tracr_models/*/ground_truth.json, derived by
run_scripts/compile_tracr.py), never from a pruning result; neither the pruning nor the selection
(the sparsest circuit that reproduces every output) looks at it. One seed per program here; the
bench (bench/tracr_recovery.py) runs three."""

import json

import pytest
import torch

from edgeprune.cli import main
from edgeprune.demo import PROGRAMS, ROOT, prune_and_check


# Their weight-level truth holds query/key reads that no output needs (tests/test_tracr.py counts
# them); tests/test_tracr_deep.py holds their bars: faithful, 1-minimal, within the truth.
WITHIN_TRUTH_ONLY = {"shuffle_dyck", "frac_dyck"}


@pytest.mark.parametrize("program", [p for p in PROGRAMS if p != "reverse" and p not in WITHIN_TRUTH_ONLY])
def test_default_faithful_config_recovers_ground_truth_exactly(program, tmp_path):
    torch.set_num_threads(1)
    rec = prune_and_check(program, tmp_path / program, ["run.seed=0"])
    assert rec.found == rec.ground_truth, "\n" + rec.table()
    assert rec.precision == rec.recall == 1.0 and rec.outputs_correct
    selection = json.loads((rec.run_dir / "circuit_selection.json").read_text())
    assert selection["edges"] == len(rec.ground_truth)


def test_demo_recovers_reverse_exactly_and_writes_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(out), "--restarts", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert "precision 1.000, recall 1.000" in printed and code == 0, printed
    assert "reproduces every output: yes" in printed and "no sparsity target" in printed
    for name in ("edges.json", "circuit.json", "circuit.dot", "config.yaml", "metrics.json", "restarts.json",
                 "circuit_selection.json"):
        assert (out / name).is_file(), name
    truth = {tuple(e) for e in json.loads((ROOT / "data" / "tracr_models" / "reverse" / "ground_truth.json").read_text())}
    assert {tuple(e) for e in json.loads((out / "edges.json").read_text())} == truth
    assert json.loads((out / "circuit.json").read_text())["counts"]["edges"] == len(truth)


def test_demo_takes_an_artifact_folder_and_names_an_unknown_program(tmp_path, capsys):
    import shutil
    art = shutil.copytree(ROOT / "data" / "tracr_models" / "length", tmp_path / "my_length")
    (art / "ground_truth.json").unlink()  # a user's own compile: no ground truth to compare with
    code = main(["demo", "--program", str(art), "--output-dir", str(tmp_path / "out"), "--restarts", "1",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "no ground_truth.json to compare" in printed and "reproduces every output: yes" in printed
    assert main(["demo", "--program", "no_such_program", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no_such_program" in err and "reverse" in err and err.count("\n") == 1
