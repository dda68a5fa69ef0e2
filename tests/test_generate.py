"""Generation with the edge-masked model: against HF's own generate, and cached against uncached."""

import copy

import pytest
import torch

from edgeprune import EdgeModel
from conftest import STORIES, build, require_shared, token_batch

FP32_TOL = 1e-5


def _sparse(model, keep=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.edge_masks.set_values((torch.rand(model.graph.num_edges, generator=gen) < keep).float())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # llama: GQA (4 query / 2 KV heads)
def test_full_mask_greedy_equals_hf_generate_and_cache_equals_no_cache(kind):
    hf = build(kind)
    model = EdgeModel.from_hf(hf)
    ids, corrupted = token_batch(2, 6, seed=1), token_batch(2, 16, seed=2)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    out, cached = model.generate(ids, max_new_tokens=8, corrupted_input_ids=corrupted, eos_token_id=[],
                                 return_logits=True)
    again, uncached = model.generate(ids, max_new_tokens=8, corrupted_input_ids=corrupted, eos_token_id=[],
                                     return_logits=True, use_cache=False)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert (cached - uncached).abs().max().item() <= FP32_TOL
    assert cached.abs().max() > 1.0


def _cached_steps(step, seq, T):
    """Logits (B, L - T + 1, V) of a prompt of T tokens then one token per step, each from ``step``."""
    out = [step(seq[:, :T])[:, -1]]
    for t in range(T, seq.shape[1]):
        out.append(step(seq[:, t:t + 1])[:, -1])
    return torch.stack(out, 1).float()


def test_bf16_cached_is_as_close_to_hf_fp32_as_hf_bf16_cached():
    from edgeprune.kvcache import EdgeKVCache

    hf32 = build("llama", num_hidden_layers=4)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    model = EdgeModel.from_hf(hf16, ablation="zero")
    seq, T = token_batch(3, 16, seed=5), 8
    with torch.no_grad():
        ref = hf32(seq).logits[:, T - 1:].float()
        hf_cache = None

        def hf_step(ids):
            nonlocal hf_cache
            out = hf16(ids, past_key_values=hf_cache, use_cache=True)
            hf_cache = out.past_key_values
            return out.logits

        ours_cache = EdgeKVCache()
        seen = []

        def our_step(ids):
            seen.append(ids)
            mask = torch.ones(ids.shape[0], sum(x.shape[1] for x in seen), dtype=torch.long)
            return model(ids, mask, past_key_values=ours_cache).logits

        hf_err = (_cached_steps(hf_step, seq, T) - ref).abs()
        our_err = (_cached_steps(our_step, seq, T) - ref).abs()
    assert our_err.mean() <= hf_err.mean()
    assert our_err.max() <= 1.1 * hf_err.max()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ["interchange", "zero", "mean"])
def test_pruned_circuit_cached_equals_uncached(kind, ablation):
    model = EdgeModel.from_hf(build(kind), ablation=ablation)
    ids, corrupted = token_batch(2, 5, seed=3), token_batch(2, 12, seed=4)
    if ablation == "mean":
        model.set_mean_states(model.compute_mean_states([(token_batch(4, 10, seed=7), None)]))
    corr = corrupted if ablation == "interchange" else None
    _sparse(model)
    a, la = model.generate(ids, max_new_tokens=6, corrupted_input_ids=corr, eos_token_id=[], return_logits=True)
    b, lb = model.generate(ids, max_new_tokens=6, corrupted_input_ids=corr, eos_token_id=[], return_logits=True,
                           use_cache=False)
    assert torch.equal(a, b)
    assert (la - lb).abs().max().item() <= FP32_TOL
    full = model.generate(ids, max_new_tokens=6, corrupted_input_ids=corr, eos_token_id=[], full=True)
    assert not torch.equal(a, full)  # the circuit is not the full model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padded_batch_equals_each_prompt_alone(kind):
    model = EdgeModel.from_hf(build(kind), ablation="zero")
    _sparse(model, keep=0.5)
    long, short = token_batch(1, 7, seed=8), token_batch(1, 4, seed=9)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out, steps = model.generate(batch, mask, max_new_tokens=6, eos_token_id=[], return_logits=True)
    for row, prompt in enumerate([long, short]):
        alone, alone_steps = model.generate(prompt, max_new_tokens=6, eos_token_id=[], return_logits=True)
        assert torch.equal(out[row, -6:], alone[0, -6:])
        assert (steps[row] - alone_steps[0]).abs().max().item() <= FP32_TOL


def test_left_padded_full_model_equals_hf_generate():
    hf = build("llama")
    model = EdgeModel.from_hf(hf, ablation="zero")
    batch = token_batch(2, 7, seed=10)
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    ref = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(batch, mask, max_new_tokens=6, eos_token_id=[]), ref)


@pytest.mark.parametrize("kind", ["gemma2", "qwen3", "phi3"])  # soft-capped attention, sliding windows < length
def test_other_families_full_greedy_equals_hf_and_circuit_cache_equals_no_cache(kind):
    hf = build(kind)
    model = EdgeModel.from_hf(hf, ablation="zero")
    ids = token_batch(2, 6, seed=1)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=[], full=True), ref)
    _sparse(model, keep=0.4)
    a, la = model.generate(ids, max_new_tokens=8, eos_token_id=[], return_logits=True)
    b, lb = model.generate(ids, max_new_tokens=8, eos_token_id=[], return_logits=True, use_cache=False)
    assert torch.equal(a, b) and (la - lb).abs().max().item() <= FP32_TOL


def test_sampling_uses_hf_processors_and_is_reproducible():
    model = EdgeModel.from_hf(build("gpt2"), ablation="zero")
    ids = token_batch(2, 4, seed=1)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[])
    a = model.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    b = model.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    c = model.generate(ids, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_stories260k_circuit_cached_equals_uncached():
    require_shared(STORIES)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = EdgeModel.from_pretrained(str(STORIES), ablation="zero")
    ids = tok("Once upon a time, there was a little", return_tensors="pt").input_ids
    full = model.generate(ids, max_new_tokens=12, full=True)
    assert torch.equal(full, model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                               do_sample=False))
    _sparse(model, keep=0.7, seed=1)
    a = model.generate(ids, max_new_tokens=12)
    assert torch.equal(a, model.generate(ids, max_new_tokens=12, use_cache=False))


def test_interchange_without_corrupted_prompt_is_an_error():
    model = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match="corrupted prompt"):
        model.generate(token_batch(1, 4), max_new_tokens=3)


def test_corrupted_prompt_shorter_than_the_generation_is_an_error():
    model = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match="corrupted prompt has 6 tokens"):
        model.generate(token_batch(1, 4), max_new_tokens=3, corrupted_input_ids=token_batch(1, 6))


def test_prompt_longer_than_the_context_is_an_error():
    model = EdgeModel.from_hf(build("gpt2"), ablation="zero")  # n_positions 64
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        model.generate(token_batch(1, 70), max_new_tokens=1)


TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog.\n"
        "\n"
        "One day, Tom found a big red ball under the tree. He was very happy and ran to show his mom.\n"
        "The sun was warm and the birds sang.\n")


def test_free_text_full_loss_equals_hf_loss_and_circuit_loss_is_higher(tmp_path):
    require_shared(STORIES)
    from transformers import AutoTokenizer

    from edgeprune.text_eval import _batches, evaluate_text, read_documents, windows

    path = tmp_path / "stories.txt"
    path.write_text(TEXT)
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = EdgeModel.from_pretrained(str(STORIES), ablation="zero")
    _sparse(model, keep=0.5, seed=2)
    metrics = evaluate_text(model, tok, path, max_length=16, stride=8, batch_size=2)
    wins = windows([tok(d)["input_ids"] for d in read_documents(path)], 16, 8)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, targets in _batches(wins, 2):
            labels = torch.full_like(ids, -100)
            labels[:, 1:][targets[:, :-1]] = ids[:, 1:][targets[:, :-1]]
            n = int((labels != -100).sum())
            total += model.hf(ids, attention_mask=mask, labels=labels).loss.item() * n
            count += n
    assert metrics["documents"] == 3 and metrics["tokens"] == count and metrics["windows"] > 3
    assert abs(metrics["loss_full"] - total / count) <= 1e-5
    assert metrics["loss_circuit"] >= metrics["loss_full"] and metrics["kl"] > 0


def test_empty_text_file_is_an_error(tmp_path):
    from edgeprune.text_eval import read_documents

    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt: no text"):
        read_documents(path)


def test_free_text_under_interchange_is_an_error():
    from edgeprune.text_eval import Window, text_metrics

    model = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match="interchange"):
        text_metrics(model, [Window(torch.arange(5), 1)])


def test_cli_generate_and_eval_text_on_a_stories260k_run(tmp_path, capsys):
    require_shared(STORIES)
    from transformers import AutoModelForCausalLM

    from conftest import prune_tiny
    from edgeprune.cli import main

    run = prune_tiny(AutoModelForCausalLM.from_pretrained(STORIES), tmp_path, "stories").output_dir
    assert main(["generate", str(run), "--prompt", "Once upon a time", "--prompt", "Lily saw a",
                 "--max-new-tokens", "8", "--ablation", "zero", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("full:") == 2 and out.count("circuit:") == 3
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", str(run), "--text", str(text), "--max-length", "16", "--ablation", "zero",
                 "--no-progress"]) == 0
    assert "loss_circuit" in capsys.readouterr().out and (run / "metrics_text.json").is_file()
    assert main(["generate", str(run), "--prompt", "Once", "--no-progress"]) == 2  # interchange, no corrupted prompt
    assert "corrupted prompt" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", str(run), "--text", str(tmp_path / "empty.txt"), "--ablation", "zero"]) == 2
    assert "empty.txt: no text" in capsys.readouterr().err
