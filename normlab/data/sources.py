"""Data sources by name: each describes its shape without reading data, and loads uint8 tensors.

``describe`` is cheap and runs in ``validate``: it checks the source's settings and that its files
exist, so bad input fails before any work (an image folder is listed instead: ``imagefolder.select``,
whose selection the loaders reuse). ``load`` returns the whole set as uint8 (N, C, H, W) tensors; the
device loader does the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from normlab.data.image_set import DataShape, ImageSet
from normlab.data.imagefolder import ImageFolderSource
from normlab.errors import ConfigError
from normlab.settings import DataConfig


def from_hwc(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 numpy to a contiguous (N, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class Digits:
    """scikit-learn's bundled handwritten digits: 1,797 grayscale 8×8 images, no download.

    A fixed, stratified split (seed 0): 1,437 training and 360 test images.
    """

    test_fraction, split_seed = 0.2, 0

    def describe(self, settings: DataConfig) -> DataShape:
        return DataShape(channels=1, size=8, num_classes=10, train_size=1437, test_size=360)

    def load(self, settings: DataConfig) -> ImageSet:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 → 0..255
        x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=self.test_fraction,
                                                  stratify=digits.target, random_state=self.split_seed)
        return ImageSet(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(), torch.from_numpy(x_te),
                        torch.from_numpy(y_te).long(), [str(c) for c in range(10)])


class Cifar:
    """CIFAR-10/100 through torchvision (``root``, ``download``)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"

    def describe(self, settings: DataConfig) -> DataShape:
        root = Path(os.path.expanduser(settings.root or "data"))
        if not settings.download and not (root / self.folder).is_dir():
            raise ConfigError(
                f"data.root={str(root)!r} does not hold CIFAR-{self.num_classes} (no {self.folder}/ in it) "
                f"and data.download=false; set data.download=true, or point data.root at a folder that holds it"
            )
        return DataShape(channels=3, size=32, num_classes=self.num_classes, train_size=50_000, test_size=10_000)

    def load(self, settings: DataConfig) -> ImageSet:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.num_classes == 10 else datasets.CIFAR100
        root = os.path.expanduser(settings.root or "data")
        try:  # torchvision checks each file's md5 before it unpickles anything: a planted file never loads
            train = cls(root, train=True, download=settings.download)
            test = cls(root, train=False, download=settings.download)
        except RuntimeError as e:
            raise ConfigError(f"data.root={root!r}: torchvision's CIFAR-{self.num_classes} files there do not pass "
                              f"its checksums ({e}); delete them and set data.download=true") from None
        return ImageSet(from_hwc(train.data), torch.tensor(train.targets), from_hwc(test.data),
                        torch.tensor(test.targets), list(train.classes))


class Synthetic:
    """Seeded random images and labels of any shape, for tests and benchmarks."""

    def describe(self, settings: DataConfig) -> DataShape:
        for key in ("num_train", "num_test", "channels", "size"):
            if getattr(settings, key) < 1:
                raise ConfigError(f"data.{key}={getattr(settings, key)} is invalid: must be >= 1")
        return DataShape(channels=settings.channels, size=settings.size, num_classes=settings.num_classes or 10,
                         train_size=settings.num_train, test_size=settings.num_test)

    def load(self, settings: DataConfig) -> ImageSet:
        shape = self.describe(settings)
        g = torch.Generator().manual_seed(1234)
        n = settings.num_train + settings.num_test
        images = torch.randint(0, 256, (n, shape.channels, shape.size, shape.size), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, shape.num_classes, (n,), generator=g)
        return ImageSet(images[: settings.num_train], labels[: settings.num_train], images[settings.num_train:],
                        labels[settings.num_train:], [str(c) for c in range(shape.num_classes)])


SOURCES = {
    "digits": Digits,
    "cifar10": lambda: Cifar(10),
    "cifar100": lambda: Cifar(100),
    "imagefolder": ImageFolderSource,
    "synthetic": Synthetic,
}


def source(name: str):
    if name not in SOURCES:
        raise ConfigError(f"data.name={name!r} is invalid: valid data sources: {', '.join(SOURCES)}")
    return SOURCES[name]()
