"""Large image folders, streamed: a DataLoader with workers decodes and augments on the CPU.

Training images get the ImageNet recipe (random resized crop and flip); evaluation images are
resized to 1/0.875 of the size and center-cropped. Batches arrive as uint8 and are normalized on
the device, as the in-memory loader does. The order is seeded by (seed, epoch), and a rank of a job on
several processes takes its slice of each global batch, as there (the crops come from the DataLoader
workers' own generators).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from normlab.data.device_loader import Batch, epoch_generator
from normlab.data.imagefolder import Selection
from normlab.errors import ConfigError


class ImageFiles(Dataset):
    def __init__(self, selection: Selection, split: str, train: bool) -> None:
        self.selection = selection
        self.names, self.labels = selection.files(split)
        size = selection.size
        crop = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if train else \
            [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
        self.transform = v2.Compose([v2.PILToTensor(), *crop])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.selection.tree.open_image(self.names[i])), self.labels[i]


class StreamLoader:
    """The same interface as :class:`DeviceLoader`, over a DataLoader."""

    def __init__(self, selection: Selection, split: str, batch_size: int, device: torch.device,
                 normalize, *, train: bool, seed: int = 0, workers: int = 4, shard: tuple[int, int] = (0, 1)) -> None:
        self.dataset = ImageFiles(selection, split, train)
        self.batch_size, self.device, self.normalize = batch_size, device, normalize
        self.train, self.seed, self.workers, self.shard = train, seed, workers, shard

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size if self.train else -(-self.num_samples // self.batch_size)

    def batches(self, epoch: int, shuffled: bool) -> list[list[int]]:
        """This rank's image indices, batch by batch: its slice of each global training batch, or its share
        of the test batches (every ranks-th)."""
        n, size = self.num_samples, self.batch_size
        order = range(n)
        if self.train or shuffled:  # a shuffled test pass: one fixed order, the same for every run
            seed, index = (self.seed, epoch) if self.train else (0, 0)
            order = torch.randperm(n, generator=epoch_generator(seed, index, torch.device("cpu"))).tolist()
        rank, ranks = self.shard
        if not self.train:
            return [list(order[start:start + size]) for start in range(rank * size, n, ranks * size)]
        per_rank = size // ranks
        return [list(order[step * size + rank * per_rank:step * size + (rank + 1) * per_rank])
                for step in range(len(self))]

    def epoch(self, epoch: int, *, shuffled: bool = False) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_sampler=self.batches(epoch, shuffled), num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        try:
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True)
                yield self.normalize(images), labels.to(self.device, non_blocking=True)
        except ConfigError as e:  # a refused image, raised in a worker: DataLoader adds the worker's traceback
            raise ConfigError(str(e).rstrip().rsplit("ConfigError: ", 1)[-1]) from None
