"""ACDC (Conmy et al. 2023): exact, greedy patching from the output backwards.

Start from the full circuit (every edge kept). Visit readers in reverse topological order
(``resid_post`` first, then layer by layer down to layer 0's Q/K/V) and, for each reader, its
incoming edges from the latest writer to the earliest. Ablate the edge and measure the metric
over the data with the current circuit; the edge's *effect* is

    effect = m(current without e) - m(current)       (kl, mse: metrics where larger is worse)
    effect = |m(current without e) - m(current)|     (logit_diff)

It stays removed iff ``effect < tau``; otherwise it is restored. The current circuit, and so
``m(current)``, carry every earlier decision, as in ACDC. A reader whose node has no kept outgoing
edge left (all of them were removed) cannot reach the output: its incoming edges are removed
without a forward pass, as ACDC never expands nodes outside the current graph (their effect is
exactly 0; they are reported as not tested).

The decisions can leave edges out of nodes whose inputs were all removed later (no path from an
embedding): such a node computes exactly its ablated value, so the edge changes nothing. The
final circuit is the decisions with dangling edges removed (``circuit.remove_dangling``, the one
the pruning path uses); both are returned.

Cost: one forward over the data per tested edge (no backward). Reference logits and ablated
states are computed once and kept.

Position-aware masks (``model.positions``, S spans): every (edge, span) is tested, S times the
forwards. For each reader, its spans in order, each span's edges as above; a Q/MLP reader at span
s is live while its node at s has a kept outgoing edge, a K/V reader while its head has one at
any span (``circuit.remove_dangling``'s rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..circuit import reader_nodes, remove_dangling
from ..model import EdgeModel
from .attribution import check_metric, metric_value, prepare

DEFAULT_TAU = 0.01


@dataclass
class AcdcResult:
    effects: torch.Tensor  # (E,) fp32 (S * E position-aware): measured effect of each tested edge (0 where not tested)
    kept: torch.Tensor  # (E,) bool: the final circuit (decisions, dangling edges removed)
    decisions: torch.Tensor  # (E,) bool: kept by ACDC's tests (effect >= tau), before dangling removal
    tested: torch.Tensor  # (E,) bool: edges that got a forward pass
    metric_full: float  # metric with every edge kept
    metric_final: float  # metric of the decisions' circuit
    forwards: int  # forward passes over the data


@torch.no_grad()
def acdc(model: EdgeModel, batches, tau: float = DEFAULT_TAU, metric: str = "kl",
         progress: bool = False) -> AcdcResult:
    """Run ACDC over ``batches`` (Batch objects; all of them are scored together at every step)."""
    check_metric(metric)
    if not tau >= 0:
        raise ValueError(f"ACDC's tau must be >= 0, got {tau}")
    graph = model.graph
    was_training = model.training
    model.eval()
    try:
        prepared = [prepare(model, b) for b in batches]
        if not prepared or sum(p.n_positions for p in prepared) == 0:
            raise ValueError("ACDC got no loss positions (empty split?)")
        E, S = graph.num_edges, model.n_spans or 1
        z = torch.ones(S * E, dtype=torch.float32, device=model.device)
        effects = torch.zeros(S * E, dtype=torch.float32)
        tested = torch.zeros(S * E, dtype=torch.bool)
        current = metric_full = metric_value(model, prepared, z, metric)
        forwards = 1

        feeds = reader_nodes(graph)
        writer_of = torch.tensor([graph.writer_index[w] for w, _ in graph.edges])
        out_reader = graph.reader_index["resid_post"]
        kv = [S > 1 and name.endswith((".k", ".v")) for name in graph.readers]
        bar = tqdm(total=S * E, desc="acdc", disable=not progress, leave=False)
        for r, s in ((r, s) for r in reversed(range(graph.num_readers)) for s in range(S)):
            lo = s * E + graph.edge_offsets[r]
            hi = lo + graph.n_writers_before[r]
            spans = range(S) if kv[r] else (s,)  # the spans of the nodes this reader feeds
            if r != out_reader and not _feeds_live_node(feeds[r], z.view(S, E), writer_of, spans):
                z[lo:hi] = 0.0
                bar.total -= hi - lo  # skipped untested: they must not speed up the ETA
                bar.refresh()
                continue
            for e in reversed(range(lo, hi)):
                z[e] = 0.0
                new = metric_value(model, prepared, z, metric)
                forwards += 1
                effect = abs(new - current) if metric == "logit_diff" else new - current
                effects[e], tested[e] = effect, True
                if effect < tau:
                    current = new
                else:
                    z[e] = 1.0
                bar.update(1)
                bar.set_postfix(kept=int(z.sum()), metric=f"{current:.4g}")
        bar.close()
    finally:
        model.train(was_training)
    decisions = (z > 0).cpu()
    return AcdcResult(effects=effects, kept=remove_dangling(graph, decisions, model.n_spans), decisions=decisions,
                      tested=tested,
                      metric_full=metric_full, metric_final=current, forwards=forwards)


def _feeds_live_node(nodes: list[int], z: torch.Tensor, writer_of: torch.Tensor, spans) -> bool:
    """Does any writer node fed by this reader still have a kept outgoing edge (at one of ``spans``;
    z (S, E))?

    Every reader of such a writer comes later in reader order and was already decided, and dead
    readers lose all their inputs, so a kept outgoing edge means a path to the output.
    """
    for s in spans:
        kept_writers = writer_of[(z[s] > 0).cpu()]
        if any(bool((kept_writers == n).any()) for n in nodes):
            return True
    return False
