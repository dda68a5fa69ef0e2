"""The pruning loop: learn edge (and node) masks that keep the model faithful under a sparsity target.

Read it top to bottom: ``prune(cfg)`` loads the frozen model and the task, then per step
1. a no-grad pass of the frozen weights over the clean and corrupted inputs gives the reference
   logits and the corrupted writer states (the ablated values),
2. the masked forward with sampled hard-concrete masks gives the circuit's logits,
3. loss = KL(p_full || p_circuit) on the loss positions
          + lambda1 * (s - t) + lambda2 * (s - t)^2   (per mask kind: edges, nodes)
   where s is the expected sparsity and t the target, ramped linearly over the warm-up,
4. AdamW steps the masks down the loss and the lambdas up it (gradient ascent), after clipping.
Checkpoints (safetensors + JSON: masks, lambdas, optimiser and ramp state, step, RNG states) are
written atomically; ``resume=True`` continues so the final masks equal an uninterrupted run's.
Under ``torchrun`` the same loop runs on every rank with the weights sharded by FSDP2, each rank
on its slice of the global batch (``edgeprune.distributed``); rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .baselines.scores import save_scores
from .tasks.jsonl import TaskFormatError, batches
from .cache import ReferenceCache, cache_nbytes, decide
from .circuit import extract_circuit
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint, write_safetensors
from .config import ExperimentConfig, save_config
from .eval import EmptyBaseline, evaluate, kl_divergence
from .estimate import WontFit, advice, check_fits, free_bytes
from .identity import FingerprintError
from .control import expected_sparsity_of, lagrangian, project
from .faithful import apply_selection, select_faithful
from .faithful import objective as faithful_objective
from .faithful import project_multiplier, start_multiplier
from .masks import OFF_LOG_ALPHA
from .experiment import load_model, load_split, prepare_ablation, use_spans
from .experiment import task_metric as get_task_metric
from .model import EdgeModel
from .warmstart import attribution_method, attribution_start, fills_reference, fixed_edges, warm_start
from .rundir import RunDirError, RunTiming, check_same_model, run_dir_plan


class PruneError(RunDirError):
    """The run cannot go on (non-finite loss, incompatible checkpoint, ...)."""


class SparsityRamp:
    """Target sparsity at a step: linear from ``start`` (0; a warm start: its own expected sparsity) to
    ``target`` over ``warmup`` steps, then constant."""

    def __init__(self, target: float, warmup: int, start: float = 0.0):
        self.target, self.warmup, self.start, self.step = target, warmup, start, 0

    def value(self) -> float:
        """The target of the step being taken (the (step + 1)-th): the last warm-up step reaches it."""
        return self.at(self.step)

    def at(self, step: int) -> float:
        """The target of the (step + 1)-th step."""
        if self.warmup <= 0:
            return self.target
        return self.start + (self.target - self.start) * min(1.0, (step + 1) / self.warmup)

    def state_dict(self) -> dict:
        return {"target": self.target, "warmup": self.warmup, "start": self.start, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.target, self.warmup, self.step = state["target"], state["warmup"], state["step"]
        self.start = state.get("start", 0.0)  # checkpoints written before warm starts ramped from 0


def sparsity_control(p) -> str:
    """``project`` or ``lagrangian`` for a PruneConfig (``auto``: project unless a target aims at or past 1,
    the reference implementation's trick, which only the Lagrangian can follow)."""
    if p.sparsity_control != "auto":
        return p.sparsity_control
    return "project" if max(p.edge_target, p.node_target or 0.0) < 1.0 else "lagrangian"


def target_warning(learned: float, target: float, tol: float = 0.005, kind: str = "edge") -> str | None:
    """A one-line warning when the learned expected sparsity missed a target in [0, 1] by more than ``tol``."""
    if target > 1.0 or abs(learned - target) <= tol:
        return None
    return (f"the learned {kind} sparsity {learned:.4f} missed the target {target:.4f} (gap {learned - target:+.4f}): "
            "the circuit is " + ("larger" if learned < target else "smaller") + " than asked; use "
            "a longer prune.warmup_steps, a higher prune.lr_lambdas, or a warm start (prune.init_from)")


class EarlyStop:
    """Stop once every sparsity target is reached (within ``tolerance``, after the warm-up) and the
    validation KL (or MSE) has not improved by 0.1% for ``patience`` evaluations in a row."""

    def __init__(self, patience: int, tolerance: float):
        self.patience, self.tolerance = patience, tolerance
        self.best, self.bad, self.reason = math.inf, 0, None

    def update(self, step: int, fit: float, gaps: dict[str, float], warmed_up: bool) -> str | None:
        if not self.patience or self.reason is not None:
            return self.reason
        reached = warmed_up and all(abs(g) <= self.tolerance for g in gaps.values())
        improved = not math.isfinite(self.best) or fit < self.best - max(1e-3 * abs(self.best), 1e-9)
        if improved:
            self.best, self.bad = fit, 0
        elif reached:
            self.bad += 1
        if reached and self.bad >= self.patience:
            gap_text = ", ".join(f"{k} gap {g:+.4f}" for k, g in gaps.items())
            self.reason = (f"early stop at step {step}: target reached ({gap_text}, tolerance {self.tolerance}) "
                           f"and validation loss {fit:.4g} has not improved on {self.best:.4g} for {self.bad} "
                           f"evaluations")
        return self.reason

    def state_dict(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "bad": self.bad, "reason": self.reason}

    def load_state_dict(self, state: dict) -> None:
        self.best = math.inf if state.get("best") is None else state["best"]
        self.bad, self.reason = state.get("bad", 0), state.get("reason")


@dataclass
class PruneResult:
    output_dir: Path
    step: int
    history: list[dict]
    finished: bool
    main_process: bool = True  # False on the ranks > 0 of a torchrun job (they write nothing)
    stopped: str | None = None  # the early-stop reason, when prune.early_stop ended the run
    warning: str | None = None  # the learned sparsity missed the target (target_warning)


def epoch_batches(data, batch_size: int, seed: int, epoch: int) -> list:
    """The training batches of one epoch: shuffled by (seed, epoch), the last partial batch dropped."""
    drop_last = len(data.examples) >= batch_size
    return list(batches(data.examples, batch_size, data.pad_token_id, shuffle=True, seed=seed, epoch=epoch,
                        drop_last=drop_last))


def prune(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False, resume_or_start: bool = False,
          progress: bool = True, stop_after: int | None = None) -> PruneResult:
    """Run (or resume) the pruning experiment ``cfg``; outputs go to ``cfg.run.output_dir``.

    The run directory must be new or empty, unless ``resume`` (continue its checkpoint; an error
    when it has none), ``resume_or_start`` (continue a checkpoint if there is one, else start
    afresh, removing the outputs of a run that never reached a checkpoint) or ``overwrite`` (remove
    the old run's outputs first). Nothing is written before every check has passed: a refused
    resume leaves the directory as it was.
    ``stop_after``: leave after this many steps of this call (after a checkpoint), as a kill would.
    Under torchrun the process group is set up here and closed (barrier, destroy) at the end.
    """
    d, device = distributed.setup(cfg.model.device)
    try:
        recipe = PruneRecipe(cfg, d, device, resume=resume, overwrite=overwrite, resume_or_start=resume_or_start,
                             progress=progress)
        result = recipe.setup().run(stop_after)
    except torch.OutOfMemoryError:  # past the up-front check (check_fits): the knobs, not a traceback
        d.close(clean=False)
        last = find_checkpoint(Path(cfg.run.output_dir) / "checkpoint")
        raise PruneError(f"out of memory on {device}: {advice(cfg)}; `edgeprune estimate CONFIG` gives the "
                         f"figures per setting. Last checkpoint: {last or 'none'} (--resume continues it)") from None
    except BaseException:
        d.close(clean=False)
        raise
    d.close()
    return result


class TargetObjective:
    """``prune.mode: target``: the fit, held to the ramp's sparsity target by the Lagrangian terms
    (``sparsity_control: lagrangian``) or by one common shift of the log_alphas after each step
    (``project``, ``edgeprune/control.py``)."""

    def __init__(self, run: "PruneRecipe"):
        self.run = run

    def start(self) -> None:
        """A new run under ``project``: the first forward already sits on the ramp."""
        if self.run.control == "project" and self.run.existing is None:
            for kind, ramp in self.run.ramps.items():
                self.run.project_onto(kind, ramp.value())

    def loss(self, per_position: torch.Tensor, fit: torch.Tensor, record: dict) -> tuple[torch.Tensor, float]:
        """(loss to minimise, its sparsity terms as a float); fills ``record``'s sparsity fields."""
        r = self.run
        loss, terms = fit, 0.0
        for kind, lam in r.lambdas.items():
            expected = r.masks_of(kind).expected_sparsity()
            target = r.ramps[kind].value()
            if r.control == "lagrangian":  # project: a shift after the step enforces the target, lambdas stay 0
                term = lagrangian(expected, target, lam)
                loss = loss + term
                terms += term.item()
            record.update({f"{kind}_sparsity": expected.item(), f"{kind}_target": target,
                           f"{kind}_gap": expected.item() - target,
                           f"{kind}_lambda1": lam[0].item(), f"{kind}_lambda2": lam[1].item()})
        return loss, terms

    def after_step(self, record: dict) -> None:
        if self.run.control == "project":  # the step took the fit alone; one common shift lands it on the next target
            for kind, ramp in self.run.ramps.items():
                record[f"{kind}_shift"] = self.run.project_onto(kind, ramp.value())


class FaithfulObjective(TargetObjective):
    """``prune.mode: faithful``: no target; E[L0] under a constraint on the fit (``edgeprune/faithful.py``)."""

    def start(self) -> None:
        """A new run starts at the full circuit with the multiplier at its bound: the fit holds every
        mask the outputs need from the first step, and the multiplier decays while the circuit stays
        within the tolerance (``edgeprune/faithful.py``)."""
        if self.run.existing is None:
            start_multiplier(self.run.lambdas)

    def loss(self, per_position, fit, record):
        r = self.run
        return faithful_objective(per_position, fit, r.model, r.lambdas, r.p, record)

    def after_step(self, record: dict) -> None:
        project_multiplier(self.run.lambdas)


class PruneRecipe:
    """The pruning loop as a recipe (torchtune's manner): ``setup`` (checks, then the run directory,
    model, data, ablation states, warm start, masks and optimisers, or a checkpoint's), then ``step``
    per batch, ``evaluate`` and ``save`` at their intervals, and ``finish`` (the final masks, the
    binary circuit's figures, the timing). ``run`` is the loop that calls them."""

    def __init__(self, cfg: ExperimentConfig, d: distributed.Dist, device: torch.device, *, resume: bool,
                 overwrite: bool, resume_or_start: bool, progress: bool):
        self.started = time.perf_counter()
        self.cfg, self.p, self.d, self.device, self.progress = cfg, cfg.prune, d, device, progress
        self.out = Path(cfg.run.output_dir)
        self.ckpt_dir, self.log_path = self.out / "checkpoint", self.out / "log.jsonl"
        self.flags = dict(resume=resume, overwrite=overwrite, resume_or_start=resume_or_start)
        self.say = tqdm.write if d.is_main else (lambda *_: None)
        self.log = _log if d.is_main else (lambda *_: None)
        self.history: list[dict] = []
        self.step_count = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> "PruneRecipe":
        self._check()  # every check first (all ranks), so that a refused run leaves the directory untouched
        self.d.barrier()  # every rank has checked and read the run directory before rank 0 writes to it
        self._write_run_dir()
        distributed.shard_model(self.model, self.d)
        record = prepare_ablation(self.model, self.cfg, self.out, self.train, write=self.d.is_main,
                                  progress=self.progress and self.d.is_main)
        self.say(f"ablation: {record['ablation']} ({record['source']})")
        self._init_reference()  # before the attribution, which may fill it
        if self.method and self.start is None:  # after the ablation states: attribution ablates as pruning will
            self._attribute()
        self._init_masks()
        self._init_optimisers()
        if self.existing is not None:
            self.step_count = _restore(self.saved, self.existing, self.model, self.opt, self.lambda_opt,
                                       self.lambdas, self.ramps, self.generator)
            self.early.load_state_dict(self.saved.get("early_stop", {}))
            why = f" (it had stopped: {self.early.reason})" if self.early.reason else ""
            self.say(f"resumed from {self.existing} at step {self.step_count}{why}")
        self.wandb_run = _start_wandb(self.cfg, self.out) if self.cfg.run.wandb and self.d.is_main else None
        self._init_data_loop()
        self.objective = FaithfulObjective(self) if self.p.mode == "faithful" else TargetObjective(self)
        self.hold_fixed()
        self.objective.start()
        return self

    def _check(self) -> None:
        cfg, p, d = self.cfg, self.p, self.d
        try:
            self.existing, self.stale = run_dir_plan(self.out, **self.flags)
        except RunDirError as err:
            raise PruneError(str(err)) from None
        if cfg.run.wandb and d.is_main:
            if importlib.util.find_spec("wandb") is None:
                raise PruneError('run.wandb / --wandb needs the wandb package: pip install "edgeprune[wandb]"')
        self.model = model = load_model(cfg.model, self.device)
        model.fingerprint()  # before FSDP shards the weights; version 1 too, to resume runs written before version 2
        with contextlib.suppress(FingerprintError):
            model.fingerprint(1)
        model.use_step_settings(p)
        self.train = None
        if cfg.model.positions:  # position-aware masks: the training split names the spans (before the graph check)
            self.train = load_split(cfg.data, model, cfg.data.train_split)
            use_spans(cfg.model.positions, model, self.train)
        self.saved, self.log_lines = None, []
        if self.existing is not None:
            self.saved = load_checkpoint(self.existing)
            _check_compatible(self.saved, self.existing, model, cfg)
            self.log_lines = _log_lines(self.log_path, int(self.saved["step"]), self.say)
        if p.batch_size < d.world:
            raise PruneError(f"prune.batch_size ({p.batch_size}) is the global batch: it must be at least the "
                             f"number of processes ({d.world})")
        self._load_data()
        self._check_warm_start()
        try:  # a step that cannot fit is refused here, naming the knobs, not by an out-of-memory traceback
            check_fits(cfg, model, self.device, d.world)
        except WontFit as err:
            raise PruneError(str(err)) from None

    def _load_data(self) -> None:
        cfg, model = self.cfg, self.model
        if self.train is None:
            self.train = load_split(cfg.data, model, cfg.data.train_split)
        try:
            self.val = load_split(cfg.data, model, cfg.data.eval_split)
        except (FileNotFoundError, ValueError) as err:
            if isinstance(err, TaskFormatError):  # a bad line is an error, not a missing split
                raise
            self.say(f"no validation data ({err}); validating on the training split")
            self.val = self.train
        self.task_metric = get_task_metric(cfg.data, model)

    def _check_warm_start(self) -> None:
        """The warm start of ``prune.init_from``, read and checked before anything is written (a
        resumed run restores over it); attribution computed in place comes after the ablation states."""
        p = self.p
        self.start = None
        self.method = attribution_method(p.init_from)  # eap / eap-ig / auto: prune computes its own scores
        self.own_scores = self.out / f"scores_{self.method}.safetensors" if self.method else None
        if self.method and self.d.world > 1:
            raise PruneError(f"prune.init_from: {p.init_from} computes attribution in one process; under torchrun "
                             f"compute it first (`edgeprune attribute CONFIG --method {self.method}`) and pass the file")
        if self.method and self.existing is not None and self.own_scores.is_file():  # resumed: its own scores
            self.start = warm_start(str(self.own_scores), self.model, p)
        elif p.init_from and not self.method:
            self.start = warm_start(p.init_from, self.model, p)

    def _write_run_dir(self) -> None:
        """Remove a replaced run's outputs, then write the resolved config (and a resumed run's log)."""
        if not self.d.is_main:
            return
        for old in self.stale:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if self.stale:
            self.say(f"removed the previous outputs in {self.out} ({len(self.stale)} entries)")
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        if self.existing is not None:
            self.log_path.write_text("".join(ln + "\n" for ln in self.log_lines))

    def _attribution_batches(self) -> list:
        train = self.train
        return list(batches(train.examples, self.p.batch_size, train.pad_token_id))

    def _attribute(self) -> None:
        p = self.p
        self.say(f"prune.init_from: {p.init_from}: computing {self.method} scores on the training split")
        self.start, scores = attribution_start(self.method, self.model, p, self._attribution_batches(),
                                               self.progress, reference=self.reference)
        save_scores(scores, self.own_scores)
        self.say(f"{self.method}: {scores.wall_time_s:.0f} s; written to {self.own_scores}")

    def _init_masks(self) -> None:
        """Masks start at init_log_alpha (+ seeded jitter), or at the warm start's log_alpha."""
        model, p, device, start = self.model, self.p, self.device, self.start
        self.generator = generator = torch.Generator(device=device).manual_seed(self.cfg.run.seed)
        model.edge_masks.generator = generator
        for masks in (model.edge_masks, model.node_masks):
            if masks is not None:
                with torch.no_grad():
                    # jitter (seeded) spreads the moments at which masks leave 'exactly 1'
                    jitter = torch.rand(masks.n, generator=generator, device=device) * p.init_jitter
                    masks.log_alpha.copy_(p.init_log_alpha + jitter)
        self.fixed = None  # (E,) bool: edges held at exactly 0 outside the candidates
        if start is None:
            return
        self.fixed = fixed_edges(start, p).to(device) if p.candidates is not None else None
        with torch.no_grad():
            model.edge_masks.log_alpha.copy_(start.edge_log_alpha.to(device))
            if model.node_masks is not None and start.node_log_alpha is not None:
                model.node_masks.log_alpha.copy_(start.node_log_alpha.to(device))
        if self.existing is None:
            only = f"; learning only its top {p.candidates} edges" if self.fixed is not None else ""
            self.say(start.describe() + only)

    def _init_optimisers(self) -> None:
        """Masks descend (AdamW), lambdas ascend; the sparsity ramps start where the warm start is."""
        model, p, device, start = self.model, self.p, self.device, self.start
        self.control = "lagrangian" if p.mode == "faithful" else sparsity_control(p)  # faithful: lambdas hold its multiplier
        self.early = EarlyStop(p.early_stop, p.early_stop_tolerance)
        self.mask_params = [model.edge_masks.log_alpha]
        self.lambdas = {"edges": torch.nn.Parameter(torch.zeros(2, device=device))}
        ramp_start = 0.0
        if start is not None and start.kind != "run":  # a scores map is built at the target: no warm-up
            ramp_start = p.edge_target
        elif start is not None:  # another run's masks: ramp from their expected sparsity to this target
            la = start.edge_log_alpha.clone()
            if self.fixed is not None:
                la[self.fixed.cpu()] = OFF_LOG_ALPHA
            ramp_start = min(expected_sparsity_of(la), p.edge_target)
        self.ramps = {"edges": SparsityRamp(p.edge_target, p.warmup_steps, ramp_start)}
        if model.node_masks is not None:
            model.node_masks.generator = self.generator
            self.mask_params.append(model.node_masks.log_alpha)
            if p.node_target is not None:
                self.lambdas["nodes"] = torch.nn.Parameter(torch.zeros(2, device=device))
                self.ramps["nodes"] = SparsityRamp(p.node_target, p.warmup_steps)
        self.opt = torch.optim.AdamW(self.mask_params, lr=p.lr_masks, weight_decay=p.weight_decay)
        self.lambda_opt = torch.optim.AdamW(list(self.lambdas.values()), lr=p.lr_lambdas, weight_decay=0.0,
                                            maximize=True)

    def _init_reference(self) -> None:
        """The reference cache (full-model logits, corrupted states; ``prune.cache_corrupted``). Made before
        the attribution: EAP-IG's masks variant makes a step's very pass for each of its batches
        (``warmstart.fills_reference``), so it fills the cache, and the first epoch's steps read it too."""
        p, train, model = self.p, self.train, self.model
        self.steps_per_epoch = len(epoch_batches(train, p.batch_size, self.cfg.run.seed, 0))
        self.attribution_fills = bool(self.method) and fills_reference(self.method)
        use_cache, why = decide(p.cache_corrupted, p.steps / self.steps_per_epoch, cache_nbytes(model, train.examples),
                                free_bytes(self.device), attribution=self.attribution_fills)
        self.say(f"reference cache: {why}")
        self.reference = ReferenceCache(enabled=use_cache)

    def _init_data_loop(self) -> None:
        """Epoch order, the empty circuit's baseline, timing, and the reference cache refilled on resume."""
        p, train, model, d = self.p, self.train, self.model, self.d
        self.empty = EmptyBaseline()  # the empty circuit's metrics, the same at every validation
        self.epoch, self.order = -1, []
        self.timing = RunTiming.load(self.out / "timing.json") if self.existing is not None else RunTiming()
        if self.reference.enabled and self.existing is not None:
            # resumed: refill from the batches that filled it before (the same values, so exact resume): the
            # attribution's, or the first epoch's that ran
            if self.attribution_fills:
                filled = self._attribution_batches()
            else:
                filled = epoch_batches(train, p.batch_size, self.cfg.run.seed, 0)[:min(self.step_count,
                                                                                     self.steps_per_epoch)]
            self.reference.warm(model, (d.shard(b).to(self.device) for b in filled))
        model.train()

    # ------------------------------------------------------------------ masks
    def masks_of(self, kind: str):
        return self.model.edge_masks if kind == "edges" else self.model.node_masks

    def hold_fixed(self) -> None:
        if self.fixed is not None:
            with torch.no_grad():
                self.model.edge_masks.log_alpha[self.fixed] = OFF_LOG_ALPHA

    def project_onto(self, kind: str, target: float) -> float:
        free = ~self.fixed if kind == "edges" and self.fixed is not None else None
        return project(self.masks_of(kind).log_alpha, target, free)

    # ------------------------------------------------------------------ the step
    def next_batch(self):
        """This rank's rows of the global batch of the current step (epochs shuffled by seed and epoch)."""
        e, i = divmod(self.step_count, self.steps_per_epoch)
        if e != self.epoch:
            self.epoch, self.order = e, epoch_batches(self.train, self.p.batch_size, self.cfg.run.seed, e)
        return self.d.shard(self.order[i]).to(self.device)

    def step(self, batch) -> dict:
        """One optimisation step on ``batch``; returns its log record."""
        cfg, p, model, d = self.cfg, self.p, self.model, self.d
        # logits only at the loss positions: the read-out over the vocabulary is costly
        sel, scale = batch.loss_mask, cfg.data.output_scale
        ref_logits, corrupted = self.reference(model, batch, sel)  # (N, V), corrupted states (W, B, T, D)
        logits = model(batch.input_ids, batch.attention_mask, corrupted_states=corrupted, select=sel,
                       span_ids=batch.span_ids).logits
        del corrupted  # the backward does not need them
        if cfg.data.loss == "mse":
            per_position = ((logits.float() - ref_logits.float()) * scale).pow(2).mean(-1)
        else:
            per_position = kl_divergence(ref_logits * scale, logits * scale)
        # the mean over the global batch's positions; the backward sums dL/dz over ranks (distributed.py)
        n_positions, fit_sum = d.sum(torch.stack([sel.sum().double(), per_position.detach().double().sum()])).tolist()
        fit = per_position.sum() / n_positions
        record = {"step": self.step_count + 1, "kl" if cfg.data.loss == "kl" else "mse": fit_sum / n_positions}
        loss, sparsity_terms = self.objective.loss(per_position, fit, record)
        record["loss"] = fit_sum / n_positions + sparsity_terms
        if not math.isfinite(record["loss"]):
            last = find_checkpoint(self.ckpt_dir)
            raise PruneError(f"non-finite loss at step {self.step_count + 1} ({record}); stopping. The last good "
                             f"checkpoint is {last or 'none (no checkpoint written yet)'}")
        self.opt.zero_grad(set_to_none=True)
        self.lambda_opt.zero_grad(set_to_none=True)
        loss.backward()
        if p.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.mask_params, p.max_grad_norm)
        self.opt.step()
        if self.control == "lagrangian":
            self.lambda_opt.step()
        self.hold_fixed()
        for ramp in self.ramps.values():
            ramp.step += 1
        self.objective.after_step(record)
        self.step_count += 1
        self.history.append(record)
        self.timing.step(self.step_count, record, self.ramps, p.early_stop_tolerance, time.perf_counter() - self.started)
        return record

    # ------------------------------------------------------------------ evaluation and saving
    def evaluate(self, at_step: int, prefix: str = "val_", whole: bool = False) -> dict:
        """The current masks on the validation split (``run.eval_batches`` of it unless ``whole``); logged."""
        cfg, p, val = self.cfg, self.p, self.val
        vb = batches(val.examples, p.batch_size, val.pad_token_id)
        if cfg.run.eval_batches is not None and not whole:
            vb = (b for i, b in enumerate(vb) if i < cfg.run.eval_batches)
        metrics = evaluate(self.model, (self.d.shard(b) for b in vb), loss=cfg.data.loss, task_metric=self.task_metric,
                           output_scale=cfg.data.output_scale, reduce=self.d.sum_floats,
                           empty=True if whole else self.empty)
        self.log(self.log_path, self.wandb_run, {"step": at_step, **{f"{prefix}{k}": v for k, v in metrics.items()}})
        return metrics

    def evaluate_circuit(self, at_step: int) -> tuple[dict, dict]:
        """The binary circuit (threshold + dangling removal, as ``edgeprune eval``) on the whole
        validation split: the figures ``edgeprune eval RUN --split VALIDATION`` prints. Logged as
        ``circuit_val_*``; the learned masks are left as they were."""
        model = self.model
        circuit = extract_circuit(model.graph, model.edge_masks.log_alpha.detach().cpu(),
                                  None if model.node_masks is None else model.node_masks.log_alpha.detach().cpu(),
                                  spans=model.spans)
        model.set_edges(circuit.edges)
        try:
            return self.evaluate(at_step, prefix="circuit_val_", whole=True), circuit.counts
        finally:
            for masks in (model.edge_masks, model.node_masks):
                if masks is not None:
                    masks.override = None

    def save(self, at_step: int) -> None:
        if self.d.is_main:
            state = _state(self.model, self.cfg, self.opt, self.lambda_opt, self.lambdas, self.ramps, self.generator,
                           at_step)
            state["early_stop"] = self.early.state_dict()
            save_checkpoint(state, self.ckpt_dir)

    def after_step(self, record: dict, bar) -> None:
        """Log, progress, validation (and early stopping), checkpoints, at their intervals."""
        cfg, p, step = self.cfg, self.p, self.step_count
        if cfg.run.log_every and (step % cfg.run.log_every == 0 or step == p.steps):
            self.log(self.log_path, self.wandb_run, record)
        bar.set_postfix(kl=f"{record.get('kl', record.get('mse')):.4f}", target=f"{record['edges_target']:.3f}",
                        sparsity=f"{record['edges_sparsity']:.3f}", gap=f"{record['edges_gap']:+.3f}",
                        lam=f"{record['edges_lambda1']:.2f}")
        bar.update(1)
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < p.steps:
            metrics = self.evaluate(step)
            self.model.train()
            if p.early_stop:
                gaps = {k: self.masks_of(k).expected_sparsity().item() - self.ramps[k].target for k in self.ramps}
                if self.early.update(step, metrics.get("kl", metrics.get("mse")), gaps, step >= p.warmup_steps):
                    self.say(self.early.reason)
                    self.log(self.log_path, self.wandb_run, {"step": step, "early_stop": self.early.reason})
                    self.save(step)
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == p.steps:
            self.save(step)

    # ------------------------------------------------------------------ the loop and the end
    def run(self, stop_after: int | None = None) -> PruneResult:
        p = self.p
        bar = tqdm(total=p.steps, initial=self.step_count, desc="prune", disable=not self.progress or not self.d.is_main,
                   dynamic_ncols=True)
        ran = 0
        try:
            while self.step_count < p.steps and self.early.reason is None:
                record = self.step(self.next_batch())
                ran += 1
                self.after_step(record, bar)
                if stop_after is not None and ran >= stop_after and self.step_count < p.steps:
                    self.save(self.step_count)
                    return PruneResult(self.out, self.step_count, self.history, finished=False,
                                       main_process=self.d.is_main)
        finally:
            bar.close()
        return self.finish()

    def finish(self) -> PruneResult:
        """Validate, select (faithful mode), write the masks and the timing, report the circuit."""
        cfg, p, model, d, out, step = self.cfg, self.p, self.model, self.d, self.out, self.step_count
        model.eval()
        final = self.evaluate(step)
        if p.mode == "faithful":  # the masks give an order; the circuit is the sparsest faithful set along it
            selection = select_faithful(model, self.val, cfg)
            apply_selection(model, selection, out if d.is_main else None)
            self.say(selection.describe(p.faithful_tolerance) + f"; {out / 'circuit_selection.json'}")
        if d.is_main:
            _write_masks(model, out / "masks.safetensors")
            self.timing.save(out / "timing.json", step, time.perf_counter() - self.started)
        learned = model.edge_masks.expected_sparsity().item()
        warning = target_warning(learned, p.edge_target, p.early_stop_tolerance) if p.mode != "faithful" else None
        self._report(final, learned)
        if warning:
            self.say(f"warning: {warning}")
            self.log(self.log_path, self.wandb_run, {"step": step, "warning": warning})
        if self.wandb_run is not None:
            self.wandb_run.finish()
        return PruneResult(out, step, self.history, finished=True, main_process=d.is_main, stopped=self.early.reason,
                           warning=warning)

    def _report(self, final: dict, learned: float) -> None:
        """The closing lines: the soft masks' figure labelled as such, then the binary circuit's (``eval``'s)."""
        cfg, p, out, step, fit = self.cfg, self.p, self.out, self.step_count, self.cfg.data.loss
        if p.mode == "faithful":
            self.say(f"done: {step} steps (faithful mode: the selected circuit); validation {fit} "
                     f"{final.get(fit):.4g}; masks in {out / 'masks.safetensors'}")
            return
        binary, counts = self.evaluate_circuit(step)
        part = f"first {cfg.run.eval_batches} batches of " if cfg.run.eval_batches else ""
        self.say(f"done: {step} steps, expected edge sparsity {learned:.4f} (target {p.edge_target:.4f}); soft masks "
                 f"(training's deterministic masks, {part}validation): {fit} {final.get(fit):.4g}")
        faith = f", faithfulness {binary['faithfulness']:.4g}" if "faithfulness" in binary else ""
        self.say(f"the circuit, {counts['edges']} of {counts['total_edges']} edges after dangling-edge removal: "
                 f"validation {fit} {binary.get(fit):.4g}{faith} (what `edgeprune eval {out} --split "
                 f"{cfg.data.eval_split}` gives); masks in {out / 'masks.safetensors'}")


# ---------------------------------------------------------------------------- helpers
def _state(model, cfg, opt, lambda_opt, lambdas, ramps, generator, step) -> dict:
    state = {
        "step": step,
        "model_id": model.model_id,
        "model_fingerprint": model.fingerprint(),
        "graph": model.graph_fingerprint(),
        "config": cfg.to_dict(),
        "edge_log_alpha": model.edge_masks.log_alpha.detach(),
        "lambdas": {k: v.detach() for k, v in lambdas.items()},
        "optimizer": opt.state_dict(),
        "lambda_optimizer": lambda_opt.state_dict(),
        "ramps": {k: r.state_dict() for k, r in ramps.items()},
        "rng": {"torch": torch.get_rng_state(), "masks": generator.get_state()},
    }
    if model.node_masks is not None:
        state["node_log_alpha"] = model.node_masks.log_alpha.detach()
    if model.span_info is not None:
        state["span_info"] = model.span_info
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_compatible(state, where, model, cfg) -> None:
    """The checkpoint belongs to this model (by content: config + weights fingerprint, whatever the
    path it was loaded from) and this config's mask kinds; CheckpointError otherwise."""
    theirs, ours = state.get("graph"), model.graph_fingerprint()
    if theirs != ours:
        raise CheckpointError(f"{where}: checkpoint is for another graph ({theirs}), this model has {ours}")
    check_same_model(state.get("model_fingerprint"), state.get("model_id"), model, str(where))
    if (state.get("node_log_alpha") is None) != (model.node_masks is None):
        raise CheckpointError(f"{where}: node masks in checkpoint and config disagree (model.node_masks)")
    kinds = {"edges"} | ({"nodes"} if model.node_masks is not None and cfg.prune.node_target is not None else set())
    if set(state.get("lambdas", {})) != kinds:
        raise CheckpointError(f"{where}: checkpoint has sparsity terms {sorted(state.get('lambdas', {}))}, the "
                              f"config {sorted(kinds)} (prune.node_target)")


def _restore(state, where, model, opt, lambda_opt, lambdas, ramps, generator) -> int:
    with torch.no_grad():
        model.edge_masks.log_alpha.copy_(state["edge_log_alpha"])
        if model.node_masks is not None:
            model.node_masks.log_alpha.copy_(state["node_log_alpha"])
        for k, v in lambdas.items():
            v.copy_(state["lambdas"][k])
    opt.load_state_dict(_fix_optimizer_state(state["optimizer"]))
    lambda_opt.load_state_dict(_fix_optimizer_state(state["lambda_optimizer"]))
    for k, r in ramps.items():
        r.load_state_dict(state["ramps"][k])
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["masks"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def _fix_optimizer_state(sd: dict) -> dict:
    """JSON turns the integer parameter ids of an optimiser state into strings; turn them back."""
    sd = dict(sd)
    sd["state"] = {int(k): v for k, v in sd["state"].items()}
    return sd


def _write_masks(model: EdgeModel, path: Path) -> None:
    tensors = {"edge_log_alpha": model.edge_masks.log_alpha.detach()}
    if model.node_masks is not None:
        tensors["node_log_alpha"] = model.node_masks.log_alpha.detach()
    meta = {"model_id": str(model.model_id), "graph": json.dumps(model.graph_fingerprint(), sort_keys=True),
            "model_fingerprint": json.dumps(model.fingerprint(), sort_keys=True)}
    if model.span_info is not None:  # per span its token counts in the training split (circuit.json)
        meta["spans"] = json.dumps(model.span_info)
    write_safetensors(tensors, path, meta)


def _log(path: Path, wandb_run, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if wandb_run is not None:
        wandb_run.log(record, step=record["step"])


def _log_lines(path: Path, step: int, say) -> list[str]:
    """The lines of ``log.jsonl`` up to the checkpoint's ``step`` (later ones are logged again).

    A partial last line (a kill during the append) is dropped with a notice: the checkpoint is the
    truth. Any other damage is an error naming the file and the line.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            at = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if number == len(lines) and not text.endswith("\n"):  # the unterminated last line
                say(f"{path}:{number}: dropped a partial last line (the run was killed while logging); "
                    "the checkpoint is the truth")
                break
            raise CheckpointError(f"{path}:{number}: damaged log line ({type(err).__name__}: {err}); "
                                  "fix or delete the file to resume") from None
        if at <= step:
            kept.append(line)
    return kept


def _start_wandb(cfg: ExperimentConfig, out: Path):
    """wandb only when asked; offline unless an API key or WANDB_MODE says otherwise."""
    try:
        import wandb  # optional dependency (edgeprune[wandb]), only with --wandb
    except ImportError as err:
        raise PruneError('--wandb needs the wandb package: pip install "edgeprune[wandb]"') from err
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=cfg.run.wandb_project, config=cfg.to_dict(), dir=str(out), mode=mode,
                      name=out.name)
