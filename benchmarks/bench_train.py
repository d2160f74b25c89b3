"""Training throughput and memory of the core engine, measured in one run.

Throughput, images per second of one reference FractalNet at the paper's batch size 16 on
CIFAR-shaped 3x32x32 images (real CIFAR-10 JPEGs when the archive is at hand):
  (a) plain loop: a torchvision DataLoader over a Dataset of uint8 arrays with per-image
      torchvision transforms (PIL image, RandomHorizontalFlip, ToTensor, Normalize), fp32,
      SGD step per batch: what the paper's code and most tutorials do;
  (b) this project's Trainer.train_epoch (DeviceLoader: whole-batch normalize + flip on the
      device) with its best CPU settings, picked here by a short measurement of
      fp32 / channels_last / amp bf16 / bf16 + channels_last.
(a) and (b) alternate `--rounds` times over the same `--images` images; the ratio (b)/(a)
is computed from the summed times (target >= 2.0).

Memory, gradient checkpointing on a deep variant (columns 6): each setting trains a few
steps in a fresh subprocess; the figure is the peak resident memory during training minus
the resident memory just before the first step (model, data and optimizer already built),
so the ~600 MB of the torch import do not dilute the ratio (target <= 0.6).

    python benchmarks/bench_train.py [--images 320] [--rounds 2] [--pick-images 96] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.xz"
BATCH = 16  # the paper's batch size
REFERENCE = dict(blocks=3, columns=3, width=64, unit="conv-norm-act", norm="batch",
                 activation="relu", dropout=0.0, drop_path="local+global")
DEEP = dict(REFERENCE, columns=6, width=32)
CANDIDATES = {  # name: (amp, channels_last)
    "fp32": ("off", False),
    "fp32+channels_last": ("off", True),
    "bf16": ("bf16", False),
    "bf16+channels_last": ("bf16", True),
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cifar_images(count: int, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """`count` training images (uint8, N x 32 x 32 x 3, classes interleaved) and labels."""
    from PIL import Image

    root = Path(data_dir) if data_dir else None
    if root is None and ARCHIVE.exists():
        root = Path(tempfile.gettempdir()) / "fractal_mlops_bench_cifar10"
        if not (root / "train").is_dir():
            print(f"extracting {ARCHIVE.name} to {root} ...", flush=True)
            with tarfile.open(ARCHIVE) as archive:
                archive.extractall(root, filter="data")
    if root is None:
        generator = np.random.default_rng(0)
        images = generator.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        return images, np.arange(count) % 10, "synthetic uint8 noise"
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    per_class = [sorted((root / "train" / c).iterdir()) for c in classes]
    files = [(label, per_class[label][i // len(classes)])
             for i in range(count) for label in [i % len(classes)]]
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for _, path in files])
    return images, np.array([label for label, _ in files]), f"CIFAR-10 JPEGs from {root}"


def build_model(variant: dict, **options):
    from fractal_mlops.engine.model import FractalNet

    return FractalNet(**variant, num_classes=10, in_chans=3, **options)


class PlainLoop:
    """(a): a DataLoader over a Dataset of uint8 arrays with per-image torchvision transforms
    (what torchvision.datasets.CIFAR10 does per item), fp32, one SGD step per `step()`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std) -> None:
        from PIL import Image
        from torch.utils.data import DataLoader, Dataset
        from torchvision import transforms

        class ArrayDataset(Dataset):
            def __init__(self, x: np.ndarray, y: np.ndarray, transform) -> None:
                self.x, self.y, self.transform = x, y, transform

            def __len__(self) -> int:
                return len(self.x)

            def __getitem__(self, index: int):
                return self.transform(Image.fromarray(self.x[index])), int(self.y[index])

        transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                        transforms.Normalize(mean, std)])
        torch.manual_seed(0)
        self.model = build_model(REFERENCE).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.batches = iter(DataLoader(ArrayDataset(images, labels, transform),
                                       batch_size=BATCH, shuffle=True))

    def step(self, seed: int) -> int:
        batch, target = next(self.batches)
        torch.manual_seed(seed)  # the same drop-path plan as (b)'s step
        loss = self.loss_fn(self.model(batch), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return len(target)


def lockstep(images: np.ndarray, labels: np.ndarray, mean, std, amp: str,
             channels_last: bool, warmup: int = 2) -> tuple[float, float]:
    """(a) and (b) over the same images, one training step of each in turn, so that both
    see the same load on a shared machine. Returns images/s of (a) and of (b).

    (b) is the project's Trainer.train_epoch over its DeviceLoader (whole-batch normalize and
    flip); its loader is wrapped so that, between two of (b)'s steps, one step of (a) runs
    (timed separately and subtracted from (b)'s time). Both draw the same drop-path plan
    (a global column, or local drops) at step i, since their compute would differ otherwise.
    """
    from fractal_mlops.config.sections import TrainConfig
    from fractal_mlops.engine.data import Dataset
    from fractal_mlops.engine.train import Trainer

    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    dataset = Dataset("cifar10", x, y, x[:BATCH], y[:BATCH], mean, std,
                      [str(c) for c in range(10)], "bench", "bench")
    settings = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01, momentum=0.9, seed=0, amp=amp,
                           channels_last=channels_last)
    trainer = Trainer(REFERENCE, dataset, settings, device="cpu", flip=True)
    plain = PlainLoop(images, labels, mean, std)
    clock = {"a": 0.0, "a_images": 0}

    class Interleaved:
        def __init__(self, loader) -> None:
            self.loader = loader

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self):
            for step, batch in enumerate(self.loader):
                if step == warmup:  # the first steps of both are warm-up (kernels, allocator)
                    clock["b_start"] = time.perf_counter()
                if step >= warmup:
                    start = time.perf_counter()
                    clock["a_images"] += plain.step(seed=step)
                    clock["a"] += time.perf_counter() - start
                else:
                    plain.step(seed=step)
                torch.manual_seed(step)
                yield batch

    trainer.train_loader = Interleaved(trainer.train_loader)
    seen = trainer.train_epoch().seen
    b_seconds = time.perf_counter() - clock["b_start"] - clock["a"]
    return clock["a_images"] / clock["a"], (seen - warmup * BATCH) / b_seconds


def input_pipelines(images: np.ndarray, labels: np.ndarray, mean, std) -> tuple[float, float]:
    """Seconds per batch of the two input pipelines alone (no model): what (b) can save."""
    from PIL import Image
    from torchvision import transforms

    from fractal_mlops.engine.data import DeviceLoader

    transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    batches = len(images) // BATCH
    start = time.perf_counter()
    for b in range(batches):
        torch.stack([transform(Image.fromarray(images[i]))
                     for i in range(b * BATCH, (b + 1) * BATCH)])
    per_image_transforms = (time.perf_counter() - start) / batches
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    loader = DeviceLoader(x, torch.from_numpy(labels), BATCH, mean, std, torch.device("cpu"),
                          shuffle=True, flip=True)
    start = time.perf_counter()
    for _ in loader:
        pass
    return per_image_transforms, (time.perf_counter() - start) / len(loader)


MEMORY_CHILD = r"""
import json, sys, torch
from pathlib import Path
from fractal_mlops.config.sections import TrainConfig
from fractal_mlops.engine.data import Dataset
from fractal_mlops.engine.train import Trainer

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024

variant, checkpointing, steps, batch = json.loads(sys.argv[1])
torch.manual_seed(0)
x = torch.randint(0, 256, (steps * batch, 3, 32, 32), dtype=torch.uint8)
y = torch.arange(steps * batch) % 10
data = Dataset("cifar10", x, y, x[:batch], y[:batch], (0.5,) * 3, (0.25,) * 3,
               [str(c) for c in range(10)], "bench", "bench")
settings = TrainConfig(epochs=1, batch_size=batch, lr=0.01, seed=0,
                       grad_checkpointing=checkpointing)
trainer = Trainer(variant, data, settings, device="cpu", flip=True)
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS:")
trainer.train_epoch()
print(json.dumps({"before_mb": before, "peak_mb": status("VmHWM:"),
                  "params": trainer.param_count}))
"""


def training_memory(variant: dict, checkpointing: bool, malloc: dict[str, str],
                    steps: int = 3) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **malloc}
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD,
                           json.dumps([variant, checkpointing, steps, BATCH])],
                          capture_output=True, text=True, env=env, check=True, cwd=REPO)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["training_mb"] = result["peak_mb"] - result["before_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of (a) and (b)")
    parser.add_argument("--pick-images", type=int, default=96,
                        help="images per candidate when picking (b)'s settings")
    parser.add_argument("--data", help="an ImageFolder tree with train/<class>/ (CIFAR-10)")
    args = parser.parse_args()

    started = time.perf_counter()
    from fractal_mlops.engine.device import cpu_has_native_bf16
    from fractal_mlops.engine.model import param_count

    print("## Training throughput and memory (core engine)")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
          f" ({torch.get_num_threads()} threads), Python {platform.python_version()}")
    images, labels, source = cifar_images(args.images, args.data)
    scaled = images.astype(np.float32) / 255
    mean = tuple(scaled.mean(axis=(0, 1, 2)).tolist())  # per channel (images are N, H, W, C)
    std = tuple(scaled.std(axis=(0, 1, 2)).tolist())
    reference = build_model(REFERENCE)
    print(f"data: {len(images)} images 3x32x32 ({source}), batch {BATCH}")
    print(f"reference variant: {REFERENCE} ({param_count(reference) / 1e6:.2f} M params)")

    native_bf16 = cpu_has_native_bf16()
    print(f"\n(b) settings, each in lockstep with (a) over {args.pick_images} images"
          + ("" if native_bf16 else "; this CPU has no native bf16: bf16 gets one warm-up"
             " and one measured step"))
    ratios = {}
    for name, (amp, channels_last) in CANDIDATES.items():
        slow = amp != "off" and not native_bf16
        count = 2 * BATCH if slow else args.pick_images
        a, b = lockstep(images[:count], labels[:count], mean, std, amp, channels_last,
                        warmup=1 if slow else 2)
        ratios[name] = b / a
        print(f"  {name:20s} (a) {a:6.1f} img/s  (b) {b:6.1f} img/s  ratio {b / a:.2f}",
              flush=True)
    best = max(ratios, key=ratios.get)
    amp, channels_last = CANDIDATES[best]
    print(f"  best: {best} (CPU capability {torch.backends.cpu.get_cpu_capability()},"
          f" native bf16: {native_bf16})")

    print(f"\nthroughput, {args.images} images per round, (a) and (b) alternating step by step:")
    a_seconds = b_seconds = 0.0
    for round_ in range(1, args.rounds + 1):
        a, b = lockstep(images, labels, mean, std, amp, channels_last)
        a_seconds += 1 / a
        b_seconds += 1 / b
        print(f"  round {round_}: (a) plain DataLoader fp32 {a:6.1f} img/s   "
              f"(b) Trainer {best} {b:6.1f} img/s   ratio {b / a:.2f}", flush=True)
    print(f"  overall: (a) {args.rounds / a_seconds:.1f} img/s, (b) {args.rounds / b_seconds:.1f}"
          f" img/s, ratio (b)/(a) = {a_seconds / b_seconds:.2f} (target >= 2.0)")
    transforms_s, device_s = input_pipelines(images, labels, mean, std)
    print(f"  input pipeline alone, per batch of {BATCH}: per-image transforms "
          f"{transforms_s * 1e3:.1f} ms, DeviceLoader {device_s * 1e3:.2f} ms; one training "
          f"step of (a) took {BATCH * a_seconds / args.rounds * 1e3:.0f} ms")

    print(f"\nmemory, deep variant {DEEP}, batch {BATCH}, {3} steps, fresh process each:")
    allocators = {  # glibc keeps freed heap memory resident; mmap'd blocks return at once
        "glibc default": {},
        "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    }
    for allocator, malloc in allocators.items():
        memory = {}
        for checkpointing in (False, True):
            result = training_memory(DEEP, checkpointing, malloc)
            memory[checkpointing] = result["training_mb"]
            print(f"  {allocator:28s} grad_checkpointing={str(checkpointing):5s}"
                  f"  before {result['before_mb']:6.0f} MB  peak {result['peak_mb']:6.0f} MB"
                  f"  training +{result['training_mb']:5.0f} MB", flush=True)
        print(f"  {allocator:28s} ratio with/without = {memory[True] / memory[False]:.2f}"
              " (target <= 0.6)")
    print(f"\nbenchmark time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
