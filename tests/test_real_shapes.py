"""Every CLI command, run as a user would, on models whose *shapes* are real checkpoints' (GPT-2
small's 50,257 x 768 embedding with 12 heads; a Llama with GQA, d_model 576 and a 50k vocabulary)
but with 1-2 layers, so the whole module stays cheap. The toy-shape tests check numerics; this one
checks sizes: index arithmetic past 2**24 elements, real vocabularies through every metric, file
writers and drawings. Random weights: every figure is exercised, none is asserted."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import GPT2_TOKENIZER, require_shared
from edgeprune.cli import main

pytestmark = pytest.mark.slow

SHAPES = {
    # GPT-2 small's vocabulary, width, heads and positions; one layer
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=12, n_embd=768, vocab_size=50_257,
                                               n_positions=1024)),
    # SmolLM2-135M's width and heads (9 query / 3 KV, head dim 64), a 50k vocabulary, two layers
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=576, intermediate_size=1536,
                                                  num_attention_heads=9, num_key_value_heads=3,
                                                  vocab_size=50_304, max_position_embeddings=2048,
                                                  tie_word_embeddings=True, bos_token_id=50_256,
                                                  eos_token_id=50_256)),
}


def _cli(*argv) -> None:
    """One command through the CLI entry point; exit status 0 or the test fails with the command."""
    t0 = time.perf_counter()
    status = main([str(a) for a in argv])
    print(f"{time.perf_counter() - t0:6.1f}s  edgeprune {' '.join(map(str, argv))}")
    assert status == 0, f"edgeprune {' '.join(map(str, argv))} exited {status}"


@pytest.fixture(scope="module", params=sorted(SHAPES))
def world(request, tmp_path_factory):
    """A saved real-shape checkpoint (``save_pretrained``, real GPT-2 tokenizer), an IOI dataset made
    by ``edgeprune data`` for it, a config, and two short pruning runs (seeds 0 and 1)."""
    require_shared(GPT2_TOKENIZER)
    kind = request.param
    root = tmp_path_factory.mktemp(f"real_{kind}")
    torch.manual_seed(0)
    model = SHAPES[kind]()
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(root / "model")
    del model
    _cli("data", "ioi", "--tokenizer", root / "model", "-o", root / "ioi", "--n-train", 16, "--n-val", 8,
         "--n-test", 8)
    cfg = {"model": {"name_or_path": str(root / "model"), "dtype": "float32", "device": "cpu"},
           "data": {"path": str(root / "ioi"), "task": "ioi", "max_length": 48},
           "prune": {"edge_target": 0.9, "steps": 3, "warmup_steps": 2, "batch_size": 8},
           "run": {"output_dir": str(root / "run"), "seed": 0, "eval_every": 0, "save_every": 2, "log_every": 1,
                   "eval_batches": 1}}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    _cli("prune", root / "config.yaml", "--check")
    _cli("prune", root / "config.yaml", "--steps", 2, "--no-progress")
    _cli("prune", root / "config.yaml", "--resume", "--set", "prune.steps=3", "--no-progress")
    _cli("prune", root / "config.yaml", "--seed", 1, "--output-dir", root / "run1", "--no-progress")
    (root / "text.txt").write_text("Once upon a time there was a little girl.\nShe went to the park.\n")
    return root


def test_prune_resumes_and_writes_its_run(world):
    run = world / "run"
    for name in ("config.yaml", "log.jsonl", "masks.safetensors", "checkpoint/state.safetensors",
                 "checkpoint/state.json"):
        assert (run / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 3


def test_eval_export_draw_view(world):
    run = world / "run"
    _cli("eval", run, "--split", "test", "--no-progress")
    assert "kl" in json.loads((run / "metrics.json").read_text())["metrics"]
    _cli("export", run, "-o", run / "edges.json")
    assert (run / "circuit.json").is_file() and json.loads((run / "edges.json").read_text())
    _cli("eval", run, "--edges", run / "edges.json", "-o", world / "metrics_edges.json", "--no-progress")
    _cli("eval", run, "--text", world / "text.txt", "--max-length", 32, "--ablation", "zero",
         "-o", world / "metrics_text.json",
         "--no-progress")
    assert (world / "metrics_edges.json").is_file() and (world / "metrics_text.json").is_file()
    _cli("draw", run / "edges.json", "-o", world / "circuit.svg")
    assert "<svg" in (world / "circuit.svg").read_text()
    _cli("view", run, "-o", world / "circuit.html")
    _cli("view", run, world / "run1", "-o", world / "both.html")
    for page in ("circuit.html", "both.html"):
        assert "<html" in (world / page).read_text()[:500].lower(), page


def test_attribute_compare_curve(world):
    run = world / "run"
    for method in ("eap", "eap-ig", "acdc"):
        extra = ["--ig-steps", 2] if method == "eap-ig" else []
        _cli("attribute", world / "config.yaml", "--method", method, "--batches", 1, *extra, "--no-progress")
        assert (run / f"scores_{method}.safetensors").is_file()
    # EAP-IG along the masks, the attribution prune.init_from: auto runs (on the plain model, baselines/ig_masks.py)
    _cli("attribute", world / "config.yaml", "--method", "eap-ig", "--ig-variant", "masks", "--ig-steps", 2,
         "--batches", 1, "-o", world / "scores_masks.safetensors", "--no-progress")
    masks_scores = load_file(world / "scores_masks.safetensors")["scores"]
    assert bool(torch.isfinite(masks_scores).all()) and bool(masks_scores.ne(0).any())
    _cli("compare", run, run / "scores_eap-ig.safetensors", "-o", world / "compare", "--batches", 1, "--no-progress")
    _cli("curve", run, run / "scores_eap.safetensors", "-o", world / "curve", "--budgets", "0.05,0.5",
         "--batches", 1, "--no-progress")
    assert (world / "compare" / "compare.md").is_file()
    # the task's own faithfulness (IOI: logit(IO) - logit(S)) in compare is eval's for the same circuit
    _cli("eval", run, "--split", "test", "-o", world / "metrics_test.json", "--no-progress")
    evaluated = json.loads((world / "metrics_test.json").read_text())["metrics"]
    row = json.loads((world / "compare" / "compare.json").read_text())["rows"][0]
    assert row["method"] == "edge-pruning"
    for key in ("ioi/faithfulness", "faithfulness", "kl"):
        assert row[key] == pytest.approx(evaluated[key], rel=1e-4, abs=1e-6), key
    assert (world / "curve" / "curve.json").is_file() and (world / "curve" / "curve.png").is_file()


def test_stability(world):
    _cli("stability", world / "run", world / "run1", "-o", world / "stability.json", "--no-progress")
    _cli("stability", world / "run", world / "run1", "--bootstrap", 2, "--split", "validation",
         "-o", world / "stability_boot.json", "--no-progress")
    assert (world / "stability.json").is_file() and (world / "stability_boot.json").is_file()


def test_generate(world, capsys):
    _cli("generate", world / "run", "--prompt", "Once upon a time", "--max-new-tokens", 3, "--ablation", "zero",
         "--no-progress")
    assert "circuit" in capsys.readouterr().out


def test_convert_both_ways_and_mib_export(world):
    run = world / "run"
    _cli("convert", run, "--to", "eap-ig", "-o", world / "graph.json")
    _cli("convert", world / "graph.json", "--from", "eap-ig", "--config", world / "config.yaml",
         "-o", world / "from_eap_ig")
    for name in ("masks.safetensors", "edges.json", "circuit.json", "config.yaml"):
        assert (world / "from_eap_ig" / name).is_file(), name
    # one file round-trips: the same circuit and the same scores (the Llama here has GQA)
    _cli("export", run, "-o", world / "exported_edges.json")
    # MIB has one `input` node for both embeddings: GPT-2's two embedding edges into a reader come back
    # together (docs/interop.md); every other edge, and every edge of the rotary Llama, exactly
    merged = lambda w: "input" if w in ("tok_embeds", "pos_embeds") else w  # noqa: E731
    edges = lambda p: sorted({(merged(w), r) for w, r in json.loads(p.read_text())})  # noqa: E731
    assert edges(world / "from_eap_ig" / "edges.json") == edges(world / "exported_edges.json")
    if "gpt2" not in world.name:
        exact = lambda p: sorted(map(tuple, json.loads(p.read_text())))  # noqa: E731
        assert exact(world / "from_eap_ig" / "edges.json") == exact(world / "exported_edges.json")
        from edgeprune.rundir import load_masks
        assert torch.allclose(load_masks(world / "from_eap_ig").edge_log_alpha, load_masks(run).edge_log_alpha)
    _cli("mib-export", run, "-o", world / "mib", "--budgets", "0.1,0.5")
    assert (world / "mib" / "manifest.json").is_file() and len(list((world / "mib").glob("circuit_*.json"))) == 2


def test_estimate(world):
    _cli("estimate", world / "config.yaml", "--gpus", "1,2", "--json", world / "estimate.json", "--no-progress")
    assert json.loads((world / "estimate.json").read_text())
