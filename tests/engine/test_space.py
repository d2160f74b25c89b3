"""The template grid: `python -m fractal_mlops.space`, its variants and its config errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import EXPERIMENTS, run_module, structural_fingerprint, write_config
from torch import nn

from fractal_mlops.config.experiment import SPACE_DEFAULTS, parse_config
from fractal_mlops.config.space import Variant, enumerate_variants

DIMENSION_KEYS = {"blocks", "columns", "width", "unit", "norm", "activation", "dropout",
                  "drop_path", "weight_sharing"}


def grid_json(*args: str) -> list[dict]:
    done = run_module("fractal_mlops.space", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_default_config_prints_the_grid_size():
    done = run_module("fractal_mlops.space")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("fractalnet-quickstart: 12 distinct variants")
    listed = [line.split()[1] for line in lines[1:]]
    assert len(listed) == 12 and len(set(listed)) == 12
    assert "b2-c2-w32-conv.batch.relu-dpLG" in listed


def test_json_variants_build_working_models_with_timm():
    import timm

    import fractal_mlops.engine.model  # noqa: F401  (registers "fractalnet" with timm)

    variants = grid_json()
    assert len(variants) == 12
    x = torch.randn(2, 1, 8, 8)  # the quickstart's digits images
    for obj in variants:
        assert set(obj) == DIMENSION_KEYS | {"name"}
        model = timm.create_model("fractalnet", **obj, num_classes=10, in_chans=1).eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()
        assert Variant.from_dict(obj).name == obj["name"]


def test_paper_grid_variants_are_all_distinct_networks(monkeypatch):
    """Every one of the paper grid's variants builds a structurally different network.

    Building all 2,720 models in full takes ~3 minutes (they hold 177k units), so identical
    fractal blocks are built once and shared: FractalNet.__init__ runs for real for every
    variant, but its FractalBlock constructor returns a cached block when the block's column
    count, channels and the units its factory builds (fingerprinted from built units) are the
    same. The fingerprint is a Merkle hash over each model's module tree, so a shared block
    contributes exactly what a freshly built one would. Models are built on the meta device
    with weight initialization skipped: the fingerprint looks at structure, never at values.
    """
    import timm

    from fractal_mlops.engine import model as model_module  # registers "fractalnet" with timm

    real_block = model_module.FractalBlock
    blocks: dict[tuple, torch.nn.Module] = {}
    memo: dict = {}

    def cached_block(columns, in_ch, out_ch, unit, *sharing):
        key = (columns, in_ch, out_ch, structural_fingerprint(unit(in_ch, out_ch)),
               structural_fingerprint(unit(out_ch, out_ch)), *sharing)
        if key not in blocks:
            blocks[key] = real_block(columns, in_ch, out_ch, unit, *sharing)
        return blocks[key]

    monkeypatch.setattr(model_module, "FractalBlock", cached_block)
    for layer in (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.modules.batchnorm._NormBase):
        monkeypatch.setattr(layer, "reset_parameters", lambda self: None)
    variants = grid_json("--config", str(EXPERIMENTS / "paper_cifar10.yaml"))
    promised = re.search(r"the paper's space at scale: ([\d,]+) distinct",
                         " ".join((EXPERIMENTS.parent / "README.md").read_text().split()))
    assert promised, "README no longer states the paper grid's size"
    assert len(variants) == int(promised.group(1).replace(",", ""))  # exactly what README says
    assert {v["weight_sharing"] for v in variants} == {"none", "recursive"}
    assert len({v["name"] for v in variants}) == len(variants)
    fingerprints = {}
    with torch.device("meta"):
        for obj in variants:
            model = timm.create_model("fractalnet", **obj, num_classes=10, in_chans=3)
            fingerprints.setdefault(structural_fingerprint(model, memo), []).append(obj["name"])
    clashes = [names for names in fingerprints.values() if len(names) > 1]
    assert not clashes, f"{len(clashes)} groups of variants build the same network: {clashes[:3]}"
    assert len(fingerprints) == len(variants)


def test_fingerprint_tells_unit_orders_and_dimensions_apart():
    """The fingerprint used above is able to see each dimension (so that test can fail)."""
    from fractal_mlops.engine.model import FractalNet

    base = dict(blocks=2, columns=2, width=8, unit="conv-norm-act", norm="batch",
                activation="relu", dropout=0.0, drop_path="local")
    changes = [dict(unit="conv-act-norm"), dict(unit="norm-act-conv"), dict(norm="group"),
               dict(activation="gelu"), dict(unit="conv-norm-act-drop", dropout=0.1),
               dict(drop_path="local+global"), dict(drop_path="none"), dict(columns=3),
               dict(blocks=3), dict(width=16), dict(columns=3, weight_sharing="recursive")]
    with torch.device("meta"):
        reference = structural_fingerprint(FractalNet(**base))
        again = structural_fingerprint(FractalNet(**base))
        others = [structural_fingerprint(FractalNet(**{**base, **change})) for change in changes]
    assert reference == again
    assert len({reference, *others}) == len(changes) + 1


def test_unused_dimensions_do_not_multiply_the_grid():
    space = {**SPACE_DEFAULTS, "unit": ["conv-act"], "norm": ["batch", "group"]}
    config = parse_config({"space": space})
    variants = enumerate_variants(config.space)
    assert len(variants) == 1
    assert variants[0].norm == "none"

    space = {**SPACE_DEFAULTS, "columns": [1], "drop_path": ["none", "local", "local+global"],
             "unit": ["conv-norm-act"], "dropout": [0.1, 0.2]}
    assert len(enumerate_variants(parse_config({"space": space}).space)) == 1

    space = {**SPACE_DEFAULTS, "unit": ["conv-norm-act"], "norm": ["batch", "none"]}
    names = [v.name for v in enumerate_variants(parse_config({"space": space}).space)]
    assert names == ["b3-c3-w64-conv.batch.relu-dpLG", "b3-c3-w64-conv.relu-dpLG"]


def test_unused_dimension_seen_from_the_command_line(tmp_path):
    path = write_config(tmp_path / "experiment.yaml", base=None, data={"name": "digits"},
                        space={"blocks": [2], "unit": ["conv-act"], "norm": ["batch", "group"]})
    variants = grid_json("--config", str(path))
    assert [v["name"] for v in variants] == ["b2-c3-w64-conv.relu-dpLG"]


BAD_CONFIGS = {
    "unknown op": ({"space": {"unit": ["conv-foo"]}}, "foo"),
    "no conv": ({"space": {"unit": ["norm-act"]}}, "conv"),
    "repeated op": ({"space": {"unit": ["conv-act-act"]}}, "act"),
    "too many blocks": ({"data": {"name": "digits"}, "space": {"blocks": [2, 4]}}, "blocks"),
    "empty dimension": ({"space": {"columns": []}}, "columns"),
    "negative width": ({"space": {"width": [-1]}}, "width"),
    "negative lr": ({"training": {"lr": -1}}, "lr"),
    "zero epochs": ({"training": {"epochs": 0}}, "epochs"),
    "unknown section": ({"trainig": {"epochs": 2}}, "trainig"),
    "unknown key": ({"training": {"learning_rate": 0.1}}, "learning_rate"),
    "unknown dimension": ({"space": {"depth": [2]}}, "depth"),
    "wrong type": ({"training": {"batch_size": "big"}}, "batch_size"),
    "unknown norm": ({"space": {"norm": ["instance"]}}, "instance"),
}


def assert_one_line_error(done, *expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in expected:
        assert word in lines[0], (word, lines[0])
    assert done.stdout == ""


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, case):
    sections, expected = BAD_CONFIGS[case]
    path = write_config(tmp_path / "experiment.yaml", base=None, **sections)
    assert_one_line_error(run_module("fractal_mlops.space", "--config", str(path)), expected)


@pytest.mark.parametrize("text, expected", [
    ("space: [blocks: 2\n  columns: {3\n", "not valid YAML"),
    ("training:\n  lr: 0.1\n epochs: 3\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
])
def test_invalid_yaml_is_one_line(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert_one_line_error(run_module("fractal_mlops.space", "--config", str(path)), expected)


def test_unreadable_and_missing_files_are_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    assert_one_line_error(run_module("fractal_mlops.space", "--config", str(binary)),
                          "binary.yaml")
    assert_one_line_error(run_module("fractal_mlops.space", "--config", str(tmp_path)),
                          "cannot read")
    missing = tmp_path / "nowhere" / "missing.yaml"
    assert_one_line_error(run_module("fractal_mlops.space", "--config", str(missing)),
                          "not found", "missing.yaml")
