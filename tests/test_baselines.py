"""Baselines on the same graph: EAP/EAP-IG against hooks on the HF model, completeness, ACDC's
decisions, circuit selection, curves/compare, the one-command benchmark and bad input."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import STORIES, build, require_shared, token_batch
from edgeprune import EdgeModel
from edgeprune.baselines import (ScoresError, acdc, areas, attribute, check_budgets, check_graph,
                                 circuit_of_size, eap_ig_scores, eap_scores, edge_order, load_scores, save_scores,
                                 select_threshold, select_top)
from edgeprune.baselines.attribution import prepare
from edgeprune.circuit import remove_dangling
from edgeprune.graph import Graph, GraphSpec
from edgeprune.tasks.jsonl import Example, collate

ROOT = Path(__file__).resolve().parents[1]


def random_batch(batch=3, seq=10, span=3, seed=1):
    """A Batch of random tokens: the last ``span`` tokens are the teacher-forced targets."""
    ids, corrupted = token_batch(batch, seq, seed=seed), token_batch(batch, seq, seed=seed + 100)
    corrupted[:, seq - span:] = ids[:, seq - span:]
    examples = [Example(input_ids=ids[b].tolist(), corrupted_input_ids=corrupted[b].tolist(),
                        loss_positions=list(range(seq - span - 1, seq - 1)), target_ids=ids[b, seq - span:].tolist(),
                        corrupted_target_ids=corrupted[b, seq - span:].tolist(), split="train", line=b + 1)
                for b in range(batch)]
    return collate(examples, pad_token_id=0)


# ---------------------------------------------------------------------------- EAP vs HF hooks
def _hf_writer_states(hf, ids):
    """Each writer's contribution (B, T, D) to the residual stream of the HF GPT-2, from hooks."""
    body, states, handles = hf.transformer, {}, []
    n_heads = hf.config.n_head
    handles.append(body.wte.register_forward_hook(lambda m, i, o: states.__setitem__("tok_embeds", o)))
    handles.append(body.wpe.register_forward_hook(
        lambda m, i, o: states.__setitem__("pos_embeds", o.expand(ids.shape[0], -1, -1))))
    for l, blk in enumerate(body.h):
        def per_head(m, args, l=l):
            x, w = args[0], m.weight  # Conv1D c_proj: (H*dh, D); its bias is not a head's
            dh = x.shape[-1] // n_heads
            for h in range(n_heads):
                states[f"a{l}.h{h}"] = x[..., h * dh:(h + 1) * dh] @ w[h * dh:(h + 1) * dh]
        handles.append(blk.attn.c_proj.register_forward_pre_hook(per_head))
        handles.append(blk.mlp.register_forward_hook(lambda m, i, o, l=l: states.__setitem__(f"m{l}", o)))
    with torch.no_grad():
        logits = hf(ids).logits
    for h in handles:
        h.remove()
    return states, logits


def _hf_reader_grad(hf, batch, reader, alt, inputs_embeds=None):
    """d(mean logit difference)/d(reader input) (B, T, D) on the HF model, from hooks (on the token
    embeddings ``inputs_embeds`` (B, T, D) instead of batch.input_ids, if given).

    resid_post: the input of ln_f; m{l}: the input of ln_2 (the residual branch around the MLP
    keeps the original tensor, so only the MLP path sees the copy). A Q/K/V reader shares ln_1's input
    with every other head, so its own input is split off: c_attn's output columns of that one
    head/port are recomputed from a separate copy of the residual stream, whose gradient is then
    exactly the gradient at that reader's input.
    """
    blocks, grabbed, handles = hf.transformer.h, {}, []

    def grab(m, args):  # the norm's input, as a separate leaf: its gradient is the reader's alone
        grabbed["x"] = args[0].detach().clone().requires_grad_(True)
        return (grabbed["x"],)

    if reader == "resid_post":
        handles.append(hf.transformer.ln_f.register_forward_pre_hook(grab))
    elif reader.startswith("m"):
        handles.append(blocks[int(reader[1:])].ln_2.register_forward_pre_hook(grab))
    else:
        layer, unit, port = reader.split(".")
        blk = blocks[int(layer[1:])]
        D, H = hf.config.n_embd, hf.config.n_head
        dh, head = D // H, int(unit[1:])
        start = {"q": 0, "k": D, "v": 2 * D}[port] + head * dh
        seen = {}
        handles.append(blk.ln_1.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid", a[0])))

        def split_port(m, args, out):
            own = seen["resid"].detach().clone().requires_grad_(True)
            grabbed["x"] = own
            out = out.clone()
            out[..., start:start + dh] = m.forward(blk.ln_1.forward(own))[..., start:start + dh]
            return out
        handles.append(blk.attn.c_attn.register_forward_hook(split_port))
    logits = (hf(batch.input_ids) if inputs_embeds is None else hf(inputs_embeds=inputs_embeds)).logits
    sel = batch.loss_mask
    cur, tgt = logits[sel], batch.target_ids[sel]
    metric = (cur.gather(1, tgt[:, None]) - cur.gather(1, alt[:, None])).mean()
    metric.backward()
    for h in handles:
        h.remove()
    return grabbed["x"].grad


EAP_EDGES = [("a0.h1", "resid_post"), ("m1", "resid_post"), ("tok_embeds", "m1"), ("a0.h3", "m1"),
             ("a0.h2", "a1.h3.q"), ("a0.h0", "a1.h0.k"), ("m0", "a1.h1.v"), ("tok_embeds", "a0.h2.q")]


def test_eap_scores_equal_first_order_estimate_from_hf_hooks():
    hf = build("gpt2")
    batch = random_batch()
    clean, full_logits = _hf_writer_states(hf, batch.input_ids)
    corrupt, _ = _hf_writer_states(hf, batch.corrupted_input_ids)
    ref = full_logits[batch.loss_mask]
    others = ref.clone()
    others.scatter_(1, batch.target_ids[batch.loss_mask][:, None], -math.inf)
    alt = others.argmax(-1)

    model = EdgeModel.from_hf(hf)
    scores = eap_scores(model, [batch])
    for writer, reader in EAP_EDGES:
        grad = _hf_reader_grad(hf, batch, reader, alt)
        expected = float((grad * (corrupt[writer] - clean[writer])).sum())
        got = float(scores[model.graph.edge_index(writer, reader)])
        assert abs(expected) > 1e-4, (writer, reader, expected)  # a real test, not 0 == 0
        # 1e-5 relative; the 1e-7 floor is fp32 rounding of a sum over B*T*D terms for the smallest scores
        assert abs(got - expected) <= 1e-5 * abs(expected) + 1e-7, (writer, reader, got, expected)


def _hf_logit_diff(hf, ids, batch, alt):
    with torch.no_grad():
        cur = hf(ids).logits[batch.loss_mask]
    tgt = batch.target_ids[batch.loss_mask]
    return float((cur.gather(1, tgt[:, None]) - cur.gather(1, alt[:, None])).mean())


def test_eap_ig_masks_variant_scores_sum_to_full_minus_ablated_metric():
    hf = build("gpt2", seed=3)
    batches = [random_batch(seed=5), random_batch(batch=2, seq=8, span=2, seed=6)]
    model = EdgeModel.from_hf(hf)
    # metric of the full model and of the fully ablated one (= the HF model on the corrupted input)
    n, full_sum, ablated_sum = 0, 0.0, 0.0
    for b in batches:
        alt = prepare(model, b).alt
        k = int(b.loss_mask.sum())
        full_sum += k * _hf_logit_diff(hf, b.input_ids, b, alt)
        ablated_sum += k * _hf_logit_diff(hf, b.corrupted_input_ids, b, alt)
        n += k
    change = ablated_sum / n - full_sum / n
    assert abs(change) > 0.1
    many = float(eap_ig_scores(model, batches, steps=64, variant="masks").sum())
    few = float(eap_ig_scores(model, batches, steps=2, variant="masks").sum())
    eap = float(eap_scores(model, batches).sum())
    assert abs(many - change) <= 2e-3 * abs(change), (many, change)
    assert abs(many - change) < abs(few - change) < abs(eap - change)  # converges from the EAP end


# ---------------------------------------------------------------------------- ACDC
def _model_with_silent_head(layer=0, head=2):
    """A random GPT-2 whose head a{layer}.h{head} writes exactly zero (its rows of W_O are 0)."""
    hf = build("gpt2", seed=4)
    with torch.no_grad():
        dh = hf.config.n_embd // hf.config.n_head
        hf.transformer.h[layer].attn.c_proj.weight[head * dh:(head + 1) * dh] = 0.0
    return EdgeModel.from_hf(hf)


def test_acdc_removes_an_edge_iff_its_effect_is_below_tau():
    model = _model_with_silent_head()
    graph = model.graph
    batches = [random_batch(seed=7)]
    tau = 0.01
    r = acdc(model, batches, tau=tau)
    tested = r.tested
    assert torch.equal(r.decisions[tested], r.effects[tested] >= tau)
    assert 0 < int(r.decisions.sum()) < int(tested.sum())  # both decisions happen
    # the silent head's outgoing edges have exactly zero effect, so they all go
    silent = torch.tensor([w == "a0.h2" for w, _ in graph.edges])
    assert not r.decisions[silent].any()
    assert (r.effects[silent & tested] == 0.0).all() and (silent & tested).any()
    # untested edges feed nodes that no longer reach the output
    kept_writers = {w for (w, _), k in zip(graph.edges, r.decisions.tolist()) if k}
    for (w, reader), t in zip(graph.edges, tested.tolist()):
        if not t:
            node = reader.rsplit(".", 1)[0]
            assert node not in kept_writers and reader != "resid_post", (w, reader)
    # each effect is measured against the circuit of the moment: the removals' effects add up to the
    # final circuit's KL, which an independent evaluation reproduces
    removed = tested & ~r.decisions
    assert math.isclose(float(r.effects[removed].sum()), r.metric_final, rel_tol=1e-4, abs_tol=1e-6)
    from edgeprune.eval import evaluate
    for kept in (r.decisions, r.kept):  # dangling edges carry exactly their ablated value: same KL
        model.set_edges([e for e, k in zip(graph.edges, kept.tolist()) if k])
        assert math.isclose(evaluate(model, batches)["kl"], r.metric_final, rel_tol=1e-4, abs_tol=1e-6)
    assert torch.equal(r.kept, remove_dangling(graph, r.decisions)) and int(r.kept.sum()) < int(r.decisions.sum())


# ---------------------------------------------------------------------------- selection
def small_graph():
    return Graph(GraphSpec(n_layers=2, n_heads=2, n_kv_heads=1, pos_embeds=True))


def test_greedy_order_only_takes_edges_whose_reader_reaches_the_output():
    from edgeprune.circuit import reader_nodes
    g = small_graph()
    key = torch.rand(g.num_edges, generator=torch.Generator().manual_seed(0))
    order = edge_order(g, key, "greedy").tolist()
    assert sorted(order) == list(range(g.num_edges))
    feeds = reader_nodes(g)
    taken_writers: set[int] = set()
    for e in order:
        w, r = g.edges[e]
        ri = g.reader_index[r]
        assert r == "resid_post" or any(n in taken_writers for n in feeds[ri]), (w, r)
        taken_writers.add(g.writer_index[w])


@pytest.mark.parametrize("how", ["topn", "greedy"])
def test_circuit_of_size_is_the_longest_prefix_within_the_budget(how):
    g = small_graph()
    key = torch.randn(g.num_edges, generator=torch.Generator().manual_seed(1))
    order = edge_order(g, key, how)
    sizes = []
    for n in range(g.num_edges + 1):
        kept = torch.zeros(g.num_edges, dtype=torch.bool)
        kept[order[:n]] = True
        sizes.append(int(remove_dangling(g, kept).sum()))
    assert sizes == sorted(sizes)  # monotone in the prefix length
    for budget in range(0, g.num_edges + 1, 3):
        kept = circuit_of_size(g, key, budget, how)
        assert torch.equal(remove_dangling(g, kept), kept)
        best = max(s for s in sizes if s <= budget)
        assert int(kept.sum()) == best


def test_top_n_and_threshold_selection_remove_dangling_edges():
    g = small_graph()
    key = torch.randn(g.num_edges, generator=torch.Generator().manual_seed(2))
    top = select_top(g, key, 10)
    assert int(top.sum()) <= 10 and torch.equal(remove_dangling(g, top), top)
    raw = torch.zeros(g.num_edges, dtype=torch.bool)
    raw[torch.argsort(key, descending=True)[:10]] = True
    assert torch.equal(top, remove_dangling(g, raw))
    thr = select_threshold(g, key, 0.5)
    assert torch.equal(thr, remove_dangling(g, key >= 0.5))


# ---------------------------------------------------------------------------- curve areas
def test_cpr_and_cmd_of_known_curves():
    assert areas([], []) == pytest.approx((0.5, 0.5))  # the anchors alone: f = x
    assert areas([0.5], [1.0]) == pytest.approx((0.75, 0.25))
    # overshoot: 1 - f changes sign inside the first segment, |1 - f| is split at the crossing
    assert areas([0.5], [2.0]) == pytest.approx((1.25, 0.5))
    assert areas([0.0, 0.25, 1.0], [1.0, 1.0, 1.0]) == pytest.approx((1.0, 0.0))


# ---------------------------------------------------------------------------- files and bad input
def _scores_for(model, method="eap"):
    return attribute(model, [random_batch(seed=9)], method)


def test_scores_file_round_trip(tmp_path):
    model = EdgeModel.from_hf(build("gpt2"))
    scores = _scores_for(model, "eap-ig")
    path = save_scores(scores, tmp_path / "s.safetensors")
    back = load_scores(path)
    assert back.method == "eap-ig" and back.edges == model.graph.edges and torch.equal(back.values, scores.values)
    assert back.settings["ig_steps"] == 5 and back.settings["metric"] == "logit_diff"
    assert back.graph == scores.graph and back.wall_time_s == pytest.approx(scores.wall_time_s)
    check_graph(back, model)


def test_scores_from_another_graph_are_refused(tmp_path):
    scores = _scores_for(EdgeModel.from_hf(build("gpt2")))
    path = save_scores(scores, tmp_path / "s.safetensors")
    other = EdgeModel.from_hf(build("gpt2", n_layer=3))
    with pytest.raises(ScoresError, match="scores are for another graph .*2 layers.* has .*3 layers"):
        check_graph(load_scores(path), other)


def test_a_masks_file_is_not_a_scores_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"edge_log_alpha": torch.zeros(3)}, str(tmp_path / "masks.safetensors"))
    with pytest.raises(ScoresError, match="not an edgeprune scores file.*pass the run directory"):
        load_scores(tmp_path / "masks.safetensors")


@pytest.mark.parametrize("bad", [[0], [-1, 10], [100.5], [float("nan")], ["ten"], []])
def test_budgets_outside_0_100_are_errors(bad):
    with pytest.raises(ValueError, match=r"outside \(0, 100\]|not a number|no edge budgets"):
        check_budgets(bad)


def test_unknown_method_is_an_error():
    model = EdgeModel.from_hf(build("gpt2"))
    with pytest.raises(ValueError, match="unknown method 'eap-gi'; known methods: eap, eap-ig, acdc"):
        attribute(model, [random_batch()], "eap-gi")


def test_cli_rejects_unknown_method_and_bad_budgets(capsys):
    from edgeprune.cli import main
    with pytest.raises(SystemExit) as err:
        main(["attribute", "configs/stories_names.yaml", "--method", "acdcc"])
    assert err.value.code == 2 and "invalid choice: 'acdcc'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["curve", "x.safetensors", "-o", "out", "--budgets", "0.1,0,10"])
    assert err.value.code == 2 and "outside (0, 100]" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the benchmark, tiny
def test_bench_tiny_writes_curve_plot_and_comparison_table(tmp_path, capsys):
    require_shared(STORIES)
    spec = importlib.util.spec_from_file_location("bench_baselines", ROOT / "bench" / "baselines.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench"
    assert bench.main(["--tiny", "--out", str(out), "--no-progress"]) == 0
    png = out / "curve" / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads((out / "curve" / "curve.json").read_text())
    assert set(curve["methods"]) == {"edge-pruning", "eap", "eap-ig"}
    for label, entry in curve["methods"].items():
        assert 0 <= entry["cmd"] and math.isfinite(entry["cpr"]), label
        for p in entry["points"]:
            assert 0 < p["edges"] <= curve["total_edges"] and math.isfinite(p["faithfulness"])
    assert [p["budget_percent"] for p in curve["methods"]["eap"]["points"]] == [1.0, 10.0, 100.0]
    assert curve["methods"]["eap"]["points"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert len(curve["methods"]["edge-pruning"]["points"]) == 2
    table = json.loads((out / "compare" / "compare.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"edge-pruning", "eap", "eap-ig"}
    assert rows["eap"]["edges"] <= rows["edge-pruning"]["edges"] == table["n_edges"]
    assert all(r["wall_time_s"] is not None and r["wall_time_s"] > 0 for r in rows.values())
    md = (out / "compare" / "compare.md").read_text()
    assert "| edge-pruning |" in md and "| eap-ig |" in md
