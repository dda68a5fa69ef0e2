"""Experiment configs: dataclasses loaded from YAML, overridable from the command line.

A config file has four sections, each a dataclass below (every field has a default except the
model and the task path)::

    model: {name_or_path: gpt2, dtype: float32, ablation: interchange, ...}
    data:  {path: data/datasets/ioi, max_length: 64, ...}
    prune: {edge_target: 0.98, steps: 3000, warmup_steps: 2500, batch_size: 32, ...}
    run:   {output_dir: runs/gpt2_ioi, seed: 0, eval_every: 100, ...}

Overrides use dotted keys (``--set prune.steps=5``); values are parsed as YAML scalars (and a
float field also takes ``1e-3``, which YAML 1.1 reads as a string). Unknown keys, wrong types and
bad values are errors that name the key and where its value came from: the file, or the command
line (with the flag, e.g. ``--steps``). The resolved config is written next to the outputs of
every run (``config.yaml``).

Paths. A relative ``model.name_or_path`` or ``data.path`` in a config file is resolved from the
config file's directory when it exists there (so a config runs from any directory); otherwise it
is used as written (a hub id such as ``gpt2``, ``tracr``, or a path from the current directory).
Paths given on the command line are taken from the current directory. ``run.output_dir`` is
relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id or local directory (HF checkpoint or a compiled Tracr model)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen weights; masks stay fp32
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    ablation: str | None = None  # interchange | zero | mean; None: interchange (zero for Tracr)
    node_masks: bool = False  # also learn one mask per writer node
    revision: str | None = None  # passed to from_pretrained
    positions: str | None = None  # null: masks shared by every position; spans: one mask per (edge, named
    # span of the task's prompts); positions: one per (edge, token position), prompts of one length


@dataclass
class DataConfig:
    path: str = ""  # a JSONL task file, or a directory with train/validation/test.jsonl
    task: str | None = None  # task metrics to report (ioi, gt, gp, boolean); None: generic only
    max_length: int | None = 64  # longer examples are an error, never silently cut
    train_split: str = "train"
    eval_split: str = "validation"
    loss: str = "kl"  # kl: KL(p_full || p_circuit) | mse: numerical outputs (Tracr xproportion)
    output_scale: float = 1.0  # outputs are multiplied by this before the loss (Tracr: one-hot values, not logits)


@dataclass
class PruneConfig:
    edge_target: float = 0.95  # target edge sparsity (fraction of edges removed), in [0, 1]
    allow_overshoot: bool = False  # allow edge_target/node_target in (1, 2]: the reference's trick of
    # aiming past 1 so that the learned sparsity gets close to 1; the target is then not a fraction
    node_target: float | None = None  # target node sparsity (needs model.node_masks)
    steps: int = 1000
    warmup_steps: int = 800  # the targets ramp linearly from 0 to their value over these steps
    batch_size: int = 16
    init_log_alpha: float = 3.0  # >= 2.4 keeps every deterministic mask exactly 1 at the start,
    # while sampled masks already fall below 1 sometimes, so the loss reaches them from step 1
    init_jitter: float = 0.0  # add U(0, init_jitter) to each initial log_alpha (seeded)
    lr_masks: float = 0.8  # the Edge Pruning paper uses 0.8 for masks and lambdas
    lr_lambdas: float = 0.8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    sparsity_control: str = "auto"  # lagrangian | project | auto (project for targets < 1, else lagrangian):
    # project: after every step a common shift of all log_alpha puts the expected sparsity exactly on
    # the ramp's target (the Lagrangian's lambdas then stay ~0); lagrangian: the paper's dual ascent only
    init_from: str | None = None  # warm start: a scores file (edgeprune attribute), a run directory, or
    # auto / eap / eap-ig: prune computes that attribution on the training split first (edgeprune.warmstart)
    candidates: int | None = None  # learn only the top N edges of prune.init_from; the rest stay exactly 0
    early_stop: int = 0  # stop once the target is reached and validation KL has not improved for this
    # many evaluations (run.eval_every) in a row; 0: off
    early_stop_tolerance: float = 0.005  # "reached": |expected sparsity - target| <= this
    cache_corrupted: bool | str = "auto"  # reference logits/corrupted states once per example (edgeprune.cache);
    # auto: when the run has more than one epoch and the cache fits in a quarter of the free memory
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (less memory)
    keep_inputs: float | None = None  # keep the deepest layers' Q/K/V inputs for the backward instead of
    # rebuilding them, up to this share of the writer states' size; null: 0.15 on CPU, 0 on GPUs
    mode: str = "target"  # target: reach edge_target | faithful: no target, the sparsest circuit whose
    # fit (KL or MSE) stays <= faithful_tolerance (edgeprune/faithful.py)
    faithful_tolerance: float = 0.01  # faithful: the largest mean KL / MSE per position of the circuit
    faithful_per_position: bool = False  # faithful: the tolerance bounds every position, not the mean


@dataclass
class RunConfig:
    output_dir: str = "runs/experiment"
    seed: int = 0
    eval_every: int = 100  # validation interval in steps (0: only at the end)
    save_every: int = 100  # checkpoint interval in steps (0: only at the end)
    log_every: int = 10
    eval_batches: int | None = None  # validation batches per evaluation (None: the whole split)
    wandb: bool = False
    wandb_project: str = "edgeprune"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        self.sources: dict[str, str] = {}  # key -> where its value came from (file or command line)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config") -> "ExperimentConfig":
        """Check values (not only types); errors name the field and where its value came from."""
        def where(key: str) -> str:
            return self.sources.get(key, source)

        def bad(key, msg):
            raise ConfigError(f"{where(key)}: {key}: {msg}")

        for check in (self._check_finite, self._check_model, self._check_data, self._check_targets,
                      self._check_schedule, self._check_prune_options, self._check_run):
            check(bad, where)
        return self

    def _check_finite(self, bad, where) -> None:
        """No NaN or infinity in any float field."""
        for section in dataclasses.fields(self):
            for f in dataclasses.fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    bad(f"{section.name}.{f.name}", f"must be a finite number, got {value}")

    def _check_model(self, bad, where) -> None:
        if not self.model.name_or_path:
            bad("model.name_or_path", "required (a hub id such as 'gpt2' or a local directory)")
        if self.model.dtype not in ("float32", "bfloat16", "float16"):
            bad("model.dtype", f"must be float32, bfloat16 or float16, got {self.model.dtype!r}")
        if self.model.positions not in (None, "spans", "positions"):
            bad("model.positions", f"must be spans, positions or null, got {self.model.positions!r}")
        if self.model.positions is not None and self.model.node_masks:
            bad("model.positions", "position-aware edge masks do not combine with model.node_masks (node masks "
                "are shared by every position)")
        if self.model.ablation not in (None, "interchange", "zero", "mean"):
            bad("model.ablation", f"must be interchange, zero or mean, got {self.model.ablation!r}")

    def _check_data(self, bad, where) -> None:
        if not self.data.path:
            bad("data.path", "required (a JSONL task file or a directory of train/validation/test.jsonl)")
        if self.data.output_scale <= 0:
            bad("data.output_scale", f"must be > 0, got {self.data.output_scale}")
        if self.data.loss not in ("kl", "mse"):
            bad("data.loss", f"must be kl or mse, got {self.data.loss!r}")
        if self.data.max_length is not None and self.data.max_length < 2:
            bad("data.max_length", f"must be >= 2 (a prefix and a predicted token) or null, got {self.data.max_length}")

    def _check_targets(self, bad, where) -> None:
        """prune.edge_target / node_target: fractions removed, in [0, 1] (or up to 2 with allow_overshoot)."""
        p = self.prune
        for key in ("edge_target", "node_target"):
            value = getattr(p, key)
            if value is None:
                continue
            top = 2.0 if p.allow_overshoot else 1.0
            if not 0.0 <= value <= top:
                hint = ("; a target above 1 (aiming past full sparsity, as the reference implementation "
                        "allows) needs prune.allow_overshoot: true") if 1.0 < value <= 2.0 else ""
                bad(f"prune.{key}", f"is the fraction of {key.split('_')[0]}s removed, in [0, {top:g}]; "
                                   f"got {value}{hint}")
        if p.node_target is not None and not self.model.node_masks:
            bad("prune.node_target", "needs model.node_masks: true")

    def _check_schedule(self, bad, where) -> None:
        """Steps, batch, warm-up, learning rates and how sparsity is controlled."""
        p = self.prune
        for key in ("steps", "batch_size"):
            if getattr(p, key) < 1:
                bad(f"prune.{key}", f"must be >= 1, got {getattr(p, key)}")
        if p.init_jitter < 0:
            bad("prune.init_jitter", f"must be >= 0, got {p.init_jitter}")
        if p.warmup_steps < 0:
            bad("prune.warmup_steps", f"must be >= 0, got {p.warmup_steps}")
        if p.warmup_steps > p.steps:
            bad("prune.warmup_steps", f"{p.warmup_steps} is longer than prune.steps ({p.steps}, from "
                                      f"{where('prune.steps')}): the target would never be reached; make the warm-up at most prune.steps "
                                      f"(the --steps shortcut of prune caps it)")
        for key in ("lr_masks", "lr_lambdas"):
            if getattr(p, key) <= 0:
                bad(f"prune.{key}", f"must be > 0, got {getattr(p, key)}")
        if p.cache_corrupted not in (True, False, "auto"):
            bad("prune.cache_corrupted", f"must be true, false or auto, got {p.cache_corrupted!r}")
        if p.sparsity_control not in ("auto", "project", "lagrangian"):
            bad("prune.sparsity_control", f"must be auto, project or lagrangian, got {p.sparsity_control!r}")
        if p.sparsity_control == "project" and max(p.edge_target, p.node_target or 0.0) >= 1.0:
            bad("prune.sparsity_control", "project puts the expected sparsity exactly on the target, and a target "
                                          ">= 1 would prune every edge; use lagrangian (or auto) to aim past 1")

    def _check_prune_options(self, bad, where) -> None:
        """Candidates, warm start, early stop, the faithful mode, weight decay and clipping."""
        p = self.prune
        if p.candidates is not None:
            if p.candidates < 1:
                bad("prune.candidates", f"must be >= 1 (edges to learn) or null, got {p.candidates}")
            if not p.init_from:
                bad("prune.candidates", "needs prune.init_from (the scores or run whose top edges are the candidates)")
        if p.init_from is not None and not p.init_from:
            bad("prune.init_from", "must be a scores file, a run directory, auto, eap, eap-ig, or null")
        if p.early_stop < 0:
            bad("prune.early_stop", f"must be >= 0 (evaluations without improvement; 0: off), got {p.early_stop}")
        if p.early_stop and not self.run.eval_every:
            bad("prune.early_stop", "needs validations: set run.eval_every > 0")
        if not 0.0 < p.early_stop_tolerance < 1.0:
            bad("prune.early_stop_tolerance", f"must be in (0, 1), got {p.early_stop_tolerance}")
        if p.mode not in ("target", "faithful"):
            bad("prune.mode", f"must be target or faithful, got {p.mode!r}")
        if not p.faithful_tolerance > 0:
            bad("prune.faithful_tolerance", f"must be > 0 (the largest KL / MSE the circuit may add), "
                                            f"got {p.faithful_tolerance}")
        if p.weight_decay < 0:
            bad("prune.weight_decay", f"must be >= 0, got {p.weight_decay}")
        if p.max_grad_norm is not None and p.max_grad_norm <= 0:
            bad("prune.max_grad_norm", f"must be > 0 or null (no clipping), got {p.max_grad_norm}")
        if p.keep_inputs is not None and not p.keep_inputs >= 0:
            bad("prune.keep_inputs", f"must be >= 0 (a share of the writer states' size) or null "
                                     f"(the device's default), got {p.keep_inputs}")

    def _check_run(self, bad, where) -> None:
        for key in ("eval_every", "save_every", "log_every"):
            if getattr(self.run, key) < 0:
                bad(f"run.{key}", f"must be >= 0, got {getattr(self.run, key)}")
        if self.run.eval_batches is not None and self.run.eval_batches < 1:
            bad("run.eval_batches", f"must be >= 1 or null (the whole split), got {self.run.eval_batches}")
        if not self.run.output_dir:
            bad("run.output_dir", "must not be empty")


# ---------------------------------------------------------------------------- loading
def _type_ok(value, hint) -> tuple[bool, object]:
    """Is ``value`` of type ``hint``? Returns (ok, value converted where lossless: int -> float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, conv = _type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return True, float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    return isinstance(value, hint), value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _set(cfg: ExperimentConfig, key: str, value, source: str) -> None:
    section_name, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section_name not in sections or not name:
        raise ConfigError(f"{source}: unknown key {key!r} (sections: {', '.join(sections)}; "
                          "keys look like 'prune.steps')")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"{source}: unknown key {key!r} (known in {section_name}: {', '.join(hints)})")
    ok, value = _type_ok(value, hints[name])
    if not ok:
        raise ConfigError(f"{source}: {key} must be {_type_name(hints[name])}, got {value!r} "
                          f"({type(value).__name__})")
    setattr(section, name, value)
    cfg.sources[key] = source


def from_dict(data: dict, source: str = "config") -> ExperimentConfig:
    cfg = ExperimentConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, prune, run), "
                          f"got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config and apply ``key=value`` overrides; validated, with errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    cfg = from_dict(data, str(path))
    _resolve_paths(cfg, path.parent)
    apply_overrides(cfg, overrides or [])
    return cfg.validate(str(path))


PATH_KEYS = ("model.name_or_path", "data.path", "prune.init_from")


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> None:
    """Relative input paths of a config file, from the file's directory when they exist there."""
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value and not Path(value).is_absolute() and (base / value).exists():
            setattr(getattr(cfg, section), name, str((base / value).resolve()))


def apply_overrides(cfg: ExperimentConfig, overrides: list[str], source: str = "command line") -> ExperimentConfig:
    """Apply ``key=value`` overrides; ``source`` names where they came from in error messages."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{source}: override {item!r}: expected key=value, e.g. prune.steps=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set(cfg, key.strip(), value, source)
    return cfg


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
