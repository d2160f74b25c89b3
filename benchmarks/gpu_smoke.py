"""GPU smoke check: what must hold on a CUDA machine before the paper grid goes to it.

One line per check, PASS / FAIL / INFO, in at most about 5 minutes on one GPU:
  device      the GPU, its compute capability, and what `amp: auto` resolves to
  syncs       host syncs inside training steps (torch.cuda.set_sync_debug_mode), expected 0
  ckpt        gradient checkpointing against none: identical loss, gradients, norm
              statistics and RNG state after a step
  determinism two 1-epoch runs from the same seed: identical losses and weights
  fp16        GradScaler from an overflowing scale: the skipped steps are counted, the scale
              settles, and training goes on with a finite loss
  memory      gpu_mem_peak_mb / gpu_mem_reserved_mb / gpu_eval_mem_peak_mb of blocks 3 /
              columns 3 and blocks 5 / columns 7 (width 64, batch 16, 32x32)
  cpu-load    a model logged from a CUDA run loads with CUDA hidden (CUDA_VISIBLE_DEVICES="")
              and predicts within 1e-4 of the fp32 GPU evaluation
  workers     the study with --workers 1, 2 and 4 on one GPU: every point COMPLETE

    python benchmarks/gpu_smoke.py            # exit 0 when every check passes, else 1
    python benchmarks/gpu_smoke.py --device cpu   # the same checks that make sense on a CPU

Without a CUDA device (and without --device cpu) it prints "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(blocks=3, columns=3, width=64, unit="conv-norm-act", norm="batch",
             activation="relu", dropout=0.0, drop_path="local+global")
LARGE = dict(SMALL, blocks=5, columns=7)
RESULTS: list[bool] = []


def source_env() -> dict[str, str]:
    """The environment for a child process: this checkout first on its path, ahead of what
    PYTHONPATH already holds (on a GPU machine: the packages carried as wheels)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def line(check: str, ok: bool | None, text: str) -> None:
    """One check's line; None is information only."""
    if ok is not None:
        RESULTS.append(ok)
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    print(f"{status:<5} {check:<12} {text}", flush=True)


def dataset(images: int, size: int = 32, seed: int = 0):
    """Random CIFAR-shaped uint8 images whose label is visible in them (a learnable task)."""
    import torch

    from fractal_mlops.engine.data import Dataset

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(images) % 10
    x = torch.randint(0, 200, (images, 3, size, size), generator=generator, dtype=torch.uint8)
    x[:, 0, : labels.max() + 1] = 0
    x[torch.arange(images), 0, labels] = 255  # row `label` of the red channel is lit
    split = images * 4 // 5
    return Dataset("smoke", x[:split], labels[:split], x[split:], labels[split:],
                   (0.45, 0.45, 0.45), (0.25, 0.25, 0.25), [str(c) for c in range(10)],
                   "smoke", "random images")


def trainer(variant: dict, data, device, **settings):
    from fractal_mlops.config.sections import TrainConfig
    from fractal_mlops.engine.train import Trainer

    config = TrainConfig(**{"epochs": 1, "batch_size": 16, "lr": 0.01, "amp": "off", **settings})
    return Trainer(dict(variant), data, config, device)


def check_device(device) -> None:
    import torch

    from fractal_mlops.engine.device import resolve_amp

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        text = (f"{name}, capability {major}.{minor}, CUDA {torch.version.cuda}, cuDNN "
                f"{torch.backends.cudnn.version()}")
    else:
        text = "CPU"
    line("device", None, f"{text}; amp auto -> {resolve_amp('auto', device)}")


def check_syncs(device, data) -> None:
    """Steps after the first few (allocator warm-up) must not wait for the GPU."""
    import torch

    if device.type != "cuda":
        line("syncs", None, "CUDA only (tests/engine checks on the CPU that a step reads nothing back)")
        return
    run = trainer(SMALL, data, device, amp="auto")
    batches = list(run.train_loader)
    for images, labels in batches[:3]:
        run.train_step(images, labels)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for images, labels in batches[3:19]:
                run.train_step(images, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    line("syncs", not syncs, f"{len(syncs)} host syncs in 16 training steps"
         + (f" (first: {syncs[0].message})" if syncs else ""))


def step_state(run, images, labels):
    import torch

    loss, _, _ = run.train_step(images, labels)
    grads = [p.grad.detach().clone() for p in run.model.parameters() if p.grad is not None]
    norms = [b.detach().clone() for name, b in run.model.named_buffers() if "running" in name]
    from fractal_mlops.engine.model import drop_rng

    rng = (torch.cuda.get_rng_state(run.device) if run.device.type == "cuda"
           else torch.get_rng_state())
    return loss.detach().clone(), grads, norms, (rng, drop_rng.getstate())


def check_checkpointing(device, data) -> None:
    import torch

    states = []
    for checkpointing in (False, True):
        run = trainer(SMALL, data, device, grad_checkpointing=checkpointing)
        images, labels = next(iter(run.train_loader))
        states.append(step_state(run, images, labels))
    (l0, g0, n0, r0), (l1, g1, n1, r1) = states
    parts = {"loss": torch.equal(l0, l1),
             "gradients": len(g0) == len(g1) and all(
                 torch.equal(a, b) for a, b in zip(g0, g1, strict=True)),
             "norm statistics": len(n0) == len(n1) and all(
                 torch.equal(a, b) for a, b in zip(n0, n1, strict=True)),
             "RNG state": torch.equal(r0[0], r1[0]) and r0[1] == r1[1]}
    worst = max((float((a - b).abs().max()) for a, b in zip(g0, g1, strict=False)), default=0.0)
    line("ckpt", all(parts.values()), ", ".join(f"{k} {'same' if v else 'DIFFER'}"
                                                for k, v in parts.items())
         + f" (max |grad diff| {worst:.3g})")


def check_determinism(device, data) -> None:
    import torch

    runs = []
    for _ in range(2):
        run = trainer(SMALL, data, device, amp="auto")
        result = next(run.epochs())
        runs.append((result.train_loss, result.val_loss,
                     [p.detach().clone() for p in run.model.parameters()]))
    (a_train, a_val, a_w), (b_train, b_val, b_w) = runs
    same = a_train == b_train and a_val == b_val and all(
        torch.equal(x, y) for x, y in zip(a_w, b_w, strict=True))
    line("determinism", same, f"train loss {a_train:.6f} / {b_train:.6f}, val loss "
         f"{a_val:.6f} / {b_val:.6f}, weights {'same' if same else 'DIFFER'}")


def check_fp16(device, data) -> None:
    import math

    if device.type != "cuda":
        line("fp16", None, "CUDA only (fp16 autocast with a GradScaler)")
        return
    import torch

    run = trainer(SMALL, data, device, amp="fp16")
    # a scale that overflows at once: the scaler must back off, and training go on
    run.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    trained = run.train_epoch()
    scale = float(run.scaler.get_scale())
    ok = (trained.skipped_steps or 0) > 0 and trained.non_finite_step is None and math.isfinite(
        trained.loss) and trained.skipped_steps < trained.seen // 16
    line("fp16", ok, f"{trained.skipped_steps} of {trained.seen // 16} steps skipped from scale "
         f"2^40, scale settled at 2^{math.log2(scale):.0f}, mean loss {trained.loss:.4f}")


def check_memory(device) -> None:
    if device.type != "cuda":
        line("memory", None, "CUDA only (the gpu_mem_* metrics)")
        return
    from fractal_mlops.engine.device import release_memory

    data = dataset(400)  # 20 training steps: the peaks come in the first (b5-c7: 687M parameters)
    for name, variant in (("b3-c3", SMALL), ("b5-c7", LARGE)):
        for checkpointing in (False, True):
            run = trainer(variant, data, device, amp="auto", grad_checkpointing=checkpointing)
            result = next(run.epochs())
            ok = result.gpu_mem_peak_mb is not None and result.gpu_mem_reserved_mb is not None
            line("memory", ok, f"{name} w64 batch 16{' checkpointed' if checkpointing else ''}: "
                 f"train peak {result.gpu_mem_peak_mb:.0f} MiB, reserved "
                 f"{result.gpu_mem_reserved_mb:.0f} MiB, eval peak "
                 f"{result.gpu_eval_mem_peak_mb:.0f} MiB, {run.param_count:,} parameters")
            del run
            release_memory(device)


@contextlib.contextmanager
def ieee_fp32():
    """fp32 as the CPU computes it: cuDNN convolutions use TF32 by default on Ampere and newer
    GPUs (about 1e-3 relative), which is not the fp32 evaluation a loaded model is held to."""
    import torch

    backends = [b for b in (getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul)
                if hasattr(b, "fp32_precision")]  # torch >= 2.9; mixing with allow_tf32 raises
    before = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, before, strict=True):
            b.fp32_precision = value


def check_cpu_load(device, data, folder: Path) -> None:
    """Log a trained model as a study does, then load and predict with CUDA hidden."""
    import numpy as np
    import torch

    from fractal_mlops.tracking.tracker import Tracker, configure

    run = trainer(SMALL, data, device)
    next(run.epochs())
    images = ((data.val_x[:64].float() / 255 - 0.45) / 0.25).to(device)
    run.model.eval()
    with torch.no_grad(), ieee_fp32():
        expected = run.model(images).float().cpu().numpy()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    configure(uri)
    tracker = Tracker(uri, "gpu-smoke")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    model_uri = tracker.log_model(run_id, run.model, (3, 32, 32), 10)
    np.save(folder / "images.npy", images.cpu().numpy())
    script = ("import sys, numpy as np, mlflow, torch; mlflow.set_tracking_uri(sys.argv[1]); "
              "assert not torch.cuda.is_available(); m = mlflow.pyfunc.load_model(sys.argv[2]); "
              "np.save(sys.argv[4], np.asarray(m.predict(np.load(sys.argv[3]))))")
    out = folder / "predicted.npy"
    done = subprocess.run([sys.executable, "-c", script, uri, model_uri,
                           str(folder / "images.npy"), str(out)],
                          env={**source_env(), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        line("cpu-load", False, f"loading with CUDA hidden failed: {done.stderr.strip()[-300:]}")
        return
    diff = float(np.abs(np.load(out) - expected).max())
    line("cpu-load", diff <= 1e-4, f"max |diff| {diff:.2e} against the {device.type} evaluation "
         "(limit 1e-4)")


def check_workers(device, folder: Path, counts: list[int], images: int) -> None:
    import sqlite3

    config = folder / "workers.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "study_name": "smoke-workers", "data": {"name": "synthetic", "synthetic_size": images},
        "space": {"blocks": [1, 2], "columns": [1, 2], "width": [32],
                  "unit": ["conv-norm-act"]},
        "training": {"epochs": 1, "batch_size": 16, "amp": "auto"}}))
    for workers in counts:
        store = folder / f"workers-{workers}"
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "fractal_mlops.study", "--config", str(config), "--workers",
             str(workers), "--device", device.type, "--no-report",
             "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--storage", f"journal:{store / 'optuna.journal'}"],
            capture_output=True, text=True, timeout=600, cwd=folder,
            env=source_env())
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            line("workers", False, f"--workers {workers}: exit {done.returncode}: "
                 f"{done.stderr.strip()[-300:]}")
            continue
        with sqlite3.connect(store / "mlflow.db") as db:
            states = dict(db.execute(
                "select value, count(*) from tags where key = 'fractal.state' group by value"))
        line("workers", states.get("COMPLETE", 0) == 4 and len(states) == 1,
             f"--workers {workers}: {states} in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to try (default 1,2,4)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images per check (default 2000)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (python benchmarks/gpu_smoke.py --device cpu "
              "runs the checks that make sense on a CPU)")
        return 0
    sys.path.insert(0, str(REPO))
    device = torch.device(args.device)
    data = dataset(args.images)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        check_device(device)
        check_syncs(device, data)
        check_checkpointing(device, data)
        check_determinism(device, data)
        check_fp16(device, data)
        check_memory(device)
        check_cpu_load(device, data, folder)
        check_workers(device, folder, [int(n) for n in args.workers.split(",")], args.images)
    passed = sum(RESULTS)
    print(f"{passed} of {len(RESULTS)} checks passed in {time.perf_counter() - started:.0f} s")
    return 0 if passed == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
