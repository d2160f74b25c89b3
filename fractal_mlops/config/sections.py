"""The typed sections of an experiment config (data, training, pruning, search, evaluation,
run): their fields and defaults, validated by pydantic, then range-checked; each error is one
ConfigError line.

This module imports no torch, so that reading a config (and `--help`) stays fast.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    with_config,
)

from fractal_mlops.config.objectives import DEFAULT_OBJECTIVES, check_objectives
from fractal_mlops.errors import ConfigError

# Input shape (channels, height, width) and class count of each dataset, known without loading it.
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
    "synthetic": (3, 8, 8),
}
DATASET_CLASSES = {"digits": 10, "cifar10": 10, "synthetic": 10}

AMP_MODES = ("auto", "bf16", "fp16", "off")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
COMPILE_MODES = ("none", "default", "reduce-overhead")  # torch.compile modes (see train.py)
OPTIMIZERS = ("sgd", "adamw")
PRUNERS = ("none", "median", "successive_halving")
SEARCH_MODES = ("grid", "halving")
DEVICES = ("auto", "cpu", "cuda")


# YAML 1.1 (PyYAML) reads `1e-3` as a string (it wants `1.0e-3`) and `off` / `no` as false:
# the field types below take the number, and the "off" word of the settings that have one.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def yaml_number(value: Any) -> Any:
    """'1e-3' -> 0.001; anything else unchanged."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _whole_number(value: Any) -> Any:
    value = yaml_number(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _off_word(word: str) -> BeforeValidator:
    return BeforeValidator(lambda value: word if value is False else value)


# Field types of the config sections, validated by pydantic: no bool passes for a number, no
# number for a string.
Int = Annotated[StrictInt, BeforeValidator(_whole_number)]
Float = Annotated[StrictFloat, BeforeValidator(yaml_number)]
Bool = StrictBool
Str = StrictStr
_SECTION = ConfigDict(extra="forbid")


@with_config(_SECTION)
@dataclass(frozen=True)
class DataConfig:
    name: Str = "digits"
    root: Str | None = None  # cifar10: an ImageFolder tree (train/, test/) or torchvision's root
    download: Bool = False  # cifar10 via torchvision when root is not an ImageFolder tree
    val_fraction: Float = 0.2  # digits / synthetic: held-out share (stratified, fixed seed)
    flip: Bool | None = None  # random horizontal flip in training; default: True for cifar10
    train_limit: Int | None = None  # use a fixed, class-balanced subset of N training images
    val_limit: Int | None = None
    synthetic_size: Int = 600
    cache_dir: Str | None = None  # decoded ImageFolder cache; default ~/.cache/fractal_mlops

    @property
    def shape(self) -> tuple[int, int, int]:
        return DATASET_SHAPES[self.name]

    @property
    def num_classes(self) -> int:
        return DATASET_CLASSES[self.name]

    @property
    def use_flip(self) -> bool:
        return self.name == "cifar10" if self.flip is None else self.flip


@with_config(_SECTION)
@dataclass(frozen=True)
class TrainConfig:
    epochs: Int = 5
    batch_size: Int = 64
    lr: Float = 0.05
    momentum: Float = 0.9
    weight_decay: Float = 0.0
    optimizer: Str = "sgd"
    seed: Int = 0
    amp: Annotated[Str, _off_word("off")] = "off"
    grad_checkpointing: Bool = False
    channels_last: Bool = False  # the older spelling of memory_format: channels_last
    compile: Annotated[Str, _off_word("none")] = "none"
    # auto: each network's fastest, timed on the trial's device (engine/precision.py); amp: auto
    # is timed too (CPUs with native bf16: fp32 against bf16)
    memory_format: Str = "contiguous"
    checkpoint_minutes: Float = 10.0  # a running trial saves its state at most this often

    @property
    def memory_format_mode(self) -> str:
        """auto, contiguous or channels_last, with the older `channels_last: true` read."""
        return "channels_last" if self.channels_last else self.memory_format


@with_config(_SECTION)
@dataclass(frozen=True)
class PruningConfig:
    warmup_epochs: Int = 1  # epochs before the divergence check applies
    chance_margin: Float = 0.05  # val_acc <= 1/num_classes + margin after warm-up: pruned
    # an Optuna pruner combined with the divergence check
    pruner: Annotated[Str, _off_word("none")] = "none"


@with_config(_SECTION)
@dataclass(frozen=True)
class SearchConfig:
    mode: Str = "grid"  # grid: every point to training.epochs; halving: see halving.py
    min_epochs: Int = 1  # halving: epochs of the first rung
    reduction_factor: Int = 3  # halving: each rung keeps the best 1/reduction_factor
    # what the study optimizes: an accuracy, then cost metrics (config/objectives.py); two or
    # more make the Optuna study multi-objective and halving rank rungs by Pareto fronts
    objectives: list[Str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))


@with_config(_SECTION)
@dataclass(frozen=True)
class EvaluationConfig:
    # anytime inference: an image stops at the first column whose top softmax probability
    # reaches this (0: always column 1; 1: only a certain answer stops early)
    halting_threshold: Float = 0.9


@with_config(_SECTION)
@dataclass(frozen=True)
class RunConfig:
    tracking_uri: Str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    storage: Str | None = None  # default: a journal file under mlruns/
    device: Str = "auto"
    workers: Int = 1
    n_trials: Int | None = None  # cap on trials started by one invocation


_EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    """pydantic's validator of a section, built once per process (building it costs more than
    validating with it)."""
    return TypeAdapter(cls)


def read_section(cls: type, raw: Any, name: str) -> Any:
    """One section of the YAML (a mapping, or None for all defaults), validated and checked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    try:
        section = _adapter(cls).validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc.errors()[0], cls, name)) from None
    _CHECKS[cls](section)
    return section


def _one_line(error: Any, cls: type, section: str) -> str:
    """pydantic's first error as the config's one line, e.g. `training.lr must be float, got 'x'`."""
    where = ".".join([section, *(str(part) for part in error["loc"][:1])])
    value = error.get("input")
    if error["type"] == "unexpected_keyword_argument":
        return f"unknown key {where} (expected one of {sorted(f.name for f in fields(cls))})"
    if value is None:
        return f"{where} must not be empty"
    if isinstance(value, bool) and error["type"] == "string_type":
        return (f"{where}: YAML reads yes/no/on/off/true/false as a boolean; quote the word, "
                f"e.g. {where.split('.')[-1]}: '{'on' if value else 'off'}'")
    return f"{where} must be {_EXPECTED.get(error['type'], error['msg'])}, got {value!r:.80}"


def _check_data(data: DataConfig) -> None:
    if data.name not in DATASET_SHAPES:
        raise ConfigError(f"data.name {data.name!r} is unknown (expected one of {sorted(DATASET_SHAPES)})")
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {data.val_fraction}")
    for key in ("train_limit", "val_limit"):
        value = getattr(data, key)
        if value is not None and value < 10:
            raise ConfigError(f"data.{key} must be at least 10 (an image per class), got {value}")
    if data.synthetic_size < 20:
        raise ConfigError(f"data.synthetic_size must be at least 20, got {data.synthetic_size}")


def _check_training(t: TrainConfig) -> None:
    for key in ("epochs", "batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"training.{key} must be a positive number, got {getattr(t, key)}")
    if not t.lr > 0 or not math.isfinite(t.lr):
        raise ConfigError(f"training.lr must be a positive number, got {t.lr}")
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"training.momentum must be in [0, 1), got {t.momentum}")
    if t.weight_decay < 0:
        raise ConfigError(f"training.weight_decay must not be negative, got {t.weight_decay}")
    if t.seed < 0:
        raise ConfigError(f"training.seed must not be negative, got {t.seed}")
    one_of(t.optimizer, OPTIMIZERS, "training.optimizer")
    one_of(t.amp, AMP_MODES, "training.amp")
    one_of(t.memory_format, MEMORY_FORMATS, "training.memory_format")
    if t.channels_last and t.memory_format != "contiguous":
        raise ConfigError(f"training.channels_last: true and memory_format: {t.memory_format} "
                          "contradict each other; keep memory_format only")
    if not (t.checkpoint_minutes >= 0 and math.isfinite(t.checkpoint_minutes)):
        raise ConfigError("training.checkpoint_minutes must be a number >= 0 (0: save at epoch "
                          f"ends only), got {t.checkpoint_minutes}")
    one_of(t.compile, COMPILE_MODES, "training.compile")
    if t.compile != "none" and t.grad_checkpointing:
        raise ConfigError("training.compile needs grad_checkpointing: false (a compiled step "
                          "cannot replay checkpointing's drop-path decisions and norm freeze)")


def _check_pruning(p: PruningConfig) -> None:
    if p.warmup_epochs < 0:
        raise ConfigError(f"pruning.warmup_epochs must not be negative, got {p.warmup_epochs}")
    if not 0.0 <= p.chance_margin < 1.0:
        raise ConfigError(f"pruning.chance_margin must be in [0, 1), got {p.chance_margin}")
    one_of(p.pruner, PRUNERS, "pruning.pruner")


def _check_evaluation(e: EvaluationConfig) -> None:
    if not 0.0 <= e.halting_threshold <= 1.0:  # also refuses nan
        raise ConfigError("evaluation.halting_threshold must be a probability in [0, 1], "
                          f"got {e.halting_threshold}")


def _check_search(s: SearchConfig) -> None:
    one_of(s.mode, SEARCH_MODES, "search.mode")
    if s.reduction_factor < 2:
        raise ConfigError(f"search.reduction_factor must be at least 2, got {s.reduction_factor}")
    check_objectives(s.objectives)


def check_min_epochs(s: SearchConfig, training: TrainConfig) -> None:
    if not 1 <= s.min_epochs <= training.epochs:
        raise ConfigError(f"search.min_epochs must be between 1 and training.epochs "
                          f"({training.epochs}), got {s.min_epochs}")


def check_run(r: RunConfig) -> RunConfig:
    one_of(r.device, DEVICES, "device")
    if r.workers < 1:
        raise ConfigError(f"workers must be a positive number, got {r.workers}")
    if r.n_trials is not None and r.n_trials < 1:
        raise ConfigError(f"n_trials must be a positive number, got {r.n_trials}")
    return r


def one_of(value: Any, allowed: tuple, where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} {value!r} is unknown (expected one of {', '.join(allowed)})")


_CHECKS = {DataConfig: _check_data, TrainConfig: _check_training, PruningConfig: _check_pruning,
           SearchConfig: _check_search, EvaluationConfig: _check_evaluation, RunConfig: check_run}
