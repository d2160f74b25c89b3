"""The GPU scripts of benchmarks/ on a machine without CUDA: one line, exit 0, nothing run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.parametrize("script", ["gpu_smoke.py", "bench_gpu.py"])
def test_without_cuda_the_gpu_scripts_say_so_in_one_line_and_exit_0(script, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the script would run its GPU checks")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("no CUDA device"), done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def run_script(script: str, *args: str, cwd) -> list[str]:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout.strip().splitlines()


@pytest.mark.slow
def test_the_smoke_check_runs_its_cpu_checks_and_passes_them(tmp_path):
    """What a GPU machine runs first, on the CPU: every check has a line, none fails."""
    lines = run_script("gpu_smoke.py", "--device", "cpu", "--images", "200", "--workers", "1",
                       cwd=tmp_path)
    checks = {line.split()[1]: line.split()[0] for line in lines[:-1]}
    assert set(checks) == {"device", "syncs", "ckpt", "determinism", "fp16", "memory",
                           "cpu-load", "workers"}, lines
    assert {checks[c] for c in ("ckpt", "determinism", "cpu-load", "workers")} == {"PASS"}, lines
    assert lines[-1].startswith("4 of 4 checks passed"), lines


@pytest.mark.slow
def test_the_gpu_benchmark_measures_every_variant_and_projects_the_whole_paper_grid(tmp_path):
    """bench_gpu's chain on the CPU at small sizes: a line per variant and worker count, and
    projections over every point of experiments/paper_cifar10.yaml, compiled ones included."""
    from fractal_mlops.config.experiment import load_config
    from fractal_mlops.config.space import grid

    points = len(grid(load_config(str(REPO / "experiments" / "paper_cifar10.yaml"))))
    lines = run_script("bench_gpu.py", "--device", "cpu", "--steps", "2", "--largest", "1x2",
                       "--workers", "1", "--compile", cwd=tmp_path)
    measured = [line.split()[:3] for line in lines if line.split()[0] in ("small", "middle",
                                                                          "largest")]
    assert measured == [["small", "b1-c1", "eager"], ["middle", "b3-c3", "eager"],
                        ["largest", "b1-c2", "eager"], ["small", "b1-c1", "compiled"],
                        ["middle", "b3-c3", "compiled"], ["largest", "b1-c2", "compiled"]]
    assert any(line.startswith("workers  1 on one cpu") for line in lines), lines
    eager = [line for line in lines if line.startswith("paper grid:")]
    compiled = [line for line in lines if line.startswith("paper grid compiled:")]
    assert eager and len(compiled) == 3, lines  # compiled: one after each compiled variant
    assert all(f"{points} points" in line for line in eager + compiled), lines
    assert "hours of compiling" in compiled[-1] and "b1-c1/b3-c3/b1-c2" in compiled[-1]
    assert list(tmp_path.iterdir()) == []  # a benchmark writes nothing where it runs


def test_the_wheels_for_an_offline_gpu_machine_are_what_it_lacks_at_the_tested_versions():
    """gpu_wheels.py: MLflow, Optuna and what they pull in (transitively), at the versions this
    environment runs; nothing the machine's list already has (torch, numpy, ...)."""
    from importlib import metadata

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_wheels import machine_packages, missing
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    have = machine_packages(REPO / "benchmarks" / "gpu_machine.txt")
    assert {"torch", "torchvision", "timm", "numpy", "rich", "pyyaml", "scikit-learn"} <= have
    needed = missing("fractal-mlops", have, "3.12")
    assert {"mlflow", "mlflow-skinny", "optuna", "sqlalchemy", "alembic", "psycopg",
            "psycopg-binary"} <= set(needed)  # direct, transitive, and an extra's (binary)
    assert not set(needed) & have and "fractal-mlops" not in needed
    assert all(needed[name] == metadata.version(name) for name in needed)
    assert "torch" in missing("fractal-mlops", set(), "3.12")  # a bare machine lacks it too
