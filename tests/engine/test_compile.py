"""The capturable step (training.compile): drop-path in static shapes keeps the eager form's
decisions and semantics, and the compiled step trains as the eager one does."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from helpers import seed

from fractal_mlops.config.experiment import load_config
from fractal_mlops.config.sections import DataConfig, TrainConfig
from fractal_mlops.engine.data import load_dataset
from fractal_mlops.engine.model import FractalNet
from fractal_mlops.engine.static_drop_path import MaskPlan, masked_join
from fractal_mlops.engine.train import Trainer
from fractal_mlops.errors import ConfigError

SMALL = dict(blocks=2, columns=3, width=8, unit="conv-norm-act", norm="none",
             activation="relu", dropout=0.0, drop_path="local+global")


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset(DataConfig(name="digits", train_limit=600, val_limit=300))


def test_a_masked_join_is_the_mean_of_the_kept_inputs_and_the_dropped_get_no_gradient():
    a, b, c = (torch.full((2, 3), v, requires_grad=True) for v in (1.0, 10.0, 4.0))
    bad = torch.full((2, 3), math.inf, requires_grad=True)
    out = masked_join([a, b, c, bad], torch.tensor([True, False, True, False]))
    assert torch.equal(out, torch.full((2, 3), 2.5))  # (1 + 4) / 2; the inf stays out
    out.sum().backward()
    assert torch.equal(a.grad, torch.full((2, 3), 0.5)) and torch.equal(c.grad, a.grad)
    assert torch.equal(b.grad, torch.zeros(2, 3)) and torch.equal(bad.grad, torch.zeros(2, 3))


class Recorded:
    """Every MaskPlan a forward builds, with the masks it draws: (plan, inputs, mask)."""

    def __init__(self, monkeypatch) -> None:
        self.plans: list[MaskPlan] = []
        self.masks: list[tuple[MaskPlan, int, torch.Tensor]] = []
        init, mask = MaskPlan.__init__, MaskPlan.mask

        def recording_init(plan, *args, **kwargs):
            init(plan, *args, **kwargs)
            self.plans.append(plan)

        def recording_mask(plan, n, column):
            drawn = mask(plan, n, column)
            self.masks.append((plan, n, drawn))
            return drawn

        monkeypatch.setattr(MaskPlan, "__init__", recording_init)
        monkeypatch.setattr(MaskPlan, "mask", recording_mask)


def test_static_drop_path_draws_with_the_eager_forms_statistics(monkeypatch):
    """Larsson's drop-path, as the eager form draws it (test_model's drop-path tests): half
    the mini-batches take one column, uniformly, for every block; the others drop each join
    input with p = 0.15 and never all of a join's inputs."""
    seed(0)
    recorded = Recorded(monkeypatch)
    model = FractalNet(**SMALL, static_drop_path=True).train()
    x = torch.randn(2, 3, 16, 16)
    passes = 600
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    assert len(recorded.plans) == passes
    global_plans = [p for p in recorded.plans if bool(p.global_on)]
    assert 0.4 <= len(global_plans) / passes <= 0.6
    columns = collections.Counter(int(p.column) for p in global_plans)
    assert set(columns) == {1, 2, 3}  # the deepest column too
    assert all(0.25 <= n / len(global_plans) <= 0.42 for n in columns.values()), columns
    # two joins of 2 and 3 inputs per block (f_3's middle, the block's output), two blocks
    assert collections.Counter(n for _, n, _ in recorded.masks) == {2: 2 * passes, 3: 2 * passes}
    for plan, n, mask in recorded.masks:
        if bool(plan.global_on) and n == 3:  # the block's output: that column's path alone
            assert mask.tolist() == [k == int(plan.column) for k in (1, 2, 3)]
    local = [mask for plan, _, mask in recorded.masks if not bool(plan.global_on)]
    assert all(bool(mask.any()) for mask in local)
    kept = sum(int(mask.sum()) for mask in local) / sum(len(mask) for mask in local)
    assert 0.82 <= kept <= 0.90, kept  # 0.85, plus the rare rescue of an all-dropped join


def test_static_local_drop_path_never_takes_one_column_for_the_network(monkeypatch):
    seed(2)
    recorded = Recorded(monkeypatch)
    model = FractalNet(**{**SMALL, "drop_path": "local"}, static_drop_path=True).train()
    with torch.no_grad():
        for _ in range(200):
            model(torch.randn(2, 3, 16, 16))
    assert len(recorded.plans) == 200 and not any(bool(p.global_on) for p in recorded.plans)
    masks = [mask for _, _, mask in recorded.masks]
    assert all(bool(mask.any()) for mask in masks)
    assert 0.82 <= sum(int(m.sum()) for m in masks) / sum(len(m) for m in masks) <= 0.90


def test_a_static_pass_computes_what_its_draws_say(monkeypatch):
    """A global pass gives what its column alone gives; a local pass that keeps everything
    gives the full network's mean (norms off, so train and eval compute alike)."""
    seed(1)
    recorded = Recorded(monkeypatch)
    model = FractalNet(**SMALL, static_drop_path=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        alone = {k: model.eval()(x, column=k) for k in (1, 2, 3)}
        full = model(x)
        model.train()
        outputs = [model(x) for _ in range(60)]
    checked = collections.Counter()
    for plan, out in zip(recorded.plans, outputs, strict=True):
        if bool(plan.global_on):
            assert torch.allclose(out, alone[int(plan.column)], atol=1e-6)
            checked["global"] += 1
        elif all(bool(mask.all()) for p, _, mask in recorded.masks if p is plan):
            assert torch.allclose(out, full, atol=1e-6)
            checked["all kept"] += 1
        else:
            assert not torch.allclose(out, full, atol=1e-6)
            checked["dropped"] += 1
    assert min(checked.values()) >= 3 and len(checked) == 3, checked


@pytest.mark.slow
def test_a_compiled_step_trains_as_the_eager_step_does(small_digits, monkeypatch):
    """torch.compile (inductor, C++ on the CPU) captures the step without a graph break and
    gives the eager step's losses; inductor draws its random numbers as eager does here
    (fallback_random), so both take the same drop-path and dropout decisions."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    counters.clear()
    variant = dict(SMALL, blocks=2, unit="conv-norm-act-drop", norm="batch", dropout=0.1)

    def losses(compile: str) -> list[float]:
        settings = TrainConfig(epochs=1, batch_size=50, lr=0.05, seed=0, compile=compile)
        trainer = Trainer(variant, small_digits, settings, static_drop_path=True)
        return [trainer.train_step(*batch)[0].item() for batch in trainer.train_loader]

    eager = losses("none")
    compiled = losses("default")
    assert len(compiled) == len(eager) == 12
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert eager[-1] < eager[0]  # and it trains


def test_training_compile_in_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  compile: reduce-overhead\n")
    assert load_config(str(path)).training.compile == "reduce-overhead"
    assert "compile: reduce-overhead" in load_config(str(path)).to_yaml()
    path.write_text("training:\n  compile: off\n")  # YAML's false: the off word
    assert load_config(str(path)).training.compile == "none"
    # at its default it is not in the config's text, so a study's config_sha256 stays as it was
    assert "compile" not in load_config(str(path)).to_yaml()
    for text, words in [("training:\n  compile: max\n", "training.compile 'max' is unknown"),
                        ("training:\n  compile: default\n  grad_checkpointing: true\n",
                         "training.compile needs grad_checkpointing: false")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=words):
            load_config(str(path))


def test_the_model_refuses_static_drop_path_with_checkpointing():
    with pytest.raises(ValueError, match="grad_checkpointing"):
        FractalNet(**SMALL, static_drop_path=True, grad_checkpointing=True)
