"""Data by name: ``describe(cfg.data)`` (shape, checked, nothing read) and ``build(...)`` (loaders)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from normlab import memory
from normlab.data.device_loader import DeviceLoader, Normalize
from normlab.errors import ConfigError
from normlab.data.image_set import DataShape
from normlab.data.sources import SOURCES, source
from normlab.data.subset import subset


IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@dataclass
class Loaders:
    train: object  # DeviceLoader or StreamLoader: .epoch(k), len(), .num_samples
    test: object
    shape: DataShape
    classes: list[str]


def describe(cfg) -> DataShape:
    """The source's shape, with the sizes after ``data.train_subset``/``test_subset``; checks those sizes."""
    shape = source(cfg.name).describe(cfg)
    if cfg.name != "imagefolder" or source(cfg.name).fits_in_memory(cfg):
        memory.check_in_memory_set(cfg, shape)  # the whole set is loaded before any subset is taken
    for split in ("train", "test"):
        size = cfg[f"{split}_subset"]
        if size is None:
            continue
        if size < shape.num_classes:
            raise ConfigError(f"data.{split}_subset={size} is invalid: a class-stratified subset needs at least one "
                              f"image per class ({shape.num_classes} classes); use >= {shape.num_classes} or null")
        available = shape.train_size if split == "train" else shape.test_size
        if available is not None and size > available:
            kind = "training" if split == "train" else "test"
            raise ConfigError(f"data.{split}_subset={size} is invalid: data={cfg.name} has {available} {kind} "
                              f"images; use at most that, or null for all of them")
        if cfg.name == "imagefolder" and not source(cfg.name).fits_in_memory(cfg):
            raise ConfigError(f"data.{split}_subset={size} is invalid for a streamed image folder (larger than "
                              f"data.in_memory_max_gb={cfg.in_memory_max_gb}); subsets are for in-memory data: "
                              f"pick fewer classes with data.num_classes, or raise data.in_memory_max_gb")
    if cfg.train_subset is not None:
        shape = replace(shape, train_size=cfg.train_subset)
    if cfg.test_subset is not None:
        shape = replace(shape, test_size=cfg.test_subset)
    return shape


def build(cfg, batch_size: int, device: torch.device, *, seed: int, channels_last: bool = False,
          shard: tuple[int, int] = (0, 1)) -> Loaders:
    """The train loader (global batches of exactly `batch_size`) and the test loader, on `device`; `shard`
    (rank, ranks): this rank's part of each (see DeviceLoader)."""
    src = source(cfg.name)
    shape = describe(cfg)
    memory.check_on_device(shape, batch_size, device)
    padding = cfg.crop_padding if cfg.crop_padding is not None else max(1, shape.size // 8)
    if cfg.name == "imagefolder" and not src.fits_in_memory(cfg):
        return _streamed(cfg, batch_size, device, seed, channels_last, shape, shard)
    data = subset(src.load(cfg), cfg.train_subset, cfg.test_subset, cfg.subset_seed)
    normalize = Normalize(*data.mean_std(), device, channels_last)

    def loader(images, labels, train):
        return DeviceLoader(images.to(device), labels.to(device), batch_size if train else cfg.eval_batch,
                            normalize, train=train, augment=cfg.augment, padding=padding, flip=cfg.flip,
                            seed=seed, shard=shard)

    return Loaders(loader(data.train_images, data.train_labels, True),
                   loader(data.test_images, data.test_labels, False), shape, data.classes)


def _streamed(cfg, batch_size, device, seed, channels_last, shape, shard) -> Loaders:
    from normlab.data.imagefolder import select
    from normlab.data.stream_loader import StreamLoader

    selection = select(cfg)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD, device, channels_last)  # too large to measure up front
    common = dict(device=device, normalize=normalize, seed=seed, workers=cfg.loader_workers, shard=shard)
    return Loaders(StreamLoader(selection, "train", batch_size, train=True, **common),
                   StreamLoader(selection, selection.test_split, cfg.eval_batch, train=False, **common),
                   shape, selection.classes)


__all__ = ["SOURCES", "DataShape", "DeviceLoader", "Loaders", "build", "describe"]
