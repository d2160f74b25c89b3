"""Datasets (digits, an ImageFolder tree with its disk cache) and the on-device batch loader."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import IMAGE_CLASSES, image_folder, write_image

from fractal_mlops.config.sections import DataConfig
from fractal_mlops.engine import data as data_module
from fractal_mlops.engine.data import DeviceLoader, load_dataset
from fractal_mlops.errors import ConfigError


def test_digits_is_a_fixed_stratified_uint8_split():
    first = load_dataset(DataConfig(name="digits", val_fraction=0.2))
    second = load_dataset(DataConfig(name="digits", val_fraction=0.2))
    assert len(first.train_x) + len(first.val_x) == 1797
    assert len(first.val_x) == pytest.approx(0.2 * 1797, abs=1)
    assert first.train_x.dtype == first.val_x.dtype == torch.uint8
    assert first.train_y.dtype == torch.int64
    assert tuple(first.train_x.shape[1:]) == (1, 8, 8)
    assert int(first.train_x.max()) > 200  # scaled from sklearn's 0..16 to 0..255
    assert first.num_classes == 10 and first.in_chans == 1
    # stratified: every class has (almost) the same share in train and validation
    train_share = Counter(first.train_y.tolist())
    val_share = Counter(first.val_y.tolist())
    for label in range(10):
        total = train_share[label] + val_share[label]
        assert abs(val_share[label] - 0.2 * total) <= 1, label
    # fixed: the same split every time
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.val_y, second.val_y)
    assert first.digest == second.digest
    assert first.mean == second.mean and first.std == second.std
    # a different split fraction is a different dataset
    assert load_dataset(DataConfig(name="digits", val_fraction=0.3)).digest != first.digest


def test_train_and_val_limits():
    limited = load_dataset(DataConfig(name="digits", train_limit=100, val_limit=50))
    assert len(limited.train_x) == 100 and len(limited.val_x) == 50
    assert all(9 <= n <= 11 for n in Counter(limited.train_y.tolist()).values())  # balanced
    assert len(Counter(limited.train_y.tolist())) == len(Counter(limited.val_y.tolist())) == 10
    again = load_dataset(DataConfig(name="digits", train_limit=100, val_limit=50))
    assert torch.equal(limited.train_x, again.train_x)  # a fixed subset


def test_image_folder_loads_and_is_cached_on_disk(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    config = DataConfig(name="cifar10", root=str(root), cache_dir=str(cache))
    first = load_dataset(config)
    assert first.classes == IMAGE_CLASSES
    assert first.train_x.dtype == torch.uint8
    assert tuple(first.train_x.shape) == tuple(first.val_x.shape) == (9, 3, 32, 32)
    assert first.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # PNG is lossless: the decoded pixels are those written
    assert int(first.train_x[0, 0, 0, 0]) == 60 and int(first.train_x[0, 0, 0, 31]) == 0
    cache_files = sorted(cache.glob("*.pt"))
    assert len(cache_files) == 2  # train/ and test/

    def no_decoding(blob):
        raise AssertionError("decoded an image although the cache holds it")

    monkeypatch.setattr(data_module, "_decode", no_decoding)
    second = load_dataset(config)
    assert torch.equal(first.train_x, second.train_x) and first.digest == second.digest
    monkeypatch.undo()

    write_image(root / "train" / "dog" / "0000.png", 200)  # one changed image: a new cache key
    third = load_dataset(config)
    assert len(sorted(cache.glob("*.pt"))) == 3
    assert third.digest != first.digest
    assert int(third.train_x[3, 0, 0, 31]) == 200
    assert not list(cache.glob("*.tmp*"))  # no half-written cache files left behind


def test_image_folder_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        load_dataset(DataConfig(name="cifar10"))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(ConfigError, match="class folders"):
        load_dataset(DataConfig(name="cifar10", root=str(empty), cache_dir=str(tmp_path / "c")))
    mismatched = image_folder(tmp_path / "mismatched", per_class=1)
    (mismatched / "test" / "ship" / "0000.png").unlink()
    (mismatched / "test" / "ship").rmdir()
    with pytest.raises(ConfigError, match="different class"):
        load_dataset(DataConfig(name="cifar10", root=str(mismatched),
                                cache_dir=str(tmp_path / "c")))


def asymmetric_images(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 6, 6), generator=generator, dtype=torch.uint8)
    return images, torch.arange(count) % 10


def stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = images.float() / 255
    return scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3))


def test_device_loader_normalizes_and_keeps_order_without_shuffle():
    images, labels = asymmetric_images()
    mean, std = stats(images)
    loader = DeviceLoader(images, labels, 10, mean.tolist(), std.tolist(), torch.device("cpu"))
    batches = list(loader)
    assert len(loader) == len(batches) == 7
    assert [len(y) for _, y in batches] == [10] * 6 + [4]
    x = torch.cat([b for b, _ in batches])
    assert x.dtype == torch.float32
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    expected = (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)  # no flip unless asked


def test_device_loader_shuffles_reproducibly_per_epoch():
    images, labels = asymmetric_images()
    mean, std = stats(images)

    def epochs(seed: int) -> list[list[int]]:
        loader = DeviceLoader(images, labels, 16, mean.tolist(), std.tolist(),
                              torch.device("cpu"), shuffle=True, seed=seed)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again
    assert first[0] != first[1]  # a new order each epoch
    assert first != other
    assert sorted(first[0]) == sorted(labels.tolist())  # every image once per epoch


def test_device_loader_flips_only_when_asked():
    images, labels = asymmetric_images()
    mean, std = stats(images)
    plain = (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    loader = DeviceLoader(images, labels, 16, mean.tolist(), std.tolist(), torch.device("cpu"),
                          flip=True)
    x = torch.cat([b for b, _ in loader])
    flipped = [bool(torch.allclose(x[i], plain[i].flip(2), atol=1e-5)) for i in range(len(x))]
    unflipped = [bool(torch.allclose(x[i], plain[i], atol=1e-5)) for i in range(len(x))]
    # each image comes as it is or mirrored
    assert all(f != u for f, u in zip(flipped, unflipped, strict=True))
    assert 16 <= sum(flipped) <= 48  # about half


def test_device_loader_channels_last():
    images, labels = asymmetric_images()
    mean, std = stats(images)
    loader = DeviceLoader(images, labels, 16, mean.tolist(), std.tolist(), torch.device("cpu"),
                          channels_last=True)
    batch, _ = next(iter(loader))
    assert batch.is_contiguous(memory_format=torch.channels_last)
