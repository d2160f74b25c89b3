"""Checks that depend on config + machine, run by the launcher before any store is written.

A setting that cannot work here (fp16 on a CPU, bf16 on a GPU without it, a grid deeper than
the images allow, a batch larger than the data, a combination of switches the device refuses,
more workers than the machine can hold) must stop the study with one line and exit 2, never
fail every trial one by one.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fractal_mlops.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fractal_mlops.config.experiment import ExperimentConfig
    from fractal_mlops.config.space import Variant
    from fractal_mlops.engine.data import Dataset

# What one worker process holds besides its data: Python, torch, MLflow, a small model.
WORKER_MEMORY_BYTES = 768 * 2**20


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, capped by a cgroup (v2) memory limit."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_workers(workers: int, data_bytes: int = 0) -> None:
    """At most one worker per usable core, and no more than the free memory holds."""
    if workers <= 1:
        return
    cores = usable_cores()
    if workers > cores:
        raise ConfigError(f"--workers {workers}: this machine gives this process {cores} CPU "
                          f"core(s); each worker trains on at least one, so at most {cores} workers")
    free = available_memory()
    need = WORKER_MEMORY_BYTES + data_bytes
    if free is not None and workers * need > free:
        most = max(1, free // need)
        raise ConfigError(f"--workers {workers}: each worker needs about {need / 2**30:.1f} GiB "
                          f"and {free / 2**30:.1f} GiB of memory is available, so at most "
                          f"{most} workers")


def check_feasible(config: ExperimentConfig, device: torch.device, data: Dataset,
                   variants: list[Variant]) -> None:
    """Everything a trial would find out in its first step, found once, before any store."""
    _check_amp(config.training.amp, device)
    _check_fits_input(data, variants)
    if config.training.batch_size > len(data.train_x):
        raise ConfigError(f"training.batch_size {config.training.batch_size} is larger than the "
                          f"{len(data.train_x)} training images of {data.name}; use at most "
                          f"{len(data.train_x)}")
    _smoke_step(config, device, data, variants)


def _check_amp(mode: str, device: torch.device) -> None:
    import torch

    if mode == "fp16" and device.type != "cuda":
        raise ConfigError(f"training.amp fp16 needs CUDA and the device is {device.type}; "
                          "use amp: auto, bf16 or off")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"training.amp bf16 is not supported by {torch.cuda.get_device_name(device)};"
                          " use amp: auto, fp16 or off")


def _check_fits_input(data: Dataset, variants: list[Variant]) -> None:
    """Each block ends in a 2x2 max-pool: B blocks need images of at least 2^B pixels a side."""
    height, width = (int(n) for n in data.train_x.shape[2:])
    deepest = max(v.blocks for v in variants)
    if min(height, width) < 2 ** deepest:
        most = max(0, min(height, width).bit_length() - 1)
        raise ConfigError(f"space.blocks {deepest} cannot fit {data.name}'s {height}x{width} "
                          f"images: each block halves them, so at most {most} blocks")


def _smoke_step(config: ExperimentConfig, device: torch.device, data: Dataset,
                variants: list[Variant]) -> None:
    """One training step and one evaluation of the smallest variant on four images, with the
    configured amp / channels_last / grad_checkpointing / compile / optimizer on this device."""
    from fractal_mlops.engine.train import Trainer

    smallest = min(variants, key=lambda v: (v.blocks, v.columns, v.width))
    tiny = replace(data, train_x=data.train_x[:4], train_y=data.train_y[:4],
                   val_x=data.val_x[:4], val_y=data.val_y[:4])
    settings = replace(config.training, epochs=1, batch_size=4)
    try:
        trainer = Trainer(smallest.to_dict(), tiny, settings, device, flip=config.data.use_flip)
        trainer.train_epoch()
        trainer.evaluate()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here would fail every trial
        text = " ".join(str(exc).split())[:300]
        t = config.training
        raise ConfigError(
            f"training settings (amp {t.amp}, channels_last {t.channels_last}, "
            f"grad_checkpointing {t.grad_checkpointing}, compile {t.compile}) fail on "
            f"{device.type} in a first training step of {smallest.name}: "
            f"{type(exc).__name__}: {text}") from None
