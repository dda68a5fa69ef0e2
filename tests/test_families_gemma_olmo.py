"""Gemma, Gemma-2, Gemma-3 (text) and OLMo-2 against transformers' own forward, never against our code.

The test models (``conftest.GEMMA_OLMO_BUILDERS``) turn on what these families add: Gemma-2's
attention and final-logit soft-caps and ``query_pre_attn_scalar``, sliding windows shorter than
the test sequences, Gemma-3's q/k norms and its local rotary base, OLMo-2's whole-projection q/k
norms, and the post-norms of Gemma-2/3 and OLMo-2. HF's reference runs its default attention:
eager for Gemma-2 (HF's Gemma-2 does not support SDPA, which has no soft-cap), SDPA for the rest.
"""


import pytest
import torch

from conftest import build, token_batch
from edgeprune import EdgeModel
from edgeprune.graph import Graph, GraphSpec


def test_gemma2_reference_is_hf_eager_attention():
    assert build("gemma2").config._attn_implementation == "eager"


@pytest.mark.parametrize("kind,without", [
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 16}),
    ("gemma2", {"sliding_window": 64}),
    ("gemma3_text", {"sliding_window": 64}),
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
])
def test_test_models_exercise_their_feature(kind, without):
    """Each feature under test changes HF's own logits at the test length, so matching HF checks it."""
    ids = token_batch(2, 12, seed=1)
    with torch.no_grad():
        assert (build(kind)(ids).logits - build(kind, **without)(ids).logits).abs().max() > 1e-3


# ---------------------------------------------------------------- graph, refusals, end to end
def test_gemma2_2b_and_olmo2_7b_graph_counts():
    # Gemma-2-2B: 26 layers, 8 query / 4 KV heads; OLMo-2-7B: 32 layers, 32 heads (no GQA)
    gemma = Graph(GraphSpec(n_layers=26, n_heads=8, n_kv_heads=4, pos_embeds=False))
    olmo = Graph(GraphSpec(n_layers=32, n_heads=32, pos_embeds=False))
    assert (gemma.num_writers, gemma.num_readers, gemma.num_edges) == (235, 443, 50_610)
    assert (olmo.num_writers, olmo.num_readers, olmo.num_edges) == (1057, 3105, 1_592_881)


@pytest.mark.parametrize("name,params", [("google/gemma-2-2b", 2_614_341_888), ("google/gemma-2-9b", 9_241_705_984),
                                         ("allenai/OLMo-2-1124-7B", 7_298_617_344)])
def test_known_configs_have_their_published_size(name, params):
    from transformers import AutoModelForCausalLM

    from edgeprune.estimate import hf_config
    config, source = hf_config(name)
    assert "known" in source
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in hf.parameters()) == params  # tied embeddings counted once
    EdgeModel.from_hf(hf)  # a supported family


@pytest.mark.parametrize("kind", ["gemma2", "olmo2"])
def test_output_bias_inside_a_post_norm_is_refused(kind):
    with pytest.raises(ValueError, match="attention_bias"):
        EdgeModel.from_hf(build(kind, attention_bias=True))
