"""EAP and EAP-IG at one plain forward+backward per step (``baselines/ig_inputs.py``): the reader
gradients against the masked model's dm/dz and against hooks on the HF model, completeness at the
input, position-aware scores, real width, and what is refused."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build, randomize
from edgeprune import EdgeModel
from edgeprune.baselines import attribute, eap_ig_scores, eap_scores
from edgeprune.baselines.attribution import path_gradient_scores, prepare
from edgeprune.baselines import ig_inputs
from edgeprune.baselines.ig_inputs import batch_reader_gradients, input_gradient_scores
from edgeprune.models import common
from edgeprune.taps import ReaderTaps
from edgeprune.tasks.jsonl import Example, collate
from test_baselines import _hf_logit_diff, _hf_reader_grad, _hf_writer_states, random_batch

ROOT = Path(__file__).resolve().parents[1]


def two_batches():
    return [random_batch(seed=5), random_batch(batch=2, seq=8, span=2, seed=6)]


def close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Every score within fp32 noise: ``rel`` of the largest score."""
    scale = float(expected.abs().max())
    assert scale > 1e-3  # a real test, not 0 == 0
    err = float((got - expected).abs().max())
    assert err <= rel * scale, (err, scale)


# ---------------------------------------------------------------------------- (a) EAP = the masks variant at z = 1
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
def test_eap_reader_gradients_equal_masked_model_dm_dz_at_full_model(kind):
    """At alpha = 1 the plain forward's <s_w - s~_w, dm/dx_r> is the masked model's dm/dz_e (z = 1):
    GPT-2, a GQA Llama (K/V readers per KV head) and a parallel-residual GPT-NeoX."""
    model = EdgeModel.from_hf(build(kind, seed=1))
    batches = two_batches()
    close(input_gradient_scores(model, batches, [1.0]), path_gradient_scores(model, batches, [1.0]))


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_eap_fast_path_equals_masks_variant_under_zero_and_mean_ablation(ablation):
    model = EdgeModel.from_hf(build("llama", seed=2), ablation=ablation)
    batches = two_batches()
    if ablation == "mean":
        model.set_mean_states(model.compute_mean_states((b.input_ids, b.attention_mask) for b in batches))
    close(eap_scores(model, batches), eap_scores(model, batches, variant="masks"))


def spans_model_and_batches() -> tuple[EdgeModel, list]:
    """A Llama with position-aware masks (three spans) and ``two_batches`` marked with them."""
    model = EdgeModel.from_hf(build("llama", seed=3))
    model.set_spans(["prefix", "middle", "end"])
    batches = []
    for b in two_batches():
        B, T = b.input_ids.shape
        span_ids = torch.zeros(B, T, dtype=torch.long)
        span_ids[:, 2:4] = 1
        span_ids[:, T - 3:] = 2
        batches.append(dataclasses.replace(b, span_ids=span_ids))
    return model, batches


def tracr_model_and_batches() -> tuple[EdgeModel, list]:
    """The shipped Tracr ``reverse`` program (zero ablation) and one batch of three inputs."""
    model = EdgeModel.from_pretrained(ROOT / "data" / "tracr_models" / "reverse")
    ids = model.hf.encode([[1, 2, 3], [3, 1, 2], [2, 2, 1]])
    examples = [Example(input_ids=row, corrupted_input_ids=row, loss_positions=[1, 2, 3], target_ids=[0, 1, 2],
                        corrupted_target_ids=[0, 1, 2], split="train", line=i + 1)
                for i, row in enumerate(ids.tolist())]
    return model, [collate(examples, pad_token_id=0)]


def real_width_gqa_model_and_batches() -> tuple[EdgeModel, list]:
    """Vocabulary 32k, d 512, 8 query / 2 KV heads, 2 layers, and one batch of two examples."""
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
                      intermediate_size=1024, vocab_size=32000, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = randomize(LlamaForCausalLM(cfg), seed=0, scale=0.05)
    model = EdgeModel.from_hf(hf)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (2, 12), generator=gen)
    corr = torch.randint(0, 32000, (2, 12), generator=gen)
    examples = [Example(input_ids=ids[b].tolist(), corrupted_input_ids=corr[b, :10].tolist() + ids[b, 10:].tolist(),
                        loss_positions=[9, 10], target_ids=ids[b, 10:].tolist(),
                        corrupted_target_ids=ids[b, 10:].tolist(), split="train", line=b + 1) for b in range(2)]
    return model, [collate(examples, pad_token_id=0)]


def test_eap_fast_path_equals_masks_variant_with_position_aware_masks():
    model, batches = spans_model_and_batches()
    fast, slow = eap_scores(model, batches), eap_scores(model, batches, variant="masks")
    assert fast.shape == (3 * model.graph.num_edges,)
    close(fast, slow)


def test_eap_fast_path_equals_masks_variant_on_tracr():
    model, batches = tracr_model_and_batches()
    close(eap_scores(model, batches), eap_scores(model, batches, variant="masks"))


# ---------------------------------------------------------------------------- (b) EAP-IG against HF hooks
IG_EDGES = [("tok_embeds", "a0.h2.q"), ("a0.h1", "resid_post"), ("m0", "a1.h1.v"), ("a0.h3", "m1"),
            ("tok_embeds", "m1"), ("a0.h0", "a1.h0.k")]


def test_eap_ig_inputs_scores_equal_hf_hooks_on_interpolated_embeddings():
    """The reference never touches edgeprune's forward: the HF GPT-2 runs on alpha * wte(clean) +
    (1 - alpha) * wte(corrupted), the reader's own input is split off by hooks, and the writer states
    come from hooks on clean and corrupted runs."""
    hf = build("gpt2", seed=4)
    batch = random_batch(seed=8)
    model = EdgeModel.from_hf(hf)
    alt = prepare(model, batch).alt
    clean, _ = _hf_writer_states(hf, batch.input_ids)
    corrupt, _ = _hf_writer_states(hf, batch.corrupted_input_ids)
    steps = 3
    scores = eap_ig_scores(model, [batch], steps=steps, variant="inputs")
    wte = hf.transformer.wte
    with torch.no_grad():
        e_clean, e_corr = wte(batch.input_ids), wte(batch.corrupted_input_ids)
    for writer, reader in IG_EDGES:
        grad = sum(_hf_reader_grad(hf, batch, reader, alt, a * e_clean + (1 - a) * e_corr)
                   for a in [(k + 0.5) / steps for k in range(steps)]) / steps
        expected = float((grad * (corrupt[writer] - clean[writer])).sum())
        got = float(scores[model.graph.edge_index(writer, reader)])
        assert abs(expected) > 1e-4, (writer, reader, expected)
        assert abs(got - expected) <= 1e-5 * abs(expected) + 1e-7, (writer, reader, got, expected)


# ---------------------------------------------------------------------------- (c) completeness
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_eap_ig_inputs_scores_out_of_the_embeddings_sum_to_corrupted_minus_clean(kind):
    """Completeness holds at the input's cut: the edges out of the embedding writers carry the whole
    path integral, m(corrupted input) - m(clean input) (measured on the HF model), more closely with
    more steps."""
    hf = build(kind, seed=3)
    batches = two_batches()
    model = EdgeModel.from_hf(hf)
    n, change = 0, 0.0
    for b in batches:
        alt = prepare(model, b).alt
        k = int(b.loss_mask.sum())
        change += k * (_hf_logit_diff(hf, b.corrupted_input_ids, b, alt) - _hf_logit_diff(hf, b.input_ids, b, alt))
        n += k
    change /= n
    assert abs(change) > 0.1
    embeds = torch.tensor([w in ("tok_embeds", "pos_embeds") for w, _ in model.graph.edges])
    many = float(eap_ig_scores(model, batches, steps=64)[embeds].sum())
    few = float(eap_ig_scores(model, batches, steps=2)[embeds].sum())
    assert abs(many - change) <= 2e-3 * abs(change), (many, change)
    assert abs(many - change) < abs(few - change)


# ---------------------------------------------------------------------------- (c2) the taps' folded norm backward
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_taps_folded_norm_backward_equals_the_norms_own(kind, monkeypatch):
    """The reader taps' norm and projections in one function (``_SharedNormProjection``: the norm folded
    into the projection's backward) give every reader's gradient the norm's own backward gives, within
    fp32 noise, and the forward bit for bit: LayerNorm with biases (GPT-2), RMSNorm (Llama, GQA), and
    RMSNorm with q/k/v biases (Qwen2)."""
    model = EdgeModel.from_hf(build(kind, seed=7))
    batch = random_batch(seed=9)
    n_total = int(batch.loss_mask.sum())
    calls = []
    monkeypatch.setattr(common._SharedNormProjection, "forward",
                        staticmethod(lambda *a, f=common._SharedNormProjection.forward: calls.append(1) or f(*a)))
    out = {}
    for fold in (True, False):
        monkeypatch.setattr(common, "SHARED_FOLD", fold)
        grads, _ = batch_reader_gradients(model, batch, [0.5], "logit_diff", n_total)
        out[fold] = grads.clone()
    assert len(calls) == model.graph.spec.n_layers  # the folded path ran, once a layer, only when on
    close(out[True], out[False])
    # the plain forward through the folded function is HF's own: the same logits bit for bit
    emb = model.family.embed(batch.input_ids, model.family.context(batch.input_ids, batch.attention_mask, None))
    logits = {}
    for fold in (True, False):
        monkeypatch.setattr(common, "SHARED_FOLD", fold)
        taps = ReaderTaps(model.graph.num_readers, tuple(emb.shape[1:]), model.device)
        with torch.enable_grad():
            logits[fold] = model.full_forward(batch.input_ids, batch.attention_mask,
                                              embeds=emb.detach().requires_grad_(True), taps=taps).logits.detach()
    assert torch.equal(logits[True], logits[False])


# ---------------------------------------------------------------------------- (d) real width
def test_eap_fast_path_equals_masks_variant_at_real_vocabulary_gqa():
    """Vocabulary 32k, d 512, 8 query / 2 KV heads, 2 layers: the sums over d_model and the read-out
    at real width stay within fp32 noise of the masked model's dm/dz."""
    model, batches = real_width_gqa_model_and_batches()
    fast, slow = eap_scores(model, batches), eap_scores(model, batches, variant="masks")
    assert math.isfinite(float(fast.sum()))
    close(fast, slow, rel=2e-5)


# ---------------------------------------------------------------------------- what is refused, what is recorded
def test_eap_ig_inputs_variant_refuses_zero_ablation_and_names_the_masks_variant():
    model = EdgeModel.from_hf(build("gpt2"), ablation="zero")
    with pytest.raises(ValueError, match="ig-variant masks"):
        eap_ig_scores(model, two_batches(), steps=2, variant="inputs")
    assert eap_ig_scores(model, two_batches(), steps=2, variant="masks").abs().sum() > 0


def test_unknown_variant_is_refused():
    model = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match="inputs, masks"):
        eap_ig_scores(model, two_batches(), variant="activations")


def test_attribute_records_the_ig_variant():
    model = EdgeModel.from_hf(build("gpt2"))
    scores = attribute(model, two_batches(), "eap-ig", ig_steps=2, ig_variant="masks")
    assert scores.settings["ig_variant"] == "masks"
    assert attribute(model, two_batches(), "eap-ig", ig_steps=2).settings["ig_variant"] == "inputs"


def test_the_default_variant_is_inputs_under_interchange_and_masks_under_zero_ablation():
    batches = two_batches()
    zero = EdgeModel.from_hf(build("gpt2"), ablation="zero")
    assert attribute(zero, batches, "eap-ig", ig_steps=2).settings["ig_variant"] == "masks"
    assert torch.equal(eap_ig_scores(zero, batches, steps=2), eap_ig_scores(zero, batches, steps=2, variant="masks"))


def test_bench_attribution_times_a_switched_setting_and_restores_it(capsys):
    """``bench/attribution.py --vs MODULE.NAME=VALUE`` times each attribution with the setting switched as
    well (a line per figure), leaves the setting as it was, and refuses a setting that does not exist."""
    import importlib.util
    import sys

    bench_dir = ROOT / "bench"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("bench_attribution", bench_dir / "attribution.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        threads = torch.get_num_threads()
        wrapped = (torch.autograd.grad, ig_inputs.contract)
        try:
            assert bench.main(["--models", "llama", "--layers", "1", "--shapes", "2x8", "--variants", "inputs",
                               "--ig-steps", "2", "--batches", "1", "--repeats", "1", "--threads", "1",
                               "--vs", "models.common.SHARED_FOLD=False", "--parts"]) == 0
            with pytest.raises(SystemExit, match="no setting 'NOPE'"):
                bench.main(["--vs", "models.common.NOPE=1"])
        finally:
            torch.set_num_threads(threads)
    finally:
        sys.path.remove(str(bench_dir))
    assert common.SHARED_FOLD is True
    assert (torch.autograd.grad, ig_inputs.contract) == wrapped  # --parts' clocks are gone again
    out = capsys.readouterr().out
    assert out.count("with models.common.SHARED_FOLD=False:") == 2 and "fastest runs" in out
    # --parts: EAP's batch is a no-grad pass over the corrupted input, a forward with taps, its backward and
    # the contraction
    (eap_parts,) = [line for line in out.splitlines() if line.startswith("    a batch:")][:1]
    for part in ("no-grad pass", "forward with reader taps", "backward", "contraction", "HF: forward"):
        assert part in eap_parts, (part, eap_parts)
