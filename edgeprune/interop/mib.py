"""``edgeprune mib-export``: the files of a MIB circuit-localization submission, one circuit per budget.

MIB takes, per task/model folder (named ``{task}_{model}``, e.g. ``ioi_gpt2``), either one file of
importance scores or one circuit per edge budget b (percent of all edges); the circuit for b must
have at most b% of the edges. This writes the second form: ``circuit_{b}pct.json`` per budget (the
EAP-IG graph JSON, scores included so ``Graph.from_json`` loads it), ``manifest.json`` and a
``README.md`` saying what each file is.

Circuits, per input:
- one scores file, or one Edge Pruning run: a single edge ordering (scores ranked as ``curve``
  ranks them; a run's masks by log_alpha), and for each budget the largest dangling-free circuit
  from a prefix of it (``selection.circuit_of_size``, the function ``edgeprune curve`` uses), so the
  circuits are nested;
- several Edge Pruning runs (one per sparsity): for each budget, the largest run circuit that fits
  (``edgeprune eval``'s circuit of that run); a budget no run fits gets the empty circuit. Circuits of
  separate runs need not be nested.

Counting: MIB counts edges in its own graph, where an ``input`` edge is our tok/pos pair and a GQA
K/V edge is one per query head. ``count="mib"`` (default) keeps every circuit within the budget in
*both* counts (ours: floor(E * b / 100); MIB's: floor(E_mib * b / 100)); the selection shrinks the
prefix only where MIB's count binds, and the manifest says where. ``count="edgeprune"`` uses our
count alone: the circuits are then exactly ``edgeprune curve``'s.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from ..baselines.curve import DEFAULT_BUDGETS, check_budgets
from ..baselines.selection import circuit_of_size, edge_order
from .common import InteropError, model_facts, refuse_existing, write_json
from .convert import source_to_eap_ig
from .eap_ig import MibMap
from .sources import EDGE_PRUNING, load_source

COUNTS = ("mib", "edgeprune")


def budget_limit(total: int, budget: float) -> int:
    """Edges allowed at ``budget`` percent of ``total`` (as ``edgeprune curve``: floor, with float slack)."""
    return int(math.floor(total * budget / 100.0 + 1e-9))


def file_name(budget: float) -> str:
    return f"circuit_{budget:g}pct.json"


def _fit(graph, mmap, key, order, selection, limit_ours, limit_mib, count):
    """The circuit at one budget and whether MIB's count made it smaller than our count alone would."""
    kept = circuit_of_size(graph, key, limit_ours, selection, order=order)
    if count == "edgeprune" or mmap.mib_count(kept) <= limit_mib:
        return kept, False
    lo, hi, best = 0, limit_ours, torch.zeros_like(kept)  # circuits grow with n: binary search
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = circuit_of_size(graph, key, mid, selection, order=order)
        if mmap.mib_count(cand) <= limit_mib:
            best, lo = cand, mid + 1
        else:
            hi = mid - 1
    return best, True


def mib_export(inputs, out_dir: str | Path, *, budgets=DEFAULT_BUDGETS, selection: str = "topn",
               count: str = "mib", d_model: int | None = None, overwrite: bool = False) -> dict:
    """Write the submission files; returns the manifest. Checks everything before writing anything."""
    if count not in COUNTS:
        raise InteropError(f"--count {count!r}: choose one of {', '.join(COUNTS)}")
    budgets = check_budgets(budgets)
    sources = [load_source(p) for p in inputs]
    if not sources:
        raise InteropError("no input: give a run directory, several run directories, or one scores file")
    kinds = {s.kind for s in sources}
    if kinds - {"run", "scores"}:
        raise InteropError(f"{sources[0].path}: mib-export takes run directories or one scores file (for a single "
                           "circuit use `edgeprune convert --to eap-ig`)")
    if "scores" in kinds and len(sources) > 1:
        raise InteropError("give one scores file (one method per submission folder), or run directories only")
    graph = sources[0].graph
    for s in sources[1:]:
        if s.graph.spec != graph.spec:
            raise InteropError(f"{s.path}: another graph ({s.graph.describe()}) than {sources[0].path} "
                               f"({graph.describe()})")
    mmap = MibMap(graph)
    E, E_mib = graph.num_edges, mmap.num_edges
    per_run = len(sources) > 1
    entries, files = [], {}
    width = model_facts(sources[0].model_id, d_model, str(sources[0].path))
    if not per_run:
        src = sources[0]
        key = src.ranking_key()
        order = edge_order(graph, key, selection)
    for b in budgets:
        lim, lim_mib = budget_limit(E, b), budget_limit(E_mib, b)
        if per_run:
            fits = [s for s in sources if int(s.kept.sum()) <= lim and
                    (count == "edgeprune" or mmap.mib_count(s.kept) <= lim_mib)]
            src = max(fits, key=lambda s: int(s.kept.sum()), default=None)
            kept = src.kept if src is not None else torch.zeros(E, dtype=torch.bool)
            shrunk, how = False, (f"the circuit of run {src.path}" if src is not None else "no run fits: empty")
        else:
            kept, shrunk = _fit(graph, mmap, key, order, selection, lim, lim_mib, count)
            how = f"{selection} prefix of the {'log_alpha' if src.method == EDGE_PRUNING else src.method} ordering"
        base = src if src is not None else sources[0]
        data = source_to_eap_ig(_with_circuit(base, kept), width)
        n_mib = sum(e["in_graph"] for e in data["edges"].values())
        name = file_name(b)
        files[name] = data
        entries.append({"budget_percent": b, "file": name, "edges": int(kept.sum()), "limit": lim,
                        "mib_edges": n_mib, "mib_limit": lim_mib, "edge_fraction": int(kept.sum()) / E,
                        "mib_edge_fraction": n_mib / E_mib, "shrunk_for_mib_count": shrunk, "from": how})
    manifest = {"format": "MIB circuit-localization submission (multiple circuits), EAP-IG graph JSON",
                "inputs": [str(s.path) for s in sources], "method": sources[0].method, "selection": selection,
                "count": count, "total_edges": E, "total_mib_edges": E_mib, "graph": graph.describe(),
                "model_id": sources[0].model_id, "circuits": entries}
    out = Path(out_dir)
    refuse_existing([out / n for n in files] + [out / "manifest.json", out / "README.md"], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_json(data, out / name)
    write_json(manifest, out / "manifest.json", indent=2)
    (out / "README.md").write_text(readme(manifest))
    return manifest


def _with_circuit(src, kept):
    return replace(src, kept=kept)


def readme(manifest: dict) -> str:
    lines = [
        "# MIB circuit-localization submission (written by `edgeprune mib-export`)", "",
        f"Model: `{manifest['model_id']}` ({manifest['graph']}; MIB counts {manifest['total_mib_edges']} edges).",
        f"Inputs: {', '.join('`' + i + '`' for i in manifest['inputs'])} (method `{manifest['method']}`, "
        f"selection `{manifest['selection']}`, budgets counted in `{manifest['count']}` edges"
        + (" and ours" if manifest["count"] == "mib" else "") + ").", "",
        "Each `circuit_{b}pct.json` is an EAP-IG graph file (`eap.graph.Graph.from_json` loads it) whose "
        "`in_graph` edges form a circuit with at most b% of the edges, dangling edges removed; the `score` "
        "fields are the ordering the circuits came from. Upload this folder as `{task}_{model}` "
        "(e.g. `ioi_gpt2`); `manifest.json` and this README may stay or go.", "",
        "| file | budget % | edges (ours) | limit | MIB edges | MIB limit | from |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in manifest["circuits"]:
        note = " (shrunk to fit MIB's count)" if e["shrunk_for_mib_count"] else ""
        lines.append(f"| `{e['file']}` | {e['budget_percent']:g} | {e['edges']} | {e['limit']} | {e['mib_edges']} | "
                     f"{e['mib_limit']} | {e['from']}{note} |")
    return "\n".join(lines) + "\n"
