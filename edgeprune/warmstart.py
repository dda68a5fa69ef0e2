"""Warm starts: initial log_alpha from attribution scores or from another run's masks.

``prune.init_from: SCORES_FILE`` (an ``edgeprune attribute`` output, ``baselines/scores.py``'s
format) maps the scores' ranking to log_alpha, rank by rank (the values of the scores do not
matter, only their order, so EAP, EAP-IG and ACDC files all work):

- the top ``k = round((1 - edge_target) * E)`` edges (the circuit of the target's size) start kept:
  log_alpha from ``a + 1`` (rank 0) down to ``a`` (rank k - 1), with ``a = max(prune.init_log_alpha,
  2.4)``, so their deterministic masks are exactly 1;
- the tail starts just below them: log_alpha a ramp of width 2 (rank k to the last rank), placed so
  that the whole map's expected sparsity is the target, so the first step is already at the target
  and the sparsity ramp starts there (no warm-up: ``SparsityRamp`` starts at the warm start's own
  expected sparsity). The top set alone nearly fills the target's budget, so the tail starts almost
  off (stories260K at 0.9: P(z != 0) from 0.002 down to 0.0002) and enters only where the loss
  pulls it (the sparsity control's common shift lifts it as top edges drop out).

Why not a tail at the decision boundary (P(z != 0) ~ 0.8): so many near-kept edges put the expected
sparsity far below the target, the sparsity control's first shift then drags the top set down with
them (deterministic masks ~0.1-0.3 at a = 3), and the warm start is lost; measured with
``bench/time_to_circuit.py`` (stories260K, seeds 0 and 1), that start ended 100 steps at KL 0.055 /
0.064, this one at 0.0079 / 0.0084 (EAP-IG's own circuit of that size: 0.025).

The map is strictly decreasing in rank, so every threshold of the initial log_alpha keeps exactly
a top set of the scores' ordering (ties in the scores keep the graph's edge order), and so does the
common shift that ``sparsity_control: project`` applies.

``prune.init_from: RUN_DIR`` starts from that run's final masks (``masks.safetensors``, else its
checkpoint), checked to belong to this model: e.g. the run of a lower target in a sparsity sweep;
the sparsity ramp goes from that run's expected sparsity to this target over ``warmup_steps``.
A shared-mask run can start a position-aware one (``model.positions``): each edge's mask is
repeated in every span, so the first step is the shared circuit, and training (or the faithful
selection's prune-back) then drops the spans an edge is not needed at.

``prune.init_from: eap`` / ``eap-ig`` / ``auto`` makes ``prune`` compute that attribution itself on the
training split first (as ``edgeprune attribute CONFIG --method ...``; written to
``RUN_DIR/scores_<method>.safetensors``, and read back on ``--resume``), then start from it as from a
scores file. ``auto`` is the attribution measured to give the most faithful circuit per minute on
a real checkpoint (``AUTO_METHOD``; docs/scale.md has the table).

``prune.candidates: N`` keeps learning only the top N edges of that ordering (scores, or the run's
log_alpha); every other edge is held at exactly 0 for the whole run (log_alpha -30), as the
hybrid attribution-then-pruning methods of the MIB shared task did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .baselines import ig_masks
from .baselines.methods import attribute
from .baselines.scores import check_graph, load_scores
from .control import solve_shift
from .masks import FULL_LOG_ALPHA
from .rundir import load_masks

TOP_SPAN = 1.0  # log_alpha range of the kept top set, above max(init_log_alpha, FULL_LOG_ALPHA)
TAIL_SPAN = 2.0  # log_alpha range of the tail, shifted to meet the target


@dataclass
class WarmStart:
    edge_log_alpha: torch.Tensor  # (E,) fp32
    node_log_alpha: torch.Tensor | None  # (W,) fp32, from a run with node masks
    order: torch.Tensor  # (E,) long: edge indices, most important first
    source: str
    kind: str  # "scores (METHOD)" or "run"

    def describe(self) -> str:
        return f"warm start from {self.kind} {self.source}"


def rank_order(key: torch.Tensor) -> torch.Tensor:
    """(E,) long: indices sorting ``key`` (larger = more important) descending; ties keep edge order."""
    return torch.argsort(key.float().cpu(), descending=True, stable=True)


def rank_log_alpha(order: torch.Tensor, n_keep: int, init_log_alpha: float, target: float) -> torch.Tensor:
    """(E,) fp32 log_alpha from a ranking (``order[r]`` is the edge of rank r) whose expected sparsity
    is ``target`` where the top set allows it: see the module docstring."""
    n = order.numel()
    n_keep = min(max(n_keep, 0), n)
    top = max(init_log_alpha, FULL_LOG_ALPHA)
    values = torch.empty(n, dtype=torch.float32)
    if n_keep:
        values[:n_keep] = torch.linspace(top + TOP_SPAN, top, n_keep) if n_keep > 1 else top + TOP_SPAN
    if n - n_keep:
        tail = torch.linspace(0.0, -TAIL_SPAN, n - n_keep) if n - n_keep > 1 else torch.zeros(1)
        values[n_keep:] = tail
        free = torch.zeros(n, dtype=torch.bool)
        free[n_keep:] = True
        shift = solve_shift(values, target, free)
        values[n_keep:] = tail + min(shift, top - 0.5)  # below the top set, whatever the target
    out = torch.empty(n, dtype=torch.float32)
    out[order] = values
    return out


def warm_start(source: str, model, p) -> WarmStart:
    """The initial masks of ``prune.init_from`` for ``model`` (PruneConfig ``p``); errors name the source."""
    path = Path(source)
    n = model.edge_masks.n  # E, or S * E for position-aware masks (scores and runs per (edge, span))
    if p.candidates is not None and p.candidates > n:
        raise ValueError(f"prune.candidates: {p.candidates} is more than the graph's {n} edges"
                         f"{'' if model.spans is None else ' (x spans)'}")
    if path.is_dir():
        masks = load_masks(path)
        masks.check_model(model, shared_into_spans=True)
        la = masks.edge_log_alpha.float().cpu().clone()
        if model.spans is not None and masks.spans is None:  # a shared-mask run: its masks in every span
            la = la.repeat(len(model.spans))
        node = masks.node_log_alpha.float().cpu().clone() if masks.node_log_alpha is not None else None
        if node is not None and model.node_masks is None:
            node = None
        return WarmStart(la, node, rank_order(la), str(path), "run")
    if not path.exists():
        raise FileNotFoundError(f"prune.init_from: {path}: no such scores file or run directory (or one of "
                                f"{', '.join(ATTRIBUTION_STARTS)}: attribution computed by prune itself)")
    return from_scores(load_scores(path), model, p, str(path))


def from_scores(scores, model, p, source: str) -> WarmStart:
    """The warm start of a ``Scores`` (a file or scores computed in memory) for ``model``."""
    n = model.edge_masks.n
    check_graph(scores, model)
    order = rank_order(scores.ranking_key())
    target = min(max(p.edge_target, 0.0), 1.0)
    n_keep = int(round((1.0 - target) * n))
    if p.candidates is not None:
        n_keep = min(n_keep, p.candidates)
    return WarmStart(rank_log_alpha(order, n_keep, p.init_log_alpha, target), None, order, source,
                     f"scores ({scores.method})")


# ``prune.init_from`` values that make prune compute its own attribution on the training split first;
# ``auto`` is the one measured to give the most faithful circuit per minute (docs/scale.md)
AUTO_METHOD = "eap-ig"
AUTO_IG_STEPS = 3  # measured on SmolLM2-135M IOI (docs/scale.md): as faithful as 5 steps, in 3/5 of the time
IG_VARIANT = "masks"  # EAP-IG's path for init_from eap-ig / auto (the measured one; "inputs": ~1.15x faster per step)
ATTRIBUTION_STARTS = ("auto", "eap", "eap-ig")


def attribution_method(init_from: str | None) -> str | None:
    """The attribution method ``prune.init_from`` asks prune to compute, or None (a file, a run, none)."""
    if init_from not in ATTRIBUTION_STARTS:
        return None
    return AUTO_METHOD if init_from == "auto" else init_from


def fills_reference(method: str) -> bool:
    """Whether ``method``'s attribution (as ``attribution_start`` runs it) makes, for each batch, the no-grad
    reference pass a pruning step makes (``eval.reference_and_corrupted``): EAP-IG's masks variant on the
    plain model. Then it fills the run's reference cache (``cache.ReferenceCache``)."""
    return method == "eap-ig" and IG_VARIANT == "masks" and ig_masks.UNIFORM_PATH


def attribution_start(method: str, model, p, batches, progress: bool = False, reference=None):
    """(WarmStart, Scores): ``method``'s scores on ``batches`` (the training split) and the warm start
    they give. The scores are what ``edgeprune attribute CONFIG --method METHOD`` computes (``auto``:
    with ``--ig-steps AUTO_IG_STEPS``). ``reference``: the run's ``cache.ReferenceCache``, which EAP-IG's
    masks variant fills with its per-batch passes (``fills_reference``)."""
    steps = {"ig_steps": AUTO_IG_STEPS} if p.init_from == "auto" else {}  # else attribute's own default
    scores = attribute(model, batches, method, progress=progress, settings={"split": "train", "by": "prune.init_from"},
                       ig_variant=IG_VARIANT, reference=reference, **steps)
    return from_scores(scores, model, p, f"{method} computed on the training split"), scores


def fixed_edges(start: WarmStart, p) -> torch.Tensor:
    """(E,) bool: the edges outside the top ``prune.candidates`` of the warm start's ordering."""
    fixed = torch.ones(start.order.numel(), dtype=torch.bool)
    fixed[start.order[:p.candidates]] = False
    return fixed
