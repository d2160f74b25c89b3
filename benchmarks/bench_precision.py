"""`training.amp: auto` + `training.memory_format: auto` against the best fixed setting, per network.

For each variant (the paper's batch 16, CIFAR-shaped 3x32x32 inputs, conv-norm-act, BatchNorm,
ReLU, local+global drop-path), in one process:
  1. `auto`: what engine/autotune.py chooses, timed as a study times it (its own short lockstep);
  2. a longer lockstep: every fixed setting (fp32 / bf16 x contiguous / channels_last; bf16 only
     where the CPU has it natively), the `auto` choice as a model of its own, and for the
     width-64 variants a per-block mix (channels_last in the shallow blocks, contiguous in the
     deep ones), one training step each per round; the median step of each.
Printed: each setting's median step time against the best fixed one; auto's ratio, the time
of the setting it chose against the best in the same lockstep (target <= 1.05), and the same
setting as a second model (how far two identical models differ: the measurement's noise); the
step's nominal GFLOP/s (forward + backward FLOPs as torch's FlopCounterMode counts them;
every timed step runs the whole network, as autotune.step_times makes it)
against this machine's measured bf16 and fp32 peaks (a large matmul, and a 3x3 convolution as
oneDNN runs the network's); and the size of a trial's checkpoint (model, optimizer, RNG
streams) for the width-64 networks.

    python benchmarks/bench_precision.py [--rounds 12] [--variants b1-c1-w16,b5-c2-w64]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fractal_mlops.config.sections import TrainConfig  # noqa: E402
from fractal_mlops.engine import autotune  # noqa: E402
from fractal_mlops.engine.data import Dataset  # noqa: E402
from fractal_mlops.engine.device import cpu_has_native_bf16, cpu_model  # noqa: E402
from fractal_mlops.engine.precision import Precision, candidates  # noqa: E402
from fractal_mlops.engine.train import Trainer  # noqa: E402

BATCH = 16
VARIANTS = {name: dict(blocks=int(name[1]), columns=int(name[4]), width=int(name.split("w")[1]),
                       unit="conv-norm-act", norm="batch", activation="relu", dropout=0.0,
                       drop_path="local+global", name=name)
            for name in ("b1-c1-w16", "b3-c3-w16", "b4-c1-w16", "b3-c2-w64", "b5-c2-w64")}
SETTINGS = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01, momentum=0.9, amp="auto",
                       memory_format="auto")


def cifar_shaped(count: int = 64) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y = torch.randint(0, 10, (count,), generator=generator)
    return Dataset("cifar-shaped", x, y, x[:BATCH], y[:BATCH], (0.5,) * 3, (0.25,) * 3,
                   [str(k) for k in range(10)], "bench", "bench")


def mixed(trainer: Trainer) -> Trainer:
    """channels_last in the first half of the blocks, contiguous in the rest (per-block choice)."""
    blocks = list(trainer.model.blocks)
    for block in blocks[len(blocks) // 2:]:
        block.to(memory_format=torch.contiguous_format)
        block.register_forward_pre_hook(
            lambda module, args: (args[0].contiguous(),) + tuple(args[1:]))
    return trainer


def lockstep(trainers: dict[str, Trainer], rounds: int) -> dict[str, float]:
    """Median step (ms) of each, in lockstep: `rounds` at least, more for a cheap network."""
    return dict(zip(trainers, autotune.step_times(list(trainers.values()), min_rounds=rounds,
                                                  min_seconds=8.0, max_rounds=400), strict=True))


def step_flops(variant: dict, data: Dataset) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    trainer = Trainer(variant, data, dataclasses.replace(SETTINGS, amp="off",
                                                         memory_format="contiguous"))
    images, labels = next(iter(trainer.train_loader))
    with FlopCounterMode(display=False) as counter, autotune.whole_network(trainer.model):
        trainer.train_step(images, labels)  # every column, as the timed steps run
    return float(counter.get_total_flops())


def trial_mean_step(trainer: Trainer, steps: int = 40) -> float:
    """Mean step (ms) with the drop-path draws of training (half of the steps one column
    alone): what a real epoch's steps cost on average, data loading aside."""
    images, labels = next(iter(trainer.train_loader))
    trainer.model.train()
    for _ in range(3):
        trainer.train_step(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, labels)
    return 1000 * (time.perf_counter() - start) / steps


def peak(dtype: torch.dtype, seconds: float = 2.0) -> tuple[float, float]:
    """GFLOP/s of (a 2048x2048 matmul, a 3x3 convolution 256 -> 256 channels on 16x16 maps at
    batch 16, oneDNN's path for the network's convolutions) in `dtype`."""
    def rate(fn, flops: float) -> float:
        fn()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            count += 1
        return flops * count / (time.perf_counter() - start) / 1e9

    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x = torch.randn(16, 256, 16, 16, dtype=dtype)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(dtype)
    with torch.no_grad():
        return (rate(lambda: a @ b, 2 * n**3),
                rate(lambda: conv(x), 2 * 16 * 256 * 256 * 9 * 16 * 16))


def checkpoint_mb(trainer: Trainer) -> float:
    list(trainer.epochs(stop=1))  # an optimizer with its momentum buffers, as mid-trial
    buffer = io.BytesIO()
    torch.save({"trainer": trainer.state_dict()}, buffer)
    return buffer.tell() / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed lockstep rounds")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        print(f"error: unknown variants {unknown} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {cpu_model()}, native bf16: {cpu_has_native_bf16()}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); batch {BATCH}, "
          f"{args.rounds} timed rounds")
    measured = {"fp32": peak(torch.float32)}
    if cpu_has_native_bf16():
        measured["bf16"] = peak(torch.bfloat16)
    peaks = {name: max(pair) for name, pair in measured.items()}
    for name, (mm, conv) in measured.items():
        print(f"{name} peak: matmul 2048x2048 {mm:.0f} GFLOP/s, 3x3 conv 256ch 16x16 "
              f"{conv:.0f} GFLOP/s")
    data = cifar_shaped()
    fixed = candidates(dataclasses.replace(SETTINGS), device)
    worst = 0.0
    for name in names:
        variant = VARIANTS[name]
        choice = autotune.choose(variant, data, SETTINGS, device, cache={})
        trainers = {p.name: Trainer(variant, data, SETTINGS, device, precision=p) for p in fixed}
        trainers["auto"] = Trainer(variant, data, SETTINGS, device, precision=choice.precision)
        if variant["width"] >= 64:
            best_dtype = choice.precision.amp_dtype
            trainers["mixed"] = mixed(Trainer(variant, data, SETTINGS, device,
                                              precision=Precision(best_dtype, True)))
        ms = lockstep(trainers, args.rounds)
        best_fixed = min((n for n in ms if n not in ("auto", "mixed")), key=ms.get)
        flops = step_flops(variant, data)
        params = sum(p.numel() for p in trainers["auto"].model.parameters()) / 1e6
        print(f"\n{name}: {params:.3f} M params, {flops / 1e9:.3f} GFLOP per training step; "
              f"auto chose {choice.summary()}")
        for setting, value in sorted(ms.items(), key=lambda item: item[1]):
            dtype = "bf16" if setting.startswith("bfloat16") or (
                setting in ("auto", "mixed") and choice.precision.amp_dtype) else "fp32"
            rate = flops / (value / 1000) / 1e9
            label = {"auto": "auto's choice, 2nd model", "mixed": "per-block mix"}.get(setting,
                                                                                       setting)
            print(f"  {label:<26} {value:8.1f} ms/step  {value / ms[best_fixed]:5.2f}x best fixed"
                  f"  {rate:6.0f} GFLOP/s = {rate / peaks.get(dtype, peaks['fp32']):.0%} of the "
                  f"{dtype} peak")
        ratio = ms[choice.precision.name] / ms[best_fixed]
        worst = max(worst, ratio)
        print(f"  auto ({choice.precision.name}) / best fixed ({best_fixed}) = {ratio:.3f} "
              f"(target <= 1.05); the same setting as a second model: "
              f"{ms['auto'] / ms[choice.precision.name]:.2f} (this measurement's noise)"
              + (f"; per-block mix / auto = {ms['mixed'] / ms[choice.precision.name]:.2f}"
                 if "mixed" in ms else ""))
        if variant["width"] >= 64:
            print(f"  a trial's mean step in auto's choice, drop-path drawn as in training: "
                  f"{trial_mean_step(trainers['auto']):.1f} ms")
            print(f"  checkpoint of a running trial: {checkpoint_mb(trainers['auto']):.0f} MB")
    print(f"\nworst auto / best fixed over {len(names)} variants: {worst:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
