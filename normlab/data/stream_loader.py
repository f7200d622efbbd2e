"""Large image folders, streamed: a DataLoader with workers decodes and augments on the CPU.

Training images get the ImageNet recipe (random resized crop and flip); evaluation images are
resized to 1/0.875 of the size and center-cropped. Batches arrive as uint8 and are normalized on
the device, as the in-memory loader does. The order is seeded by (seed, epoch), as there.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2

from normlab.data.device_loader import Batch, epoch_generator
from normlab.data.imagefolder import Selection


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
                 normalize, *, train: bool, seed: int = 0, workers: int = 4) -> None:
        self.dataset = ImageFiles(selection, split, train)
        self.batch_size, self.device, self.normalize = batch_size, device, normalize
        self.train, self.seed, self.workers = train, seed, workers

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size if self.train else -(-self.num_samples // self.batch_size)

    def epoch(self, epoch: int, *, shuffled: bool = False) -> Iterator[Batch]:
        sampler = None
        if self.train or shuffled:  # a shuffled test pass: one fixed order, the same for every run
            seed, index = (self.seed, epoch) if self.train else (0, 0)
            sampler = RandomSampler(self.dataset, generator=epoch_generator(seed, index, torch.device("cpu")))
        loader = DataLoader(self.dataset, self.batch_size, sampler=sampler, drop_last=self.train,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)
