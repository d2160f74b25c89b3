"""GPU throughput at the paper's settings, and what the whole paper grid would cost.

For three variants of experiments/paper_cifar10.yaml (small: blocks 1 / columns 1, middle:
blocks 3 / columns 3, largest: blocks 5 / columns 7; width 64, batch 16, 32x32 images, with
the config's amp, gradient checkpointing and channels_last):
  - images/s of training steps (after a warm-up; at most --steps, at most --seconds), eager;
    with --compile also with `training.compile: reduce-overhead` (torch.compile and CUDA graphs
    over the static drop-path form; without gradient checkpointing, which a compiled step does
    not take), and its startup: the first three steps' time beyond three steady steps
    (compiling, recording the CUDA graphs), which a worker pays again for every trial;
  - the GPU's busy share: CUDA kernel time over wall time, from torch.profiler;
  - the middle variant with 1, 2 and 4 worker processes on the one GPU, timed together after
    each has warmed up: images/s in all;
  - the projected GPU-hours of the whole paper grid: time per image fitted on the measured
    variants against conv units per block (2^columns - 1, times blocks), summed over every
    grid point at 5 epochs of 50,000 training images plus 10,000 evaluated, for 1 worker and
    for the best worker count; compiled, plus the compilation of every point, fitted likewise.

The lines come in the order of what matters most, so a run cut short (a time limit) still
says the most: the eager figures and their projection, the worker counts, then the compiled
variants smallest first, each followed by the compiled projection so far.

    python benchmarks/bench_gpu.py [--steps 200] [--compile [small,middle]] [--workers 1,2,4]
    python benchmarks/bench_gpu.py --device cpu --steps 3 --largest 2x2   # the code, on a CPU

Without a CUDA device (and without --device cpu) it prints "no CUDA device" and exits 0.
Record the figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "experiments" / "paper_cifar10.yaml"
VARIANTS = {"small": (1, 1), "middle": (3, 3), "largest": (5, 7)}
TRAIN_IMAGES, VAL_IMAGES = 50_000, 10_000
EVAL_COST = 1 / 3  # an evaluated image against a trained one (forward only, batch 512)


def units(blocks: int, columns: int) -> int:
    """Conv units a training step runs, at most: every column of every block."""
    return blocks * (2**columns - 1)


def paper_settings():
    from fractal_mlops.config.experiment import load_config

    return load_config(str(PAPER))


def measure(blocks: int, columns: int, device_name: str, steps: int, compiled: bool,
            profile: bool, seconds_cap: float = 20.0, barrier: str | None = None,
            parties: int = 1) -> dict:
    """Images/s of up to `steps` training steps, stopping after `seconds_cap` (and the GPU's
    busy share when `profile`). `barrier`: a folder where `parties` processes meet after their
    warm-up, so that their timed steps run at the same time."""
    import torch

    from fractal_mlops.engine.data import Dataset
    from fractal_mlops.engine.train import Trainer

    config = paper_settings()
    device = torch.device(device_name)
    images = (steps + 10) * config.training.batch_size
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(images) % 10
    data = Dataset("bench", x, y, x[:512], y[:512], (0.5,) * 3, (0.25,) * 3,
                   [str(c) for c in range(10)], "bench", "random")
    variant = dict(blocks=blocks, columns=columns, width=64, unit="conv-norm-act",
                   norm="batch", activation="relu", dropout=0.1, drop_path="local+global")
    settings = config.training
    if compiled:
        settings = replace(settings, compile="reduce-overhead", grad_checkpointing=False)
    run = Trainer(variant, data, settings, device, flip=True)
    batches = list(run.train_loader)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for images_, labels in batches[:3]:  # compiled: dynamo and inductor on the first step,
        run.train_step(images_, labels)  # CUDA graphs recorded on the second (reduce-overhead)
    sync()
    first_steps = time.perf_counter() - start
    for images_, labels in batches[3:10]:  # warm-up: allocator, cuDNN, graph replay
        run.train_step(images_, labels)
    sync()
    if barrier:
        wait_for_all(Path(barrier), parties)
    started_at, start, done = time.time(), time.perf_counter(), 0
    for images_, labels in batches[10:10 + steps]:
        run.train_step(images_, labels)
        done += 1
        if time.perf_counter() - start > seconds_cap:  # the host runs at most a few steps ahead
            break
    sync()
    seconds = time.perf_counter() - start
    step = seconds / done
    result = {"blocks": blocks, "columns": columns, "compiled": compiled, "steps": done,
              "images": done * config.training.batch_size,
              "images_per_second": done * config.training.batch_size / seconds,
              "startup_seconds": max(first_steps - 3 * step, 0.0),
              "started_at": started_at, "ended_at": time.time(), "param_count": run.param_count}
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        profiled = max(3, min(20, int(5 / step)))  # about 5 s: a large variant has 10k+
        with profiler(activities=[ProfilerActivity.CUDA]) as prof:  # kernels in each step
            start = time.perf_counter()
            for images_, labels in batches[10:10 + profiled]:
                run.train_step(images_, labels)
            sync()
            wall = time.perf_counter() - start
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
        result["gpu_busy_share"] = kernel_us / 1e6 / wall
    return result


def wait_for_all(folder: Path, parties: int, timeout: float = 600.0) -> None:
    """Say this process is ready, and wait until all `parties` are."""
    (folder / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("ready-*"))) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.glob('ready-*')))} of {parties} ready")
        time.sleep(0.002)


def workers_run(count: int, device: str, steps: int, seconds_cap: float) -> float:
    """Images/s of `count` processes training the middle variant at once: every image they
    trained over the time from the first one's start to the last one's end (they start
    together, after each has warmed up)."""
    blocks, columns = VARIANTS["middle"]
    with tempfile.TemporaryDirectory() as barrier:
        code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
                f"from benchmarks.bench_gpu import measure; print(json.dumps(measure("
                f"{blocks}, {columns}, {device!r}, {steps}, False, False, {seconds_cap}, "
                f"{barrier!r}, {count})))")
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True, cwd=REPO) for _ in range(count)]
        outputs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"a worker process failed ({[p.returncode for p in procs]})")
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    wall = max(r["ended_at"] for r in results) - min(r["started_at"] for r in results)
    return sum(r["images"] for r in results) / wall


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line; a flat line through one point."""
    n, mean_x, mean_y = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
             / max(sum((x - mean_x) ** 2 for x in xs), 1e-12)) if n > 1 else 0.0
    return mean_y - slope * mean_x, slope


def projected_hours(measured: list[dict], speedup: float) -> tuple[float, float, int]:
    """(GPU-hours of training the whole paper grid, hours of compiling it, grid points): time
    per image, and for compiled runs the first step's time, fitted against conv units."""
    from fractal_mlops.config.space import grid

    xs = [units(m["blocks"], m["columns"]) for m in measured]
    per_image = fit(xs, [1 / m["images_per_second"] for m in measured])
    compiled = measured[0]["compiled"]
    per_trial = fit(xs, [m["startup_seconds"] for m in measured]) if compiled else (0.0, 0.0)
    config = paper_settings()
    points = grid(config)
    per_point_images = config.training.epochs * (TRAIN_IMAGES + EVAL_COST * VAL_IMAGES)

    def summed(line: tuple[float, float], scale: float) -> float:
        return sum(max(line[0] + line[1] * units(v.blocks, v.columns), 0.0) * scale
                   for v in points)

    return (summed(per_image, per_point_images) / 3600 / speedup,
            summed(per_trial, 1.0) / 3600 / speedup, len(points))


def print_projection(measured: list[dict], best: float) -> None:
    """The grid's projected hours from `measured`, and with the best worker count (`best`: its
    throughput over one worker's) once measured."""
    hours, compiling, points = projected_hours(measured, 1.0)
    compiled = measured[0]["compiled"]
    fitted = "/".join(f"b{m['blocks']}-c{m['columns']}" for m in measured)
    print(f"paper grid{' compiled' if compiled else ''}: {points} points, about {hours:.1f} "
          "device-hours of training with 1 worker"
          + (f", {hours / best:.1f} with the best worker count ({best:.2f}x)" if best > 1 else "")
          + (f", plus {compiling:.1f} hours of compiling in all (shared by the workers)"
             if compiled else "") + f"; fitted on {fitted}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=200, help="timed training steps")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long timing "
                        "each variant (default 20; fewer steps then)")
    parser.add_argument("--compile", nargs="?", const="small,middle,largest", default="",
                        metavar="VARIANTS", help="also under torch.compile: these variants "
                        "(default small,middle,largest)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--largest", default="5x7", help="blocks x columns of the largest "
                        "variant (default 5x7: 687M parameters, for a GPU)")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.compile.split(","))) - set(VARIANTS)
    if unknown:
        parser.error(f"--compile: unknown variant(s) {', '.join(sorted(unknown))} "
                     f"(expected some of {', '.join(VARIANTS)})")
    blocks, columns = (int(n) for n in args.largest.lower().split("x"))
    sys.path.insert(0, str(REPO))  # a checkout that pip has not installed (a GPU machine's copy)
    VARIANTS["largest"] = (blocks, columns)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--device cpu runs the same code on a CPU)")
        return 0
    name = (torch.cuda.get_device_name() if args.device == "cuda" else "CPU")
    print(f"{name}, torch {torch.__version__}, paper settings from {PAPER.name}", flush=True)

    def variant(label: str, blocks: int, columns: int, compiled: bool) -> dict:
        result = measure(blocks, columns, args.device, args.steps, compiled, True, args.seconds)
        busy = result.get("gpu_busy_share")
        print(f"{label:<8} b{blocks}-c{columns} {'compiled' if compiled else 'eager':<8} "
              f"{result['images_per_second']:>8.0f} images/s"
              + (f", GPU busy {100 * busy:.0f} %" if busy is not None else "")
              + f", {result['steps']} steps"
              + (f", startup {result['startup_seconds']:.1f} s" if compiled else "")
              + f", {result['param_count']:,} parameters", flush=True)
        return result

    eager = [variant(label, b, c, False) for label, (b, c) in VARIANTS.items()]
    print_projection(eager, 1.0)
    best = 1.0
    for count in [int(n) for n in args.workers.split(",")]:
        total = workers_run(count, args.device, args.steps, args.seconds)
        speedup = total / eager[1]["images_per_second"]
        best = max(best, speedup)
        print(f"workers  {count} on one {args.device}: {total:.0f} images/s in all, "
              f"{speedup:.2f}x one worker", flush=True)
    if best > 1:
        print_projection(eager, best)
    if args.compile:  # smallest first: compiling the largest takes longest
        compiled: list[dict] = []
        for label in args.compile.split(","):
            compiled.append(variant(label, *VARIANTS[label], True))
            print_projection(compiled, best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
