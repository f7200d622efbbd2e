"""Large image folders, streamed: a DataLoader with workers decodes and augments on the CPU.

Training images get the ImageNet recipe (random resized crop and flip); evaluation images are
resized to 1/0.875 of the size and center-cropped. Batches arrive as uint8 and are normalized on
the device, as the in-memory loader does. The order is seeded by (seed, epoch), and a rank of a job on
several processes takes its slice of each global batch, as there. Each training image's crop and flip are
seeded by its place in the epoch, not by the DataLoader worker that happens to decode it: an epoch is the
same for any number of workers, and one started at step k (a run resumed mid-epoch) gives the whole
epoch's batches from k on.
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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """Image `key`, or (image, seed): its random transform drawn from that seed, torch's own RNG untouched."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        image = self.selection.tree.open_image(self.names[i])
        if seed is None:
            return self.transform(image), self.labels[i]
        with torch.random.fork_rng(devices=[]):  # the CPU generator restored after; CUDA's never touched
            torch.default_generator.manual_seed(seed)
            return self.transform(image), self.labels[i]


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

    def batches(self, epoch: int, shuffled: bool) -> list[list]:
        """This rank's image keys, batch by batch: its slice of each global training batch, as (index, seed of
        its augmentation) pairs, or its share of the test batches (every ranks-th) as indices."""
        n, size = self.num_samples, self.batch_size
        order, seeds = list(range(n)), None
        if self.train or shuffled:  # a shuffled test pass: one fixed order, the same for every run
            generator = epoch_generator(*((self.seed, epoch) if self.train else (0, 0)), torch.device("cpu"))
            order = torch.randperm(n, generator=generator).tolist()
            if self.train:
                seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        rank, ranks = self.shard
        if not self.train:
            return [order[start:start + size] for start in range(rank * size, n, ranks * size)]
        per_rank = size // ranks
        first = [step * size + rank * per_rank for step in range(len(self))]  # each batch's first position
        return [[(order[p], seeds[p]) for p in range(f, f + per_rank)] for f in first]

    def epoch(self, epoch: int, *, shuffled: bool = False, start: int = 0) -> Iterator[Batch]:
        """The epoch's batches from step `start` on (training; a run resumed mid-epoch), as DeviceLoader.epoch."""
        loader = DataLoader(self.dataset, batch_sampler=self.batches(epoch, shuffled)[start:],
                            num_workers=self.workers, pin_memory=self.device.type == "cuda", persistent_workers=False,
                            generator=epoch_generator(self.seed, epoch, torch.device("cpu")))  # not torch's own
        try:
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True)
                yield self.normalize(images), labels.to(self.device, non_blocking=True)
        except ConfigError as e:  # a refused image, raised in a worker: DataLoader adds the worker's traceback
            raise ConfigError(str(e).rstrip().rsplit("ConfigError: ", 1)[-1]) from None
