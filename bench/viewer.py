"""Page size and load time of `edgeprune view` for GPT-2 small's full graph (32,936 edges), in headless Chromium.

    python bench/viewer.py [--cap 5000] [--chromium /usr/bin/chromium]

Random scores on the graph of GPT-2 small (12 layers, 12 heads, token + position embeddings; the graph
depends on the shape only, so no weights are built). Load time: navigation start to the page's
ready flag (first render done); slider: one move re-extracting the circuit (dangling rule) and redrawing.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=DEFAULT_CAP)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    graph = Graph(GraphSpec(n_layers=12, n_heads=12))
    assert graph.num_edges == 32936, graph.describe()
    work = Path(tempfile.mkdtemp(prefix="edgeprune-bench-viewer-"))
    fp = {"n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "pos_embeds": True, "mlp": True,
          "num_edges": graph.num_edges, "num_writers": graph.num_writers}
    scores = work / "scores_eap.safetensors"
    save_scores(Scores("eap", torch.randn(graph.num_edges, generator=torch.Generator().manual_seed(0)),
                       graph.edges, fp, model_id="gpt2 (random scores)"), scores)
    t0 = time.perf_counter()
    page_path = write_html(build_payload([load_source(scores)], cap=args.cap, initial=[args.cap]), work / "gpt2.html")
    build_s = time.perf_counter() - t0
    print(f"graph: {graph.describe()}; cap {args.cap}")
    print(f"page: {page_path.stat().st_size / 1024:.0f} KiB, written in {build_s:.2f} s")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(work / "profile"), executable_path=args.chromium,
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
        for size in (args.cap // 2, 1000, 200):
            ms = page.evaluate(f"(() => {{ const t = performance.now(); window.edgeprune.setSize(0, {size}); "
                               "return performance.now() - t; })()")
            print(f"slider to {size}: {ms:.0f} ms ({page.locator('#edges path.edge').count()} edges after dangling removal)")
        print(f"page errors: {errors or 'none'}")
        ctx.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
