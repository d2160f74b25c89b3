"""Fuzz: a few hundred generated bad configs (random keys, wrong types, out-of-range values,
YAML oddities) are each refused with one ConfigError line; a sample goes through the real
CLI: one line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import copy
import random
import string
from pathlib import Path

import pytest
import yaml
from helpers import StudyDir

from fractal_mlops.config.experiment import load_config
from fractal_mlops.errors import ConfigError

BASE = {
    "study_name": "fuzz",
    "data": {"name": "digits", "val_fraction": 0.2, "train_limit": 100, "synthetic_size": 600,
             "root": None, "flip": False},
    "space": {"blocks": [1, 2], "columns": [1, 2], "width": [8], "unit": ["conv-norm-act"],
              "norm": ["batch"], "activation": ["relu"], "dropout": [0.0],
              "drop_path": ["local+global"]},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.1, "momentum": 0.9,
                 "weight_decay": 0.0, "optimizer": "sgd", "seed": 0, "amp": "off",
                 "grad_checkpointing": False, "channels_last": False, "compile": "none"},
    "pruning": {"warmup_epochs": 1, "chance_margin": 0.05, "pruner": "none"},
    "run": {"device": "cpu", "workers": 1, "n_trials": 2},
}
# Values that are wrong for every field of a kind.
BAD = {
    "int": ["abc", [1], {"a": 1}, 2.5, -7, True, ""],
    "float": ["abc", [1], {"a": 1}, -3.0, True, "1e-3x", ""],
    "enum": ["bogus", 5, ["sgd"], {"a": 1}, True, ""],
    "bool": ["maybe", 5, [1], {"a": 1}, 0.5],
    "path": [5, [1], {"a": 1}, 2.5],
    "space_int": [[], "many", [0], [-1], [1.5], [True], [{"a": 1}], [1, 1]],
    "space_str": [[], [5], ["bogus"], [["nested"]], [None], ["relu", "relu"]],
    "dropout": [[1.5], [-0.1], ["x"], [], [True]],
    "unit": [["conv-conv"], ["foo"], ["norm-act"], [5], [""], ["conv--act"]],
    "name": ["", "x" * 300, "a\tb", ["a"], {"a": 1}, "it's", None],
}
FIELDS = {
    ("data", "val_fraction"): "float", ("data", "train_limit"): "int",
    ("data", "synthetic_size"): "int", ("data", "name"): "enum", ("data", "root"): "path",
    ("data", "flip"): "bool",
    ("training", "epochs"): "int", ("training", "batch_size"): "int", ("training", "lr"): "float",
    ("training", "momentum"): "float", ("training", "weight_decay"): "float",
    ("training", "optimizer"): "enum", ("training", "seed"): "int", ("training", "amp"): "enum",
    ("training", "grad_checkpointing"): "bool", ("training", "channels_last"): "bool",
    ("training", "compile"): "enum",
    ("pruning", "warmup_epochs"): "int", ("pruning", "chance_margin"): "float",
    ("pruning", "pruner"): "enum", ("run", "device"): "enum", ("run", "workers"): "int",
    ("run", "n_trials"): "int", ("run", "storage"): "path", ("run", "tracking_uri"): "path",
    ("space", "blocks"): "space_int", ("space", "columns"): "space_int",
    ("space", "width"): "space_int", ("space", "norm"): "space_str",
    ("space", "activation"): "space_str", ("space", "drop_path"): "space_str",
    ("space", "dropout"): "dropout", ("space", "unit"): "unit",
}
BROKEN_YAML = [
    "training: [1, 2", "{{", "training:\n\tepochs: 2\n", "- a\nb: c\n", "a: &x 1\nb: *y\n",
    "!!python/object/apply:os.system ['true']\n", "---\na: 1\n---\nb: 2\n", "- 1\n- 2\n", "42\n",
    "training: {epochs: 2, epochs: 3}\n", "space:\n  blocks: [1, 2]\n   columns: [1]\n",
    "data: digits\n", "training: 5\n", "space: [1, 2]\n", "'unterminated\n", "key: \"\\x\"\n",
    "? [a, b]\n: 1\n", "study_name: [fuzz]\n", "1: 2\n", "~: 1\n",
    "space:\n  1: [2]\n", "training:\n  null: 1\n",
]


def generated(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(what was broken, the YAML bytes)."""
    rng = random.Random(seed)
    cases = [(f"yaml {i}", text.encode()) for i, text in enumerate(BROKEN_YAML)]
    cases.append(("not utf-8", b"training:\n  lr: \xff\xfe\n"))
    while len(cases) < count:
        config = copy.deepcopy(BASE)
        what = []
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.1:
                key = "".join(rng.choices(string.ascii_letters + "_.-", k=rng.randint(1, 12)))
                config[key] = rng.choice([1, "x", [1], {"a": 1}])
                what.append(f"section {key}")
            elif roll < 0.2:
                section = rng.choice(["data", "training", "pruning", "run", "space"])
                key = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 10)))
                config[section][key + "_x"] = rng.choice([1, "x", None])
                what.append(f"key {section}.{key}_x")
            elif roll < 0.27:
                config["study_name"] = rng.choice(BAD["name"])
                what.append("study_name")
            else:
                (section, key), kind = rng.choice(list(FIELDS.items()))
                config[section][key] = copy.deepcopy(rng.choice(BAD[kind]))
                what.append(f"{section}.{key}={config[section][key]!r:.30}")
        cases.append(("; ".join(what), yaml.safe_dump(config).encode()))
    return cases


CASES = generated(300)


def test_hundreds_of_bad_configs_each_get_one_config_error_line(tmp_path):
    path = tmp_path / "fuzz.yaml"
    accepted = []
    for what, data in CASES:
        path.write_bytes(data)
        try:
            load_config(str(path))
        except ConfigError as exc:
            message = str(exc)
            assert message.strip() and "\n" not in message, (what, message)
            assert "Traceback" not in message
            continue
        accepted.append(what)
    assert accepted == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz.yaml"]  # nothing written


@pytest.mark.parametrize("index", list(range(0, len(CASES), len(CASES) // 8)))
def test_the_cli_refuses_a_sample_with_one_line_and_exit_2(tmp_path: Path, index):
    what, data = CASES[index]
    config = tmp_path / "fuzz.yaml"
    config.write_bytes(data)
    study = StudyDir(tmp_path)
    proc = study.run("--config", str(config), *study.args(), timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (what, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), (what, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz.yaml"], what
