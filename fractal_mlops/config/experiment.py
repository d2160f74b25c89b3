"""The experiment config: one YAML file read into an ExperimentConfig, with its search space
checked here and its other sections in sections.py.

An experiment YAML has seven sections (all optional except what differs from the defaults):

    study_name: fractalnet-quickstart
    data:     {name: digits | cifar10 | synthetic, root: ..., val_fraction: 0.2, ...}
    space:    {blocks: [..], columns: [..], unit: [..], norm: [..], activation: [..],
               dropout: [..], drop_path: [..], width: [..], weight_sharing: [..]}
    training: {epochs, batch_size, lr, momentum, weight_decay, optimizer, seed, amp,
               grad_checkpointing, channels_last}
    pruning:  {warmup_epochs, chance_margin, pruner: none | median | successive_halving}
    search:   {mode: grid | halving, min_epochs: 1, reduction_factor: 3,
               objectives: [final_val_acc] (or e.g. [final_val_acc, flops])}
    evaluation: {halting_threshold: 0.9}   (anytime inference halted by confidence)
    run:      {tracking_uri, storage, device: auto | cpu | cuda, workers, n_trials}

Command-line flags override the `run` section.

This module imports no torch, so that reading a config (and `--help`) stays fast.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fractal_mlops.config.objectives import DEFAULT_OBJECTIVES
from fractal_mlops.config.sections import (
    DataConfig,
    EvaluationConfig,
    PruningConfig,
    RunConfig,
    SearchConfig,
    TrainConfig,
    check_min_epochs,
    one_of,
    read_section,
    yaml_number,
)
from fractal_mlops.errors import ConfigError

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
        if tuple(self.search.objectives) == DEFAULT_OBJECTIVES:  # as before `objectives`
            out["search"].pop("objectives")
            if self.search.mode == "grid":  # grid studies keep the hash they had before `search`
                out.pop("search")
        if self.training.compile == "none":
            out["training"].pop("compile")
        if self.training.memory_format == "contiguous":
            out["training"].pop("memory_format")
        out["training"].pop("checkpoint_minutes")  # when a trial saves, not what it learns
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


# What a config may expand to, checked before anything is built: YAML aliases can make a
# small file stand for billions of values (an "alias bomb"), and a few long dimension lists a
# grid no study could walk.
MAX_YAML_VALUES = 100_000
MAX_GRID_POINTS = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (memoized per node, so
    an alias bomb is counted in linear time; stops counting past the limit)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_VALUES:
            break
    sizes[id(node)] = total
    return total


def _read_yaml(text: str, where: Path) -> Any:
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(f"config {where} expands to more than {MAX_YAML_VALUES:,} values "
                              "(YAML aliases?): refused")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | None = None) -> ExperimentConfig:
    resolved = resolve_config_path(path)
    try:
        raw = _read_yaml(resolved.read_text(), resolved)
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
    data = read_section(DataConfig, raw.get("data"), "data")
    training = read_section(TrainConfig, raw.get("training"), "training")
    pruning = read_section(PruningConfig, raw.get("pruning"), "pruning")
    evaluation = read_section(EvaluationConfig, raw.get("evaluation"), "evaluation")
    search = read_section(SearchConfig, raw.get("search"), "search")
    check_min_epochs(search, training)
    if len(search.objectives) > 1 and pruning.pruner != "none":
        raise ConfigError(f"pruning.pruner {pruning.pruner!r} needs a single objective (Optuna's "
                          "pruners rank one value); with several search.objectives use pruner: none")
    run = read_section(RunConfig, raw.get("run"), "run")
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


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def study_folder(name: str) -> str:
    """The folder name of a study (its artifacts, its default report folder): the name itself
    when it is plain ASCII (letters, digits, . _ -), else a readable ASCII form plus a short
    hash of the exact name, so that two names never share a folder (`研究` and `実験` both read
    `_`) and none can leave its parent (`..`, `../x`)."""
    safe = _UNSAFE.sub("_", name).lstrip(".")
    if safe == name:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{safe.strip('_') or 'study'}-{digest}"


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
    combinations = math.prod(len(values) for values in space.values())
    if combinations > MAX_GRID_POINTS:
        sizes = " x ".join(str(len(space[dim])) for dim in DIMENSIONS)
        raise ConfigError(f"the space has {combinations:,} combinations ({sizes}); a study "
                          f"takes at most {MAX_GRID_POINTS:,}: split it into several studies")
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
    one_of(value.lower(), allowed, where)
    return value.lower()
