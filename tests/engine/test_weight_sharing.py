"""Recursive weight sharing (`weight_sharing: recursive`) and confidence-halted anytime inference
(`evaluation.halting_threshold`; metrics `halting_val_acc`, `halting_compute`; `anytime.csv`)."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from itertools import pairwise

import pytest
import timm
import torch
from helpers import ConvCalls, StudyDir, convs, loss_and_grads, structural_fingerprint, write_config
from torch import nn

import fractal_mlops.engine.model  # noqa: F401  (registers "fractalnet" with timm)
from fractal_mlops.config.experiment import parse_config
from fractal_mlops.config.sections import DataConfig, TrainConfig
from fractal_mlops.config.space import enumerate_variants
from fractal_mlops.engine.anytime import (
    anytime_curve,
    column_flops,
    curve_csv,
    halting_point,
    halting_predict,
)
from fractal_mlops.engine.model import FractalNet, param_count

# digits-shaped (1 channel in), one block of width 4, a 10-class head
TINY = dict(blocks=1, width=4, in_chans=1, num_classes=10, activation="relu", dropout=0.0,
            drop_path="local+global")
HEAD = 4 * 10 + 10
IN_CONV, INNER_CONV = 1 * 4 * 9, 4 * 4 * 9  # weights of a 3x3 conv 1 -> 4 and 4 -> 4
NORM = 2 * 4  # batch norm affine weight and bias on 4 channels


def hand_count(columns: int, sharing: str, norms: str) -> int:
    """Parameters of TINY, counted by hand.

    The chain that reads the block input holds the in -> out convs, one per level (C of them);
    every other application maps out -> out. Without sharing there are 2^C - 1 applications
    in all; with sharing one conv per level and role: C in -> out, C - 1 out -> out.
    norms: "none" (convs have a bias), "per application" or "shared" (one per shared conv).
    """
    applications = 2**columns - 1
    in_convs = columns
    inner_convs = columns - 1 if sharing == "recursive" else applications - columns
    bias = 4 if norms == "none" else 0
    weights = in_convs * (IN_CONV + bias) + inner_convs * (INNER_CONV + bias)
    norm_modules = {"none": 0, "per application": applications,
                    "shared": in_convs + inner_convs}[norms]
    return weights + norm_modules * NORM + HEAD


def tiny(columns: int, sharing: str, norms: str = "none", **extra) -> FractalNet:
    unit = "conv-act" if norms == "none" else "conv-norm-act"
    return FractalNet(**TINY, columns=columns, unit=unit, norm="none" if norms == "none" else "batch",
                      weight_sharing=sharing, shared_norms=norms == "shared", **extra)


@pytest.mark.parametrize("columns", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("norms", ["none", "per application", "shared"])
def test_parameter_counts_match_a_hand_count(columns, norms):
    assert param_count(tiny(columns, "none", norms)) == hand_count(columns, "none", norms)
    assert param_count(tiny(columns, "recursive", norms)) == hand_count(columns, "recursive",
                                                                          norms)


def test_shared_conv_weights_grow_linearly_in_columns_independent_ones_exponentially():
    shared = [param_count(tiny(c, "recursive")) for c in range(1, 8)]
    independent = [param_count(tiny(c, "none")) for c in range(1, 8)]
    steps = [b - a for a, b in pairwise(shared)]
    assert steps == [IN_CONV + INNER_CONV + 8] * 6  # one more conv per role and level
    assert independent[-1] > 10 * shared[-1]  # 2^7 - 1 = 127 convs against 13
    # the literal hand count of the smallest shared case: 3 columns, a conv 1->4 at each level
    # (3 x 40) and a conv 4->4 at levels 1 and 2 (2 x 148), plus the head
    assert shared[2] == 3 * 40 + 2 * 148 + 50 == 466


def test_with_one_or_two_columns_sharing_builds_the_same_network():
    for columns in (1, 2):
        a, b = tiny(columns, "none"), tiny(columns, "recursive")
        assert param_count(a) == param_count(b)
        assert len(convs(a)) == len(convs(b)) == 2**columns - 1


def test_shared_and_independent_variants_are_distinct_networks():
    torch.manual_seed(0)
    independent = tiny(3, "none").eval()
    torch.manual_seed(0)
    shared = tiny(3, "recursive").eval()
    assert structural_fingerprint(independent) != structural_fingerprint(shared)
    assert len(convs(independent)) == 7 and len(convs(shared)) == 5  # distinct conv modules
    # the two applications of f_1 inside the inner f_2 use one conv; the input chain its own
    inner = shared.blocks[0].path.second
    assert inner.first.shallow.conv is inner.second.shallow.conv
    assert shared.blocks[0].path.first.first.shallow.conv is not inner.first.shallow.conv
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(independent(x), shared(x))


def test_a_training_step_keeps_shared_applications_identical():
    torch.manual_seed(0)
    model = tiny(4, "recursive", "per application")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.arange(8)).backward()
    optimizer.step()
    block = model.blocks[0].path
    a, b = block.second.first.first.shallow, block.second.second.second.shallow
    assert a.conv is b.conv  # level-1 inner applications: one conv
    assert a.norm is not b.norm  # ... with a norm each
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_timm_builds_the_shared_variant():
    model = timm.create_model("fractalnet", blocks=2, columns=4, width=8, num_classes=10,
                              in_chans=1, weight_sharing="recursive")
    assert model.blocks[0].weight_sharing == "recursive"
    assert param_count(model) < param_count(timm.create_model(
        "fractalnet", blocks=2, columns=4, width=8, num_classes=10, in_chans=1))
    with pytest.raises(ValueError, match="weight_sharing"):
        FractalNet(blocks=1, columns=3, width=4, weight_sharing="all")


@pytest.mark.parametrize("columns", [3, 4])
def test_single_column_mode_runs_each_columns_units_with_sharing(columns):
    model = FractalNet(blocks=2, columns=columns, width=8, unit="conv-norm-act", norm="batch",
                       weight_sharing="recursive").eval()
    calls = ConvCalls(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
        assert calls.per_block == [2**columns - 1] * 2
        answers = []
        for k in range(1, columns + 1):
            calls.reset()
            answers.append(model(x, column=k))
            assert calls.per_block == [2 ** (k - 1)] * 2
    assert all(not torch.allclose(a, b) for a, b in pairwise(answers))


def test_drop_path_varies_in_training_with_sharing():
    torch.manual_seed(0)
    model = FractalNet(blocks=2, columns=3, width=8, unit="conv-act", norm="none",
                       weight_sharing="recursive").train()  # no batch norm: train == eval
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        columns = [model.eval()(x, column=k) for k in (1, 2, 3)]
        model.train()
        train = [model(x) for _ in range(20)]
    assert len({tuple(out.flatten().tolist()) for out in train}) >= 3
    assert any(any(torch.allclose(out, c) for c in columns) for out in train)  # global drop


@pytest.mark.parametrize("drop_path", ["none", "local+global"])
@pytest.mark.parametrize("shared_norms", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_with_sharing(drop_path, shared_norms):
    sharing = dict(weight_sharing="recursive", shared_norms=shared_norms)
    loss, grads = loss_and_grads(False, drop_path, **sharing)
    loss_ckpt, grads_ckpt = loss_and_grads(True, drop_path, **sharing)
    assert torch.allclose(loss, loss_ckpt, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in grads.values())


# -- the grid ------------------------------------------------------------------------------

def test_sharing_multiplies_the_grid_only_where_there_is_something_to_share():
    config = parse_config({"space": {"blocks": [2], "columns": [1, 2, 3], "width": [8],
                                     "weight_sharing": ["none", "recursive"]}})
    names = [v.name for v in enumerate_variants(config.space)]
    assert names == ["b2-c1-w8-conv.batch.relu-dp0", "b2-c2-w8-conv.batch.relu-dpLG",
                     "b2-c3-w8-conv.batch.relu-dpLG", "b2-c3-w8-conv.batch.relu-dpLG-rec"]


def test_a_config_without_the_new_options_keeps_its_sha256():
    """A study started before weight sharing and halting existed must still resume."""
    old = parse_config({"space": {"blocks": [2]}})
    explicit = parse_config({"space": {"blocks": [2], "weight_sharing": ["none"]},
                             "evaluation": {"halting_threshold": 0.9}})
    assert "weight_sharing" not in old.to_yaml() and "evaluation" not in old.to_yaml()
    assert old.sha256 == explicit.sha256
    changed = parse_config({"space": {"blocks": [2]}, "evaluation": {"halting_threshold": 0.5}})
    assert changed.sha256 != old.sha256 and "halting_threshold: 0.5" in changed.to_yaml()


@pytest.mark.parametrize("evaluation, expected", [
    ({"halting_threshold": 1.5}, "halting_threshold"),
    ({"halting_threshold": -0.1}, "halting_threshold"),
    ({"halting_threshold": "high"}, "halting_threshold"),
    ({"halting_threshold": float("nan")}, "halting_threshold"),
    ({"halting_treshold": 0.5}, "halting_treshold"),
])
def test_bad_halting_threshold_is_one_line_and_exit_code_2(tmp_path, evaluation, expected):
    path = write_config(tmp_path / "bad.yaml", evaluation=evaluation)
    done = subprocess.run([sys.executable, "-m", "fractal_mlops.space", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr


def test_bad_weight_sharing_value_is_one_line(tmp_path):
    path = write_config(tmp_path / "bad.yaml", space={"weight_sharing": ["shared"]})
    done = subprocess.run([sys.executable, "-m", "fractal_mlops.space", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "space.weight_sharing 'shared' is unknown (expected one of none, recursive)" in \
        done.stderr.strip()


# -- halting on a trained digits model -------------------------------------------------------

@pytest.fixture(scope="module", params=["none", "recursive"])
def trained(request):
    from fractal_mlops.engine.data import load_dataset
    from fractal_mlops.engine.train import Trainer

    data = load_dataset(DataConfig(name="digits"))
    variant = dict(blocks=1, columns=3, width=8, unit="conv-norm-act", norm="batch",
                   activation="relu", dropout=0.0, drop_path="local+global",
                   weight_sharing=request.param)
    trainer = Trainer(variant, data, TrainConfig(epochs=3, batch_size=32, lr=0.1))
    for _ in trainer.epochs():
        pass
    return trainer


def test_halting_above_1_is_column_c_and_at_0_is_column_1(trained):
    outputs = trained.column_outputs()
    accuracies = trained.column_accuracies()
    columns = trained.model.columns
    flops = column_flops(trained.model, (1, 8, 8))
    assert flops == sorted(flops) and flops[0] < flops[-1]

    never = halting_point(outputs, flops, 1.01)
    assert never.accuracy == accuracies[columns]
    assert never.halted[-1] == 1.0
    assert never.compute_fraction == pytest.approx(sum(flops) / flops[-1])  # paid all columns

    always = halting_point(outputs, flops, 0.0)
    assert always.accuracy == accuracies[1]
    assert always.halted[0] == 1.0
    assert always.compute_fraction == pytest.approx(flops[0] / flops[-1])
    assert len(set(accuracies.values())) > 1  # the columns really differ, so this can fail


def test_real_early_exit_agrees_with_the_logged_halting_point(trained):
    outputs = trained.column_outputs()
    flops = column_flops(trained.model, (1, 8, 8))
    x = torch.cat([images for images, _ in trained.val_loader])
    median = float(outputs.confidence[0].median())  # column 1 is sure of half the images
    for threshold in (0.5, 0.9, 0.99, median):
        point = halting_point(outputs, flops, threshold)
        prediction, halted_at = halting_predict(trained.model, x, threshold)
        assert int((prediction == outputs.labels).sum()) / len(x) == point.accuracy
        shares = torch.bincount(halted_at - 1, minlength=3).double() / len(x)
        assert tuple(shares.tolist()) == pytest.approx(point.halted)
    middle = halting_point(outputs, flops, median)
    assert 0.3 < middle.halted[0] < 0.7  # some images stop at column 1, others go on
    assert flops[0] / flops[-1] < middle.compute_fraction < sum(flops) / flops[-1]


def test_anytime_csv_layout(trained):
    outputs = trained.column_outputs()
    flops = column_flops(trained.model, (1, 8, 8))
    rows = list(csv.DictReader(io.StringIO(curve_csv(anytime_curve(outputs, flops, 0.42)))))
    assert list(rows[0]) == ["threshold", "accuracy", "compute_fraction", "halted_column_1",
                             "halted_column_2", "halted_column_3"]
    thresholds = [float(r["threshold"]) for r in rows]
    assert thresholds == sorted(thresholds) and 0.42 in thresholds and thresholds[0] == 0.0
    for row in rows:
        shares = [float(row[f"halted_column_{k}"]) for k in (1, 2, 3)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)  # rounded to 6 decimals


# -- MLflow and reproduce -------------------------------------------------------------------

def test_complete_trials_log_halting_metrics_and_anytime_csv_and_reproduce_compares_them(
        tmp_path):
    study_dir = StudyDir(tmp_path)
    config = write_config(study_dir.root / "halting.yaml", study_name="halting",
                          space={"blocks": [1], "columns": [3], "width": [8],
                                 "unit": ["conv-norm-act"], "weight_sharing": ["recursive"]},
                          evaluation={"halting_threshold": 0.8},
                          pruning={"warmup_epochs": 5})
    done = study_dir.run("--config", str(config), *study_dir.args())
    assert done.returncode == 0, done.stderr[-2000:]
    [run] = study_dir.runs("halting")
    assert run.data.tags["fractal.state"] == "COMPLETE"
    assert run.data.params["weight_sharing"] == "recursive"
    assert run.data.params["halting_threshold"] == "0.8"
    assert run.data.params["variant"].endswith("-rec")
    metrics = run.data.metrics
    assert 0 < metrics["halting_val_acc"] <= 1
    assert 0 < metrics["halting_compute"] < 2
    client = study_dir.client()
    text = open(client.download_artifacts(run.info.run_id, "anytime.csv",
                                          str(study_dir.root))).read()
    rows = list(csv.DictReader(io.StringIO(text)))
    at = next(r for r in rows if float(r["threshold"]) == 0.8)
    assert float(at["accuracy"]) == pytest.approx(metrics["halting_val_acc"], abs=1e-6)
    assert float(at["compute_fraction"]) == pytest.approx(metrics["halting_compute"], abs=1e-6)

    again = subprocess.run([sys.executable, "-m", "fractal_mlops.reproduce", run.info.run_id,
                            "--tracking-uri", study_dir.tracking_uri], cwd=study_dir.root,
                           env=study_dir.env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    compared = {line.split()[0]: line.split()[-1] for line in again.stdout.splitlines()
                if line.startswith("halting_")}
    assert compared == {"halting_compute": "same", "halting_val_acc": "same"}
    [copy] = study_dir.runs("halting", role="reproduction")
    assert copy.data.metrics["halting_val_acc"] == metrics["halting_val_acc"]
    assert "anytime.csv" in {a.path for a in client.list_artifacts(copy.info.run_id)}
    assert copy.data.params["weight_sharing"] == "recursive"
