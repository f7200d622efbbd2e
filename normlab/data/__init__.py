"""Data by name: ``resolve(settings)`` (checked, shape and file selection, nothing read) and ``build(...)`` (loaders).

A job resolves its data once (``DataSpec``): an image folder is listed and its classes picked there, and every
later step (the memory-format probe, the loaders) reads that selection instead of listing the folder again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from normlab import memory
from normlab.data.device_loader import DeviceLoader, Normalize
from normlab.data.image_set import DataShape
from normlab.data.imagefolder import ImageFolderSource, Selection, select
from normlab.data.sources import SOURCES, source
from normlab.data.subset import subset
from normlab.errors import ConfigError
from normlab.settings import DataConfig

IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@dataclass(frozen=True)
class DataSpec:
    """The data a job trains on, resolved once: its settings, its shape (after the subsets) and, for an image
    folder, the files it picks and whether they stream (too large for ``data.in_memory_max_gb``)."""

    settings: DataConfig
    shape: DataShape
    selection: Selection | None = None
    streamed: bool = False


@dataclass
class Loaders:
    train: object  # DeviceLoader or StreamLoader: .epoch(k), len(), .num_samples
    test: object
    shape: DataShape


def resolve(settings: DataConfig) -> DataSpec:
    """Check the source's settings and files (ConfigError naming the key) and resolve its shape and selection."""
    selection, streamed = None, False
    if settings.name == "imagefolder":
        selection = select(settings)
        shape = selection.shape()
        streamed = not selection.fits_in(settings.in_memory_max_gb)
    else:
        shape = source(settings.name).describe(settings)
    if not streamed:
        memory.check_in_memory_set(settings, shape)  # the whole set is loaded before any subset is taken
    for split in ("train", "test"):
        size = getattr(settings, f"{split}_subset")
        if size is None:
            continue
        if size < shape.num_classes:
            raise ConfigError(f"data.{split}_subset={size} is invalid: a class-stratified subset needs at least one "
                              f"image per class ({shape.num_classes} classes); use >= {shape.num_classes} or null")
        available = shape.train_size if split == "train" else shape.test_size
        if available is not None and size > available:
            kind = "training" if split == "train" else "test"
            raise ConfigError(f"data.{split}_subset={size} is invalid: data={settings.name} has {available} {kind} "
                              f"images; use at most that, or null for all of them")
        if streamed:
            raise ConfigError(f"data.{split}_subset={size} is invalid for a streamed image folder (larger than "
                              f"data.in_memory_max_gb={settings.in_memory_max_gb}); subsets are for in-memory data: "
                              f"pick fewer classes with data.num_classes, or raise data.in_memory_max_gb")
    if settings.train_subset is not None:
        shape = replace(shape, train_size=settings.train_subset)
    if settings.test_subset is not None:
        shape = replace(shape, test_size=settings.test_subset)
    return DataSpec(settings, shape, selection, streamed)


def build(data: DataSpec, batch_size: int, device: torch.device, *, seed: int, channels_last: bool = False,
          shard: tuple[int, int] = (0, 1)) -> Loaders:
    """The train loader (global batches of exactly `batch_size`) and the test loader, on `device`; `shard`
    (rank, ranks): this rank's part of each (see DeviceLoader)."""
    settings, shape = data.settings, data.shape
    memory.check_on_device(shape, batch_size, device, streamed=data.streamed)
    padding = settings.crop_padding if settings.crop_padding is not None else max(1, shape.size // 8)
    if data.streamed:
        return _streamed(data, batch_size, device, seed, channels_last, shard)
    if data.selection is not None:
        whole = ImageFolderSource().load(settings, data.selection)
    else:
        whole = source(settings.name).load(settings)
    images = subset(whole, settings.train_subset, settings.test_subset, settings.subset_seed)
    normalize = Normalize(*images.mean_std(), device, channels_last)

    def loader(x, y, train):
        return DeviceLoader(x.to(device), y.to(device), batch_size if train else settings.eval_batch,
                            normalize, train=train, augment=settings.augment, padding=padding, flip=settings.flip,
                            seed=seed, shard=shard)

    return Loaders(loader(images.train_images, images.train_labels, True),
                   loader(images.test_images, images.test_labels, False), shape)


def _streamed(data: DataSpec, batch_size: int, device: torch.device, seed: int, channels_last: bool,
              shard: tuple[int, int]) -> Loaders:
    from normlab.data.stream_loader import StreamLoader

    selection = data.selection
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD, device, channels_last)  # too large to measure up front
    common = dict(device=device, normalize=normalize, seed=seed, workers=data.settings.loader_workers, shard=shard)
    return Loaders(StreamLoader(selection, "train", batch_size, train=True, **common),
                   StreamLoader(selection, selection.test_split, data.settings.eval_batch, train=False, **common),
                   data.shape)


__all__ = ["SOURCES", "DataShape", "DataSpec", "DeviceLoader", "Loaders", "build", "resolve"]
