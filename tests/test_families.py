"""The families of issue 12 (GPT-NeoX/Pythia, Phi-3, Qwen3, Llama-3.x rotary scaling, Mistral's
sliding window) against transformers' own forward, never against our code."""


import pytest
import torch

from conftest import build, token_batch
from edgeprune import EdgeModel
from edgeprune.graph import Graph, GraphSpec
from edgeprune.models import family_for

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

# test kind -> (conftest kind, config overrides)
KINDS = {
    "pythia": ("gpt_neox", {}),  # parallel residual
    "neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "phi3": ("phi3", {}),
    "qwen3": ("qwen3", {}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "mistral_window": ("mistral", {}),
}


def make(kind, **kw):
    base, overrides = KINDS[kind]
    return build(base, **{**overrides, **kw})


@pytest.mark.parametrize("kind,without", [
    ("llama3_rope", {"rope_scaling": None}),
    ("mistral_window", {"sliding_window": None}),
    ("qwen3", {"use_sliding_window": False}),
    ("phi3", {"sliding_window": None}),
    ("pythia", {"rotary_pct": 1.0}),
])
def test_test_models_exercise_their_feature(kind, without):
    """The feature under test (rope scaling, a window shorter than the sequence, partial rotary)
    changes HF's own logits at the test length, so matching HF above really checks it."""
    ids = token_batch(2, 12, seed=1)
    with torch.no_grad():
        assert (make(kind)(ids).logits - make(kind, **without)(ids).logits).abs().max() > 1e-3


# ---------------------------------------------------------------- the parallel-residual graph
def test_parallel_residual_mlp_does_not_read_its_own_layers_heads():
    model = EdgeModel.from_hf(make("pythia"))
    graph = model.graph
    assert graph.spec.parallel_residual
    with pytest.raises(KeyError, match="parallel residual"):
        graph.edge_index("a1.h2", "m1")
    graph.edge_index("a0.h2", "m1")
    graph.edge_index("m0", "m1")
    assert not EdgeModel.from_hf(make("neox_sequential")).graph.spec.parallel_residual


def test_pythia_160m_graph_counts():
    # 12 layers x 12 heads, rotary (no pos_embeds): writers 1 + 12 * 13, readers 12 * (36 + 1) + 1;
    # edges: each of a layer's 37 readers sees 1 + 13 l writers, resid_post all 157
    parallel = Graph(GraphSpec(n_layers=12, n_heads=12, pos_embeds=False, parallel_residual=True))
    sequential = Graph(GraphSpec(n_layers=12, n_heads=12, pos_embeds=False))
    assert (parallel.num_writers, parallel.num_readers, parallel.num_edges) == (157, 445, 32347)
    assert sequential.num_edges - parallel.num_edges == 12 * 12  # the same-layer head -> MLP edges
    assert len(parallel.edges) == parallel.num_edges


def test_known_pythia_160m_config_builds_its_published_shape_offline():
    from transformers import AutoModelForCausalLM

    from edgeprune.estimate import hf_config

    config, source = hf_config("EleutherAI/pythia-160m")
    assert "known configs" in source  # nothing downloaded
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in hf.parameters()) == 162_322_944  # the checkpoint's parameter count
    graph = EdgeModel.from_hf(hf).graph
    assert graph.spec.parallel_residual
    assert (graph.num_writers, graph.num_readers, graph.num_edges) == (157, 445, 32347)


# ---------------------------------------------------------------- registry and end to end
def test_unsupported_model_type_names_the_supported_ones_and_how_to_add_one():
    with pytest.raises(ValueError) as err:
        family_for("bert")
    message = str(err.value)
    for supported in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3"):
        assert supported in message
    assert "edgeprune/models/" in message and "Family" in message


def test_export_of_a_parallel_residual_run_rebuilds_its_graph(tmp_path):
    """The graph fingerprint carries parallel_residual, so export (no weights loaded) rebuilds the
    Pythia graph, without the same-layer head -> MLP edges."""
    from edgeprune.export import run_circuit
    from edgeprune.prune import _write_masks

    model = EdgeModel.from_hf(build("gpt_neox"))
    assert model.graph.spec.parallel_residual
    _write_masks(model, tmp_path / "masks.safetensors")
    circuit, fp = run_circuit(tmp_path)
    assert fp["parallel_residual"] is True
    assert circuit.counts["total_edges"] == model.graph.num_edges
    assert not any(w.startswith("a0.") and r == "m0" for w, r in circuit.edges)
