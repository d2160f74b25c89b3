"""Typed, validated experiment configuration: the one place for defaults and config errors.

An experiment YAML has seven sections (all optional except what differs from the defaults):

    study_name: fractalnet-quickstart
    data:     {name: digits | cifar10 | synthetic, root: ..., val_fraction: 0.2, ...}
    space:    {blocks: [..], columns: [..], unit: [..], norm: [..], activation: [..],
               dropout: [..], drop_path: [..], width: [..], weight_sharing: [..]}
    training: {epochs, batch_size, lr, momentum, weight_decay, optimizer, seed, amp,
               grad_checkpointing, channels_last}
    pruning:  {warmup_epochs, chance_margin, pruner: none | median | successive_halving}
    search:   {mode: grid | halving, min_epochs: 1, reduction_factor: 3}
    evaluation: {halting_threshold: 0.9}   (anytime inference halted by confidence)
    run:      {tracking_uri, storage, device: auto | cpu | cuda, workers, n_trials}

Command-line flags override the `run` section.

This module imports no torch, so that reading a config (and `--help`) stays fast.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
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


class ConfigError(ValueError):
    """Bad user input: reported as one line on stderr with exit code 2."""


# Input shape (channels, height, width) and class count of each dataset, known without loading it.
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
    "synthetic": (3, 8, 8),
}
DATASET_CLASSES = {"digits": 10, "cifar10": 10, "synthetic": 10}

UNIT_OPS = ("conv", "norm", "act", "drop")
NORMS = ("batch", "group", "layer", "none")
# Activation names that timm's create_act_layer builds (plus "none").
ACTIVATIONS = (
    "relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "gelu_tanh", "silu",
    "swish", "mish", "sigmoid", "tanh", "hard_sigmoid", "hard_swish", "hard_mish", "prelu",
    "none",
)
DROP_PATHS = ("none", "local", "local+global")
WEIGHT_SHARING = ("none", "recursive")
AMP_MODES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("sgd", "adamw")
PRUNERS = ("none", "median", "successive_halving")
SEARCH_MODES = ("grid", "halving")
DEVICES = ("auto", "cpu", "cuda")
MAX_COLUMNS = 8

# A dimension the YAML leaves out keeps this single value.
SPACE_DEFAULTS: dict[str, list[Any]] = {
    "blocks": [3],
    "columns": [3],
    "unit": ["conv-norm-act-drop"],
    "norm": ["batch"],
    "activation": ["relu"],
    "dropout": [0.0],
    "drop_path": ["local+global"],
    "width": [64],
    "weight_sharing": ["none"],
}
DIMENSIONS = tuple(SPACE_DEFAULTS)


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
    channels_last: Bool = False


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


@dataclass(frozen=True)
class ExperimentConfig:
    study_name: str
    data: DataConfig = field(default_factory=DataConfig)
    space: dict[str, list[Any]] = field(default_factory=lambda: dict(SPACE_DEFAULTS))
    training: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = ""  # where it was read from

    def to_dict(self) -> dict[str, Any]:
        """What defines the experiment's results; `run` (where it runs, credentials) is left out."""
        out = asdict(self)
        out.pop("source")
        out.pop("run")
        # left out at their defaults, so that the config (and its sha256) of a study started
        # before these options existed is unchanged and the study still resumes
        if out["space"].get("weight_sharing") == SPACE_DEFAULTS["weight_sharing"]:
            out["space"] = {k: v for k, v in out["space"].items() if k != "weight_sharing"}
        if self.evaluation == EvaluationConfig():
            out.pop("evaluation")
        if self.search.mode == "grid":  # grid studies keep the hash they had before `search`
            out.pop("search")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


def default_config_path() -> Path:
    """experiments/quickstart.yaml as shipped inside the package (works from any directory)."""
    return Path(str(resources.files("fractal_mlops") / "experiments" / "quickstart.yaml"))


def resolve_config_path(path: str | None) -> Path:
    if path is None:
        return default_config_path()
    candidate = Path(path)
    if candidate.exists():
        return candidate
    shipped = Path(str(resources.files("fractal_mlops") / "experiments" / candidate.name))
    if not candidate.parent.parts and shipped.exists():  # a bare name such as paper_cifar10.yaml
        return shipped
    raise ConfigError(f"config file not found: {path}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps
    the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | None = None) -> ExperimentConfig:
    resolved = resolve_config_path(path)
    try:
        raw = yaml.load(resolved.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - safe
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {resolved}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None)
        why = f": {' '.join(str(problem).split())}" if problem and "twice" in str(problem) else ""
        raise ConfigError(f"config {resolved} is not valid YAML{line}{why}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {resolved} must be a mapping of sections, got {type(raw).__name__}")
    return parse_config(raw, source=str(resolved))


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    known = {"study_name", "data", "space", "training", "pruning", "search", "evaluation",
             "run"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (expected one of {sorted(known)})")
    study_name = check_study_name(
        raw.get("study_name", Path(source).stem if source != "<dict>" else "fractalnet"))
    data = _section(DataConfig, raw.get("data"), "data")
    training = _section(TrainConfig, raw.get("training"), "training")
    pruning = _section(PruningConfig, raw.get("pruning"), "pruning")
    evaluation = _section(EvaluationConfig, raw.get("evaluation"), "evaluation")
    _check_data(data)
    _check_training(training)
    _check_pruning(pruning)
    _check_evaluation(evaluation)
    search = _section(SearchConfig, raw.get("search"), "search")
    _check_search(search, training)
    run = check_run(_section(RunConfig, raw.get("run"), "run"))
    space = _check_space(raw.get("space"), data)
    return ExperimentConfig(study_name, data, space, training, pruning, search, evaluation,
                            run, source)


# The study name is also the MLflow experiment name (at most 256 characters in its SQL store)
# and, made safe, a folder name under the artifact root (at most 255 bytes on most file systems).
MAX_NAME_BYTES = 200


def check_study_name(name: Any) -> str:
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)  # `study_name: 2024` in YAML
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("study_name must be a non-empty string")
    name = name.strip()
    if any(quote in name for quote in "'\"`\\"):
        raise ConfigError(f"study_name {name[:60]!r} must not contain quotes or backslashes")
    if not name.isprintable():
        raise ConfigError(f"study_name {name[:60]!r} must not contain control characters")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"study_name is {len(name.encode())} bytes long; the stores take at "
                          f"most {MAX_NAME_BYTES} (it names the MLflow experiment and a folder)")
    return name


_EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def _section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc.errors()[0], cls, name)) from None


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
    _one_of(t.optimizer, OPTIMIZERS, "training.optimizer")
    _one_of(t.amp, AMP_MODES, "training.amp")


def _check_pruning(p: PruningConfig) -> None:
    if p.warmup_epochs < 0:
        raise ConfigError(f"pruning.warmup_epochs must not be negative, got {p.warmup_epochs}")
    if not 0.0 <= p.chance_margin < 1.0:
        raise ConfigError(f"pruning.chance_margin must be in [0, 1), got {p.chance_margin}")
    _one_of(p.pruner, PRUNERS, "pruning.pruner")


def _check_evaluation(e: EvaluationConfig) -> None:
    if not 0.0 <= e.halting_threshold <= 1.0:  # also refuses nan
        raise ConfigError("evaluation.halting_threshold must be a probability in [0, 1], "
                          f"got {e.halting_threshold}")


def _check_search(s: SearchConfig, training: TrainConfig) -> None:
    _one_of(s.mode, SEARCH_MODES, "search.mode")
    if not 1 <= s.min_epochs <= training.epochs:
        raise ConfigError(f"search.min_epochs must be between 1 and training.epochs "
                          f"({training.epochs}), got {s.min_epochs}")
    if s.reduction_factor < 2:
        raise ConfigError(f"search.reduction_factor must be at least 2, got {s.reduction_factor}")


def check_run(r: RunConfig) -> RunConfig:
    _one_of(r.device, DEVICES, "device")
    if r.workers < 1:
        raise ConfigError(f"workers must be a positive number, got {r.workers}")
    if r.n_trials is not None and r.n_trials < 1:
        raise ConfigError(f"n_trials must be a positive number, got {r.n_trials}")
    return r


def _one_of(value: Any, allowed: tuple, where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} {value!r} is unknown (expected one of {', '.join(allowed)})")


def parse_unit(unit: Any, where: str = "space.unit") -> tuple[str, ...]:
    """'conv-norm-act-drop' -> ('conv', 'norm', 'act', 'drop'), checked."""
    if not isinstance(unit, str) or not unit.strip():
        raise ConfigError(f"{where} entries must be strings such as 'conv-norm-act', got {unit!r}")
    ops = tuple(op.strip() for op in unit.strip().lower().split("-"))
    for op in ops:
        if op not in UNIT_OPS:
            raise ConfigError(f"{where} {unit!r}: unknown op {op!r} (expected conv, norm, act, drop)")
    if ops.count("conv") != 1:
        raise ConfigError(f"{where} {unit!r} must contain exactly one conv")
    repeated = sorted({op for op in ops if ops.count(op) > 1})
    if repeated:
        raise ConfigError(f"{where} {unit!r} repeats {repeated[0]!r} (each op at most once)")
    return ops


def _check_space(raw: Any, data: DataConfig) -> dict[str, list[Any]]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("config section 'space' must be a mapping of dimension -> list of values")
    unknown = sorted(set(raw) - set(DIMENSIONS))
    if unknown:
        raise ConfigError(f"unknown space dimension {unknown[0]!r} (expected one of {list(DIMENSIONS)})")
    space: dict[str, list[Any]] = {}
    for dim in DIMENSIONS:
        values = raw.get(dim, SPACE_DEFAULTS[dim])
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise ConfigError(f"space.{dim} is empty: give at least one value")
        space[dim] = [_check_value(dim, v) for v in values]
        if len(set(space[dim])) != len(space[dim]):
            raise ConfigError(f"space.{dim} lists a value twice: {space[dim]}")
    max_blocks = int(math.log2(min(data.shape[1:])))
    too_deep = [b for b in space["blocks"] if b > max_blocks]
    if too_deep:
        raise ConfigError(
            f"space.blocks {too_deep[0]} is too deep for {data.name}'s {data.shape[1]}x{data.shape[2]}"
            f" images: each block halves H and W, so at most {max_blocks} blocks"
        )
    return space


def _check_value(dim: str, value: Any) -> Any:
    where = f"space.{dim}"
    if dim in ("blocks", "columns", "width"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where} values must be positive integers, got {value!r}")
        if dim == "columns" and value > MAX_COLUMNS:
            raise ConfigError(f"{where} {value} is too many (at most {MAX_COLUMNS} columns)")
        return value
    if dim == "dropout":
        value = yaml_number(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ConfigError(f"{where} values must be numbers in [0, 1), got {value!r}")
        return float(value)
    if dim == "unit":
        return "-".join(parse_unit(value, where))
    allowed = {"norm": NORMS, "activation": ACTIVATIONS, "drop_path": DROP_PATHS,
               "weight_sharing": WEIGHT_SHARING}[dim]
    if not isinstance(value, str):
        raise ConfigError(f"{where} values must be strings, got {value!r}")
    _one_of(value.lower(), allowed, where)
    return value.lower()
