"""Compiled Tracr models: exact outputs, the known circuits, and artifact validation.

The artifacts under data/tracr_models/ come from run_scripts/compile_tracr.py; these tests need no
JAX. Where tracr is importable, one test also recompiles and compares against JAX directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeprune import EdgeModel
from edgeprune.models.tracr import TracrArtifactError, TracrModel, load_tracr
from tracr_compile import fresh_compile

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "data" / "tracr_models"
PROGRAMS = tuple(sorted(p.name for p in ARTIFACTS.iterdir() if (p / "config.json").is_file()))
NUMERICAL_TOL = 1e-5


@pytest.fixture(scope="module", params=PROGRAMS)
def model(request) -> EdgeModel:
    return EdgeModel.from_pretrained(ARTIFACTS / request.param)


def by_length(tracr: TracrModel) -> dict[int, tuple[torch.Tensor, list]]:
    """Reference cases grouped by length: {n: (input_ids (B, n + 1), expected outputs)}."""
    groups: dict[int, list] = {}
    for case in tracr.reference_outputs():
        groups.setdefault(len(case["input"]), []).append(case)
    return {n: (tracr.encode([c["input"] for c in cases]), [c["output"] for c in cases])
            for n, cases in sorted(groups.items())}


def assert_same_outputs(tracr: TracrModel, got: list, expected: list, what: str) -> None:
    if tracr.output_kind == "categorical":
        wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
        assert not wrong, f"{what}: {len(wrong)} inputs decode differently, e.g. {got[wrong[0]]} vs {expected[wrong[0]]}"
    else:
        err = max(abs(a - b) for g, e in zip(got, expected) for a, b in zip(g, e))
        assert err <= NUMERICAL_TOL, f"{what}: max |difference| {err:.3g} > {NUMERICAL_TOL}"


def differs(tracr: TracrModel, got: list, expected: list) -> bool:
    if tracr.output_kind == "categorical":
        return got != expected
    return max(abs(a - b) for g, e in zip(got, expected) for a, b in zip(g, e)) > NUMERICAL_TOL


# ------------------------------------------------------------------------------ outputs
def test_every_reference_output_reproduced_by_plain_full_and_masked_forward(model):
    tracr = model.hf
    cases = by_length(tracr)
    assert sorted(cases) == list(range(1, tracr.max_seq_len + 1))
    with torch.no_grad():
        for n, (ids, expected) in cases.items():
            for what, out in (("TracrModel", tracr(ids)), ("full_forward", model.full_forward(ids).logits),
                              ("masked, all masks 1", model(ids).logits)):
                assert_same_outputs(tracr, tracr.decode(out), expected, f"{tracr.program} length {n} {what}")


def test_output_shapes_follow_output_kind(model):
    tracr = model.hf
    ids = tracr.encode(tracr.all_inputs()[:3])
    out = model.full_forward(ids).logits
    n_out = len(tracr.config.output_encoding) if tracr.output_kind == "categorical" else 1
    assert out.shape == (3, tracr.task_length + 1, n_out)


@pytest.mark.slow
@pytest.mark.parametrize("name", PROGRAMS)
def test_matches_a_fresh_tracr_compile(name):
    artifact, built = fresh_compile(name)  # skips without tracr, fails under EDGEPRUNE_REQUIRE_TRACR=1
    import jax.numpy as jnp  # optional dependency: the Tracr compiler's JAX

    fresh = load_tracr(artifact)
    shipped = load_file(str(ARTIFACTS / name / "weights.safetensors"))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, shipped[key]), f"{key}: the shipped weights differ from a fresh compile"
    assert [list(e) for e in fresh.ground_truth] == json.loads((ARTIFACTS / name / "ground_truth.json").read_text())
    assert built["reference"]["cases"] == load_tracr(ARTIFACTS / name).reference_outputs()
    # Pre-argmax outputs against JAX's own residual stream, on every task input.
    assembled, inputs = built["assembled"], fresh.all_inputs()
    ids = fresh.encode(inputs)
    jax_out = assembled.forward(assembled.params, jnp.asarray(ids.numpy())).transformer_output.output
    expected = torch.tensor(np.asarray(jax_out)) @ fresh.unembed.W_U
    model = EdgeModel.from_pretrained(artifact)
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() <= NUMERICAL_TOL


# ------------------------------------------------------------------------------ the known circuits
def test_graph_and_ground_truth_sizes():
    sizes = {name: EdgeModel.from_pretrained(ARTIFACTS / name) for name in PROGRAMS}
    assert sizes["reverse"].graph.describe() == "10 writers, 17 readers, 94 edges"
    assert sizes["xproportion"].graph.describe() == "6 writers, 9 readers, 32 edges"
    assert len(sizes["reverse"].hf.ground_truth) == 11
    assert len(sizes["xproportion"].hf.ground_truth) == 5
    shipped = {name: (m.graph.num_edges, len(m.hf.ground_truth)) for name, m in sizes.items()}
    assert shipped == {"reverse": (94, 11), "xproportion": (32, 5), "length": (13, 4), "hist": (13, 6),
                       "count_a": (13, 6), "sort_unique": (32, 9), "pair_balance": (61, 10),
                       "shuffle_dyck": (431, 32), "sort_freq": (137, 20), "frac_dyck": (742, 40)}


def test_at_least_four_programs_beyond_reverse_and_xproportion_ship():
    assert {"reverse", "xproportion"} < set(PROGRAMS) and len(PROGRAMS) >= 6


def test_zero_ablation_is_the_default_for_tracr_and_explicit_choice_wins():
    assert EdgeModel.from_pretrained(ARTIFACTS / "reverse").ablation == "zero"
    assert EdgeModel.from_pretrained(ARTIFACTS / "reverse", ablation="mean").ablation == "mean"


def test_ground_truth_alone_reproduces_every_output_under_zero_ablation(model):
    tracr = model.hf
    model.set_edges(tracr.ground_truth)
    try:
        with torch.no_grad():
            for n, (ids, expected) in by_length(tracr).items():
                assert_same_outputs(tracr, tracr.decode(model(ids).logits), expected,
                                    f"{tracr.program} length {n}, ground-truth edges only")
    finally:
        model.reset_masks()


# Ground-truth edges of the deeper programs whose removal alone changes no output (on any input of
# any length, checked below at the task length): query/key reads of the embeddings by heads whose
# attention pattern does not matter for the outputs (BOS fallback, the always-on 'one' direction).
# The weights show the read; the outputs do not need it. Every other ground-truth edge is needed.
PATTERN_READS_NOT_NEEDED = {"shuffle_dyck": 8, "frac_dyck": 10}


def test_removing_any_ground_truth_edge_changes_some_output(model):
    tracr = model.hf
    ids, expected = by_length(tracr)[tracr.task_length]
    not_needed = []
    try:
        with torch.no_grad():
            for edge in tracr.ground_truth:
                model.set_edges([e for e in tracr.ground_truth if e != edge])
                if not differs(tracr, tracr.decode(model(ids).logits), expected):
                    not_needed.append(tuple(edge))
    finally:
        model.reset_masks()
    assert len(not_needed) == PATTERN_READS_NOT_NEEDED.get(tracr.program, 0), f"not needed: {not_needed}"
    assert all(w in ("tok_embeds", "pos_embeds") and r.endswith((".q", ".k")) for w, r in not_needed), not_needed


# ------------------------------------------------------------------------------ task-facing API
def test_encode_all_inputs_and_decode():
    tracr = load_tracr(ARTIFACTS / "reverse")
    assert tracr.vocab == [1, 2, 3] and tracr.output_kind == "categorical" and tracr.max_seq_len == 5
    assert len(tracr.all_inputs(4)) == 81 and len(tracr.all_inputs()) == 3 ** tracr.task_length
    ids = tracr.encode([3, 1, 2])
    assert ids.shape == (1, 4) and ids[0, 0] == tracr.bos_id
    assert tracr.decode(tracr(ids)) == [[2, 1, 3]]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tracr.encode([1, 7])
    with pytest.raises(ValueError, match="one length"):
        tracr.encode([[1, 2], [1]])
    with pytest.raises(ValueError, match="1..5"):
        tracr.all_inputs(6)
    xprop = load_tracr(ARTIFACTS / "xproportion")
    assert xprop.output_kind == "numerical" and len(xprop.all_inputs(4)) == 256
    assert xprop.decode(xprop(xprop.encode(["x", "a", "x", "x"]))) == [[1.0, 0.5, pytest.approx(2 / 3), 0.75]]


def test_padding_and_missing_bos_are_rejected():
    model = EdgeModel.from_pretrained(ARTIFACTS / "reverse")
    ids = model.hf.encode([[1, 2, 3], [3, 2, 1]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="no padding"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="start with BOS"):
        model(ids[:, 1:])


# ------------------------------------------------------------------------------ bad artifacts
@pytest.fixture
def artifact(tmp_path) -> Path:
    return Path(shutil.copytree(ARTIFACTS / "reverse", tmp_path / "reverse"))


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_shape_mismatch_names_tensor_and_both_shapes(artifact):
    tensors = load_file(str(artifact / "weights.safetensors"))
    tensors["blocks.2.attn.W_Q"] = torch.zeros(1, 41, 11)
    save_file(tensors, str(artifact / "weights.safetensors"))
    with pytest.raises(TracrArtifactError, match=r"weights\.safetensors: tensor 'blocks\.2\.attn\.W_Q' has shape "
                                                 r"\(1, 41, 11\), but .*config\.json implies \(1, 41, 12\)"):
        load_tracr(artifact)


def test_missing_tensor_is_named(artifact):
    tensors = load_file(str(artifact / "weights.safetensors"))
    del tensors["blocks.1.mlp.W_out"]
    save_file(tensors, str(artifact / "weights.safetensors"))
    with pytest.raises(TracrArtifactError, match=r"weights\.safetensors: tensor 'blocks\.1\.mlp\.W_out' is missing"):
        load_tracr(artifact)


def test_missing_field_names_file_and_field(artifact):
    edit_config(artifact, key_size=None)
    with pytest.raises(TracrArtifactError, match=r"config\.json: missing field 'key_size'"):
        load_tracr(artifact)


def test_unknown_format_version_names_file_and_field(artifact):
    edit_config(artifact, format_version=99)
    with pytest.raises(TracrArtifactError, match=r"config\.json: field 'format_version' is 99"):
        EdgeModel.from_pretrained(artifact)


def test_missing_weights_file_is_named(artifact):
    (artifact / "weights.safetensors").unlink()
    with pytest.raises(TracrArtifactError, match=r"weights\.safetensors is missing"):
        load_tracr(artifact)


def test_bad_ground_truth_edge_names_file_and_entry(artifact):
    (artifact / "ground_truth.json").write_text(json.dumps([["tok_embeds", "m0"], ["m3", "a0.h0.q"]]))
    with pytest.raises(TracrArtifactError, match=r"ground_truth\.json: entry 1: no edge m3 -> a0\.h0\.q"):
        load_tracr(artifact)
