"""Tracking overhead of one study trial, and the cost of `study --help`.

In one run, alternating, for the same quickstart variant:
  (a) bare: train.py's Trainer over all epochs (what training costs without any tracking);
  (b) tracked: the study's trial path (MLflow run with params, config.yaml, dataset input,
      per-epoch metrics, column accuracies, model, final metrics, tags) plus the Optuna
      claim / report / tell, on real local stores (SQLite MLflow, Optuna journal).
Prints wall times and the ratio (b)/(a); target <= 1.10 at quickstart scale.
Then times `python -m fractal_mlops.study --help` in a fresh process (target <= 1 s) and
checks it imported neither torch, timm nor mlflow.

    python benchmarks/bench_tracking.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from fractal_mlops import study as study_module
    from fractal_mlops.cli import make_console
    from fractal_mlops.config.experiment import load_config
    from fractal_mlops.config.space import grid
    from fractal_mlops.engine.data import load_dataset
    from fractal_mlops.engine.train import Trainer
    from fractal_mlops.search import trial as trial_module
    from fractal_mlops.search import worker as study_loop
    from fractal_mlops.search.progress import StudyProgress
    from fractal_mlops.signals import InterruptGuard
    from fractal_mlops.stores.optuna_storage import resolve_storage
    from fractal_mlops.tracking.tracker import configure

    torch.set_num_threads(2)
    config = load_config(None)
    variant = next(v for v in grid(config) if v.unit == "conv-norm-act" and v.columns == 3
                   and v.activation == "relu")
    data = load_dataset(config.data)
    workdir = Path(tempfile.mkdtemp(prefix="bench-tracking-"))

    def bare() -> float:
        start = time.perf_counter()
        trainer = Trainer(variant.to_dict(), data, config.training, "cpu")
        for _ in trainer.epochs():
            pass
        return time.perf_counter() - start

    bare()  # warm-up: first-call costs (allocator, kernels) are not training
    counter = iter(range(1000))

    def tracked() -> float:
        settings = study_module.StudySettings(
            config=config, study_name=f"bench-{next(counter)}",
            tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
            storage=resolve_storage(f"journal:{workdir / 'optuna.journal'}", None),
            device="cpu", workers=1, n_trials=None)
        configure(settings.tracking_uri)  # as the study's main does
        study, tracker, parent = study_loop.open_stores(settings, [variant])
        ctx = trial_module.TrialContext(study, tracker, parent, settings, data,
                                        torch.device("cpu"), [variant], InterruptGuard())
        progress = StudyProgress(make_console(), 1, 0, config.training.epochs, live=False)
        start = time.perf_counter()
        trial_module.claim_and_run(ctx, progress)  # claim, start, train, close: one trial
        return time.perf_counter() - start

    tracked()  # warm-up: MLflow's first log_model imports and caches its flavors
    bare_times, tracked_times = [], []
    for _ in range(args.repeats):
        bare_times.append(bare())
        tracked_times.append(tracked())
    bare_s, tracked_s = statistics.median(bare_times), statistics.median(tracked_times)
    print(f"variant {variant.name}, {config.training.epochs} epochs on digits, 2 threads")
    print(f"bare train.py   : {bare_s:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in bare_times)})")
    print(f"tracked trial   : {tracked_s:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in tracked_times)})")
    print(f"ratio tracked/bare: {tracked_s / bare_s:.3f}  (target <= 1.10)")

    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "fractal_mlops.study",
                          "--help"], capture_output=True, text=True, check=True)
    help_s = time.perf_counter() - start
    heavy = sorted({line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
                   & {"torch", "timm", "mlflow", "optuna"})
    print(f"study --help    : {help_s:.2f} s (with -X importtime), heavy imports: {heavy or 'none'}"
          "  (target <= 1 s, none)")


if __name__ == "__main__":
    main()
