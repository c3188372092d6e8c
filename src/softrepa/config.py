"""Typed training configuration: dataclasses with validation, loaded from YAML over defaults.

`load_config(path, overrides)` reads a recipe (`configs/sd3.yaml`, ...) over the defaults below
and applies `--key value` overrides with dotted keys (`--loss.tau 0.05`, `--tokens.num_tokens 8`).
Unknown keys and wrong types are errors that name the key; the resolved config is what gets saved
beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checks import MAX_BATCH, MAX_SIDE, MAX_STEPS, MAX_TEXT_LENGTH, finite, int_in, load_yaml, read_text
from .errors import ConfigError
from .loss import binned_tau, linear_tau
from .negatives import NegativesConfig
from .objectives import get_objective
from .speedups import SpeedConfig
from .tokens import SoftTokensConfig


TAU_SCHEDULES = ("constant", "linear", "calibrated")


@dataclass
class LossConfig:
    """Contrastive loss (defaults: the authors' tau = 0.07, scale = 4, exp logits, i2t only).

    Args:
        tau: the temperature of the "constant" schedule.
        tau_schedule: "constant" (tau for every t, the authors' choice) or "linear"
            (`softrepa.loss.linear_tau`: tau_min at t = 0 rising to tau_max at t = 1000).
            Or "calibrated" (`softrepa.loss.binned_tau`): one temperature per timestep bin,
            `tau_table`, estimated from the model's own errors before the first step when not
            given (`softrepa.diagnose.calibrate_tau`) and saved in the run's config.yaml.
        tau_min, tau_max: the ends of the "linear" schedule (both required there, > 0; not
            accepted with "constant", where they would be silently unused).
        tau_table: the "calibrated" schedule's temperatures, one per equal bin of 0..1000.
        tau_bins: bins of the calibration (used when tau_table is not given).
        calibration_batches: batches drawn from the training data to calibrate tau_table.
        scale, form, symmetric, denoise_weight, contrastive_weight: see
            `softrepa.loss.softrepa_loss` (contrastive_weight 0 with denoise_weight 1: the
            positive-only control, also spelled `objective: positive_only`).
    """

    tau: float = 0.07
    tau_schedule: str = "constant"
    tau_min: float | None = None
    tau_max: float | None = None
    tau_table: list[float] | None = None
    tau_bins: int = 10
    calibration_batches: int = 20
    scale: float = 4.0
    form: str = "exp"
    symmetric: bool = False
    denoise_weight: float = 0.0
    contrastive_weight: float = 1.0

    def __post_init__(self) -> None:
        # NaN / inf / 0 switch the loss's signal off without a word: refused (issue 26)
        finite(self.tau, "loss.tau", above=0, error=ConfigError)
        finite(self.scale, "loss.scale", above=0, error=ConfigError)
        finite(self.denoise_weight, "loss.denoise_weight", at_least=0, error=ConfigError)
        finite(self.contrastive_weight, "loss.contrastive_weight", at_least=0, error=ConfigError)
        for name, value in [("tau_min", self.tau_min), ("tau_max", self.tau_max),
                            *(("tau_table", v) for v in self.tau_table or [])]:
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ConfigError(f"loss.{name} must be a finite number > 0, got {value!r}")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ConfigError(f"loss.tau_schedule must be one of {'|'.join(TAU_SCHEDULES)}, got {self.tau_schedule!r}")
        if self.tau_table is not None:
            if self.tau_schedule != "calibrated":
                raise ConfigError("loss.tau_table is only used with loss.tau_schedule: calibrated")
            if not self.tau_table or not all(v > 0 for v in self.tau_table):
                raise ConfigError(f"loss.tau_table must be a non-empty list of values > 0, got {self.tau_table}")
        int_in(self.tau_bins, "loss.tau_bins", 1, 1000, error=ConfigError)  # bins of t in 0..1000
        if self.calibration_batches < 1:
            raise ConfigError(f"loss.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.contrastive_weight < 0:
            raise ConfigError(f"loss.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        for name in ("tau_min", "tau_max"):
            value = getattr(self, name)
            if self.tau_schedule == "linear" and value is None:
                raise ConfigError(f"loss.{name} is required with loss.tau_schedule: linear")
            if self.tau_schedule != "linear" and value is not None:
                raise ConfigError(f"loss.{name} is only used with loss.tau_schedule: linear "
                                  f"(the {self.tau_schedule} schedule does not read it); got {value}")
            if value is not None and not value > 0:
                raise ConfigError(f"loss.{name} must be > 0, got {value}")
        if self.form not in ("exp", "neg"):
            raise ConfigError(f"loss.form must be 'exp' or 'neg', got {self.form!r}")
        if self.denoise_weight < 0:
            raise ConfigError(f"loss.denoise_weight must be >= 0, got {self.denoise_weight}")

    def describe_tau(self) -> str:
        """The temperature as a run actually uses it, e.g. "tau 0.07" or "tau linear 0.05 -> 0.2"."""
        if self.tau_schedule == "linear":
            return f"tau linear {self.tau_min:g} -> {self.tau_max:g}"
        if self.tau_schedule == "calibrated":
            if self.tau_table is None:
                return f"tau calibrated ({self.tau_bins} bins, to be estimated)"
            return f"tau calibrated {min(self.tau_table):.3g}..{max(self.tau_table):.3g} ({len(self.tau_table)} bins)"
        return f"tau {self.tau:g}"


def loss_kwargs(loss: LossConfig) -> dict[str, Any]:
    """Keyword arguments of `softrepa_loss` for a `LossConfig` (tau: a float, `linear_tau` or `binned_tau`)."""
    # the constant schedule passes the float itself: the authors' path, bit for bit as before
    if loss.tau_schedule == "constant":
        tau: Any = loss.tau
    elif loss.tau_schedule == "linear":
        tau = linear_tau(loss.tau_min, loss.tau_max)
    else:
        if loss.tau_table is None:
            raise ConfigError("loss.tau_schedule: calibrated needs loss.tau_table (Trainer.calibrate() estimates it)")
        tau = binned_tau(loss.tau_table)
    kw = dict(tau=tau, scale=loss.scale, form=loss.form, symmetric=loss.symmetric,
              denoise_weight=loss.denoise_weight)
    if loss.contrastive_weight != 1.0:
        kw["contrastive_weight"] = loss.contrastive_weight
    return kw


@dataclass
class AGSMConfig:
    """Settings of `objective: agsm` (`softrepa.objectives.agsm`; unused by the other objectives).

    Args:
        tau: Plackett-Luce temperature of the EMA reward (official: 0.1).
        gamma_pos: guidance scale of the positive pairs' target (official: 1.0).
        gamma_neg: guidance scale of the negative pairs' target (official: 0.1 for SD3 / SDXL,
            1.0 for SD1.5; 0 drops the negative term).
        ema_decay: decay of the EMA copies of both token sets, updated after every optimizer
            step; the reward and guidance are their predictions (official: 0.9999).
    """

    tau: float = 0.1
    gamma_pos: float = 1.0
    gamma_neg: float = 0.1
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"agsm.tau must be a finite number > 0, got {self.tau}")
        for name in ("gamma_pos", "gamma_neg"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"agsm.{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"agsm.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class ScheduleConfig:
    """CosineAnnealingWarmRestarts stepped every `step_every` iterations (authors: T_0 10, every 2500)."""

    T_0: int = 10
    T_mult: int = 1
    eta_min: float = 1e-5
    step_every: int = 2500

    def __post_init__(self) -> None:
        if self.T_0 < 1 or self.T_mult < 1 or self.step_every < 1:
            raise ConfigError("schedule.T_0, schedule.T_mult and schedule.step_every must be >= 1")


@dataclass
class ValidationConfig:
    """Every `every` steps: the same prompts and seeds without / with the tokens.

    The grid is saved under `validation/`, logged as images to the trackers that take images
    (`log_with`), and scored by `metrics` (each arm's mean, as scalars `validation/<metric>/vanilla`,
    `.../tokens`, `.../delta` in the trackers and in metrics.jsonl rows with `"validation": true`).

    Args:
        prompts, seeds, steps, guidance_scale, resolution: what is generated (resolution None:
            the training resolution).
        every: steps between validations (0: none).
        metrics: names from the evaluation registry (`softrepa.evaluation.metric_names()`) that
            score an image against its prompt: `world` on the miniature; clip, pickscore,
            imagereward, hps when their weights are configured (`metrics_config`). Metrics needing
            reference images (fid, lpips) are refused.
        metrics_config: a metrics.yaml (`softrepa.evaluation.load_metrics_config`) for weights
            paths / hub ids; None: the packaged defaults.
        log_images: send the grid to the trackers.
    """

    prompts: list[str] = field(default_factory=lambda: [
        "a photo of a cat sitting on a red sofa", "two dogs playing in the snow",
        "a blue bus parked next to a yellow taxi", "a bowl of oranges on a wooden table"])
    seeds: list[int] = field(default_factory=lambda: [0])
    every: int = 1000
    steps: int = 28
    guidance_scale: float = 4.0
    resolution: int | None = None
    metrics: list[str] = field(default_factory=list)
    metrics_config: str | None = None
    log_images: bool = True

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError("validation.every must be >= 0 (0 disables the grids)")
        if not self.prompts:
            raise ConfigError("validation.prompts must name at least one prompt")
        int_in(self.steps, "validation.steps", 1, MAX_STEPS, error=ConfigError)
        finite(self.guidance_scale, "validation.guidance_scale", error=ConfigError)
        if self.resolution is not None:
            int_in(self.resolution, "validation.resolution", 8, MAX_SIDE, error=ConfigError)
        if len(self.seeds) * len(self.prompts) > 1024 or not all(0 <= s < 1 << 64 for s in self.seeds):
            raise ConfigError(f"validation.seeds: at most 1024 images a grid, seeds in 0..2^64-1 "
                              f"(got {len(self.seeds)} seeds x {len(self.prompts)} prompts)")


@dataclass
class TrainConfig:
    """Everything a training run needs; see `configs/*.yaml` for the paper's recipes.

    Args (main ones):
        model: hub id or local diffusers folder.
        data: dataset path or spec (see `softrepa.data.build_dataset`).
        objective: the training objective, a name from `softrepa.objectives.objective_names()`:
            "softrepa" (the paper's contrastive loss, default) or "positive_only" (the control:
            the denoising term alone), whose settings are the `loss:` section, or "agsm" (AGSM's
            dual tokens, `softrepa.objectives.agsm`), whose settings are the `agsm:` section.
        output_dir: run folder (checkpoints, logs, grids).
        batch_size: images per process per step; each step evaluates batch_size x (all prompts) pairs.
        pair_chunk: pairs per forward pass (None: all at once); exact gradients either way.
        mixed_precision: "no" | "bf16" | "fp16" (fp16 uses a GradScaler).
        weights_dtype: dtype of the frozen model ("auto": half on GPU per mixed_precision, else fp32).
        compile: regional `torch.compile` of the denoiser's repeated blocks (`softrepa.compile_blocks`);
            the first step compiles, later steps reuse the code.
        compile_mode: torch.compile mode (None: default; "max-autotune-no-cudagraphs").
        speed: speed options of the step, all off by default (`softrepa.speedups.SpeedConfig`).
    """

    model: str = ""
    data: Any = ""
    data_images: str | None = None
    output_dir: str = "runs/softrepa"
    resolution: int = 512
    batch_size: int = 16
    max_steps: int = 30000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tokens: SoftTokensConfig = field(default_factory=SoftTokensConfig)
    objective: str = "softrepa"
    loss: LossConfig = field(default_factory=LossConfig)
    agsm: AGSMConfig = field(default_factory=AGSMConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    t_min: int = 0
    t_max: int = 1000
    shared_timestep: bool = True
    shared_noise: bool = True
    pair_chunk: int | None = None
    mixed_precision: str = "no"
    weights_dtype: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_mode: str | None = None
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    max_sequence_length: int | None = None  # None: the family's text_length
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log_with: str | None = None
    latent_cache: str | None = None
    max_items: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.resolution > 0 and self.resolution % 8 == 0, f"resolution must be a positive multiple of 8, got {self.resolution}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.t_min < self.t_max <= 1000, f"need 0 <= t_min < t_max <= 1000, got {self.t_min}, {self.t_max}"),
            (self.pair_chunk is None or self.pair_chunk >= 1, f"pair_chunk must be None or >= 1, got {self.pair_chunk}"),
            (self.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision must be no|bf16|fp16, got {self.mixed_precision!r}"),
            (self.weights_dtype in ("auto", "fp32", "bf16", "fp16"), f"weights_dtype must be auto|fp32|bf16|fp16, got {self.weights_dtype!r}"),
            (self.compile_mode in (None, "default", "max-autotune-no-cudagraphs"),
             f"compile_mode must be null, default or max-autotune-no-cudagraphs (CUDA-graph modes break with "
             f"per-call tokens), got {self.compile_mode!r}"),
            (self.log_every >= 1, f"log_every must be >= 1 (steps between log rows), got {self.log_every}"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (-(1 << 63) <= self.seed < (1 << 63), f"seed must fit in 64 bits (signed), got {self.seed}"),
            (not self._unknown_trackers(),
             f"log_with: unknown tracker(s) {self._unknown_trackers()}; expected null or a comma-separated list of "
             f"accelerate's trackers: {', '.join(tracker_names())}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        int_in(self.resolution, "resolution", 8, MAX_SIDE, error=ConfigError)
        int_in(self.batch_size, "batch_size", 2, MAX_BATCH, error=ConfigError)  # batch^2 pairs per step
        int_in(self.num_workers, "num_workers", 0, 256, error=ConfigError)  # each one a process
        finite(self.weight_decay, "weight_decay", at_least=0, error=ConfigError)
        if len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        finite(self.schedule.eta_min, "schedule.eta_min", at_least=0, error=ConfigError)
        if self.max_items is not None:
            int_in(self.max_items, "max_items", 1, error=ConfigError)  # -1 would drop the last image
        if self.max_sequence_length is not None:
            int_in(self.max_sequence_length, "max_sequence_length", 1, MAX_TEXT_LENGTH, error=ConfigError)
        finite(self.lr, "lr", above=0, error=ConfigError)
        if self.objective == "softrepa" and self.loss.contrastive_weight == 0 and self.loss.denoise_weight == 0:
            raise ConfigError("loss.contrastive_weight and loss.denoise_weight are both 0: nothing would be learned "
                              "(the positive-only control is objective: positive_only)")
        get_objective(self.objective).check_config(self)  # an unknown name lists the known ones

    def _unknown_trackers(self) -> list[str]:
        return [n for n in split_trackers(self.log_with) if n not in tracker_names()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tracker_names() -> tuple[str, ...]:
    """The `log_with` names accelerate knows: its built-in trackers and those registered with
    `accelerate.tracking.register_tracker_class` (and "all": every installed one)."""
    try:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return ("tensorboard", "wandb")
    return ("all", *LOGGER_TYPE_TO_CLASS)


def split_trackers(log_with: str | None) -> list[str]:
    """"tensorboard, wandb" -> ["tensorboard", "wandb"] (None / "" -> [])."""
    return [n.strip() for n in (log_with or "").split(",") if n.strip()]


# ---------------------------------------------------------------------------- loading
class Override(str):
    """A command-line override's text, typed by the field it sets (`_convert`), never guessed by YAML:
    `--output_dir 0755` stays "0755", `--data no` stays "no", `--model @assets/toy_sd3` is a string."""


def _structured(value: "Override", key: str) -> Any:
    """An override for a list / mapping / free-form field: YAML flow syntax when it starts with [ or {."""
    if value.lstrip()[:1] in ("[", "{"):
        return load_yaml(str(value), f"--{key}")
    return value


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML / command-line value to the annotated type, or raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        if isinstance(value, Override):  # a free-form field (data): a mapping in flow syntax, else the text
            try:  # `{000000..000009}.tar` is a shard pattern, not a broken mapping
                parsed = _structured(value, key) if value.lstrip()[:1] == "{" else None
            except ConfigError:
                parsed = None
            return parsed if isinstance(parsed, dict) else str(value)
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot use {value!r} ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Override):
            value = _structured(value, key)
        if not isinstance(value, dict):
            got = repr(str(value)) if isinstance(value, Override) else type(value).__name__
            raise ConfigError(f"{key}: expected a mapping, got {got}")
        return build_dataclass(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, Override):
            value = _structured(value, key)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            num = float(value) if tp is float else value
            if tp is int:
                num = int(value) if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()) else None
                if num is None:
                    raise ValueError
            return num
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, (bool, int, float)):  # YAML 1.1 read `0755` as 493 and `yes` as true
            raise ConfigError(f"{key}: expected a string, got the YAML {type(value).__name__} {value!r}; "
                              "quote the value")
        return str(value)
    return value


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a dict, converting and validating every field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # validation errors of nested configs (e.g. SoftTokensError)
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.replace("-", "_").split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["--loss.tau", "0.05", "--max_steps=10"]` -> nested dict of `Override` texts (typed by the schema
    when the config is built: a string field keeps the text as typed)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}; overrides look like --key value")
        key = item[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"--{key} needs a value")
            raw = items[i + 1]
            i += 2
        _set_dotted(out, key, Override(raw))
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


RECIPES_DIR = Path(__file__).parent / "recipes"


def resolve_recipe(path: str | os.PathLike) -> Path:
    """A YAML path, or the name of a packaged recipe (`sd3`, `sd15`, `sdxl`, `toy_sd3`, `toy_sd15`)."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = RECIPES_DIR / f"{p.stem if p.suffix in ('.yaml', '.yml') else p.name}.yaml"
    if packaged.is_file() and (p.parent == Path(".") or p.parent.name in ("configs", "recipes")):
        return packaged
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {p} does not exist (packaged recipes: {known})")


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                cls: type = TrainConfig) -> Any:
    """Defaults <- YAML file <- overrides, validated into `cls`.

    Args:
        path: YAML recipe (None: defaults only).
        overrides: nested dict, e.g. from `parse_overrides`.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = resolve_recipe(path)
        loaded = load_yaml(read_text(p, "config", error=ConfigError), str(p)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        values = loaded
    values = _merge(values, overrides or {})
    return build_dataclass(cls, values)


def config_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-safe data (what `save_config` writes; tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Fields that differ between two plain config dicts, as "dotted.key: old -> new" lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in config_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


#: config fields that may name local files or folders (made absolute when they exist locally)
PATH_FIELDS = ("model", "data", "data_images", "latent_cache")


def absolute_path(value: Any) -> Any:
    """An existing local path as an absolute one; anything else (hub ids, @assets/...) unchanged.

    A dataset spec mapping has its `path` / `annotations` / `images` made absolute the same way,
    and a webdataset shard pattern (`shards/{000000..000009}.tar`, `shards/*.tar`) its folder.
    """
    if isinstance(value, dict):
        return {k: absolute_path(v) if k in ("path", "annotations", "images") else v for k, v in value.items()}
    if not isinstance(value, str) or not value or value.startswith("@") or "://" in value:
        return value
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve())
    if ("{" in path.name or any(c in path.name for c in "*?[")) and path.parent.is_dir():
        return str(path.parent.resolve() / path.name)
    return value


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Rewrite the local paths of `cfg` (`PATH_FIELDS`) as absolute ones, in place; returns `cfg`.

    The saved config.yaml then finds its files when the run is resumed from another directory.
    A latent cache is a folder the run creates, so its path is made absolute even before it exists.
    """
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if name == "latent_cache" and isinstance(value, str) and value:
            setattr(cfg, name, str(Path(value).expanduser().resolve()))
        else:
            setattr(cfg, name, absolute_path(value))
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from .runfolder import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(config_dict(cfg), sort_keys=False).encode())


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
