"""Interop: EAP-IG / MIB graph JSON in and out, reference Edge Pruning runs in, MIB budget exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import STORIES, gpt2_config, llama_config, randomize
from edgeprune.circuit import extract_circuit, remove_dangling
from edgeprune.cli import main
from edgeprune.graph import Graph, GraphSpec, edges_to_mask
from edgeprune.interop import InteropError, MibMap, read_eap_ig, read_reference, to_eap_ig
from edgeprune.interop.mib import budget_limit, mib_export
from edgeprune.rundir import load_masks

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
REPO = Path(__file__).resolve().parents[1]
GPT2 = GraphSpec(n_layers=2, n_heads=2, pos_embeds=True)
GQA = GraphSpec(n_layers=2, n_heads=4, n_kv_heads=2, pos_embeds=False)


def _edges(graph, kept):
    return {e for e, k in zip(graph.edges, kept.tolist()) if k}


def _config_json(tmp_path, cfg, name) -> str:
    path = tmp_path / f"{name}.json"
    cfg.to_json_file(str(path))
    return str(path)


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ---------------------------------------------------------------------------- the naming map
@pytest.mark.parametrize("spec", [GPT2, GQA, GraphSpec(n_layers=3, n_heads=2, pos_embeds=False, parallel_residual=True)])
def test_mib_edge_set_is_the_eap_ig_graph(spec):
    """As many MIB edges as the EAP-IG library's graph has for that config (its construction rule)."""
    L, H = spec.n_layers, spec.n_heads
    fwd = lambda l: 1 + l * (H + 1)  # sources before layer l: input + earlier heads and MLPs
    mlp_extra = 0 if spec.parallel_residual else H
    expected = sum(3 * H * fwd(l) + fwd(l) + mlp_extra for l in range(L)) + fwd(L)
    mmap = MibMap(Graph(spec))
    assert mmap.num_edges == len(set(mmap.names)) == expected
    assert "input->a0.h0<q>" in mmap.index and "m0->logits" in mmap.index


# ---------------------------------------------------------------------------- fixtures in
def test_gpt2_fixture_loads_to_expected_edges():
    g = Graph(GPT2)
    f = read_eap_ig(FIXTURES / "gpt2_2layer.json", g)
    both = lambda r: {("tok_embeds", r), ("pos_embeds", r)}  # one MIB input edge = both of ours
    assert _edges(g, f.kept) == (both("a0.h0.q") | both("a0.h0.k") | both("a0.h0.v")
                                 | {("a0.h0", "m0"), ("m0", "a1.h0.v"), ("a1.h0", "m1"), ("m1", "resid_post")})
    v = dict(zip(g.edges, f.values.tolist()))
    assert v[("tok_embeds", "a0.h0.k")] == v[("pos_embeds", "a0.h0.k")] == pytest.approx(-0.25)
    assert v[("m0", "a1.h0.v")] == pytest.approx(-2.0) and v[("a0.h1", "resid_post")] == pytest.approx(0.05)
    assert f.mib_edges == 10 and f.mib_in_graph == 7
    assert torch.equal(remove_dangling(g, f.kept), f.kept)  # the file's circuit is connected


def test_gqa_fixture_aggregates_kv_per_group():
    g = Graph(GQA)
    f = read_eap_ig(FIXTURES / "llama_gqa.json", g)
    assert _edges(g, f.kept) == {("tok_embeds", "a0.h0.q"), ("tok_embeds", "a0.g0.k"), ("a0.h0", "m0"),
                                 ("m0", "a1.h3.q"), ("a1.h3", "resid_post")}
    v = dict(zip(g.edges, f.values.tolist()))
    assert v[("tok_embeds", "a0.g0.k")] == pytest.approx(-1.2)  # max |score| of heads 0 and 1; in_graph: any
    assert v[("tok_embeds", "a0.g1.v")] == pytest.approx(0.1)
    assert v[("tok_embeds", "a0.g1.k")] == 0.0  # no MIB entry: score 0, not kept
    assert f.missing == g.num_edges - 7  # 9 MIB entries are 7 of our edges (two K/V pairs merge)


# ---------------------------------------------------------------------------- round trips
def test_written_file_parses_back_with_same_scores_and_in_graph_gqa(tmp_path):
    """GQA, no position embeddings: ours -> EAP-IG -> ours is exact."""
    g = Graph(GQA)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(g.num_edges, generator=gen)
    kept = remove_dangling(g, values.abs() > 1.0)
    data = to_eap_ig(g, values, kept, signed=False, d_model=64)
    mmap = MibMap(g)
    assert len(data["edges"]) == mmap.num_edges and sum(e["in_graph"] for e in data["edges"].values()) == \
        mmap.mib_count(kept)
    # a K edge of ours is the <k> input of each query head of its group, with its score
    e = g.edges.index(("a0.h1", "a1.g1.k"))
    assert data["edges"]["a0.h1->a1.h2<k>"]["score"] == data["edges"]["a0.h1->a1.h3<k>"]["score"] == \
        pytest.approx(float(values[e]))
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(data))
    back = read_eap_ig(path, g)
    assert torch.equal(back.kept, kept) and torch.equal(back.values, values) and back.missing == 0


def test_round_trip_gpt2_embeddings_aggregate_as_documented(tmp_path):
    g = Graph(GPT2)
    values = torch.randn(g.num_edges, generator=torch.Generator().manual_seed(1))
    kept = remove_dangling(g, values > 0.3)  # a circuit: the library's pruning keeps every edge of it
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(to_eap_ig(g, values, kept, signed=False, d_model=32)))
    back = read_eap_ig(path, g)
    for e, (w, r) in enumerate(g.edges):
        if w in ("tok_embeds", "pos_embeds"):
            a, b = g.edge_index("tok_embeds", r), g.edge_index("pos_embeds", r)
            best = values[a] if values[a].abs() >= values[b].abs() else values[b]
            assert back.values[e] == best and bool(back.kept[e]) == bool(kept[a] or kept[b])
        else:
            assert back.values[e] == values[e] and back.kept[e] == kept[e]


def _write_run(run_dir: Path, graph: Graph, edge_la: torch.Tensor, model_id: str) -> None:
    from edgeprune.checkpoint import write_safetensors

    run_dir.mkdir(parents=True)
    write_safetensors({"edge_log_alpha": edge_la}, run_dir / "masks.safetensors",
                      {"model_id": model_id, "graph": json.dumps(graph.fingerprint(), sort_keys=True)})


def test_cli_run_to_eap_ig_and_back_same_circuit_and_log_alpha(tmp_path):
    cfg = _config_json(tmp_path, llama_config(), "llama")
    g = Graph(GQA)
    la = torch.randn(g.num_edges, generator=torch.Generator().manual_seed(2)) * 4
    _write_run(tmp_path / "run", g, la, cfg)
    assert main(["convert", str(tmp_path / "run"), "--to", "eap-ig", "-o", str(tmp_path / "g.json")]) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["cfg"]["d_model"] == 64 and data["cfg"]["edgeprune"]["method"] == "edge-pruning"
    assert min(e["score"] for e in data["edges"].values()) >= 0.0  # MIB ranks |score|: log_alpha shifted
    assert main(["convert", str(tmp_path / "g.json"), "--from", "eap-ig", "--model", cfg, "-o",
                 str(tmp_path / "back")]) == 0
    masks = load_masks(tmp_path / "back")
    assert torch.allclose(masks.edge_log_alpha, la, atol=1e-5)
    before = extract_circuit(g, la)
    after = extract_circuit(g, masks.edge_log_alpha)
    assert before.edges == after.edges
    edges = json.loads((tmp_path / "back" / "edges.json").read_text())
    assert {tuple(e) for e in edges} == set(before.edges)


def test_cli_scores_round_trip_gives_scores_file(tmp_path):
    from edgeprune.baselines.scores import Scores, load_scores, save_scores

    cfg = _config_json(tmp_path, llama_config(), "llama")
    g = Graph(GQA)
    values = torch.randn(g.num_edges, generator=torch.Generator().manual_seed(3))
    save_scores(Scores("eap-ig", values, list(g.edges), g.fingerprint(), model_id=cfg), tmp_path / "s.safetensors")
    assert main(["convert", str(tmp_path / "s.safetensors"), "--to", "eap-ig", "-o", str(tmp_path / "g.json")]) == 0
    assert main(["convert", str(tmp_path / "g.json"), "--from", "eap-ig", "--model", cfg,
                 "-o", str(tmp_path / "out")]) == 0
    back = load_scores(tmp_path / "out" / "scores_eap-ig.safetensors")
    assert torch.equal(back.values, values) and back.graph == g.fingerprint()


# ---------------------------------------------------------------------------- reference runs in
def _reference_gpt2(tmp_path, kept_edges, embedding_nodes=True):
    """A random GPT-2 saved as the reference saves a run: HF weights + mask log_alphas (FPT2 names)."""
    from transformers import GPT2LMHeadModel

    cfg = gpt2_config(n_head=2, n_embd=32)
    hf = randomize(GPT2LMHeadModel(cfg))
    ref = tmp_path / "ref"
    hf.save_pretrained(ref)
    g = Graph(GPT2)
    L, H = 2, 2
    n_emb = 2 if embedding_nodes else 0
    W = n_emb + L * (H + 1)
    gen = torch.Generator().manual_seed(4)
    low = lambda *shape: -10.0 + 0.1 * torch.randn(*shape, generator=gen)  # pruned: P(z != 0) ~ 2e-4
    sd = {}
    for l in range(L):
        for part in "qkv":
            sd[f"transformer.h.{l}.{part}_read_log_alphas"] = low(W, H)
        sd[f"transformer.h.{l}.mlp_read_log_alphas"] = low(W)
        sd[f"transformer.h.{l}.attn_write_log_alphas"] = torch.full((H,), 10.0)
        sd[f"transformer.h.{l}.mlp_write_log_alphas"] = torch.full((1,), 10.0)
    sd["transformer.final_read_log_alphas"] = low(W)
    if embedding_nodes:
        sd["transformer.token_write_log_alpha"] = torch.full((1,), 10.0)
        sd["transformer.pos_write_log_alpha"] = torch.full((1,), 10.0)
    ref_row = lambda w: g.writer_index[w] - (2 - n_emb)  # reference writer order, embeddings first if any
    for w, r in kept_edges:
        if r == "resid_post":
            sd["transformer.final_read_log_alphas"][ref_row(w)] = 5.0
        elif r.startswith("m"):
            sd[f"transformer.h.{r[1:]}.mlp_read_log_alphas"][ref_row(w)] = 5.0
        else:
            layer, head, part = r.split(".")
            sd[f"transformer.h.{layer[1:]}.{part}_read_log_alphas"][ref_row(w), int(head[1:])] = 5.0
    weights = {k: v.clone().contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file({**weights, **sd}, str(ref / "model.safetensors"))
    return ref, g


CIRCUIT = [("tok_embeds", "a0.h1.q"), ("pos_embeds", "a0.h1.k"), ("tok_embeds", "a0.h1.v"), ("a0.h1", "m0"),
           ("m0", "a1.h0.v"), ("pos_embeds", "a1.h0.q"), ("a1.h0", "resid_post"), ("m0", "resid_post")]


def test_reference_checkpoint_imports_to_the_constructed_circuit(tmp_path):
    ref, g = _reference_gpt2(tmp_path, CIRCUIT)
    assert torch.equal(remove_dangling(g, edges_to_mask(g, CIRCUIT)), edges_to_mask(g, CIRCUIT))
    masks = read_reference(ref)
    assert masks.family == "gpt2" and masks.embedding_nodes and masks.graph.spec == g.spec
    c = extract_circuit(g, masks.edge_log_alpha, masks.node_log_alpha)
    assert set(c.edges) == set(CIRCUIT)
    # the same through the CLI, for the model the run was learned on
    out = tmp_path / "ours"
    assert main(["convert", str(ref), "--from", "ep-reference", "--model", str(ref), "-o", str(out)]) == 0
    saved = load_masks(out)
    assert torch.equal(saved.edge_log_alpha, masks.edge_log_alpha) and saved.graph == g.fingerprint()
    assert set(extract_circuit(g, saved.edge_log_alpha, saved.node_log_alpha).edges) == set(CIRCUIT)


def test_reference_without_embedding_nodes_keeps_embedding_edges(tmp_path):
    inner = [("a0.h1", "m0"), ("m0", "resid_post")]
    ref, g = _reference_gpt2(tmp_path, inner, embedding_nodes=False)
    masks = read_reference(ref)
    assert not masks.embedding_nodes
    c = extract_circuit(g, masks.edge_log_alpha, masks.node_log_alpha)
    # the reference adds the embeddings to every reader: all their edges that reach the output stay
    reached = ("a0.h1.q", "a0.h1.k", "a0.h1.v", "m0", "resid_post")
    assert set(c.edges) == set(inner) | {(e, r) for e in ("tok_embeds", "pos_embeds") for r in reached}


def test_reference_gqa_llama_and_its_edges_json_in_our_names(tmp_path):
    g = Graph(GQA)
    L, H, KV, W = 2, 4, 2, 1 + 2 * 5
    sd = {}
    for l in range(L):
        sd[f"model.layers.{l}.q_read_log_alphas"] = torch.full((W, H), -10.0)
        sd[f"model.layers.{l}.k_read_log_alphas"] = torch.full((W, KV), -10.0)
        sd[f"model.layers.{l}.v_read_log_alphas"] = torch.full((W, KV), -10.0)
        sd[f"model.layers.{l}.mlp_read_log_alphas"] = torch.full((W,), -10.0)
        sd[f"model.layers.{l}.attn_write_log_alphas"] = torch.full((H,), 10.0)
        sd[f"model.layers.{l}.mlp_write_log_alphas"] = torch.full((1,), 10.0)
    sd["model.final_read_log_alphas"] = torch.full((W,), -10.0)
    sd["model.token_write_log_alpha"] = torch.full((1,), 10.0)
    sd["model.layers.0.k_read_log_alphas"][0, 1] = 5.0  # embeds -> KV head 1 of layer 0
    sd["model.layers.0.q_read_log_alphas"][0, 2] = 5.0  # embeds -> query head 2 (group 1)
    sd["model.final_read_log_alphas"][1 + 2] = 5.0  # a0.h2 -> read-out
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file(sd, str(ref / "model.safetensors"))
    (ref / "edges.json").write_text(json.dumps([["embeds", "a0.h1.k"], ["embeds", "a0.h2.q"], ["a0.h2", "resid_post"]]))
    cfg = _config_json(tmp_path, llama_config(), "llama")
    assert main(["convert", str(ref), "--from", "ep-reference", "--model", cfg, "-o", str(tmp_path / "o")]) == 0
    want = {("tok_embeds", "a0.g1.k"), ("tok_embeds", "a0.h2.q"), ("a0.h2", "resid_post")}
    assert {tuple(e) for e in json.loads((tmp_path / "o" / "edges.json").read_text())} == want
    m = load_masks(tmp_path / "o")
    assert set(extract_circuit(g, m.edge_log_alpha, m.node_log_alpha).edges) == want


# ---------------------------------------------------------------------------- MIB export
@pytest.fixture(scope="module")
def stories_scores(tmp_path_factory):
    """EAP scores of stories260K on four training examples (a second of CPU)."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not available")
    from edgeprune.baselines.methods import attribute
    from edgeprune.baselines.scores import save_scores
    from edgeprune.config import load_config
    from edgeprune.experiment import load_model, load_split
    from edgeprune.tasks.jsonl import batches

    cfg = load_config(REPO / "configs" / "stories_names.yaml", ["model.device=cpu"])
    model = load_model(cfg.model)
    data = load_split(cfg.data, model, "train")
    bs = list(batches(data.examples[:4], 4, data.pad_token_id))
    scores = attribute(model, bs, "eap", config=cfg.to_dict())
    path = tmp_path_factory.mktemp("scores") / "scores_eap.safetensors"
    save_scores(scores, path)
    return model, bs, scores, path


def test_mib_export_all_budgets_on_stories260k(stories_scores, tmp_path):
    from edgeprune.baselines.curve import DEFAULT_BUDGETS, faithfulness_curve

    model, bs, scores, path = stories_scores
    g = model.graph
    mmap = MibMap(g)
    out = tmp_path / "names_stories"
    assert main(["mib-export", str(path), "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["budget_percent"] for c in manifest["circuits"]] == list(DEFAULT_BUDGETS)
    previous = set()
    for c in manifest["circuits"]:
        f = read_eap_ig(out / c["file"], g)  # our reader parses what we wrote
        data = json.loads((out / c["file"]).read_text())
        n_mib = sum(e["in_graph"] for e in data["edges"].values())
        assert int(f.kept.sum()) == c["edges"] <= budget_limit(g.num_edges, c["budget_percent"])
        assert n_mib == c["mib_edges"] <= budget_limit(mmap.num_edges, c["budget_percent"])
        now = _edges(g, f.kept)
        assert previous <= now  # nested
        assert torch.equal(remove_dangling(g, f.kept), f.kept)
        previous = now
    assert manifest["circuits"][-1]["edges"] == g.num_edges  # 100 %: the whole graph
    assert "circuit_0.1pct.json" in (out / "README.md").read_text()
    # counted as ours alone, the circuits are exactly `edgeprune curve`'s
    mine = mib_export([path], tmp_path / "ours_count", count="edgeprune")
    curve = faithfulness_curve(model, bs, scores=[scores], budgets=DEFAULT_BUDGETS)
    points = curve["methods"]["eap"]["points"]
    assert [c["edges"] for c in mine["circuits"]] == [p["edges"] for p in points]
    assert all(a["edges"] <= b["edges"] for a, b in zip(manifest["circuits"], mine["circuits"]))


def test_mib_export_refuses_tracr(tmp_path):
    fake = tmp_path / "tracr_model"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "tracr"}))
    g = Graph(GPT2)
    _write_run(tmp_path / "run", g, torch.zeros(g.num_edges), str(fake))
    with pytest.raises(InteropError, match="Tracr"):
        mib_export([tmp_path / "run"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- bad input
def _bad(tmp_path, text: str) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(text)
    return p


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["cfg"].update(n_layers=12), r"cfg\.n_layers is 12 but the model has 2"),
    (lambda d: d["cfg"].update(n_heads=8), r"cfg\.n_heads is 8 but the model has 4"),
    (lambda d: d["edges"].update({"a0.h7->m0": {"score": 1.0, "in_graph": True}}), r"edges\['a0\.h7->m0'\].*head 7"),
    (lambda d: d["edges"].update({"embed->m0": {"score": 1.0, "in_graph": True}}), r"edges\['embed->m0'\].*'embed'"),
    (lambda d: d["nodes"].update({"m9": {"in_graph": True}}), r"nodes\['m9'\]: unknown node"),
    (lambda d: d["edges"]["a0.h0->m0"].update(score="high"), r"edges\['a0\.h0->m0'\]\.score"),
])
def test_bad_eap_ig_file_names_file_and_key_and_writes_nothing(tmp_path, mutate, message):
    d = json.loads((FIXTURES / "llama_gqa.json").read_text())
    mutate(d)
    p = _bad(tmp_path, json.dumps(d))
    with pytest.raises(InteropError, match=message) as err:
        read_eap_ig(p, Graph(GQA))
    assert str(p) in str(err.value)
    cfg = _config_json(tmp_path, llama_config(), "llama")
    out = tmp_path / "out"
    assert main(["convert", str(p), "--from", "eap-ig", "--model", cfg, "-o", str(out)]) == 2
    assert not out.exists()


def test_malformed_json_is_one_line_with_position(tmp_path, capsys):
    p = _bad(tmp_path, '{"cfg": {"n_layers": 2,, }')
    cfg = _config_json(tmp_path, llama_config(), "llama")
    assert main(["convert", str(p), "--from", "eap-ig", "--model", cfg, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprune convert: error:") and "not valid JSON (line 1" in err and str(p) in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_reference_missing_mask_tensor_names_file_and_key(tmp_path, capsys):
    from safetensors.torch import load_file

    ref, _ = _reference_gpt2(tmp_path, CIRCUIT)
    sd = load_file(str(ref / "model.safetensors"))
    del sd["transformer.h.1.k_read_log_alphas"]
    save_file(sd, str(ref / "model.safetensors"))
    out = tmp_path / "out"
    assert main(["convert", str(ref), "--from", "ep-reference", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(ref / "model.safetensors") in err and "'transformer.h.1.k_read_log_alphas'" in err
    assert not out.exists()


def test_reference_pickle_only_is_refused_with_resave_recipe(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InteropError, match="only a pickle.*never unpickles.*save_file"):
        read_reference(ref)


def test_reference_for_another_model_is_refused(tmp_path):
    ref, _ = _reference_gpt2(tmp_path, CIRCUIT)
    cfg = _config_json(tmp_path, gpt2_config(n_layer=3, n_head=2, n_embd=32), "gpt2_3l")
    out = tmp_path / "out"
    assert main(["convert", str(ref), "--from", "ep-reference", "--model", cfg, "-o", str(out)]) == 2
    assert not out.exists()


def test_reference_run_for_stories260k_is_accepted_by_eval_checks(stories_scores, tmp_path):
    """With --config the masks carry the model's fingerprint, so `edgeprune eval OUT` accepts them; the
    reference's edges.json comes out in our names for `eval OUT --edges OUT/edges.json`."""
    model = stories_scores[0]
    L, H, KV, W = 5, 8, 4, 46
    sd = {}
    for l in range(L):
        for part, cols in (("q", H), ("k", KV), ("v", KV)):
            sd[f"model.layers.{l}.{part}_read_log_alphas"] = torch.full((W, cols), -10.0)
        sd[f"model.layers.{l}.mlp_read_log_alphas"] = torch.full((W,), -10.0)
        sd[f"model.layers.{l}.attn_write_log_alphas"] = torch.full((H,), 10.0)
        sd[f"model.layers.{l}.mlp_write_log_alphas"] = torch.full((1,), 10.0)
    sd["model.final_read_log_alphas"] = torch.full((W,), -10.0)
    sd["model.token_write_log_alpha"] = torch.full((1,), 10.0)
    sd["model.layers.0.mlp_read_log_alphas"][0] = 5.0  # embeds -> m0
    sd["model.final_read_log_alphas"][9] = 5.0  # m0 -> read-out
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file(sd, str(ref / "model.safetensors"))
    (ref / "edges.json").write_text(json.dumps([["embeds", "m0"], ["m0", "resid_post"]]))
    out = tmp_path / "out"
    assert main(["convert", str(ref), "--from", "ep-reference", "--config",
                 str(REPO / "configs" / "stories_names.yaml"), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "edges.json", "masks.safetensors"]
    masks = load_masks(out)
    masks.check_model(model)  # same graph and weights fingerprint: no --allow-other-model needed
    c = extract_circuit(model.graph, masks.edge_log_alpha, masks.node_log_alpha)
    assert set(c.edges) == {("tok_embeds", "m0"), ("m0", "resid_post")}
    assert json.loads((out / "edges.json").read_text()) == [["tok_embeds", "m0"], ["m0", "resid_post"]]


def test_cli_edges_json_to_eap_ig(tmp_path):
    cfg = _config_json(tmp_path, gpt2_config(n_head=2, n_embd=32), "gpt2")
    g = Graph(GPT2)
    (tmp_path / "edges.json").write_text(json.dumps([list(e) for e in CIRCUIT]))
    (tmp_path / "circuit.json").write_text(json.dumps({"model_id": cfg, "graph": g.fingerprint()}))
    assert main(["convert", str(tmp_path / "edges.json"), "--to", "eap-ig", "-o", str(tmp_path / "g.json")]) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["cfg"]["d_model"] == 32
    assert data["edges"]["input->a0.h1<q>"] == {"score": 1.0, "in_graph": True}  # tok_embeds -> a0.h1.q
    assert data["nodes"]["a0.h0"]["in_graph"] is False and data["nodes"]["a1.h0"]["in_graph"] is True
    back = read_eap_ig(tmp_path / "g.json", g, signed=True)
    both = {(e, r) for w, r in CIRCUIT if w in ("tok_embeds", "pos_embeds") for e in ("tok_embeds", "pos_embeds")}
    assert _edges(g, back.kept) == {e for e in CIRCUIT if e[0] not in ("tok_embeds", "pos_embeds")} | both
    # refuses to overwrite
    assert main(["convert", str(tmp_path / "edges.json"), "--to", "eap-ig", "-o", str(tmp_path / "g.json")]) == 2


def test_mib_export_one_run_per_budget_picks_largest_fitting_run(tmp_path):
    cfg = _config_json(tmp_path, llama_config(), "llama")
    g = Graph(GQA)
    base = torch.randn(g.num_edges, generator=torch.Generator().manual_seed(5))
    runs, sizes = [], []
    for i, keep in enumerate((4, 20, 60)):  # three runs of growing size
        la = torch.full((g.num_edges,), -10.0)
        la[torch.argsort(base, descending=True)[:keep]] = 5.0
        _write_run(tmp_path / f"run{i}", g, la, cfg)
        runs.append(str(tmp_path / f"run{i}"))
        sizes.append(len(extract_circuit(g, la).edges))
    m = mib_export(runs, tmp_path / "sub", budgets=[5, 50, 100])
    mmap = MibMap(g)
    for c in m["circuits"]:
        fits = [n for n in sizes if n <= budget_limit(g.num_edges, c["budget_percent"])]
        assert c["edges"] == (max(fits) if fits else 0)
        assert c["mib_edges"] <= budget_limit(mmap.num_edges, c["budget_percent"])


# ---------------------------------------------------------------------------- the EAP-IG library's pruning
def _library_rule(data: dict) -> dict[str, bool]:
    """The EAP-IG library's ``Graph.prune`` as its documentation states it, written independently of
    ``edgeprune.interop``: repeat { a node is in the graph iff it has an in-graph outgoing edge and an
    in-graph incoming edge (the input node needs no incoming one); an edge stays iff its parent node
    and its child node are in the graph (the logits node always is) } until nothing changes."""
    edges = {name: e["in_graph"] for name, e in data["edges"].items()}
    while True:
        nodes = {}
        for name in data["nodes"]:
            out = any(k for n, k in edges.items() if n.split("->")[0] == name)
            inc = name == "input" or any(k for n, k in edges.items() if n.split("->")[1].split("<")[0] == name)
            nodes[name] = out and inc
        nodes["logits"] = True
        new = {n: k and nodes[n.split("->")[0]] and nodes[n.split("->")[1].split("<")[0]] for n, k in edges.items()}
        if new == edges:
            return edges
        edges = new


@pytest.mark.parametrize("seed", range(4))
def test_gqa_export_is_a_fixed_point_of_the_library_pruning(seed):
    g = Graph(GQA)
    values = torch.randn(g.num_edges, generator=torch.Generator().manual_seed(seed))
    kept = remove_dangling(g, values.abs() > 1.2)
    data = to_eap_ig(g, values, kept, signed=False, d_model=64)
    in_graph = {n: e["in_graph"] for n, e in data["edges"].items()}
    assert _library_rule(data) == in_graph
    assert sum(in_graph.values()) == MibMap(g).mib_count(kept)  # budgets count what the library keeps


def test_gqa_kv_edge_is_copied_only_to_query_heads_in_the_circuit():
    g = Graph(GQA)  # 2 query heads per KV head
    circuit = {("tok_embeds", "a0.g0.k"), ("tok_embeds", "a0.h0.q"), ("a0.h0", "resid_post")}
    kept = edges_to_mask(g, circuit)
    data = to_eap_ig(g, torch.ones(g.num_edges), kept, signed=False, d_model=64)
    assert data["edges"]["input->a0.h0<k>"]["in_graph"] and not data["edges"]["input->a0.h1<k>"]["in_graph"]
    assert MibMap(g).mib_count(kept) == 3 == sum(e["in_graph"] for e in data["edges"].values())
    assert _library_rule(data) == {n: e["in_graph"] for n, e in data["edges"].items()}
