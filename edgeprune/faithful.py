"""``prune.mode: faithful``: the sparsest circuit that reproduces the outputs, with no sparsity target.

Training. Instead of a sparsity target, a constraint on faithfulness: minimise the expected
density (E[L0] / n) subject to fit <= ``prune.faithful_tolerance``, as the Lagrangian

    loss = E[L0] / n + lambda * (fit - tolerance),    lambda = exp(rho) >= 0,

with rho trained by gradient ascent (the run's lambda optimiser; ``lambdas["edges"][0]`` holds
rho, so checkpoints and resumes work unchanged). While the circuit is faithful lambda decays
geometrically and the L0 term prunes every mask at the same pace; once the fit exceeds the
tolerance lambda grows until the fit's gradient holds the masks that carry the outputs. Masks the
outputs do not need keep falling. ``fit`` is the loss of the batch (mean KL or squared error per
position) or, with ``prune.faithful_per_position``, its worst position ("every output").

Selection. The masks give an order, not a circuit: ``select_circuit`` takes the smallest top set of
log_alpha (bisection on the count, dangling edges removed) whose deterministic binary circuit is
faithful on the validation split, searching below the learned circuit itself (the masks that are
on) when that is faithful (top sets above it need not be: edges added to a faithful Tracr circuit
can break it), then drops, lowest log_alpha first, every edge whose removal
alone keeps it faithful, until none can go. The result is faithful and 1-minimal (every kept edge
is needed); the rule uses only the model's outputs, never a ground truth. The binary circuit is
written into ``masks.safetensors`` (kept edges +``KEEP_LOG_ALPHA``, others ``OFF_LOG_ALPHA``, so
eval/export/draw binarise to exactly it); the learned masks stay in the run's checkpoint, and
``circuit_selection.json`` records each step.

The selection evaluates on the validation split (``run.eval_batches`` of it, as the run's
validations do). The prune-back costs one such pass per kept edge: it runs when the top set has at
most ``PRUNE_BACK_MAX`` edges (Tracr models, small circuits); larger circuits keep the bisection's
set, which is faithful but may hold edges that could go.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .circuit import remove_dangling
from .eval import kl_divergence, reference_and_corrupted
from .masks import OFF_LOG_ALPHA, deterministic

KEEP_LOG_ALPHA = 15.0  # deterministic value exactly 1, P(z != 0) = 1 - 1e-7
PRUNE_BACK_MAX = 200


def objective(per_position: torch.Tensor, fit: torch.Tensor, model, lambdas: dict, p, record: dict):
    """The faithful-mode loss and its terms for the log. per_position (N,) this batch's fits,
    fit () their mean. Returns (loss, sparsity term as a float); fills ``record``."""
    stat = per_position.max() if p.faithful_per_position else fit
    rho = lambdas["edges"][0]
    lam = rho.clamp(max=30.0).exp()
    density = model.edge_masks.expected_l0() / model.edge_masks.n
    if model.node_masks is not None:
        density = density + model.node_masks.expected_l0() / model.node_masks.n
    constraint = lam * (stat - p.faithful_tolerance)
    expected = model.edge_masks.expected_sparsity().item()
    record.update({"edges_sparsity": expected, "edges_target": expected, "edges_gap": 0.0,
                   "edges_lambda1": lam.item(), "edges_lambda2": 0.0,
                   "faithful_fit": stat.item(), "faithful_tolerance": p.faithful_tolerance})
    loss = density + constraint
    return loss, loss.item() - fit.item()  # record["loss"] = fit + this = the loss optimised


# ---------------------------------------------------------------------------------------- selection
@torch.no_grad()
def circuit_fit(model, batches, loss: str, output_scale: float = 1.0) -> tuple[float, float]:
    """(mean, max) per-position fit of the model's current (deterministic) circuit over ``batches``:
    KL(p_full || p_circuit) or squared error of the scaled outputs, at the loss positions."""
    total, worst, n = 0.0, 0.0, 0
    for batch in batches:
        batch = batch.to(model.device)
        full, corrupted = reference_and_corrupted(model, batch)
        circuit = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted,
                        span_ids=batch.span_ids).logits
        sel = batch.loss_mask
        ref, cur = full[sel].float() * output_scale, circuit[sel].float() * output_scale
        per = (cur - ref).pow(2).mean(-1) if loss == "mse" else kl_divergence(ref, cur)
        total += float(per.sum())
        worst = max(worst, float(per.max())) if per.numel() else worst
        n += per.numel()
    return total / max(n, 1), worst


@dataclass
class Selection:
    kept: torch.Tensor  # (E,) bool: the chosen circuit (dangling-free)
    fit: float  # its fit statistic (mean or worst position)
    evaluations: int
    trace: list = field(default_factory=list)  # [{"step", "edges", "fit", "faithful"}]

    def describe(self, tolerance: float) -> str:
        if self.fit > tolerance:
            return (f"faithful selection: even the full graph has fit {self.fit:.3g} > {tolerance:g} "
                    "(prune.faithful_tolerance): every edge kept")
        return (f"faithful selection: {int(self.kept.sum())} edges, fit {self.fit:.3g} <= {tolerance:g} "
                f"({self.evaluations} evaluations)")

    def to_dict(self, graph) -> dict:
        return {"rule": "smallest faithful top set of log_alpha, then drop every edge whose removal alone "
                        "keeps the circuit faithful (never looks at a ground truth)",
                "edges": int(self.kept.sum()), "fit": self.fit, "evaluations": self.evaluations,
                "trace": self.trace}


def select_circuit(model, batches_fn, log_alpha: torch.Tensor, *, loss: str, tolerance: float,
                   per_position: bool, output_scale: float = 1.0) -> Selection:
    """The sparsest faithful circuit along the masks' order (see the module docstring).

    ``batches_fn()`` yields the validation batches afresh for each evaluation; log_alpha (E,), or
    (S * E,) for position-aware masks (dangling removal then walks the spans).
    The model's masks are overridden while searching and reset to the learned ones afterwards.
    """
    graph, n_spans, names = model.graph, model.n_spans, model.edge_names
    la = log_alpha.detach().float().cpu()
    order = torch.argsort(la, descending=True, stable=True)
    trace, evals = [], 0

    def check(kept: torch.Tensor, step: str) -> tuple[bool, float]:
        nonlocal evals
        model.edge_masks.set_values(kept.float())
        if model.node_masks is not None:
            model.node_masks.set_values(torch.ones(graph.num_writers))
        mean, worst = circuit_fit(model, batches_fn(), loss, output_scale)
        evals += 1
        stat = worst if per_position else mean
        ok = stat <= tolerance
        trace.append({"step": step, "edges": int(kept.sum()), "fit": stat, "faithful": ok})
        return ok, stat

    def top(k: int) -> torch.Tensor:
        kept = torch.zeros(len(names), dtype=torch.bool)
        kept[order[:k]] = True
        return remove_dangling(graph, kept, n_spans)

    try:
        lo, hi = 0, len(names)  # top(lo) unfaithful or empty, top(hi) faithful (assumed: the full model)
        best = top(hi)
        ok, best_fit = check(best, "top all")
        if not ok:  # not even the full graph: nothing to select; keep everything
            return Selection(best, best_fit, evals, trace)
        # the learned circuit itself (deterministic masks > 0) bounds the search when it is faithful:
        # adding edges outside a faithful circuit can break it (exact Tracr lookups under zero
        # ablation), so top sets above it are not always faithful and would mislead the bisection
        n_on = int((deterministic(la) > 0).sum())
        if 0 < n_on < hi:
            kept = top(n_on)
            ok, stat = check(kept, f"top {n_on} (the masks that are on)")
            if ok:
                hi, best, best_fit = n_on, kept, stat
        while hi - lo > 1:
            mid = (lo + hi) // 2
            kept = top(mid)
            ok, stat = check(kept, f"top {mid}") if kept.any() else (False, math.inf)
            if ok:
                hi, best, best_fit = mid, kept, stat
            else:
                lo = mid
        if int(best.sum()) <= PRUNE_BACK_MAX:
            changed = True
            while changed:
                changed = False
                for e in sorted(best.nonzero().flatten().tolist(), key=lambda i: float(la[i])):
                    if not best[e]:
                        continue
                    trial = best.clone()
                    trial[e] = False
                    trial = remove_dangling(graph, trial, n_spans)
                    if not trial.any():
                        continue
                    ok, stat = check(trial, "drop " + "->".join(names[e][:2]) + "".join(f"@{s}" for s in names[e][2:]))
                    if ok:
                        best, best_fit, changed = trial, stat, True
        return Selection(best, best_fit, evals, trace)
    finally:
        model.edge_masks.override = None
        if model.node_masks is not None:
            model.node_masks.override = None


def apply_selection(model, selection: Selection, out_dir: Path | None) -> None:
    """Write the chosen circuit into the model's edge log_alpha (and circuit_selection.json)."""
    with torch.no_grad():
        la = model.edge_masks.log_alpha
        kept = selection.kept.to(la.device)
        la.copy_(torch.where(kept, torch.full_like(la, KEEP_LOG_ALPHA), torch.full_like(la, OFF_LOG_ALPHA)))
    if out_dir is not None:
        (Path(out_dir) / "circuit_selection.json").write_text(json.dumps(selection.to_dict(model.graph), indent=2))


def select_faithful(model, val, cfg) -> Selection:
    """``select_circuit`` on a run's validation split (``val``: a TaskData) with the config's tolerance."""
    from .tasks.jsonl import batches

    p, limit = cfg.prune, cfg.run.eval_batches

    def val_batches():  # the validation batches of run.eval_batches, as in the run's validations
        return (b for i, b in enumerate(batches(val.examples, p.batch_size, val.pad_token_id))
                if limit is None or i < limit)

    was_training = model.training
    model.eval()
    try:
        return select_circuit(model, val_batches,
                              model.edge_masks.log_alpha, loss=cfg.data.loss, tolerance=p.faithful_tolerance,
                              per_position=p.faithful_per_position, output_scale=cfg.data.output_scale)
    finally:
        model.train(was_training)
