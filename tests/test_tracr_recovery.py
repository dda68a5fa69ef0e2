"""Edge Pruning recovers the ground-truth circuits of the compiled Tracr models exactly.

The ground truth comes from the compiled weights (data/tracr_models/*/ground_truth.json, derived by
run_scripts/compile_tracr.py), never from a pruning result; the recovery procedure (3 seeded
restarts, keep the sparsest circuit that reproduces every output) never looks at it."""

import json

import torch

from edgeprune.cli import main
from edgeprune.demo import recover_tracr


def test_xproportion_ground_truth_recovered_exactly(tmp_path):
    torch.set_num_threads(1)
    rec = recover_tracr("xproportion", tmp_path / "xproportion")
    assert rec.found == rec.ground_truth, "\n" + rec.table()
    assert rec.precision == rec.recall == 1.0
    assert rec.outputs_correct and rec.max_output_error <= 1e-5


def test_demo_recovers_reverse_exactly_and_writes_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "precision 1.000, recall 1.000" in printed and code == 0, printed
    assert "reproduces every output: yes" in printed
    for name in ("edges.json", "circuit.json", "circuit.dot", "config.yaml", "metrics.json", "restarts.json"):
        assert (out / name).is_file(), name
    truth = {tuple(e) for e in json.loads((_artifact("reverse") / "ground_truth.json").read_text())}
    assert {tuple(e) for e in json.loads((out / "edges.json").read_text())} == truth
    assert json.loads((out / "circuit.json").read_text())["counts"]["edges"] == len(truth)


def _artifact(program):
    from edgeprune.demo import ROOT
    return ROOT / "data" / "tracr_models" / program
