"""Datasets, decoded once into uint8 tensors, and a loader that batches on the training device.

- digits: scikit-learn's 8x8 handwritten digits (real, offline), a fixed stratified split.
- cifar10: an ImageFolder tree (root/train/<class>/*, root/test/<class>/*), decoded once and
  cached on disk keyed by the files' content; or torchvision's CIFAR10 (download for users).
- synthetic: small, learnable, generated from a seed (fast tests).

Normalization and random horizontal flips run on whole batches on the device: there are no
per-image Python transforms in the training loop.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fractal_mlops.config.sections import DataConfig
from fractal_mlops.errors import ConfigError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp"}


@dataclass
class Dataset:
    """Images as uint8 (N, C, H, W), labels as int64, plus what normalizing them needs."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    digest: str  # content hash of the images and labels actually used
    source: str  # where it came from (path or description)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])


def load_dataset(config: DataConfig, seed: int = 0) -> Dataset:
    if config.name == "digits":
        train_x, train_y, val_x, val_y, classes, source = _digits(config)
    elif config.name == "cifar10":
        train_x, train_y, val_x, val_y, classes, source = _cifar10(config)
    elif config.name == "synthetic":
        train_x, train_y, val_x, val_y, classes, source = _synthetic(config)
    else:
        raise ConfigError(f"unknown dataset {config.name!r}")
    if config.train_limit:
        train_x, train_y = _stratified_subset(train_x, train_y, config.train_limit)
    if config.val_limit:
        val_x, val_y = _stratified_subset(val_x, val_y, config.val_limit)
    scaled = train_x.float().div_(255)
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    digest = hashlib.sha256()
    for t in (train_x, train_y, val_x, val_y):
        digest.update(t.contiguous().numpy().tobytes())
    return Dataset(config.name, train_x.contiguous(), train_y, val_x.contiguous(), val_y,
                   mean, std, classes, digest.hexdigest()[:16], source)


def _stratified_split(x: np.ndarray, y: np.ndarray, val_fraction: float):
    from sklearn.model_selection import train_test_split

    train_x, val_x, train_y, val_y = train_test_split(
        x, y, test_size=val_fraction, stratify=y, random_state=0)
    as_tensor = torch.from_numpy
    return (as_tensor(np.ascontiguousarray(train_x)), as_tensor(train_y.astype(np.int64)),
            as_tensor(np.ascontiguousarray(val_x)), as_tensor(val_y.astype(np.int64)))


def _stratified_subset(x: Tensor, y: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """A fixed subset of `size` images with the class balance of the whole (image folders are
    sorted by class, so the first N images would be one class)."""
    if size >= len(y):
        return x, y
    from sklearn.model_selection import train_test_split

    index, _ = train_test_split(np.arange(len(y)), train_size=size, stratify=y.numpy(),
                                random_state=0)
    index = torch.from_numpy(np.sort(index))
    return x[index], y[index]


def _digits(config: DataConfig):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    split = _stratified_split(images, digits.target, config.val_fraction)
    return (*split, [str(c) for c in range(10)], "sklearn.datasets.load_digits")


def _synthetic(config: DataConfig):
    """Ten classes, each a fixed random 3x8x8 prototype; images are noisy copies of it."""
    generator = np.random.default_rng(1234)
    prototypes = generator.uniform(40, 215, size=(10, 3, 8, 8))
    labels = np.arange(config.synthetic_size) % 10
    noise = generator.normal(0, 45, size=(config.synthetic_size, 3, 8, 8))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    split = _stratified_split(images, labels, config.val_fraction)
    return (*split, [f"class{c}" for c in range(10)], f"synthetic(n={config.synthetic_size})")


def _cifar10(config: DataConfig):
    if config.root is None:
        raise ConfigError("data.root is required for cifar10 (an ImageFolder tree or a download dir)")
    root = Path(config.root).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():
        cache = Path(config.cache_dir or os.environ.get("FRACTAL_MLOPS_CACHE")
                     or Path.home() / ".cache" / "fractal_mlops")
        train_x, train_y, classes = load_image_folder(root / "train", cache)
        val_x, val_y, val_classes = load_image_folder(root / "test", cache)
        if val_classes != classes:
            raise ConfigError(f"{root}: train/ and test/ have different class folders")
        return train_x, train_y, val_x, val_y, classes, str(root)
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=config.download)
        test = CIFAR10(str(root), train=False, download=config.download)
    except RuntimeError as exc:
        raise ConfigError(f"cifar10 at {root}: {exc} (set data.download: true, or point "
                          "data.root at an ImageFolder tree with train/ and test/)") from None

    def to_tensors(ds):
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.int64))

    return (*to_tensors(train), *to_tensors(test), list(train.classes), f"torchvision:{root}")


def load_image_folder(root: Path, cache_dir: Path) -> tuple[Tensor, Tensor, list[str]]:
    """Decode root/<class>/* once into uint8 (N, C, H, W); later calls read the on-disk cache.

    The cache key hashes every file's relative path and bytes, so a changed image is noticed.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    files = [(label, path) for label, name in enumerate(classes)
             for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ConfigError(f"{root} has class folders but no images")
    if len(classes) < 2:
        raise ConfigError(f"{root} has one class folder ({classes[0]}): a classifier needs at "
                          "least 2 classes")
    labelled = {label for label, _ in files}
    empty = [name for label, name in enumerate(classes) if label not in labelled]
    if empty:
        raise ConfigError(f"{root / empty[0]} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                          "remove the class folder or add its images")
    key = hashlib.sha256()
    blobs = []
    for _, path in files:
        blob = path.read_bytes()
        key.update(str(path.relative_to(root)).encode() + b"\0")
        key.update(hashlib.sha256(blob).digest())
        blobs.append(blob)
    cache_file = cache_dir / f"imagefolder-{key.hexdigest()[:24]}.pt"
    if cache_file.exists():
        cached = torch.load(cache_file)
        return cached["x"], cached["y"], cached["classes"]
    x = torch.from_numpy(_decode_all(root, [path for _, path in files], blobs))
    y = torch.tensor([label for label, _ in files], dtype=torch.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".tmp{os.getpid()}")
    torch.save({"x": x, "y": y, "classes": classes}, partial)
    partial.replace(cache_file)  # atomic: concurrent workers never read half a file
    return x, y, classes


def _decode_all(root: Path, paths: list[Path], blobs: list[bytes]) -> np.ndarray:
    """Decode every image, or refuse (ConfigError) naming the first file that is not an image
    or has another size than most: a dataset silently missing files would not be the one
    asked for, so they are never skipped."""
    images, unreadable = [], []
    for path, blob in zip(paths, blobs, strict=True):
        try:
            images.append(_decode(blob))
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad file
            unreadable.append((path, type(exc).__name__))
    if unreadable:
        path, why = unreadable[0]
        raise ConfigError(f"{path} is not a readable image ({why}); {len(unreadable)} such "
                          f"file(s) in {root}: remove or replace them")
    shapes = collections.Counter(image.shape for image in images)
    usual = shapes.most_common(1)[0][0]
    odd = [(path, image.shape) for path, image in zip(paths, images, strict=True)
           if image.shape != usual]
    if odd:
        path, shape = odd[0]
        raise ConfigError(f"{path} is {shape[2]}x{shape[1]} pixels, the other images "
                          f"{usual[2]}x{usual[1]}; {len(odd)} file(s) of another size in {root}: "
                          "resize or remove them")
    return np.stack(images)


def _decode(blob: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(blob)) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return array.transpose(2, 0, 1)


class DeviceLoader:
    """Batches a uint8 tensor dataset on `device`: normalize (and flip) whole batches at once.

    The dataset is moved to the device once; each epoch draws a permutation from a seeded
    generator, so the batch order depends only on (seed, epoch).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, mean, std, device: torch.device,
                 shuffle: bool = False, flip: bool = False, seed: int = 0,
                 channels_last: bool = False) -> None:
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.flip = flip
        self.seed = seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape)
        self.std = torch.tensor(std, device=device).view(shape)
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches()

    def batches(self, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The next epoch's batches, from batch `start_step` on (a trial resumed mid-epoch
        skips those it trained: the order depends on (seed, epoch) alone)."""
        self.epoch += 1
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (torch.randperm(len(self.x), generator=generator) if self.shuffle
                 else torch.arange(len(self.x))).to(self.device)
        # the epoch's flips in one draw and one copy: none per step (the same numbers as a
        # draw per batch, which the generator gives in sequence)
        flips = ((torch.rand(len(self.x), generator=generator) < 0.5).to(self.device)
                 if self.flip else None)
        for start in range(start_step * self.batch_size, len(self.x), self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.x[index].float().div_(255).sub_(self.mean).div_(self.std)
            if flips is not None:
                flip = flips[start:start + self.batch_size].view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(3), images)
            yield images.contiguous(memory_format=self.memory_format), self.y[index]
