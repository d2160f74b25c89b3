"""FractalNet as built from one variant: Larsson's structure, unit order, columns, drop-path."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import timm
import torch
from helpers import ConvCalls, convs, loss_and_grads, seed
from torch import nn

import fractal_mlops.engine.model  # noqa: F401  (registers "fractalnet" with timm)
from fractal_mlops.engine.model import FractalNet

SMALL = dict(blocks=2, columns=3, width=8, unit="conv-norm-act", norm="none",
             activation="relu", dropout=0.0, drop_path="local+global")


def test_import_then_timm_create_model_in_a_fresh_process():
    code = ("import fractal_mlops.engine.model, timm, torch\n"
            "m = timm.create_model('fractalnet', blocks=5, columns=3, width=64,"
            " num_classes=10, in_chans=3).eval()\n"
            "print(tuple(m(torch.randn(2, 3, 32, 32)).shape))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10)"


def test_larssons_cifar_network():
    model = timm.create_model("fractalnet", blocks=5, columns=3, width=64, num_classes=10,
                              in_chans=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert len(model.blocks) == 5
    # a block with C columns has 2^C - 1 convs; widths 64, 128, 256, 512, 512
    widths = []
    for block in model.blocks:
        block_convs = convs(block)
        assert len(block_convs) == 2**3 - 1
        assert {c.kernel_size for c in block_convs} == {(3, 3)}
        widths.append({c.out_channels for c in block_convs})
        assert sum(isinstance(m, nn.BatchNorm2d) for m in block.modules()) == 7
        assert sum(isinstance(m, nn.MaxPool2d) for m in block.modules()) == 1
    assert widths == [{64}, {128}, {256}, {512}, {512}]
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 1 and linear[0].in_features == 512 and linear[0].out_features == 10


@pytest.mark.parametrize("columns", [1, 2, 3, 4])
def test_block_has_2_pow_c_minus_1_units_and_deepest_path_2_pow_c_minus_1(columns):
    model = FractalNet(**{**SMALL, "columns": columns}).eval()
    calls = ConvCalls(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
    assert calls.per_block == [2**columns - 1] * 2  # every unit runs once in the full network
    for k in range(1, columns + 1):
        calls.reset()
        with torch.no_grad():
            out = model(x, column=k)
        assert out.shape == (2, 10)
        assert calls.per_block == [2 ** (k - 1)] * 2
    with pytest.raises(ValueError, match=rf"column must be in 1\.\.{columns}, got {columns + 1}"):
        model(x, column=columns + 1)


def test_each_column_alone_is_a_different_network():
    model = FractalNet(**SMALL).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        columns = [model(x, column=k) for k in (1, 2, 3)]
    for k, out in enumerate(columns):
        assert not torch.allclose(out, full), k
    assert not torch.allclose(columns[0], columns[1])
    assert not torch.allclose(columns[1], columns[2])


def test_unit_order_changes_the_built_network():
    orders = ["conv-norm-act", "conv-act-norm", "norm-act-conv", "act-conv-norm"]
    built = {}
    for unit in orders:
        model = FractalNet(**{**SMALL, "unit": unit, "norm": "batch", "columns": 1})
        unit_module = model.blocks[0].path.shallow
        built[unit] = [type(m).__name__ for m in unit_module]
    assert built["conv-norm-act"] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert built["conv-act-norm"] == ["Conv2d", "ReLU", "BatchNorm2d"]
    assert built["norm-act-conv"] == ["BatchNorm2d", "ReLU", "Conv2d"]
    assert built["act-conv-norm"] == ["ReLU", "Conv2d", "BatchNorm2d"]
    # a norm before the conv normalizes the conv's input channels
    first = FractalNet(**{**SMALL, "unit": "norm-act-conv", "norm": "batch"}).blocks[0]
    assert first.path.shallow.norm.num_features == 3


def test_unit_order_changes_what_the_network_computes():
    """Same weights, different order of norm and act: different outputs."""
    seed(0)
    a = FractalNet(**{**SMALL, "unit": "conv-norm-act", "norm": "batch"})
    b = FractalNet(**{**SMALL, "unit": "conv-act-norm", "norm": "batch"})
    b.load_state_dict(a.state_dict())  # same parameter names and shapes
    x = torch.randn(4, 3, 16, 16)
    a.train()
    b.train()
    with torch.no_grad():
        assert not torch.allclose(a(x, column=3), b(x, column=3), atol=1e-4)


def test_conv_bias_only_without_a_following_norm():
    def biases(unit: str, norm: str) -> set[bool]:
        return {c.bias is not None for c in convs(FractalNet(**{**SMALL, "unit": unit,
                                                                 "norm": norm}))}

    assert biases("conv-norm-act", "batch") == {False}
    assert biases("conv-norm-act", "group") == {False}
    assert biases("conv-norm-act", "none") == {True}
    assert biases("conv-act", "batch") == {True}
    assert biases("norm-act-conv", "batch") == {True}


def test_norm_and_activation_kinds_are_built():
    model = FractalNet(**{**SMALL, "norm": "group", "activation": "gelu", "width": 48})
    groups = [{m.num_groups for m in block.modules() if isinstance(m, nn.GroupNorm)}
              for block in model.blocks]
    assert groups == [{16}, {32}]  # 48 channels: gcd(32, 48) groups; 96 channels: 32 groups
    units = [m for m in model.modules() if isinstance(m, nn.Sequential) and hasattr(m, "conv")]
    assert len(units) == 2 * 7
    assert {type(unit.act).__name__ for unit in units} == {"GELU"}
    drop = FractalNet(**{**SMALL, "unit": "conv-norm-act-drop", "norm": "batch", "dropout": 0.25})
    assert {m.p for m in drop.modules() if isinstance(m, nn.Dropout)} == {0.25}


def test_bad_model_arguments_raise():
    with pytest.raises(ValueError, match="unknown op 'foo'"):
        FractalNet(**{**SMALL, "unit": "conv-foo"})
    with pytest.raises(ValueError, match="drop_path 'sometimes' must be none, local or local"):
        FractalNet(**{**SMALL, "drop_path": "sometimes"})
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("fractalnet", pretrained=True)


def outputs(model: nn.Module, x: torch.Tensor, times: int = 12) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for _ in range(times)]


def test_drop_path_varies_in_training_and_is_off_in_eval():
    seed(0)
    model = FractalNet(**SMALL)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    train = outputs(model, x)
    distinct = {tuple(out.flatten().tolist()) for out in train}
    assert len(distinct) >= 3
    model.eval()
    evaluated = outputs(model, x)
    assert all(torch.equal(evaluated[0], out) for out in evaluated)


def drop_path_plans(model: FractalNet, passes: int) -> collections.Counter:
    """What each training pass ran, read from the conv calls per block: "local" (all 2^C - 1
    units of every block; local drop-path drops join inputs after computing them) or
    "column k" (2^(k-1) units in every block: global drop-path kept column k alone)."""
    calls = ConvCalls(model)
    units = {2 ** (k - 1): f"column {k}" for k in range(1, model.columns + 1)}
    units[2 ** model.columns - 1] = "local"
    plans: collections.Counter = collections.Counter()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for _ in range(passes):
            calls.reset()
            model(x)
            assert len(set(calls.per_block)) == 1, calls.per_block  # one plan for all blocks
            plans[units[calls.per_block[0]]] += 1
    return plans


def test_global_drop_path_keeps_one_column_for_the_whole_network():
    seed(1)
    model = FractalNet(**SMALL).train()
    plans = drop_path_plans(model, passes=300)
    global_passes = sum(n for plan, n in plans.items() if plan != "local")
    assert 0.4 <= global_passes / 300 <= 0.6, plans  # half the mini-batches (Larsson: 50/50)
    for k in (1, 2, 3):  # each column, the deepest included, about equally often
        assert 0.25 <= plans[f"column {k}"] / global_passes <= 0.42, plans
    # and a global pass computes what that column alone computes
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        columns = [model(x, column=k) for k in (1, 2, 3)]
        train = [model(x) for _ in range(40)]
    assert sum(any(torch.allclose(out, c) for c in columns) for out in train) >= 10


def test_local_drop_path_never_runs_a_single_column_for_every_block():
    seed(2)
    model = FractalNet(**{**SMALL, "drop_path": "local"}).train()
    assert drop_path_plans(model, passes=200) == {"local": 200}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        full = model.eval()(x)
        model.train()
    train = outputs(model, x, times=40)
    # p = 0.15 per join input: some passes drop nothing, most drop something
    assert 1 <= sum(torch.allclose(out, full) for out in train) <= 20
    assert sum(not torch.allclose(out, full) for out in train) >= 20


def test_without_drop_path_training_outputs_are_deterministic():
    model = FractalNet(**{**SMALL, "drop_path": "none", "norm": "batch"}).train()
    x = torch.randn(4, 3, 16, 16)
    train = outputs(model, x, times=5)
    assert all(torch.equal(train[0], out) for out in train)


@pytest.mark.parametrize("drop_path", ["none", "local", "local+global"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(drop_path):
    loss, grads = loss_and_grads(False, drop_path)
    loss_ckpt, grads_ckpt = loss_and_grads(True, drop_path)
    assert torch.allclose(loss, loss_ckpt, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_gradient_checkpointing_updates_norm_statistics_once():
    """The recomputation in backward must not update batch-norm running statistics again."""

    def statistics(checkpointing: bool) -> dict[str, torch.Tensor]:
        seed(0)
        model = FractalNet(**{**SMALL, "norm": "batch"}, grad_checkpointing=checkpointing)
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 16, 16)).sum().backward()
        return {k: v.clone() for k, v in model.state_dict().items() if "running" in k
                or "num_batches" in k}

    plain, checkpointed = statistics(False), statistics(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6), name


def test_gradient_checkpointing_really_recomputes():
    """With checkpointing, backward runs (most of) the convs a second time; without, not."""
    for checkpointing, expected in ((False, range(7, 8)), (True, range(8, 15))):
        seed(0)
        model = FractalNet(**{**SMALL, "drop_path": "none"}, grad_checkpointing=checkpointing)
        calls = ConvCalls(model.train())
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        assert all(n in expected for n in calls.per_block), (checkpointing, calls.per_block)
        calls.reset()
        with torch.no_grad():
            model(torch.randn(2, 3, 16, 16))
        assert calls.per_block == [7, 7]  # nothing to recompute without gradients


def test_a_model_pickled_by_the_flat_layout_still_loads():
    """Models logged before the package had subpackages name `fractal_mlops.model.FractalNet`."""
    code = ("import pickle\n"
            "from fractal_mlops.engine.model import FractalNet, FractalPath\n"
            "assert pickle.loads(b'cfractal_mlops.model\\nFractalNet\\n.') is FractalNet\n"
            "assert pickle.loads(b'cfractal_mlops.model\\nFractalPath\\n.') is FractalPath\n"
            "import fractal_mlops.static_drop_path as old, fractal_mlops.engine.static_drop_path as new\n"
            "assert old is new\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
