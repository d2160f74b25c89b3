"""Training one variant: it learns, it is reproducible, it stops on a non-finite loss."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fractal_mlops.config.sections import DataConfig, TrainConfig
from fractal_mlops.engine.data import load_dataset
from fractal_mlops.engine.device import cpu_has_native_bf16, resolve_amp, resolve_device
from fractal_mlops.engine.train import CHECK_EVERY, EpochResult, Trainer, build_optimizer
from fractal_mlops.errors import ConfigError

REASONABLE = dict(blocks=2, columns=2, width=32, unit="conv-norm-act", norm="batch",
                  activation="relu", dropout=0.0, drop_path="local+global",
                  name="b2-c2-w32-conv.batch.relu-dpLG")
QUICK_LEARNER = dict(blocks=2, columns=2, width=16, unit="conv-norm-act", norm="batch",
                     activation="relu", dropout=0.0, drop_path="local+global")
TINY = dict(blocks=1, columns=2, width=8, unit="conv-norm-act", norm="batch",
            activation="relu", dropout=0.0, drop_path="local+global")
CONTRACT_METRICS = {"train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds",
                    "images_per_second", "host_mem_peak_mb"}
TIMING_AND_MEMORY = {"epoch_seconds", "images_per_second", "host_mem_peak_mb", "gpu_mem_peak_mb",
                     "gpu_mem_reserved_mb", "gpu_eval_mem_peak_mb"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset(DataConfig(name="digits", train_limit=600, val_limit=300))


def learned(result: EpochResult) -> dict[str, float]:
    return {k: v for k, v in result.metrics().items() if k not in TIMING_AND_MEMORY}


def test_a_reasonable_variant_learns_digits(digits):
    settings = TrainConfig(epochs=4, batch_size=32, lr=0.1, momentum=0.9, seed=0)
    trainer = Trainer(REASONABLE, digits, settings)
    started = time.perf_counter()
    results = list(trainer.epochs())
    wall = time.perf_counter() - started
    assert [r.epoch for r in results] == [1, 2, 3, 4]
    assert max(r.val_acc for r in results) >= 0.90
    assert results[-1].train_loss < results[0].train_loss
    assert all(r.stop_reason is None for r in results)
    assert trainer.model.variant_name == REASONABLE["name"]

    for result in results:
        metrics = result.metrics()
        assert set(metrics) == CONTRACT_METRICS  # no gpu_mem_peak_mb on the CPU
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics["val_acc"] <= 1.0 and 0.0 <= metrics["train_acc"] <= 1.0
        assert metrics["epoch_seconds"] > 0 and metrics["images_per_second"] > 0
        assert metrics["host_mem_peak_mb"] > 50  # the training process's resident memory
    # training time in seconds: a part of the wall time around it (evaluation is not in it)
    assert 0 < trainer.train_seconds <= wall
    assert trainer.train_seconds > 0.2 * wall

    columns = trainer.column_accuracies()
    assert sorted(columns) == [1, 2]
    assert all(0.0 <= acc <= 1.0 for acc in columns.values())
    assert max(columns.values()) > 0.5  # each column alone is a working network


def test_same_seed_same_results(small_digits):
    def run(seed: int) -> list[dict[str, float]]:
        settings = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=seed)
        trainer = Trainer(TINY, small_digits, settings, flip=True)
        return [learned(r) for r in trainer.epochs()] + [trainer.column_accuracies()]

    first = run(seed=3)
    assert run(seed=3) == first
    assert run(seed=4) != first


@pytest.mark.parametrize("form", ["eager, checkpointed", "static"])
def test_a_training_step_reads_nothing_back_from_the_device(small_digits, monkeypatch, form):
    """On a GPU, reading a value back (.item(), .tolist(), .cpu()) stalls the host until the
    device has caught up: the step must not, with drop-path (local and global), dropout and
    flips all drawing, in either drop-path form. Here those reads raise inside the steps."""
    variant = dict(TINY, columns=4, unit="conv-norm-act-drop", dropout=0.1,
                   drop_path="local+global")
    static = form == "static"
    settings = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=0,
                           grad_checkpointing=not static)
    trainer = Trainer(variant, small_digits, settings, flip=True, static_drop_path=static)
    batches = iter(trainer.train_loader)
    first = next(batches)  # the epoch's shuffle and flips are drawn here, once

    def refuse(self, *args, **kwargs):
        raise AssertionError("a training step read a tensor back to the host")

    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    losses = [trainer.train_step(*batch)[0] for batch in [first, *(next(batches)
                                                               for _ in range(7))]]
    monkeypatch.undo()
    assert all(math.isfinite(loss.item()) for loss in losses)


def test_a_non_finite_loss_ends_the_pass_near_the_step_it_happened_at(small_digits):
    variant = dict(TINY, unit="conv-act", norm="none", drop_path="none")
    settings = TrainConfig(epochs=1, batch_size=8, lr=1e30, seed=0)
    trained = Trainer(variant, small_digits, settings).train_epoch()
    assert trained.non_finite_step is not None
    steps = math.ceil(len(small_digits.train_x) / settings.batch_size)
    assert trained.seen < steps * settings.batch_size  # not the whole epoch on a dead model
    assert trained.seen <= (trained.non_finite_step + CHECK_EVERY) * settings.batch_size


def test_steps_the_grad_scaler_skips_are_counted_not_taken_for_divergence(small_digits):
    """training.amp fp16 needs CUDA, but fp16 autocast and GradScaler work the same on the CPU:
    a first scale too large for fp16 gradients makes the scaler skip steps (halving the scale
    each time) until they fit; the epoch goes on and counts them."""
    settings = TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=0)
    trainer = Trainer(TINY, small_digits, settings)
    trainer.amp_dtype = torch.float16
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    trained = trainer.train_epoch()
    steps = math.ceil(len(small_digits.train_x) / settings.batch_size)
    assert trained.skipped_steps is not None and 0 < trained.skipped_steps < steps
    assert trained.non_finite_step is None and math.isfinite(trained.loss)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_steps_after_skipped_ones_train_as_unfused_steps_do(small_digits, optimizer):
    """CUDA trains with fused optimizers, which take GradScaler's overflow flag on the device.
    The CPU has the same fused kernels: with fp16's usual start (the first steps skipped for
    overflow) the fused epoch ends where the unfused one does. A skipped first fused SGD step
    used to leave its momentum buffers as uninitialized memory, carried into the weights."""
    settings = TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer=optimizer, seed=0)
    weights, skipped = [], []
    for fused in (False, True):
        trainer = Trainer(TINY, small_digits, settings)
        trainer.optimizer = build_optimizer(trainer.model, settings, fused=fused)
        trainer.amp_dtype = torch.float16
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
        skipped.append(trainer.train_epoch().skipped_steps)
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert skipped[0] == skipped[1] and skipped[0] > 0  # the same steps skipped, first ones
    for unfused, fused in zip(*weights, strict=True):
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_training_with_a_reason(small_digits):
    variant = dict(TINY, unit="conv-act", norm="none", drop_path="none")
    settings = TrainConfig(epochs=3, batch_size=64, lr=1e30, seed=0)
    results = list(Trainer(variant, small_digits, settings).epochs())
    assert len(results) < settings.epochs
    last = results[-1]
    assert last.stop_reason is not None and "non-finite train loss" in last.stop_reason
    assert f"at epoch {last.epoch}, step " in last.stop_reason
    assert not math.isfinite(last.train_loss)
    assert all(r.stop_reason is None for r in results[:-1])


def test_bf16_autocast_trains_on_cpu(small_digits):
    settings = TrainConfig(epochs=1, batch_size=32, lr=0.003, optimizer="adamw", seed=0,
                           amp="bf16", channels_last=True)
    trainer = Trainer(QUICK_LEARNER, small_digits, settings)
    assert trainer.amp_dtype == torch.bfloat16
    results = list(trainer.epochs())
    assert all(math.isfinite(r.train_loss) for r in results)
    assert results[-1].val_acc > 0.4  # chance is 0.1
    assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_amp_modes_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) == torch.bfloat16
    # auto: bf16 only where the CPU runs it natively (elsewhere it is many times slower)
    assert resolve_amp("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(ConfigError, match="fp16"):
        resolve_amp("fp16", cpu)


def test_amp_auto_on_a_gpu_without_native_bf16_picks_fp16(monkeypatch):
    """torch counts emulated bf16 as supported by default; auto must not pick it (V100, T4)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp("auto", torch.device("cuda")) == torch.bfloat16


def test_fp16_on_cpu_is_a_config_error(small_digits):
    with pytest.raises(ConfigError, match="fp16"):
        Trainer(TINY, small_digits, TrainConfig(amp="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_cuda_without_a_gpu_is_a_config_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device 'tpu' is unknown"):
        resolve_device("tpu")


def test_gradient_checkpointing_trains_the_same_model(small_digits):
    """Checkpointing trades compute for memory only: the trained network must not change
    (batch-norm running statistics included, which the validation metrics depend on)."""

    def run(checkpointing: bool) -> list[dict[str, float]]:
        settings = TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=0,
                               grad_checkpointing=checkpointing)
        trainer = Trainer(TINY, small_digits, settings)
        assert trainer.model.grad_checkpointing is checkpointing
        return [learned(r) for r in trainer.epochs()]

    plain, checkpointed = run(False), run(True)
    for a, b in zip(plain, checkpointed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_adamw_and_weight_decay_train(small_digits):
    settings = TrainConfig(epochs=1, batch_size=32, lr=0.003, optimizer="adamw",
                           weight_decay=0.01, seed=0)
    trainer = Trainer(QUICK_LEARNER, small_digits, settings)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    (result,) = list(trainer.epochs())
    assert math.isfinite(result.train_loss) and result.val_acc > 0.4
