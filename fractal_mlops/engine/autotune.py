"""`training.amp: auto` / `training.memory_format: auto`: the fastest candidate precision of a
network, timed on the trial's device as cuDNN's benchmark mode times kernels.

No one setting is right for every network: on a CPU with AMX, bf16 contiguous is fastest for
b5-c2-w64, bf16 channels_last for b3-c3-w16, by up to 2x either way (benchmarks/RESULTS.md).
The candidates take training steps in lockstep (one step each, round after round), so a load
that comes and goes on the machine slows them alike; the median step of each decides. Every
timed step runs the whole network: with local+global drop-path a training step otherwise runs
one column alone for half of the mini-batches (a third of the work for two columns), and a
candidate whose timed steps happened to draw the cheap ones looked up to 2.8x faster than it
trains (benchmarks/RESULTS.md).

    choice = choose(variant, data, settings, device, cache)   # Precision + what was measured
    Trainer(variant, data, settings, device, precision=choice.precision)

Measuring changes nothing a trial computes: the random-number streams are put back as they
were, so a network trains the same whether its choice was measured or taken from the cache.
"""

from __future__ import annotations

import contextlib
import logging
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fractal_mlops.config.sections import TrainConfig
from fractal_mlops.engine.data import Dataset
from fractal_mlops.engine.model import drop_rng
from fractal_mlops.engine.precision import Precision, candidates
from fractal_mlops.engine.train import Trainer

log = logging.getLogger(__name__)

WARMUP_STEPS, MIN_ROUNDS, MAX_ROUNDS, MIN_SECONDS = 2, 5, 100, 2.0


@dataclass(frozen=True)
class Choice:
    precision: Precision
    step_ms: dict[str, float] = field(default_factory=dict)  # candidate name: median step, ms
    seconds: float = 0.0  # what measuring took (0: taken from the cache or fixed)

    def params(self) -> dict[str, str]:
        out = self.precision.params()
        for name, ms in self.step_ms.items():
            out[f"step_ms.{name.replace('/', '.')}"] = f"{ms:.2f}"
        return out

    def summary(self) -> str:
        best = self.step_ms.get(self.precision.name)
        others = ", ".join(f"{name} {ms / best:.2f}x" for name, ms in
                           sorted(self.step_ms.items(), key=lambda item: item[1])
                           if name != self.precision.name) if best else ""
        return (f"{self.precision.name}" + (f" ({best:.1f} ms/step; {others})" if others else "")
                + (f", measured in {self.seconds:.1f} s" if self.seconds else ""))


def choose(variant: dict, data: Dataset, settings: TrainConfig, device: torch.device,
           cache: dict | None = None, fixed_precision: Precision | None = None) -> Choice:
    """The precision `variant` trains in: `fixed_precision` if given, else timed when the
    config leaves more than one candidate, once per distinct network and setting in `cache`
    (a worker's, kept across its trials)."""
    options = [fixed_precision] if fixed_precision else candidates(settings, device)
    if len(options) == 1:
        return Choice(options[0])
    key = (variant.get("name") or repr(sorted(variant.items())), tuple(data.train_x.shape[1:]),
           settings.batch_size, settings.amp, settings.memory_format_mode, settings.optimizer,
           settings.grad_checkpointing, str(device))
    if cache is not None and key in cache:
        return replace(cache[key], seconds=0.0)
    started = time.perf_counter()
    with _random_state_kept(device):
        step_ms = _lockstep(variant, data, settings, device, options)
    best = min(options, key=lambda option: step_ms[option.name])
    choice = Choice(best, step_ms, time.perf_counter() - started)
    log.info("%s trains in %s", variant.get("name", "the network"), choice.summary())
    if cache is not None:
        cache[key] = choice
    return choice


def _lockstep(variant: dict, data: Dataset, settings: TrainConfig, device: torch.device,
              options: list[Precision]) -> dict[str, float]:
    """Median step time (ms) of each option, in lockstep."""
    eager = replace(settings, compile="none")  # the choice, not compile's cost, is measured
    trainers = [Trainer(variant, data, eager, device, precision=option) for option in options]
    return dict(zip((option.name for option in options), step_times(trainers), strict=True))


def step_times(trainers: list[Trainer], min_rounds: int = MIN_ROUNDS,
               min_seconds: float = MIN_SECONDS, max_rounds: int = MAX_ROUNDS) -> list[float]:
    """Median training-step time (ms) of each trainer, stepped in turn on its first batch: at
    least `min_rounds` timed rounds, more for a cheap network until `min_seconds` have gone by
    (a step of a few milliseconds is noisy), at most `max_rounds`. Every step runs the whole
    network (`whole_network`), so that every candidate is timed on the same work."""
    with contextlib.ExitStack() as stack:
        for trainer in trainers:
            stack.enter_context(whole_network(trainer.model))
        return _step_times(trainers, min_rounds, min_seconds, max_rounds)


@contextlib.contextmanager
def whole_network(model: torch.nn.Module) -> Iterator[None]:
    """Training steps that run every column: local+global drop-path becomes local alone for the
    block (local drop-path computes every column and drops at the joins, so the work of a step
    does not depend on the draws). A real epoch's mean step costs less: half of its steps
    run one column alone."""
    before = model.drop_path
    model.drop_path = "local" if before == "local+global" else before
    try:
        yield
    finally:
        model.drop_path = before


def _step_times(trainers: list[Trainer], min_rounds: int, min_seconds: float,
                max_rounds: int) -> list[float]:
    batches = [next(iter(trainer.train_loader)) for trainer in trainers]
    times: list[list[float]] = [[] for _ in trainers]
    started, round_ = time.perf_counter(), 0
    while round_ < WARMUP_STEPS + min_rounds or (
            time.perf_counter() - started < min_seconds and round_ < WARMUP_STEPS + max_rounds):
        for index, (trainer, (images, labels)) in enumerate(zip(trainers, batches, strict=True)):
            trainer.model.train()
            start = time.perf_counter()
            trainer.train_step(images, labels)
            trainer._sync()
            if round_ >= WARMUP_STEPS:
                times[index].append(time.perf_counter() - start)
        round_ += 1
    return [1000 * statistics.median(seconds) for seconds in times]


@contextlib.contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    """Every random-number stream a trial draws from, as it was before the block."""
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate(), drop_rng.getstate(),
             torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        drop_rng.setstate(state[3])
        if state[4] is not None:
            torch.cuda.set_rng_state(state[4], device)
