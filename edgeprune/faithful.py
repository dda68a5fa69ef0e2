"""``prune.mode: faithful``: the sparsest circuit that reproduces the outputs, with no sparsity target.

Training. Instead of a sparsity target, a constraint on faithfulness: minimise the expected
density (E[L0] / n) subject to fit <= eps (``prune.faithful_tolerance``), as the Lagrangian

    loss = E[L0] / n + lambda * c(fit),   c(fit) = log((fit + eps) / (2 eps)),   lambda = exp(rho)

with rho trained by gradient ascent (the run's lambda optimiser; ``lambdas["edges"][0]`` holds
rho, so checkpoints and resumes work unchanged). The constraint is normalised: 0 at the
tolerance, -log 2 at a perfect fit, growing only logarithmically above, so its gradient
1 / (fit + eps) weighs a KL of 1e-3 and a squared error of 1e-8 alike and stays bounded however
far off the fit is. The multiplier is bounded: rho is projected onto [-log LAMBDA_MAX, log
LAMBDA_MAX] after each step, so a constraint that no mask can meet (on deep Tracr programs, once
a needed edge's mask has died, the lookup MLPs pass no gradient) leaves lambda at LAMBDA_MAX
instead of running to 1e13, and it decays as soon as the fit is back. A new run starts at the
full circuit with lambda at its bound: the fit holds the masks the outputs need from the first
step, and the density term tightens the circuit as lambda decays. ``fit`` is the batch's mean KL
or squared error per position or, with ``prune.faithful_per_position``, its worst position
("every output").

Selection. The masks give an order, not a circuit: ``select_circuit`` takes the smallest top set of
log_alpha (bisection on the count, dangling edges removed) whose deterministic binary circuit is
faithful on the validation split, searching below the learned circuit itself (the masks that are
on) when that is faithful (top sets above it need not be: edges added to a faithful Tracr circuit
can break it). Then the prune-back, ACDC's test on every kept edge, lowest log_alpha first: drop
each edge whose removal (and what then dangles) keeps the circuit faithful, in passes until one
drops none. A drop doubles the next try's block, so where the learned order failed (most of the
bisection's set can go) a pass costs a few evaluations per needed edge; where it is good, one per
kept edge. The result is faithful and 1-minimal (every kept edge is needed); the rule uses only
the model's outputs, never a ground truth. The binary circuit is written into
``masks.safetensors`` (kept edges +``KEEP_LOG_ALPHA``, others ``OFF_LOG_ALPHA``, so
eval/export/draw binarise to exactly it); the learned masks stay in the run's checkpoint, and
``circuit_selection.json`` records each evaluation.

The selection evaluates on the validation split (``run.eval_batches`` of it, as the run's
validations do); the full model's outputs and the ablation states are computed once. The
prune-back runs when one pass over the kept set is estimated (from the bisection's evaluations) to
take at most ``PRUNE_BACK_BUDGET_S``; larger searches keep the bisection's set, which is faithful
but may hold edges that could go, and ``circuit_selection.json`` says so.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .circuit import remove_dangling
from .eval import kl_divergence, reference_and_corrupted
from .masks import OFF_LOG_ALPHA, deterministic
from .tasks.jsonl import batches

KEEP_LOG_ALPHA = 15.0  # deterministic value exactly 1, P(z != 0) = 1 - 1e-7
LAMBDA_MAX = 1e4  # the multiplier's bound (and 1 / LAMBDA_MAX its floor): see project_multiplier
RHO_BOUND = math.log(LAMBDA_MAX)
PRUNE_BACK_BUDGET_S = 900.0  # the prune-back runs when one pass over the kept set is estimated to fit in it


def constraint(stat: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The normalised constraint c = log((fit + eps) / (2 eps)): 0 at the tolerance, < 0 within it
    (>= -log 2 at fit 0), > 0 above; its gradient 1 / (fit + eps) makes the multiplier's scale free
    of the fit's units (a KL of 1e-3 and a squared error of 1e-8 weigh alike) and stays bounded
    however far the fit is off."""
    return torch.log((stat + tolerance) / (2 * tolerance))


def project_multiplier(lambdas: dict) -> None:
    """Keep rho in [-RHO_BOUND, RHO_BOUND] after each ascent step: the multiplier cannot run away
    (a constraint that no mask can meet leaves lambda at LAMBDA_MAX, from which it decays as soon as
    the fit is back within the tolerance)."""
    with torch.no_grad():
        lambdas["edges"][0].clamp_(-RHO_BOUND, RHO_BOUND)


def start_multiplier(lambdas: dict) -> None:
    """A new run's multiplier: at its bound (see ``PruneRecipe``'s faithful objective)."""
    with torch.no_grad():
        lambdas["edges"][0].fill_(RHO_BOUND)


def objective(per_position: torch.Tensor, fit: torch.Tensor, model, lambdas: dict, p, record: dict):
    """The faithful-mode loss and its terms for the log. per_position (N,) this batch's fits,
    fit () their mean. Returns (loss, sparsity term as a float); fills ``record``."""
    stat = per_position.max() if p.faithful_per_position else fit
    rho = lambdas["edges"][0]
    lam = rho.clamp(-RHO_BOUND, RHO_BOUND).exp()
    density = model.edge_masks.expected_l0() / model.edge_masks.n
    if model.node_masks is not None:
        density = density + model.node_masks.expected_l0() / model.node_masks.n
    term = lam * constraint(stat, p.faithful_tolerance)
    expected = model.edge_masks.expected_sparsity().item()
    record.update({"edges_sparsity": expected, "edges_target": expected, "edges_gap": 0.0,
                   "edges_lambda1": lam.item(), "edges_lambda2": 0.0,
                   "faithful_fit": stat.item(), "faithful_tolerance": p.faithful_tolerance})
    loss = density + term
    return loss, loss.item() - fit.item()  # record["loss"] = fit + this = the loss optimised


# ---------------------------------------------------------------------------------------- selection
@torch.no_grad()
def reference_batches(model, batches) -> list:
    """[(batch, full-model outputs, corrupted states)] on the model's device: computed once, reused by
    every evaluation of the search (the full model and the ablation states do not change)."""
    out = []
    for batch in batches:
        batch = batch.to(model.device)
        full, corrupted = reference_and_corrupted(model, batch)
        out.append((batch, full, corrupted))
    return out


@torch.no_grad()
def circuit_fit(model, batches, loss: str, output_scale: float = 1.0) -> tuple[float, float]:
    """(mean, max) per-position fit of the model's current (deterministic) circuit over ``batches``
    (Batch objects, or ``reference_batches``' triples): KL(p_full || p_circuit) or squared error of
    the scaled outputs, at the loss positions."""
    total, worst, n = 0.0, 0.0, 0
    for item in batches:
        batch, full, corrupted = item if isinstance(item, tuple) else reference_batches(model, [item])[0]
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
    prune_back: str = "not needed"  # "done" (1-minimal), or why it did not run

    def describe(self, tolerance: float) -> str:
        if self.fit > tolerance:
            return (f"faithful selection: even the full graph has fit {self.fit:.3g} > {tolerance:g} "
                    "(prune.faithful_tolerance): every edge kept")
        return (f"faithful selection: {int(self.kept.sum())} edges, fit {self.fit:.3g} <= {tolerance:g} "
                f"({self.evaluations} evaluations; prune-back {self.prune_back})")

    def to_dict(self, graph) -> dict:
        return {"rule": "smallest faithful top set of log_alpha, then drop every edge whose removal alone "
                        "keeps the circuit faithful, until none can go (never looks at a ground truth)",
                "edges": int(self.kept.sum()), "fit": self.fit, "evaluations": self.evaluations,
                "prune_back": self.prune_back, "trace": self.trace}


class _Search:
    """The state of one selection: the order, the cached references, the evaluations so far."""

    def __init__(self, model, batches, log_alpha, loss, tolerance, per_position, output_scale):
        self.model, self.graph, self.n_spans, self.names = model, model.graph, model.n_spans, model.edge_names
        self.la = log_alpha.detach().float().cpu()
        self.order = torch.argsort(self.la, descending=True, stable=True)
        self.batches = reference_batches(model, batches)
        self.loss, self.tolerance, self.per_position, self.scale = loss, tolerance, per_position, output_scale
        self.trace, self.evals, self.seconds = [], 0, 0.0

    def check(self, kept: torch.Tensor, step: str) -> tuple[bool, float]:
        started = time.perf_counter()
        self.model.edge_masks.set_values(kept.float())
        if self.model.node_masks is not None:
            self.model.node_masks.set_values(torch.ones(self.graph.num_writers))
        mean, worst = circuit_fit(self.model, self.batches, self.loss, self.scale)
        self.evals += 1
        self.seconds += time.perf_counter() - started
        stat = worst if self.per_position else mean
        ok = stat <= self.tolerance
        self.trace.append({"step": step, "edges": int(kept.sum()), "fit": stat, "faithful": ok})
        return ok, stat

    def top(self, k: int) -> torch.Tensor:
        kept = torch.zeros(len(self.names), dtype=torch.bool)
        kept[self.order[:k]] = True
        return remove_dangling(self.graph, kept, self.n_spans)

    def bisect(self, best: torch.Tensor, best_fit: float) -> tuple[torch.Tensor, float]:
        """The smallest faithful top set, searched below the learned circuit when that is faithful:
        edges added to a faithful circuit can break it (exact Tracr lookups under zero ablation), so
        top sets above it are not always faithful and would mislead the bisection."""
        lo, hi = 0, len(self.names)
        n_on = int((deterministic(self.la) > 0).sum())
        if 0 < n_on < hi:
            kept = self.top(n_on)
            ok, stat = self.check(kept, f"top {n_on} (the masks that are on)")
            if ok:
                hi, best, best_fit = n_on, kept, stat
        while hi - lo > 1:
            mid = (lo + hi) // 2
            kept = self.top(mid)
            ok, stat = self.check(kept, f"top {mid}") if kept.any() else (False, math.inf)
            if ok:
                hi, best, best_fit = mid, kept, stat
            else:
                lo = mid
        return best, best_fit

    def prune_back(self, best: torch.Tensor, best_fit: float) -> tuple[torch.Tensor, float]:
        """ACDC's test on every kept edge, lowest log_alpha first, in passes until a pass drops none:
        every kept edge is then needed. Within a pass, each drop doubles the next try's block (two
        edges, four, ...; a failed block falls back to one edge): where most edges can go (a
        learned order that failed) a pass takes a few evaluations per needed edge, where the order
        is good one per kept edge."""
        changed = True
        while changed:
            best, best_fit, changed = self._pass(best, best_fit)
        return best, best_fit

    def _pass(self, best, best_fit):
        order, i, size, changed = self._lowest_first(best), 0, 1, False
        while i < len(order):
            block = [e for e in order[i:i + size] if best[e]]
            dropped = False
            if block:
                best, best_fit, dropped = self._try_drop(best, best_fit, block)
            if dropped or not block:
                i, size, changed = i + size, size * 2 if dropped else size, changed or dropped
            elif size > 1:
                size = 1  # the block failed: its edges one at a time
            else:
                i += 1
        return best, best_fit, changed

    def _lowest_first(self, kept: torch.Tensor) -> list[int]:
        return sorted(kept.nonzero().flatten().tolist(), key=lambda i: float(self.la[i]))

    def _try_drop(self, best, best_fit, edges: list[int]):
        """(circuit, fit, dropped): ``best`` without ``edges`` (and what then dangles) when faithful."""
        trial = best.clone()
        trial[edges] = False
        trial = remove_dangling(self.graph, trial, self.n_spans)
        if not trial.any():
            return best, best_fit, False
        e = edges[0]
        name = ("->".join(self.names[e][:2]) + "".join(f"@{s}" for s in self.names[e][2:]) if len(edges) == 1
                else f"{len(edges)} edges")
        ok, stat = self.check(trial, "drop " + name)
        return (trial, stat, True) if ok else (best, best_fit, False)


def select_circuit(model, batches_fn, log_alpha: torch.Tensor, *, loss: str, tolerance: float,
                   per_position: bool, output_scale: float = 1.0,
                   budget_s: float | None = None) -> Selection:
    """The sparsest faithful circuit along the masks' order (see the module docstring).

    ``batches_fn()`` yields the validation batches; log_alpha (E,), or (S * E,) for position-aware
    masks (dangling removal then walks the spans). The prune-back runs when one pass over the kept
    set is estimated (from the bisection's evaluations) to take at most ``budget_s`` seconds
    (default ``PRUNE_BACK_BUDGET_S``). The model's masks are overridden while searching and reset
    to the learned ones afterwards.
    """
    budget_s = PRUNE_BACK_BUDGET_S if budget_s is None else budget_s
    search = _Search(model, batches_fn(), log_alpha, loss, tolerance, per_position, output_scale)
    try:
        best = search.top(len(search.names))
        ok, best_fit = search.check(best, "top all")
        if not ok:  # not even the full graph: nothing to select; keep everything
            return Selection(best, best_fit, search.evals, search.trace, "not run (the full graph is not faithful)")
        best, best_fit = search.bisect(best, best_fit)
        estimate = int(best.sum()) * search.seconds / search.evals
        if estimate > budget_s:
            why = (f"skipped: one pass over {int(best.sum())} edges ~{estimate:.0f} s > {budget_s:g} s; the "
                   "bisection's set is faithful but may hold edges that could go")
            return Selection(best, best_fit, search.evals, search.trace, why)
        best, best_fit = search.prune_back(best, best_fit)
        return Selection(best, best_fit, search.evals, search.trace, "done: every kept edge is needed")
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
