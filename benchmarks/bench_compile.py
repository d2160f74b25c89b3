"""The capturable step (training.compile) on the digits: does masking drop-path instead of
skipping it change what the network learns, and what does compiling cost and give on this CPU?

Accuracy: the same variants and seeds trained three ways, the final validation accuracy of the
whole network and of each column alone (global drop-path is what trains the columns alone):

  skip      the eager form: dropped paths do not run (model.join), training.compile none
  mask      the static form: every path runs, a join averages what its mask keeps
            (static_drop_path.py), still eager
  compiled  the static form under torch.compile (mode default): first seed only, as a check
            that the compiled step learns as the masked one does

Speed: seconds per epoch of each form once warm, and the compiled form's first epoch (which
pays for compilation), in one run.

    python benchmarks/bench_compile.py [--epochs 6] [--seeds 0 1 2 3 4] [--columns 3 4]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from _digits import digits_setup  # benchmarks/, the script's folder

from fractal_mlops.config.sections import TrainConfig
from fractal_mlops.engine.train import Trainer

FORMS = {"skip": ("none", False), "mask": ("none", True), "compiled": ("default", True)}


def train(variant: dict, data, settings: TrainConfig, form: str) -> dict:
    compile, static = FORMS[form]
    trainer = Trainer(variant, data, replace(settings, compile=compile), static_drop_path=static)
    seconds = [result.epoch_seconds for result in trainer.epochs()]
    return {"val_acc": trainer.evaluate()[1], "columns": trainer.column_accuracies(),
            "first_epoch": seconds[0], "epoch": statistics.median(seconds[1:] or seconds)}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def short_mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f}±{sd:.2f}"[:10].ljust(10)


def main() -> None:
    started = time.perf_counter()
    args, data, settings = digits_setup(__doc__.splitlines()[0], [0, 1, 2, 3, 4])
    print(f"digits: {len(data.train_y)} train / {len(data.val_y)} val images; blocks 2, width "
          f"{args.width}, conv-norm-act-drop (batch norm, dropout 0.1), drop-path local+global, "
          f"{args.epochs} epochs, SGD lr 0.1 momentum 0.9; mean ± sd over seeds {args.seeds}")
    for columns in args.columns:
        variant = dict(blocks=2, columns=columns, width=args.width, unit="conv-norm-act-drop",
                       norm="batch", activation="relu", dropout=0.1, drop_path="local+global")
        print(f"\ncolumns {columns}")
        print(f"  {'form':<9} {'runs':>4}  {'val_acc':>15}  {'column accuracies':<{11 * columns}}"
              f"  {'s/epoch':>7}  {'1st epoch':>9}")
        for form in FORMS:
            seeds = args.seeds[:1] if form == "compiled" else args.seeds
            runs = [train(variant, data, replace(settings, seed=s), form) for s in seeds]
            cols = " ".join(short_mean_sd([r["columns"][k] for r in runs])
                             for k in range(1, columns + 1))
            print(f"  {form:<9} {len(runs):>4}  {mean_sd([r['val_acc'] for r in runs]):>15}  "
                  f"{cols:<{11 * columns}}  {statistics.mean(r['epoch'] for r in runs):>7.2f}  "
                  f"{statistics.mean(r['first_epoch'] for r in runs):>9.2f}", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
