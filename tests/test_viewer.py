"""The circuit viewer (``edgeprune view``): its payload, its errors, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from edgeprune.baselines.scores import Scores, save_scores
from edgeprune.baselines.selection import select_top
from edgeprune.cli import main
from edgeprune.graph import Graph, GraphSpec
from edgeprune.viewer import build_payload, load_source, write_html
from edgeprune.viewer.page import render

SNAPSHOT = Path(__file__).parent / "snapshots" / "viewer_payload.json"
CHROMIUM = os.environ.get("EDGEPRUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def fingerprint(graph: Graph) -> dict:
    s = graph.spec
    return {"n_layers": s.n_layers, "n_heads": s.n_heads, "n_kv_heads": s.kv_heads, "pos_embeds": s.pos_embeds,
            "mlp": s.mlp, "num_edges": graph.num_edges, "num_writers": graph.num_writers}


def write_scores(path: Path, graph: Graph, seed: int = 0, method: str = "eap") -> torch.Tensor:
    """Deterministic scores with no ties in |score| (a formula, not an RNG: the snapshot must not drift)."""
    n = graph.num_edges
    values = torch.tensor([((i * 7919 + seed * 104729) % 1009 - 504.5) / 100 for i in range(n)])
    save_scores(Scores(method, values, graph.edges, fingerprint(graph), model_id="test"), path)
    return values


@pytest.fixture
def small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    graph = Graph(GraphSpec(n_layers=2, n_heads=4))
    values = write_scores(Path("a.safetensors"), graph)
    return graph, values


# ------------------------------------------------------------------ payload (no browser)
def test_payload_snapshot_is_deterministic(small):
    payload = build_payload([load_source("a.safetensors")], cap=50, initial=[20])
    text = json.dumps(payload, sort_keys=True, indent=1)
    if os.environ.get("EDGEPRUNE_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(text + "\n")
    assert text + "\n" == SNAPSHOT.read_text()
    assert render(payload) == render(build_payload([load_source("a.safetensors")], cap=50, initial=[20]))


def test_page_ships_only_top_k_and_no_network_references(small):
    payload = build_payload([load_source("a.safetensors")], cap=25)
    src = payload["sources"][0]
    assert src["shipped"] == 25 and src["candidates"] == 137 and len(src["w"]) == 25
    html = render(payload)
    assert "http://" not in html.replace('http://www.w3.org/2000/svg', "") and "https://" not in html
    assert "<script src" not in html and "<link" not in html


def test_not_a_circuit_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text('{"model": "gpt2"}')
    assert main(["view", str(bad), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "config.json: not a circuit" in err and "Traceback" not in err
    (tmp_path / "notes.json").write_text("[1, 2")
    assert main(["view", str(tmp_path / "notes.json"), "-o", str(tmp_path / "x.html")]) == 2
    assert "invalid JSON at line 1" in capsys.readouterr().err


def test_scores_for_a_graph_that_does_not_match_are_refused(tmp_path, capsys):
    graph = Graph(GraphSpec(n_layers=2, n_heads=4))
    other = Graph(GraphSpec(n_layers=3, n_heads=4))
    values = torch.ones(graph.num_edges)
    save_scores(Scores("eap", values, graph.edges, fingerprint(other)), tmp_path / "s.safetensors")
    assert main(["view", str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "x.html")]) == 2
    assert "do not match their graph" in capsys.readouterr().err
    write_scores(tmp_path / "a.safetensors", graph)
    write_scores(tmp_path / "b.safetensors", other)
    assert main(["view", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "-o", str(tmp_path / "x.html")]) == 2
    assert "different graphs" in capsys.readouterr().err


def test_edges_not_in_the_circuit_json_graph_are_refused(tmp_path, capsys):
    (tmp_path / "edges.json").write_text(json.dumps([["a0.h1", "a5.h0.q"]]))
    (tmp_path / "circuit.json").write_text(json.dumps({"graph": fingerprint(Graph(GraphSpec(2, 4))),
                                                       "edges_file": "edges.json"}))
    assert main(["view", str(tmp_path / "edges.json"), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "edges.json" in err and "a5.h0.q" in err


# ------------------------------------------------------------------ the page in headless Chromium
def _browser_or_skip():
    # CI sets EDGEPRUNE_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip
    missing = pytest.fail if os.environ.get("EDGEPRUNE_REQUIRE_BROWSER") == "1" else pytest.skip
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium; make install does it)")
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        missing('the playwright Python package is missing (pip install -e ".[dev]")')
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _browser_or_skip()
    profile = tempfile.mkdtemp(prefix="edgeprune-chromium-")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                                    else shutil.which("chromium"), headless=True,
                                                    args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        yield ctx
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def open_page(browser):
    """Open an HTML file; after the test, assert no console errors and no request but the file itself."""
    pages = []

    def open_(path: Path, fragment: str = ""):
        page = browser.new_page()
        page.errors, page.requests = [], []
        page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("request", lambda r: page.requests.append(r.url.split("#")[0]))
        url = Path(path).resolve().as_uri()
        page.goto(url + (f"#{fragment}" if fragment else ""))
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        pages.append((page, url))
        return page

    yield open_
    for page, url in pages:
        assert page.errors == [], page.errors
        assert page.requests == [url], page.requests
        page.close()


def page_edges(page) -> set[tuple[str, str]]:
    return {tuple(x) for x in page.eval_on_selector_all("#edges path.edge",
                                                        "els => els.map(e => [e.dataset.w, e.dataset.r])")}


def test_slider_matches_python_selection_and_hover_names_the_edge(small, open_page, tmp_path):
    graph, values = small
    path = write_html(build_payload([load_source("a.safetensors")], cap=60, initial=[12]), tmp_path / "a.html")
    page = open_page(path)
    for n in (12, 0, 1, 5, 30, 60):
        if n != 12:
            page.fill("#slider-0", str(n))  # an input event, as dragging the slider sends
        want = {e for e, k in zip(graph.edges, select_top(graph, values.abs(), n).tolist()) if k}
        got = page_edges(page)
        assert got == want, n
        assert page.locator("#edges path.edge").count() == len(want) == int(page.inner_text("#count-0").replace(",", ""))
    page.fill("#slider-0", "30")
    assert page.locator("#edges path.edge").count() > 0
    last = page.locator("#edges path.edge").last  # drawn last: on top, so the mouse reaches it
    w, r = last.get_attribute("data-w"), last.get_attribute("data-r")
    last.hover()
    assert f"{w} \u2192 {r}" in page.inner_text("#info")
    page.click(f"#nodes g[data-name='{w}'] rect")
    assert page.locator("#nodes g.sel").count() == 1
    artifacts = Path(os.environ.get("EDGEPRUNE_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = page.screenshot(path=str(artifacts / "viewer.png"))
    assert len(shot) > 5000


def test_gqa_slider_uses_the_group_feeding_rule(tmp_path, monkeypatch, open_page):
    monkeypatch.chdir(tmp_path)
    graph = Graph(GraphSpec(n_layers=2, n_heads=4, n_kv_heads=2, pos_embeds=False))
    values = write_scores(Path("g.safetensors"), graph, seed=3)
    page = open_page(write_html(build_payload([load_source("g.safetensors")], initial=[40]), tmp_path / "g.html"))
    for n in (40, 15, 80):
        page.fill("#slider-0", str(n))
        assert page_edges(page) == {e for e, k in zip(graph.edges, select_top(graph, values.abs(), n).tolist()) if k}


def test_run_directory_page_draws_the_run_circuit(tmp_path, open_page):
    from conftest import build, prune_tiny
    from edgeprune.export import export_run

    result = prune_tiny(build("gpt2", vocab_size=512), tmp_path, "gpt2")
    circuit, _ = export_run(result.output_dir, result.output_dir / "edges.json")
    assert main(["view", str(result.output_dir)]) == 0
    page = open_page(result.output_dir / "circuit.html")
    assert page.locator("#edges path.edge").count() == circuit.counts["edges"]
    assert page_edges(page) == set(circuit.edges)
    page2 = open_page(write_html(build_payload([load_source(result.output_dir / "edges.json")]), tmp_path / "e.html"))
    assert page_edges(page2) == set(circuit.edges)


def test_two_circuits_show_intersection_and_iou(small, tmp_path, open_page):
    graph, values = small
    other = write_scores(Path("b.safetensors"), graph, seed=5)
    page = open_page(write_html(build_payload([load_source("a.safetensors"), load_source("b.safetensors")],
                                              initial=[30, 40]), tmp_path / "ab.html"))
    a = {e for e, k in zip(graph.edges, select_top(graph, values.abs(), 30).tolist()) if k}
    b = {e for e, k in zip(graph.edges, select_top(graph, other.abs(), 40).tolist()) if k}
    assert int(page.inner_text("#count-both")) == len(a & b)
    assert page.locator("#edges path.both").count() == len(a & b)
    assert page.locator("#edges path.only-a").count() == len(a - b)
    assert page.locator("#edges path.only-b").count() == len(b - a)
    assert float(page.inner_text("#iou")) == pytest.approx(len(a & b) / len(a | b), abs=1e-4)


def test_empty_circuit_page_says_it_is_empty(tmp_path, open_page):
    (tmp_path / "edges.json").write_text("[]")
    assert main(["view", str(tmp_path / "edges.json"), "-o", str(tmp_path / "empty.html")]) == 0
    page = open_page(tmp_path / "empty.html")
    assert page.locator("#edges path.edge").count() == 0
    assert page.is_visible("#empty") and "empty circuit" in page.inner_text("#empty")


def test_serve_serves_the_page_on_localhost(small, tmp_path):
    import threading
    import urllib.request

    from edgeprune.viewer import serve

    path = write_html(build_payload([load_source("a.safetensors")]), tmp_path / "s.html")
    urls = []
    ready = threading.Event()
    threading.Thread(target=serve, args=(path, 0, lambda u: (urls.append(u), ready.set())), daemon=True).start()
    assert ready.wait(10)
    assert urls[0].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(urls[0], timeout=10) as resp:
        assert resp.read() == path.read_bytes()


# ------------------------------------------------------------------ position-aware circuits
def _positional_scores(path: Path, graph: Graph, spans: list[str]) -> torch.Tensor:
    from edgeprune.graph import span_edges

    edges = span_edges(graph, spans)
    n = len(edges)
    values = torch.tensor([((i * 7919) % 1013 - 506.5) / 100 for i in range(n)])
    save_scores(Scores("eap", values, edges, {**fingerprint(graph), "spans": spans, "positions": "spans"},
                       model_id="test"), path)
    return values


def test_position_aware_payload_has_a_column_per_span_and_the_kv_feeding_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    graph, spans = Graph(GraphSpec(n_layers=2, n_heads=4)), ["IO", "END"]
    _positional_scores(Path("p.safetensors"), graph, spans)
    payload = build_payload([load_source("p.safetensors")], cap=400)
    assert payload["spans"] == spans and payload["total_edges"] == 2 * graph.num_edges
    names = [n["name"] for n in payload["nodes"]]
    x = {n["name"]: n["x"] for n in payload["nodes"]}
    assert x["resid_post@IO"] < x["resid_post@END"] and [c["label"] for c in payload["columns"]] == spans
    idx = {n: i for i, n in enumerate(names)}
    k_input = idx["a1.h2.k@IO"]
    assert sorted(names[i] for i in payload["feeds"][k_input]) == ["a1.h2@END", "a1.h2@IO"]  # K/V: every span
    assert [names[i] for i in payload["guides"][k_input]] == ["a1.h2@IO"]  # drawn in its own column
    assert [names[i] for i in payload["feeds"][idx["a1.h2.q@END"]]] == ["a1.h2@END"]
    other = Graph(GraphSpec(n_layers=2, n_heads=4))
    write_scores(Path("shared.safetensors"), other)
    with pytest.raises(ValueError, match="different spans"):
        build_payload([load_source("p.safetensors"), load_source("shared.safetensors")])


def test_position_aware_slider_matches_python_selection(tmp_path, monkeypatch, open_page):
    monkeypatch.chdir(tmp_path)
    graph, spans = Graph(GraphSpec(n_layers=2, n_heads=4)), ["IO", "END", "other"]
    values = _positional_scores(Path("p.safetensors"), graph, spans)
    from edgeprune.graph import span_edges

    names = span_edges(graph, spans)
    page = open_page(write_html(build_payload([load_source("p.safetensors")], initial=[30]), tmp_path / "p.html"))
    for n in (30, 5, 90, 200):
        page.fill("#slider-0", str(n))
        want = {(f"{w}@{s}", f"{r}@{s}") for (w, r, s), k in
                zip(names, select_top(graph, values.abs(), n, n_spans=len(spans)).tolist()) if k}
        assert page_edges(page) == want, n
    assert page.locator("#rows text", has_text="END").count() >= 1


def test_edge_width_follows_rank_within_what_is_shown(small, open_page, tmp_path):
    """Rank 1 is the widest edge, widths never grow with rank, and negative signed scores are dashed."""
    graph, values = small
    page = open_page(write_html(build_payload([load_source("a.safetensors")], cap=60, initial=[40]), tmp_path / "w.html"))
    drawn = page.eval_on_selector_all("#edges path.edge", "els => els.map(e => [Number(e.dataset.rank), "
                                      "Number(e.getAttribute('stroke-width')), e.getAttribute('stroke-dasharray'), "
                                      "e.dataset.w, e.dataset.r])")
    by_rank = sorted(drawn)
    widths = [w for _, w, *_ in by_rank]
    assert widths[0] == max(widths) and all(a >= b for a, b in zip(widths, widths[1:]))
    score = {e: float(v) for e, v in zip(graph.edges, values.tolist())}
    for _, _, dash, w, r in drawn:
        assert (dash is not None) == (score[(w, r)] < 0), (w, r)


def test_a_200k_edge_page_renders_and_its_slider_moves(tmp_path, monkeypatch, open_page):
    """A position-aware GPT-2-small-sized graph (32,936 edges x 6 spans = 197,616 (edge, span) pairs),
    every pair shipped: no array spread or recursion that depends on the graph size."""
    monkeypatch.chdir(tmp_path)
    graph = Graph(GraphSpec(n_layers=12, n_heads=12))
    spans = ["IO", "S1", "S2", "END", "other", "predict"]
    n = graph.num_edges * len(spans)
    values = torch.randn(n, generator=torch.Generator().manual_seed(0))
    edges = [(w, r, s) for s in spans for (w, r) in graph.edges]
    fp = graph.fingerprint(spans, "spans")
    save_scores(Scores("eap", values, edges, fp, model_id="gpt2 (random)"), Path("big.safetensors"))
    page = open_page(write_html(build_payload([load_source("big.safetensors")], cap=n, initial=[20_000]),
                                tmp_path / "big.html"))
    assert page.locator("#edges path.edge").count() > 0
    page.fill("#slider-0", "60000")
    assert page.locator("#edges path.edge").count() > 0


def _table(page, k: int = 0) -> tuple[str, str]:
    t = page.locator(f"#src-{k} table.m")
    return t.get_attribute("data-kind"), t.inner_text()


def test_panel_shows_only_figures_measured_for_the_circuit_on_screen(small, open_page, tmp_path):
    graph, values = small
    src = load_source("a.safetensors")
    key = values.abs()
    count = lambda n: int(select_top(graph, key, n).sum())  # noqa: E731
    src.points = [{"prefix": n, "edges": count(n), "faithfulness": f, "kl": 1 - f, "split": "validation",
                   "source": "view"} for n, f in ((40, 0.25), (90, 0.75))]
    page = open_page(write_html(build_payload([src], cap=graph.num_edges, initial=[40]), tmp_path / "p.html"))
    kind, text = _table(page)
    assert kind == "measured" and "0.25" in text and f"{count(40)} edges" in text
    page.fill("#slider-0", "60")  # between the two measured sizes: neither figure as if it were this one's
    kind, text = _table(page)
    assert kind == "between" and "not measured" in text and "0.25" in text and "0.75" in text
    page.fill("#slider-0", "0")
    kind, text = _table(page)
    assert kind == "empty" and "0 (by definition)" in text
    page.fill("#slider-0", str(graph.num_edges))
    kind, text = _table(page)
    assert kind == "full" and "1 (by definition)" in text
    assert page.locator("#src-0 svg.plot").count() == 1  # faithfulness vs edges, a marker at the slider


def test_find_node_by_prefix_and_a_removed_node_drops_the_selection(small, open_page, tmp_path):
    page = open_page(write_html(build_payload([load_source("a.safetensors")], cap=60, initial=[60]), tmp_path / "s.html"))
    page.fill("#search", "a1")
    page.dispatch_event("#search", "change")
    selected = page.locator("#nodes g.sel")
    assert selected.count() == 1 and selected.get_attribute("data-name").startswith("a1")
    assert "start with a1" in page.inner_text("#info")
    page.fill("#slider-0", "0")  # the node leaves the circuit: no stale selection, no faded graph
    assert page.locator("#nodes g.sel").count() == 0 and page.locator(".faded").count() == 0
    assert "not in the circuit" in page.inner_text("#info")


def test_view_measures_the_slider_at_log_spaced_sizes(tmp_path):
    from conftest import build, prune_tiny
    from edgeprune.rundir import load_run_config
    from edgeprune.viewer.measure import measure

    result = prune_tiny(build("gpt2", vocab_size=512), tmp_path, "gpt2")
    run = result.output_dir
    src = load_source(run)
    points = measure(src, load_run_config(run), cap=len(src.edges), run_dir=run)
    graph = src.graph
    order = torch.tensor([graph.edges.index(tuple(e)) for e in src.edges])
    for p in points:
        kept = torch.zeros(graph.num_edges, dtype=torch.bool)
        kept[order[:p["prefix"]]] = True
        from edgeprune.circuit import remove_dangling
        assert p["edges"] == int(remove_dangling(graph, kept).sum())  # the slider's circuit at that prefix
    assert len(points) >= 12 and src.default_n in [p["prefix"] for p in points]
    full = [p for p in points if p["prefix"] == len(src.edges)][0]
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-5) and full["kl"] == pytest.approx(0.0, abs=1e-5)


def test_edges_within_one_column_are_bowed_apart(tmp_path, monkeypatch, open_page):
    """MLP -> MLP and MLP -> resid_post edges share a column: each is bowed, the longer further, so
    none runs straight through the boxes between and m0 -> m3 is told from m0 -> m1."""
    monkeypatch.chdir(tmp_path)
    graph = Graph(GraphSpec(n_layers=4, n_heads=2))
    circuit = [("m0", "m1"), ("m0", "m3"), ("m1", "m3"), ("m3", "resid_post"), ("m0", "resid_post"),
               ("tok_embeds", "m0")]
    Path("edges.json").write_text(json.dumps(circuit))
    Path("circuit.json").write_text(json.dumps({"graph": graph.fingerprint()}))
    page = open_page(write_html(build_payload([load_source("edges.json")]), tmp_path / "c.html"))
    width = {tuple(e): w for *e, w in page.eval_on_selector_all(
        "#edges path.edge", "els => els.map(e => [e.dataset.w, e.dataset.r, e.getBBox().width])")}
    aligned = [("m0", "m1"), ("m0", "m3"), ("m1", "m3"), ("m3", "resid_post"), ("m0", "resid_post")]
    assert all(width[e] > 5 for e in aligned), width
    assert width[("m0", "m3")] > width[("m0", "m1")] and width[("m0", "resid_post")] > width[("m3", "resid_post")]


def test_export_from_the_page_equals_edgeprune_export(tmp_path, open_page):
    from conftest import build, prune_tiny

    result = prune_tiny(build("llama", vocab_size=512), tmp_path, "llama")  # GQA: grouped K/V readers
    run = result.output_dir
    assert main(["export", str(run), "-o", str(run / "edges.json")]) == 0
    assert main(["view", str(run), "--no-eval"]) == 0
    page = open_page(run / "circuit.html")  # opens at the run's own circuit
    assert json.loads(page.evaluate("window.edgeprune.exportEdges(0)")) == json.loads((run / "edges.json").read_text())
    with page.expect_download() as info:
        page.click("#export-0")
    assert json.loads(Path(info.value.path()).read_text()) == json.loads((run / "edges.json").read_text())


def test_view_state_in_the_url_reopens_the_same_view(small, open_page, tmp_path):
    path = write_html(build_payload([load_source("a.safetensors")], cap=80, initial=[40]), tmp_path / "u.html")
    page = open_page(path)
    page.fill("#slider-0", "55")
    names = page.eval_on_selector_all("#nodes g", "els => els.map(e => e.dataset.name)")
    heads = [n for n in names if n.startswith("a") and n.count(".") == 1][:2]  # heads: drawn as boxes
    page.click(f"#nodes g[data-name='{heads[0]}'] rect")
    page.click(f"#nodes g[data-name='{heads[1]}'] rect", modifiers=["Shift"])  # pin a second node
    page.select_option("#mode", "up")
    state, edges = page.evaluate("window.edgeprune.state()"), page_edges(page)
    assert state["n"] == [55] and sorted(state["pins"]) == sorted(heads) and page.locator("#nodes g.sel").count() == 2
    fragment = page.evaluate("location.hash").lstrip("#")
    again = open_page(path, fragment)
    assert again.evaluate("window.edgeprune.state()")["n"] == [55] and page_edges(again) == edges
    assert sorted(again.evaluate("window.edgeprune.state()")["pins"]) == sorted(heads)
    assert again.input_value("#mode") == "up" and again.locator("#nodes g.sel").count() == 2


def test_wheel_zooms_drag_pans_and_the_page_opens_fitted(small, open_page, tmp_path):
    page = open_page(write_html(build_payload([load_source("a.safetensors")], cap=80, initial=[60]), tmp_path / "z.html"))
    box = page.locator("#canvas").bounding_box()
    nodes = page.locator("#nodes").bounding_box()  # fitted: the drawn nodes are inside the visible canvas
    assert nodes["x"] >= box["x"] - 1 and nodes["y"] >= box["y"] - 1
    assert nodes["x"] + nodes["width"] <= box["x"] + box["width"] + 1 and nodes["y"] + nodes["height"] <= box["y"] + box["height"] + 1
    z0 = page.evaluate("window.edgeprune.state().zoom")
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)
    z1 = page.evaluate("window.edgeprune.state().zoom")
    assert z1 > z0
    before = page.evaluate("[canvas.scrollLeft, canvas.scrollTop]")
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 - 80, box["y"] + box["height"] / 2 - 60, steps=4)
    page.mouse.up()
    assert page.evaluate("[canvas.scrollLeft, canvas.scrollTop]") != before


def test_compare_lock_keeps_both_circuits_at_equal_size(small, open_page, tmp_path):
    graph, _ = small
    write_scores(Path("b.safetensors"), graph, seed=5, method="eap-ig")
    page = open_page(write_html(build_payload([load_source("a.safetensors"), load_source("b.safetensors")], cap=137),
                                tmp_path / "ab.html"))
    page.check("#lock")
    for n in (30, 90):
        page.fill("#slider-0", str(n))
        a, b = (int(page.inner_text(f"#count-{k}").replace(",", "")) for k in (0, 1))
        assert abs(a - b) <= max(2, a // 10), (n, a, b)
    name = page.eval_on_selector_all("#nodes g", "els => els.map(e => e.dataset.name)")[0]
    page.hover(f"#nodes g[data-name='{name}']")
    info = page.inner_text("#info")
    assert "A: in-degree" in info and "B: in-degree" in info  # degrees per circuit


def test_position_aware_page_shows_an_example_prompts_tokens_under_the_span_columns(tmp_path, monkeypatch,
                                                                                   open_page):
    from conftest import STORIES, require_shared
    from edgeprune.config import load_config
    from edgeprune.viewer.measure import span_tokens

    require_shared(STORIES)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "stories_names_spans.yaml")
    tokens = span_tokens(cfg, ["NAME", "END", "other", "predict"])
    assert tokens["NAME"].strip() and tokens["NAME"].strip()[0].isupper()  # a character's name
    monkeypatch.chdir(tmp_path)
    graph = Graph(GraphSpec(n_layers=2, n_heads=2))
    spans = ["NAME", "END", "other", "predict"]
    edges = [(w, r, s) for s in spans for (w, r) in graph.edges]
    values = torch.randn(len(edges), generator=torch.Generator().manual_seed(0))
    save_scores(Scores("eap", values, edges, graph.fingerprint(spans, "spans"), model_id="t"), Path("s.safetensors"))
    page = open_page(write_html(build_payload([load_source("s.safetensors")], initial=[200], span_tokens=tokens),
                                tmp_path / "s.html"))
    shown = page.eval_on_selector_all("text.tokens", "els => els.map(e => e.textContent)")
    assert json.dumps(tokens["NAME"]) in shown and len(shown) == len(tokens)
