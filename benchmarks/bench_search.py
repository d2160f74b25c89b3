"""Exhaustive grid against successive halving on the same grid, measured in one run.

Both modes run through the real CLI (`python -m fractal_mlops.study`, one worker, FRACTAL_THREADS
threads) into their own fresh stores; the figures are read back from Optuna and MLflow:
  - epochs spent: per-epoch `val_acc` entries in MLflow over all trials (an epoch trained twice
    would count twice), halving / exhaustive (target <= 35 %);
  - whether halving's best variant is the exhaustive best, and its regret: exhaustive best
    final val_acc minus the exhaustive final val_acc of halving's best, in percentage points
    (target: same best, or regret <= 0.5 pp);
  - Spearman rank agreement on the exhaustive top 10: their exhaustive order against the
    order halving gives them (deepest rung reached, then val_acc at that rung);
  - whether the points halving trained to the end reached the exhaustive run's final val_acc
    exactly (a promoted point continues from its checkpoint: same epochs as an unbroken run).

    python benchmarks/bench_search.py                      # digits, 36 variants, 9 epochs
    python benchmarks/bench_search.py --grid cifar10 [--train-limit N] [--val-limit N]   # CIFAR-10 CPU grid
    python benchmarks/bench_search.py --plan-only --grid cifar10           # the rung plan alone
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

DIGITS_GRID = {  # 2 x 3 x 3 x 2 = 36 variants; those without a norm train slower
    "study_name": "bench-search-digits",
    "data": {"name": "digits"},
    "space": {"blocks": [1, 2], "columns": [1, 2, 3], "width": [16],
              "unit": ["conv-norm-act", "conv-act-norm", "conv-act"],
              "activation": ["relu", "gelu"], "drop_path": ["local+global"]},
    "training": {"epochs": 9, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "seed": 0},
    "pruning": {"warmup_epochs": 1, "chance_margin": 0.05},
}


def build_config(args: argparse.Namespace) -> dict:
    if args.grid == "digits":
        config = yaml.safe_load(yaml.safe_dump(DIGITS_GRID))
    else:
        config = yaml.safe_load((REPO / "experiments" / "cifar10_cpu.yaml").read_text())
        config["study_name"] = "bench-search-cifar10"
        # the config's root is relative to the project root, where the study command runs
        config["data"]["root"] = str((REPO / config["data"]["root"]).resolve()) \
            if args.data is None else args.data
        if args.train_limit:
            config["data"]["train_limit"] = args.train_limit
        if args.val_limit:
            config["data"]["val_limit"] = args.val_limit
    if args.epochs:
        config["training"]["epochs"] = args.epochs
    config["search"] = {"mode": "grid", "min_epochs": args.min_epochs,
                        "reduction_factor": args.reduction_factor}
    return config


def run_mode(config: dict, mode: str, folder: Path, threads: int) -> tuple[float, Path]:
    config = {**config, "study_name": f"{config['study_name']}-{mode}",
              "search": {**config["search"], "mode": mode}}
    path = folder / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FRACTAL_STORAGE")}
    env["FRACTAL_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fractal_mlops.study", "--config", str(path), "--workers", "1",
         "--device", "cpu", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--storage", f"journal:{folder / (mode + '.journal')}"],
        cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{mode} study failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print(f"  {mode:<8} {seconds:7.1f} s   " + proc.stdout.strip().splitlines()[1][:110])
    return seconds, path


def read_study(folder: Path, config_path: Path) -> dict:
    """Per variant: state, final val_acc, halving's (rung reached, val_acc there), epochs run."""
    import optuna
    from mlflow import MlflowClient

    from fractal_mlops.stores.optuna_storage import open_storage, resolve_storage

    name = yaml.safe_load(config_path.read_text())["study_name"]
    mode = name.rsplit("-", 1)[1]
    study = optuna.load_study(study_name=name, storage=open_storage(
        resolve_storage(f"journal:{folder / (mode + '.journal')}", None)))
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    points = {}
    for t in study.get_trials():
        if not t.state.is_finished():
            continue
        run_id = t.user_attrs["mlflow_run_id"]
        epochs = len(client.get_metric_history(run_id, "val_acc"))
        rung = max([int(k.split("_")[1]) for k in t.user_attrs if k.startswith("rung_")
                    and k.endswith("_val_acc")] + [0])
        if t.state.name == "COMPLETE":
            rung += 1
        points[t.params["variant"]] = {
            "state": t.state.name, "final": t.value if t.state.name == "COMPLETE" else None,
            "key": (rung, t.value if t.value is not None else -1.0), "epochs": epochs}
    return points


def spearman(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--epochs", type=int, help="training.epochs (default: the grid's)")
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-limit", type=int, help="cifar10: a class-balanced slice")
    parser.add_argument("--val-limit", type=int, help="cifar10: a slice of the test images")
    parser.add_argument("--data", help="cifar10: the ImageFolder tree")
    parser.add_argument("--plan-only", action="store_true", help="print the rung plan and stop")
    args = parser.parse_args()

    from fractal_mlops.config.experiment import parse_config
    from fractal_mlops.config.space import grid
    from fractal_mlops.search.halving import describe_plan

    config = build_config(args)
    halving = parse_config({**config, "search": {**config["search"], "mode": "halving"}})
    size = len(grid(halving))
    machine = platform.processor() or platform.machine()
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine}, "
          f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per study")
    print(f"grid: {args.grid}, {size} variants, {halving.training.epochs} epochs; "
          f"{describe_plan(halving, size)}")
    if args.plan_only:
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        folder = Path(tmp)
        grid_seconds, grid_path = run_mode(config, "grid", folder, args.threads)
        halving_seconds, halving_path = run_mode(config, "halving", folder, args.threads)
        full, halved = read_study(folder, grid_path), read_study(folder, halving_path)

    full_epochs = sum(p["epochs"] for p in full.values())
    halved_epochs = sum(p["epochs"] for p in halved.values())
    complete = {v: p["final"] for v, p in full.items() if p["final"] is not None}
    best_full = max(complete, key=lambda v: (complete[v], v))
    best_halved = max((v for v, p in halved.items() if p["final"] is not None),
                      key=lambda v: (halved[v]["final"], v))
    regret = 100 * (complete[best_full] - complete.get(best_halved, 0.0))
    top = sorted(complete, key=lambda v: -complete[v])[:10]
    halving_order = sorted(halved, key=lambda v: halved[v]["key"], reverse=True)
    rho = spearman([complete[v] for v in top], [-halving_order.index(v) for v in top])
    survivors = [v for v, p in halved.items() if p["final"] is not None]
    same = sum(abs(halved[v]["final"] - (full[v]["final"] or -1)) < 1e-12 for v in survivors)
    states = {s: sum(p["state"] == s for p in halved.values()) for s in ("COMPLETE", "PRUNED", "FAIL")}

    print(f"exhaustive: {len(complete)} of {len(full)} COMPLETE, best {best_full} "
          f"{complete[best_full]:.4f}")
    print(f"halving: {states}; best {best_halved} {halved[best_halved]['final']:.4f}")
    print(f"epochs spent: halving {halved_epochs} / exhaustive {full_epochs} = "
          f"{halved_epochs / full_epochs:.1%} (target <= 35 %)")
    print(f"wall time: halving {halving_seconds:.0f} s / exhaustive {grid_seconds:.0f} s = "
          f"{halving_seconds / grid_seconds:.1%}")
    print(f"same best variant: {'yes' if best_halved == best_full else 'no'}; regret "
          f"{regret:.2f} pp (target: same best or <= 0.5 pp)")
    print(f"Spearman rank agreement on the exhaustive top 10: {rho:.3f}")
    print(f"points halving trained to the end with the exhaustive final val_acc exactly: "
          f"{same} of {len(survivors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
