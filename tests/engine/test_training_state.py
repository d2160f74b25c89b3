"""A trial resumed from its saved state trains exactly what an unbroken one trains (on a CPU,
bit for bit), whether the state was saved at an epoch's end or in the middle of one; and the
precision `auto` chooses by timing changes nothing a trial computes."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from fractal_mlops.config.sections import DataConfig, TrainConfig
from fractal_mlops.engine import autotune
from fractal_mlops.engine.data import load_dataset
from fractal_mlops.engine.device import cpu_has_native_bf16
from fractal_mlops.engine.precision import Precision, candidates
from fractal_mlops.engine.train import Trainer

# dropout and local+global drop-path: every random stream a step draws from is in play
VARIANT = dict(blocks=2, columns=2, width=8, unit="conv-norm-act-drop", norm="batch",
               activation="relu", dropout=0.1, drop_path="local+global", name="resume-me")
SETTINGS = TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=3)
DETERMINISTIC = ("train_loss", "train_acc", "val_loss", "val_acc")


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits", train_limit=480, val_limit=200))


def learned(results) -> list[tuple]:
    return [(r.epoch, *(getattr(r, k) for k in DETERMINISTIC)) for r in results]


def through_a_file(state: dict) -> dict:
    """As a checkpoint artifact carries it: torch.save, then torch.load on the CPU."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=False)


def unbroken(digits) -> list[tuple]:
    return learned(Trainer(VARIANT, digits, SETTINGS).epochs())


def test_resumed_at_an_epoch_end_trains_what_an_unbroken_run_trains(digits):
    first = Trainer(VARIANT, digits, SETTINGS)
    before = list(first.epochs(stop=1))
    state = through_a_file(first.state_dict())
    torch.manual_seed(12345)  # a new process: whatever the streams hold now is not the trial's
    second = Trainer(VARIANT, digits, SETTINGS)
    second.load_state_dict(state)
    assert learned(before) + learned(second.epochs()) == unbroken(digits)


@pytest.mark.parametrize("stop_after", [1, 7, 14])
def test_resumed_in_the_middle_of_an_epoch_trains_what_an_unbroken_run_trains(digits, stop_after):
    """15 steps an epoch: a state saved after step 1, 7 or 14 of epoch 2, the process gone."""
    saved: list[dict] = []
    first = Trainer(VARIANT, digits, SETTINGS)
    before = list(first.epochs(stop=1))
    first.checkpoint_seconds = 1e-9  # a checkpoint after every step of the next epoch
    first.on_checkpoint = lambda state: saved.append(through_a_file(state))
    first.train_epoch()  # epoch 2 runs on, but the process "dies" after it
    assert [s["epoch_so_far"]["step"] for s in saved] == list(range(1, 15))  # not the last step

    torch.manual_seed(12345)
    second = Trainer(VARIANT, digits, SETTINGS)
    second.load_state_dict(saved[stop_after - 1])
    assert second.epochs_done == 1
    assert learned(before) + learned(second.epochs()) == unbroken(digits)


def test_a_checkpoint_is_taken_no_more_often_than_asked(digits):
    saved = []
    trainer = Trainer(VARIANT, digits, SETTINGS)
    trainer.checkpoint_seconds = 3600.0
    trainer.on_checkpoint = saved.append
    list(trainer.epochs())
    assert saved == []


def test_precision_auto_times_every_candidate_and_takes_the_fastest(digits, monkeypatch):
    settings = dataclasses.replace(SETTINGS, amp="auto", memory_format="auto")
    options = candidates(settings, torch.device("cpu"))
    expected = 4 if cpu_has_native_bf16() else 2  # bf16 only where the CPU has it natively
    assert len(options) == expected
    assert {o.memory_format for o in options} == {"contiguous", "channels_last"}
    # a stand-in clock: the slowest candidate first, the fastest one last
    fake_ms = {o.name: 10.0 * (len(options) - i) for i, o in enumerate(options)}
    monkeypatch.setattr(autotune, "_lockstep", lambda variant, data, s, device, opts: fake_ms)
    choice = autotune.choose(VARIANT, digits, settings, torch.device("cpu"), cache={})
    assert choice.precision == options[-1]
    assert choice.params()["memory_format"] == options[-1].memory_format
    assert f"step_ms.{options[0].name.replace('/', '.')}" in choice.params()


def test_precision_auto_measures_once_per_network_and_leaves_the_trial_unchanged(digits):
    settings = dataclasses.replace(SETTINGS, memory_format="auto")
    cache: dict = {}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = autotune.choose(VARIANT, digits, settings, torch.device("cpu"), cache)
    assert torch.equal(torch.rand(3), expected)  # the random streams are as they were
    assert first.seconds > 0 and set(first.step_ms) == {"float32/contiguous",
                                                        "float32/channels_last"}
    again = autotune.choose(VARIANT, digits, settings, torch.device("cpu"), cache)
    assert again.precision == first.precision and again.seconds == 0.0
    chosen = Trainer(VARIANT, digits, settings, precision=first.precision)
    assert learned(chosen.epochs(stop=1)) == learned(
        Trainer(VARIANT, digits, settings, precision=first.precision).epochs(stop=1))


def test_precision_auto_times_every_candidate_on_the_whole_network(digits):
    """With local+global drop-path, half of a trial's steps run one column alone. If the
    candidates' timed steps drew different columns, the one that drew the cheap steps would
    win: every timed step runs every column, and the model trains as configured afterwards."""
    options = candidates(dataclasses.replace(SETTINGS, memory_format="auto"), torch.device("cpu"))
    trainers = [Trainer(VARIANT, digits, SETTINGS, precision=option) for option in options]
    plans: list[list] = [[] for _ in trainers]
    for trainer, seen in zip(trainers, plans, strict=True):
        draw = trainer.model._drop_plan
        trainer.model._drop_plan = lambda draw=draw, seen=seen: seen.append(draw()) or seen[-1]
    autotune.step_times(trainers, min_rounds=20, min_seconds=0.0)
    for seen in plans:
        assert len(seen) >= 20 and all(column is None for column, _ in seen)
        assert all(drop_prob == trainers[0].model.local_drop_prob > 0 for _, drop_prob in seen)
    assert all(trainer.model.drop_path == "local+global" for trainer in trainers)
    # and a trial's own steps still run one column alone about half of the time
    seen = plans[0]
    seen.clear()
    list(trainers[0].epochs(stop=1))
    assert 0.3 < sum(column is not None for column, _ in seen) / len(seen) < 0.7


def test_a_fixed_setting_is_not_timed(digits):
    choice = autotune.choose(VARIANT, digits, SETTINGS, torch.device("cpu"), cache={})
    assert choice.precision == Precision(None, False) and choice.step_ms == {}


def test_the_recorded_precision_is_replayed_and_older_runs_read_their_config():
    settings = dataclasses.replace(SETTINGS, amp="auto", memory_format="auto")
    recorded = {"amp_dtype": "bfloat16", "memory_format": "channels_last"}
    assert Precision.from_params(recorded, settings, torch.device("cpu")) == Precision(
        torch.bfloat16, True)
    legacy = dataclasses.replace(SETTINGS, channels_last=True)
    assert Precision.from_params({"amp_dtype": "float32"}, legacy, torch.device("cpu")) == Precision(
        None, True)


@pytest.mark.parametrize(("training", "message"), [
    ({"memory_format": "nhwc"}, "training.memory_format"),
    ({"channels_last": True, "memory_format": "auto"}, "contradict"),
    ({"checkpoint_minutes": -1}, "training.checkpoint_minutes"),
])
def test_bad_precision_and_checkpoint_settings_are_refused(training, message):
    from fractal_mlops.config.experiment import parse_config
    from fractal_mlops.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config({"training": training})


def test_the_new_settings_leave_an_older_study_config_and_its_hash_unchanged():
    """A study started before memory_format / checkpoint_minutes existed still resumes."""
    from fractal_mlops.config.experiment import parse_config

    before = parse_config({"training": {"epochs": 2}})
    assert "memory_format" not in before.to_dict()["training"]
    assert "checkpoint_minutes" not in before.to_dict()["training"]
    assert parse_config({"training": {"epochs": 2, "checkpoint_minutes": 3}}).sha256 == before.sha256
    assert parse_config({"training": {"epochs": 2, "memory_format": "auto"}}).sha256 != before.sha256
