"""A run directory: what ``edgeprune prune`` writes and every other command reads, in one place.

- its files (``RUN_OUTPUTS``) and what a new, resumed or replaced run does with them (``run_dir_plan``);
- its resolved config (``load_run_config``);
- its masks (``load_masks`` -> ``RunMasks``: the final ``masks.safetensors``, else the latest
  checkpoint) and the check that they belong to a model (``RunMasks.check_model``,
  ``check_same_model``: graph fingerprint and content fingerprint of the weights);
- its wall time (``RunTiming``, ``timing.json``).
"""

from __future__ import annotations

import fnmatch
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from .circuit import extract_circuit, load_edges, remove_dangling
from .config import ExperimentConfig, apply_overrides, load_config
from .experiment import load_model, prepare_ablation
from .graph import edges_to_mask
from .identity import FingerprintError, fingerprint_version
from .spans import refuse_positions

if TYPE_CHECKING:
    from .model import EdgeModel


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (not a run, a refused overwrite or resume)."""


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The resolved config a run wrote (``RUN_DIR/config.yaml``), with ``--set``-style overrides."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (is this a run directory written by `edgeprune prune`?)")
    cfg = load_config(cfg_path)
    apply_overrides(cfg, list(overrides or []))
    return cfg.validate(str(cfg_path))


# What ``prune``, ``eval``, ``export``, ``draw``, ``attribute``, ``curve`` and ``compare`` write into a
# run directory: what ``--overwrite`` removes. Anything else there makes ``--overwrite`` refuse, except
# attribution scores (``scores_*.safetensors``), which neither block a run nor are removed.
RUN_OUTPUTS = ("config.yaml", "log.jsonl", "checkpoint", "checkpoint.tmp", "checkpoint.old", "masks.safetensors",
               "masks.safetensors.tmp", "metrics*.json", "edges*.json", "circuit*", "timing.json",
               "mean_states.safetensors", "wandb", "restarts.json", "curve*", "compare*", "estimate.json", "seed*")


def run_dir_plan(out: Path, *, resume: bool, overwrite: bool, resume_or_start: bool) -> tuple[Path | None, list[Path]]:
    """(checkpoint to resume or None, old outputs to remove before starting) for a run directory;
    RunDirError when the combination is refused. Reads only."""
    existing = find_checkpoint(out / "checkpoint")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    if (resume or resume_or_start) and existing is not None:
        return existing, []
    if resume and not resume_or_start:
        raise RunDirError(f"--resume: {out} has no checkpoint to continue ({out / 'checkpoint'} is missing); "
                         "start the run without --resume, or pass --resume-or-start")
    # attribution scores (``edgeprune attribute`` writes them here by default) are not a run: kept
    present = [p for p in sorted(out.iterdir()) if not fnmatch.fnmatch(p.name, "scores_*.safetensors")] \
        if out.is_dir() else []
    if not present:
        return None, []
    if not (overwrite or resume_or_start):
        what = f"a run (checkpoint at {existing})" if existing is not None else \
            f"{len(present)} file(s): {', '.join(p.name for p in present[:5])}{' ...' if len(present) > 5 else ''}"
        raise RunDirError(f"{out} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
                         "or choose another run.output_dir")
    foreign = [p.name for p in present if not any(fnmatch.fnmatch(p.name, pat) for pat in RUN_OUTPUTS)]
    if foreign:
        raise RunDirError(f"{out}: refusing to overwrite: {', '.join(foreign)} is not an edgeprune output; "
                         "move it away or choose another run.output_dir")
    return None, present


@dataclass
class RunTiming:
    """Wall time of a run (``timing.json``): the whole run, summed over resumed invocations, and
    when the expected sparsity first sat on its final target (within ``prune.early_stop_tolerance``)
    -- the time a user waits for a circuit of the asked size. Seconds include model loading."""
    previous_s: float = 0.0  # invocations before this one (a resumed run)
    target_reached_step: int | None = None
    target_reached_s: float | None = None

    @classmethod
    def load(cls, path: Path) -> "RunTiming":
        try:
            saved = json.loads(path.read_text())
            return cls(float(saved["wall_time_s"]), saved.get("target_reached_step"), saved.get("target_reached_s"))
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: the time before is unknown
            return cls()

    def step(self, step: int, record: dict, ramps: dict, tolerance: float, elapsed: float) -> None:
        ramp = ramps.get("edges")
        if (self.target_reached_step is None and ramp is not None and record.get("edges_target") == ramp.target
                and abs(record.get("edges_gap", math.inf)) <= tolerance):
            self.target_reached_step, self.target_reached_s = step, self.previous_s + elapsed

    def save(self, path: Path, steps: int, elapsed: float) -> None:
        path.write_text(json.dumps({"wall_time_s": self.previous_s + elapsed, "steps": steps,
                                    "target_reached_step": self.target_reached_step,
                                    "target_reached_s": self.target_reached_s}, indent=2) + "\n")


def check_same_model(saved_fp: dict | None, saved_id: str | None, model: EdgeModel, where: str,
                     allow_other: bool = False) -> None:
    """Masks saved for one model must not be applied to another: compare content fingerprints.

    Runs written before fingerprints existed carry only the model id: then the id is compared.
    ``allow_other`` turns a mismatch into a warning (to transfer masks on purpose, e.g. to another
    training checkpoint of the same model).
    """
    if saved_fp is not None:
        try:  # a run written by an older edgeprune is compared with its own fingerprint version
            ours = model.fingerprint(fingerprint_version(saved_fp))
        except FingerprintError as err:
            raise CheckpointError(f"{where}: {err}; this run's fingerprint (version "
                                  f"{fingerprint_version(saved_fp)}) cannot be checked by this edgeprune: rerun "
                                  "`edgeprune prune` to write a current run") from None
        same = saved_fp == ours
        theirs = f"{saved_id!r} (fingerprint {saved_fp.get('weights', '?')[:12]})"
        mine = f"{model.model_id!r} (fingerprint {ours.get('weights', '?')[:12]})"
    else:
        same = saved_id == model.model_id
        theirs, mine = repr(saved_id), repr(model.model_id)
    if same:
        return
    message = (f"{where}: these masks were learned on model {theirs}, but the config loads {mine}, "
               "another model (its config or weights differ)")
    if allow_other:
        warnings.warn(message + "; applying them anyway (--allow-other-model)", stacklevel=2)
        return
    raise CheckpointError(message + "; pass --allow-other-model to apply them anyway")


@dataclass
class RunMasks:
    """A run's learned masks and what they were learned on."""
    edge_log_alpha: torch.Tensor  # (E,)
    node_log_alpha: torch.Tensor | None  # (W,)
    graph: dict  # EdgeModel.graph_fingerprint() of the model
    model_id: str | None
    model_fingerprint: dict | None  # EdgeModel.fingerprint(); None in runs written before it existed
    source: Path
    span_info: list[dict] | None = None  # position-aware runs: per span its token counts

    @property
    def spans(self) -> list[str] | None:
        """The span names of position-aware masks (their order), or None."""
        return (self.graph or {}).get("spans")

    def apply_spans(self, model: EdgeModel) -> None:
        """Make ``model``'s masks position-aware like these (a shared-mask run: nothing to do)."""
        if self.spans is not None:
            model.set_spans(self.spans, mode=self.graph.get("positions", "spans"), info=self.span_info)

    def __iter__(self):  # (edge, node, graph), as older callers unpack it
        return iter((self.edge_log_alpha, self.node_log_alpha, self.graph))

    def check_model(self, model: EdgeModel, allow_other: bool = False, shared_into_spans: bool = False) -> None:
        """CheckpointError unless these masks belong to ``model``'s graph and to the model itself.
        ``shared_into_spans``: shared masks for a position-aware model of the same graph (a warm start
        repeats them in every span)."""
        ours, spans, n = model.graph_fingerprint(), model.spans, model.edge_masks.n
        if shared_into_spans and self.spans is None and spans is not None:  # compared as the shared graph
            ours = {k: v for k, v in ours.items() if k not in ("spans", "positions")}
            spans, n = None, model.graph.num_edges
        if self.graph and self.graph != ours:
            raise CheckpointError(f"{self.source}: the masks are for another graph ({self.graph}); this model "
                                  f"has {ours}")
        if self.edge_log_alpha.numel() != n:
            raise CheckpointError(f"{self.source}: masks have {self.edge_log_alpha.numel()} edges but the model's "
                                  f"graph has {n} ({model.graph.describe()}"
                                  f"{'' if spans is None else f' x {len(spans)} spans'})")
        check_same_model(self.model_fingerprint, self.model_id, model, str(self.source), allow_other)


def load_masks(run_dir: str | Path) -> RunMasks:
    """A run's masks: its final ``masks.safetensors``, else its latest checkpoint (a run that was
    stopped early). A damaged file is a CheckpointError naming it."""
    run_dir = Path(run_dir)
    path = run_dir / "masks.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if "edge_log_alpha" not in keys:
                    raise CheckpointError(f"{path}: no 'edge_log_alpha' tensor (found {sorted(keys)}): not an "
                                          "edgeprune masks file")
                edge = f.get_tensor("edge_log_alpha")
                node = f.get_tensor("node_log_alpha") if "node_log_alpha" in keys else None
            graph = json.loads(meta.get("graph", "{}"))
            fp = json.loads(meta["model_fingerprint"]) if "model_fingerprint" in meta else None
            span_info = json.loads(meta["spans"]) if "spans" in meta else None
        except (SafetensorError, OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: damaged masks file ({type(err).__name__}: {err}); re-export it "
                                  "from the run's checkpoint or rerun") from None
        model_id = meta.get("model_id")
        return RunMasks(edge, node, graph, None if model_id in (None, "None") else model_id, fp, path, span_info)
    ckpt = find_checkpoint(run_dir / "checkpoint")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no masks.safetensors and no checkpoint/ (is this a run directory "
                                "written by `edgeprune prune`?)")
    state = load_checkpoint(ckpt)
    return RunMasks(state["edge_log_alpha"], state.get("node_log_alpha"), state["graph"], state.get("model_id"),
                    state.get("model_fingerprint"), ckpt, state.get("span_info"))


def circuit_to_evaluate(run_dir: Path, model, edges_file: str | None = None, allow_other_model: bool = False):
    """(edges, info) of the circuit a command evaluates on ``model``: a given edges.json, else the
    run's masks binarised (threshold + dangling removal, as ``export``); ``info`` has its source and
    counts (and thresholds). Position-aware runs make ``model``'s masks position-aware first."""
    masks = load_masks(run_dir)
    masks.apply_spans(model)  # a position-aware run: masks (and edges) per span
    if edges_file:
        edges = load_edges(edges_file)
        try:
            kept = edges_to_mask(model.graph, edges, model.spans)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{edges_file}: {err.args[0] if err.args else err}") from None
        counts = {"total_edges": kept.numel(), "edges": int(kept.sum()),
                  "edges_after_dangling": int(remove_dangling(model.graph, kept, model.n_spans).sum()),
                  "edge_sparsity": 1.0 - int(kept.sum()) / kept.numel()}
        return edges, {"source": str(edges_file), "counts": counts}
    masks.check_model(model, allow_other_model)
    circuit = extract_circuit(model.graph, masks.edge_log_alpha, masks.node_log_alpha, spans=masks.spans)
    return circuit.edges, {"source": "masks", "counts": circuit.counts, "thresholds": circuit.thresholds()}


def load_circuit_model(run_dir: str | Path, overrides: list[str] | None = None, edges_file: str | None = None,
                       allow_other_model: bool = False, ablation_states: bool = True):
    """(model, info, cfg): the run's model with its circuit set (``circuit_to_evaluate``), for
    ``generate`` and ``eval --text``; ``overrides`` are ``--set``-style (an ``--ablation`` too). With
    ``ablation_states`` the model gets the run's own ablation states (``experiment.prepare_ablation``:
    the mean states pruning stored, or the same definition for older runs)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    model = load_model(cfg.model)
    edges, info = circuit_to_evaluate(run_dir, model, edges_file, allow_other_model)
    refuse_positions(model.spans, str(run_dir), "generate / eval --text (free text and new tokens have no spans)")
    model.set_edges(edges)
    if ablation_states:
        info["ablation"] = prepare_ablation(model, cfg, run_dir)
    return model, info, cfg
