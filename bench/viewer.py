"""Page size and load time of `edgeprune view`, and time and file size of `edgeprune draw`, on real graph sizes.

    python bench/viewer.py [--graphs gpt2,smollm2] [--cap 5000] [--draw 1400,5000] [--chromium /usr/bin/chromium]

Random scores on the graph of GPT-2 small (12 layers, 12 heads, token + position embeddings: 32,936
edges) and of SmolLM2-135M (30 layers, 9 query / 3 KV heads, rotary: 70,651 edges); the graph depends
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


GRAPHS = {"gpt2": (GraphSpec(n_layers=12, n_heads=12), 32936),
          "smollm2": (GraphSpec(n_layers=30, n_heads=9, n_kv_heads=3, pos_embeds=False), 70651)}


def scores_file(name: str, work: Path) -> tuple[Graph, Path]:
    spec, edges = GRAPHS[name]
    graph = Graph(spec)
    assert graph.num_edges == edges, graph.describe()
    fp = {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "n_kv_heads": spec.kv_heads,
          "pos_embeds": spec.pos_embeds, "mlp": True, "num_edges": graph.num_edges, "num_writers": graph.num_writers}
    path = work / f"scores_{name}.safetensors"
    save_scores(Scores("eap", torch.randn(graph.num_edges, generator=torch.Generator().manual_seed(0)),
                       graph.edges, fp, model_id=f"{name} (random scores)"), path)
    return graph, path


def bench_draw(graph: Graph, scores: torch.Tensor, sizes: list[int], work: Path) -> None:
    from edgeprune.baselines.selection import select_top
    from edgeprune.draw import draw_circuit

    for n in sizes:
        kept = select_top(graph, scores.abs(), n)
        edges = [e for e, k in zip(graph.edges, kept.tolist()) if k]
        t0 = time.perf_counter()
        out = draw_circuit(edges, work / f"circuit_{n}.svg")
        print(f"draw top {n} ({len(edges)} edges after dangling removal): {time.perf_counter() - t0:.1f} s, "
              f"{Path(out).stat().st_size / 1024:.0f} KiB SVG")


def bench_page(page_path: Path, cap: int, chromium: str, work: Path) -> None:
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
        ctx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", default="gpt2,smollm2", help=f"comma-separated: {', '.join(GRAPHS)}")
    ap.add_argument("--cap", type=int, default=DEFAULT_CAP)
    ap.add_argument("--draw", default="1400,5000", help="circuit sizes to draw with dot (empty: none)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeprune-bench-viewer-"))
    for name in args.graphs.split(","):
        graph, scores = scores_file(name, work)
        print(f"\n{name}: {graph.describe()}; cap {args.cap}")
        t0 = time.perf_counter()
        page_path = write_html(build_payload([load_source(scores)], cap=args.cap, initial=[args.cap]),
                               work / f"{name}.html")
        print(f"page: {page_path.stat().st_size / 1024:.0f} KiB, written in {time.perf_counter() - t0:.2f} s")
        bench_page(page_path, args.cap, args.chromium, work)
        if args.draw:
            values = torch.randn(graph.num_edges, generator=torch.Generator().manual_seed(0))
            bench_draw(graph, values, [int(n) for n in args.draw.split(",")], work)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
