"""Page size and load time of `edgeprune view`, and time and file size of `edgeprune draw`, on real graph sizes.

    python bench/viewer.py [--graphs gpt2,smollm2,gpt2-spans] [--cap 5000] [--draw 1400] [--screenshots DIR]
    python bench/viewer.py --graphs gpt2-spans --cap 0     # every one of the 197,616 (edge, span) pairs shipped

Random scores on the graph of GPT-2 small (12 layers, 12 heads, token + position embeddings: 32,936
edges), of SmolLM2-135M (30 layers, 9 query / 3 KV heads, rotary: 70,651 edges) and GPT-2 small with
6 spans (position-aware: 197,616 (edge, span) pairs); the graph depends
on the shape only, so no weights are built. Load time: navigation start to the page's ready flag
(first render done); slider: one move re-extracting the circuit (dangling rule) and redrawing. Drawing:
the top-N circuit (dangling edges removed) through graphviz ``dot`` to SVG, N from ``--draw``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from edgeprune.baselines.scores import Scores, save_scores
from edgeprune.graph import Graph, GraphSpec
from edgeprune.viewer import DEFAULT_CAP, build_payload, load_source, write_html

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


SPANS = ["IO", "S1", "S2", "END", "other", "predict"]
GRAPHS = {"stories": (GraphSpec(n_layers=5, n_heads=8, n_kv_heads=4, pos_embeds=False), 1701, None),  # stories260K
          "gpt2": (GraphSpec(n_layers=12, n_heads=12), 32936, None),
          "smollm2": (GraphSpec(n_layers=30, n_heads=9, n_kv_heads=3, pos_embeds=False), 70651, None),
          "gpt2-spans": (GraphSpec(n_layers=12, n_heads=12), 32936, SPANS)}  # 197,616 (edge, span) pairs


def scores_file(name: str, work: Path) -> tuple[Graph, Path, int]:
    """A scores file of random scores on the graph (per (edge, span) for a position-aware one)."""
    spec, edges, spans = GRAPHS[name]
    graph = Graph(spec)
    assert graph.num_edges == edges, graph.describe()
    names = graph.edges if spans is None else [(w, r, s) for s in spans for (w, r) in graph.edges]
    path = work / f"scores_{name}.safetensors"
    save_scores(Scores("eap", torch.randn(len(names), generator=torch.Generator().manual_seed(0)), names,
                       graph.fingerprint(spans, "spans" if spans else None), model_id=f"{name} (random scores)"), path)
    return graph, path, len(names)


def bench_draw(graph: Graph, scores: torch.Tensor, sizes: list[int], work: Path) -> None:
    from edgeprune.baselines.selection import select_top
    from edgeprune.draw import draw_circuit

    for n in sizes:
        kept = select_top(graph, scores.abs(), n)
        edges = [e for e, k in zip(graph.edges, kept.tolist()) if k]
        t0 = time.perf_counter()
        group = graph.spec.n_heads // graph.spec.kv_heads if graph.spec.grouped else None
        out = draw_circuit(edges, work / f"circuit_{n}.svg", heads_per_group=group)
        print(f"draw top {n} ({len(edges)} edges after dangling removal): {time.perf_counter() - t0:.1f} s, "
              f"{Path(out).stat().st_size / 1024:.0f} KiB SVG")


def bench_page(page_path: Path, cap: int, chromium: str, work: Path, screenshots: str | None = None) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(work / "profile"), executable_path=chromium,
                                                    headless=True, args=ARGS, viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for run in range(3):
            page.goto(page_path.resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            load_ms = page.evaluate("performance.now()")
            n = page.locator("#edges path.edge").count()
            print(f"load {run + 1}: {load_ms:.0f} ms to first render ({n} edges drawn at the cap)")
        for size in (cap // 2, 1000, 200):
            ms = page.evaluate(f"(() => {{ const t = performance.now(); window.edgeprune.setSize(0, {size}); "
                               "return performance.now() - t; })()")
            print(f"slider to {size}: {ms:.0f} ms ({page.locator('#edges path.edge').count()} edges after dangling removal)")
        print(f"page errors: {errors or 'none'}")
        if screenshots:
            Path(screenshots).mkdir(parents=True, exist_ok=True)
            page.evaluate("window.edgeprune.setSize(0, 600)")
            page.screenshot(path=str(Path(screenshots) / f"{page_path.stem}.png"))
        ctx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="gpt2,smollm2,gpt2-spans", help=f"comma-separated: {', '.join(GRAPHS)}")
    ap.add_argument("--cap", type=int, default=DEFAULT_CAP, help="edges shipped in the page (0: every edge)")
    ap.add_argument("--screenshots", help="also save a screenshot of each page in this directory")
    ap.add_argument("--draw", default="1400", help="circuit sizes to draw with dot (empty: none)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeprune-bench-viewer-"))
    for name in args.graphs.split(","):
        graph, scores, n = scores_file(name, work)
        cap = n if args.cap == 0 else args.cap
        print(f"\n{name}: {graph.describe()}{'' if n == graph.num_edges else f' x {n // graph.num_edges} spans'}; "
              f"cap {cap}")
        t0 = time.perf_counter()
        page_path = write_html(build_payload([load_source(scores)], cap=cap, initial=[min(cap, 20_000)]),
                               work / f"{name}.html")
        print(f"page: {page_path.stat().st_size / 1024:.0f} KiB, written in {time.perf_counter() - t0:.2f} s")
        bench_page(page_path, min(cap, 20_000), args.chromium, work, args.screenshots)
        if args.draw and GRAPHS[name][2] is None:
            values = torch.randn(graph.num_edges, generator=torch.Generator().manual_seed(0))
            bench_draw(graph, values, [int(n) for n in args.draw.split(",")], work)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
