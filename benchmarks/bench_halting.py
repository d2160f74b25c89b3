"""What confidence-halted anytime inference saves in wall time, beside its nominal compute.

Trains one FractalNet on the digits, then, on the validation images, times three ways to
answer, in eval mode, alternating rounds and taking the median of each:

  full       the whole network (all columns, joined): what `model(x)` serves
  deepest    column C alone: `model(x, column=C)`
  halting    `anytime.halting_predict` at a threshold: column 1 on every image, column 2 on
             the images column 1 was not confident about, ... (each column from scratch: in
             single-column mode column k shares no unit with the shallower ones)

It prints, per threshold, the accuracy, the nominal compute fraction that the study logs as
`halting_compute` (FLOPs relative to column C alone), and the measured time relative to
`deepest` and to `full` (wall time, and the process's CPU time, which a machine shared with
other jobs disturbs less), at two batch sizes: the whole validation set in one batch (the
throughput case) and one image at a time (the latency case).

    python benchmarks/bench_halting.py [--columns 4] [--width 32] [--epochs 6] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone

import torch
from torch.utils.flop_counter import FlopCounterMode

from fractal_mlops.config.sections import DataConfig, TrainConfig
from fractal_mlops.engine.anytime import anytime_curve, column_flops, halting_predict
from fractal_mlops.engine.data import load_dataset
from fractal_mlops.engine.train import Trainer

THRESHOLDS = (0.5, 0.9, 0.99, 0.999)


def timed(fn, x: torch.Tensor, batch: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to answer all of `x` in batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            fn(x[i:i + batch])
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--single-images", type=int, default=120,
                        help="validation images timed one at a time")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    data = load_dataset(DataConfig(name="digits"))
    variant = dict(blocks=2, columns=args.columns, width=args.width, unit="conv-norm-act",
                   norm="batch", activation="relu", dropout=0.0, drop_path="local+global")
    trainer = Trainer(variant, data, TrainConfig(epochs=args.epochs, batch_size=32, lr=0.1))
    result = list(trainer.epochs())[-1]
    model = trainer.model.eval()
    print(f"model: {variant}, {trainer.param_count:,} params, trained {args.epochs} epochs: "
          f"val_acc {result.val_acc:.4f}")
    outputs = trainer.column_outputs()
    flops = column_flops(model, tuple(data.val_x.shape[1:]))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *data.val_x.shape[1:]))
    full_flops = counter.get_total_flops()
    print("FLOPs per image: " + ", ".join(f"column {k} {f / 1e6:.2f} M"
                                          for k, f in enumerate(flops, 1))
          + f", full network {full_flops / 1e6:.2f} M (= {full_flops / flops[-1]:.2f} x column "
          f"{args.columns})")
    print("accuracy: " + ", ".join(f"column {k} {outputs.accuracy(k):.4f}"
                                   for k in range(1, args.columns + 1)))
    x = torch.cat([images for images, _ in trainer.val_loader])  # normalized, as evaluated

    def full(batch):
        return model(batch)

    def deepest(batch):
        return model(batch, column=args.columns)

    def halting(threshold):
        return lambda batch: halting_predict(model, batch, threshold)

    points = {p.threshold: p for p in anytime_curve(outputs, flops)
              if p.threshold in THRESHOLDS}
    for threshold in THRESHOLDS:  # the real early exit agrees with the logged curve
        prediction, _ = halting_predict(model, x, threshold)
        real = int((prediction == outputs.labels).sum()) / len(x)
        assert abs(real - points[threshold].accuracy) < 1e-9, (threshold, real)
    for batch, images in ((len(x), x), (1, x[:args.single_images])):
        ways = {"full": full, "deepest": deepest,
                **{f"halting@{t:g}": halting(t) for t in THRESHOLDS}}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                times[name].append(timed(fn, images, batch))
        wall = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
        cpu = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
        per_image = 1e3 / len(images)
        print(f"\nbatch {batch} ({len(images)} images, median of {args.rounds} rounds; "
              "wall ms/image, CPU ms/image):")
        print(f"  full network    wall {wall['full'] * per_image:7.3f}  cpu "
              f"{cpu['full'] * per_image:7.3f}")
        print(f"  column {args.columns} alone  wall {wall['deepest'] * per_image:7.3f}  cpu "
              f"{cpu['deepest'] * per_image:7.3f}  ({wall['deepest'] / wall['full']:.2f} x full "
              f"wall, {cpu['deepest'] / cpu['full']:.2f} x full cpu)")
        for t in THRESHOLDS:
            p, w, c = points[t], wall[f"halting@{t:g}"], cpu[f"halting@{t:g}"]
            print(f"  halting @ {t:<5g} wall {w * per_image:7.3f}  cpu {c * per_image:7.3f}  "
                  f"accuracy {p.accuracy:.4f}  nominal {p.compute_fraction:.3f} x column "
                  f"{args.columns}; measured vs column {args.columns}: wall "
                  f"{w / wall['deepest']:.3f} cpu {c / cpu['deepest']:.3f}; vs full: wall "
                  f"{w / wall['full']:.3f} cpu {c / cpu['full']:.3f}", flush=True)
    print(f"\nbenchmark time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
