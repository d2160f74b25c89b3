"""What the digits benchmarks of FractalNet variants share: their flags, the header they print,
the data and the training settings (blocks 2, batch 32, SGD lr 0.1)."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import torch

from fractal_mlops.config.sections import DataConfig, TrainConfig
from fractal_mlops.engine.data import Dataset, load_dataset


def digits_setup(description: str, seeds: list[int]
                 ) -> tuple[argparse.Namespace, Dataset, TrainConfig]:
    """Parse --epochs, --seeds, --columns and --width; print the date, torch and threads; load
    the digits."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--columns", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    data = load_dataset(DataConfig(name="digits"))
    return args, data, TrainConfig(epochs=args.epochs, batch_size=32, lr=0.1, seed=0)
