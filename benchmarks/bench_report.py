"""How long the study report takes over a 1,520-trial experiment (target: at most 30 s).

Fills a fresh SQLite MLflow store with one study run and 1,520 recorded trial runs the way a
study records them (params, tags, 5 epochs of per-epoch metrics, final metrics, per-column
accuracies, anytime.csv for COMPLETE ones; ~10 % PRUNED, ~1 % FAIL; batch logging), then
times `python -m fractal_mlops.report` in a fresh process (imports included, as a user runs
it), and prints the figures.

    python benchmarks/bench_report.py [--trials 1520] [--top 10] [--keep] [--store DIR]

Wall time depends on what else runs on the 2 cores; the CPU time (user + sys of the report
process) is what it costs on an idle machine, near enough. `--store DIR` reuses a store kept
by `--keep` (filling takes minutes).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPERIMENT = "bench-report"
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds",
                 "images_per_second", "host_mem_peak_mb")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=1520)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the store (prints its path)")
    parser.add_argument("--store", type=Path, help="a folder kept by --keep: skip the filling")
    args = parser.parse_args()

    workdir = args.store or Path(tempfile.mkdtemp(prefix="bench-report-"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    start = time.perf_counter()
    if args.store is None:
        fill(uri, args.trials)
    fill_seconds = time.perf_counter() - start

    out = workdir / "report"
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fractal_mlops.report", "--experiment",
                           EXPERIMENT, "--tracking-uri", uri, "--out", str(out), "--top",
                           str(args.top)], capture_output=True, text=True)
    report_seconds = time.perf_counter() - start
    report_cpu = _children_cpu() - cpu_before
    load_after = os.getloadavg()[0]
    if done.returncode != 0:
        sys.exit(f"report failed ({done.returncode}): {done.stderr[-2000:]}")
    rows = (out / "leaderboard.csv").read_text().count("\n") - 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    html_kb = (out / "report.html").stat().st_size / 1024

    filled = f"filled in {fill_seconds:.1f} s" if args.store is None else f"reused {workdir}"
    print(f"store: {rows} trial runs + 1 study run in SQLite, {filled}")
    print(f"report --top {args.top}: {report_seconds:.1f} s wall in a fresh process "
          f"(target <= 30 s), {report_cpu:.1f} s CPU (user+sys); load average "
          f"{load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores")
    print(f"  {rows} CSV rows, {len(pngs)} figures, report.html {html_kb:.0f} KB")
    print("figures: " + ", ".join(pngs))
    print(done.stdout.strip().splitlines()[0])
    if args.keep or args.store:
        print(f"kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def grid_points(n: int) -> list[dict]:
    """n distinct template points (blocks 1..5 x columns 1..4 x unit orders x ...)."""
    from fractal_mlops.config.space import enumerate_variants

    space = {"blocks": [1, 2, 3, 4, 5], "columns": [1, 2, 3, 4], "width": [16],
             "unit": ["conv-norm-act", "conv-act-norm", "conv-norm-act-drop", "conv-act-norm-drop"],
             "norm": ["batch", "group"], "activation": ["relu", "gelu", "silu", "elu", "sigmoid"],
             "dropout": [0.1, 0.2], "drop_path": ["local", "local+global"]}
    variants = enumerate_variants(space)
    random.Random(0).shuffle(variants)
    if len(variants) < n:
        sys.exit(f"the benchmark grid has only {len(variants)} points")
    return [v.to_dict() for v in variants[:n]]


def fill(uri: str, n: int) -> None:
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(
        EXPERIMENT, artifact_location=(Path(uri.split(":///", 1)[1]).parent / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name=EXPERIMENT,
                               tags={"fractal.role": "study", "optuna.study_name": EXPERIMENT})
    parent_id = parent.info.run_id
    client.log_batch(parent_id, params=[Param("grid_size", str(n))])
    client.set_terminated(parent_id, "FINISHED")
    rng = random.Random(1)
    now = int(time.time() * 1000)
    for number, point in enumerate(grid_points(n)):
        name = point.pop("name")
        roll = rng.random()
        state = "FAIL" if roll < 0.01 else "PRUNED" if roll < 0.11 else "COMPLETE"
        quality = (0.55 + 0.04 * point["blocks"] + 0.02 * point["columns"]
                   - (0.2 if point["activation"] == "sigmoid" else 0.0))
        run = client.create_run(experiment_id, run_name=name, tags={
            "fractal.role": "trial", "mlflow.parentRunId": parent_id, "fractal.variant": name,
            "optuna.study_name": EXPERIMENT, "optuna.trial_number": str(number)})
        run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in point.items()]
        params += [Param("variant", name), Param("epochs", "5"), Param("dataset", "cifar10")]
        epochs = 2 if state == "PRUNED" else 5
        metrics, acc = [], 0.1
        for epoch in range(1, epochs + 1):
            acc = 0.1 if state == "PRUNED" else min(0.99, quality * epoch / 5 + rng.gauss(0, 0.02))
            values = dict(zip(EPOCH_METRICS, (2.3 * (1 - acc), acc, 2.2 * (1 - acc), acc, 30.0,
                                              900.0, 800.0), strict=True))
            metrics += [Metric(k, v, now, epoch) for k, v in values.items()]
        final = {"best_val_acc": acc, "param_count": 10_000 * point["blocks"] * 2 ** point["columns"],
                 "train_seconds": 30.0 * epochs}
        if state == "COMPLETE":
            final["final_val_acc"] = acc
            final.update({f"val_acc_column_{k}": acc * (0.7 + 0.3 * k / point["columns"])
                          for k in range(1, point["columns"] + 1)})
        metrics += [Metric(k, float(v), now, 0) for k, v in final.items()]
        tags = [RunTag("fractal.state", state)]
        if state != "COMPLETE":
            tags.append(RunTag("fractal.reason", "diverged: val_acc 0.100 at epoch 2 is within "
                               "0.05 of chance (0.100)" if state == "PRUNED" else
                               "RuntimeError: out of memory"))
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)  # one call a run
        if state == "COMPLETE":
            curve = "threshold,accuracy,compute_fraction\n" + "".join(
                f"{t},{acc * (0.8 + 0.2 * t):.4f},{0.3 + 0.7 * t:.4f}\n" for t in (0.5, 0.7, 0.9, 1.0))
            client.log_text(run_id, curve, "anytime.csv")
        client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")


if __name__ == "__main__":
    main()
