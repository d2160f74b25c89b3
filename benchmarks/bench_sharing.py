"""Recursive weight sharing on the digits: norms per application against shared norms.

With `weight_sharing: recursive` the applications of f_k that play the same role in a block
share their conv weights. Their norms can be shared too (one BatchNorm for all applications:
its running statistics mix inputs from different depths) or kept per application (each
application its own statistics and affine parameters, as recurrent nets with shared weights
usually do). This trains the same variants three ways, with the same seeds, and prints the
final validation accuracy (whole network and each column alone) and the parameter count:

  none          independent weights (Larsson's FractalNet)
  per-app norm  recursive, norms per application (the project's choice)
  shared norm   recursive, whole units shared

    python benchmarks/bench_sharing.py [--epochs 6] [--seeds 0 1 2] [--columns 3 4]
"""

from __future__ import annotations

import statistics
import time

from _digits import digits_setup  # benchmarks/, the script's folder

from fractal_mlops.config.sections import TrainConfig
from fractal_mlops.engine.train import Trainer

SETTINGS = {
    "none": dict(weight_sharing="none"),
    "per-app norm": dict(weight_sharing="recursive", shared_norms=False),
    "shared norm": dict(weight_sharing="recursive", shared_norms=True),
}


def main() -> None:
    started = time.perf_counter()
    args, data, settings = digits_setup(__doc__.splitlines()[0], [0, 1, 2])
    print(f"digits: {len(data.train_y)} train / {len(data.val_y)} val images; blocks 2, width "
          f"{args.width}, conv-norm-act (batch norm), drop-path local+global, {args.epochs} "
          f"epochs, SGD lr 0.1, seeds {args.seeds}; accuracies are means over the seeds")
    for columns in args.columns:
        print(f"\ncolumns {columns}")
        header = "".join(f"  col {k:<3}" for k in range(1, columns + 1))
        print(f"  {'setting':<13} {'params':>8}  {'val_acc':>7}{header}")
        for label, extra in SETTINGS.items():
            finals, per_column, params = [], [[] for _ in range(columns)], 0
            for seed in args.seeds:
                variant = dict(blocks=2, columns=columns, width=args.width,
                               unit="conv-norm-act", norm="batch", activation="relu",
                               dropout=0.0, drop_path="local+global", **extra)
                trainer = Trainer(variant, data, TrainConfig(**{**settings.__dict__,
                                                                "seed": seed}))
                for result in trainer.epochs():
                    final = result.val_acc
                finals.append(final)
                for k, acc in trainer.column_accuracies().items():
                    per_column[k - 1].append(acc)
                params = trainer.param_count
            cells = "".join(f"  {statistics.mean(accs):.4f}" for accs in per_column)
            print(f"  {label:<13} {params:>8,}  {statistics.mean(finals):.4f}{cells}  "
                  f"(val_acc per seed: {', '.join(f'{a:.4f}' for a in finals)})", flush=True)
    print(f"\nbenchmark time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
