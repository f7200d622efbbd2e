"""Batches of an in-memory image set, kept as uint8 on the training device and augmented there.

A small-batch sweep takes thousands of steps per epoch; a DataLoader of PIL images spends most of
each one in Python. Here the whole set sits on the device, a batch is one index, and random crop
(with zero padding) and horizontal flip are drawn per sample but applied to the batch at once.
Every epoch's order and augmentation come from a generator seeded by (seed, epoch), so an epoch
is the same whether or not the run was interrupted before it, or in it: an epoch started at step k
replays the first k steps' draws (without touching an image) and goes on as the whole epoch would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


def draw_crop_flip(total: int, padding: int, flip: bool, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One batch's random draws: crop offsets (2, total, 1) and flips (total,), in the order the batch uses them."""
    offsets = torch.randint(0, 2 * padding + 1, (2, total, 1), generator=generator, device=device) if padding else None
    flipped = torch.rand(total, generator=generator, device=device) < 0.5 if flip else None
    return offsets, flipped


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator,
                     share: slice = slice(None), total: int | None = None) -> torch.Tensor:
    """Per sample: a random crop of the zero-padded image, at its original size, and (if `flip`) a
    horizontal flip with p=0.5. `images` may be one rank's `share` of a batch of `total` images: the draws are
    made for all `total` and the share's are applied, so it gets exactly what a single process would give it."""
    _, _, h, w = images.shape
    device, total = images.device, images.shape[0] if total is None else total
    offsets, flipped = draw_crop_flip(total, padding, flip, generator, device)
    if padding:
        offsets = offsets[:, share]
        b = images.shape[0]
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = offsets[0] + torch.arange(h, device=device)  # (B, H)
        cols = offsets[1] + torch.arange(w, device=device)  # (B, W)
        batch = torch.arange(b, device=device)[:, None, None]
        images = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B,H,W,C)→(B,C,H,W)
    if not flip:
        return images
    return torch.where(flipped[share][:, None, None, None], images.flip(3), images)


class Normalize:
    """uint8 (B, C, H, W) on the device → float, ``(x/255 − mean)/std`` per channel, in one fused op."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, device: torch.device, channels_last: bool = False):
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)


class DeviceLoader:
    """Iterate (images, labels) batches: float, normalized, on the device.

    Training loaders shuffle, augment and drop the last partial batch (every step sees exactly
    N·W images, so the workers split evenly); evaluation loaders do none of these.

    `shard` = (rank, ranks): one rank of a job on several processes. Training: every rank draws the same
    global batch and augmentation, and yields its own consecutive slice (its workers' images). Evaluation:
    every ranks-th batch. Alone, (0, 1): everything.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalize: Normalize, *,
                 train: bool, augment: bool = True, padding: int = 0, flip: bool = True, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.padding, self.flip = padding, flip
        self.normalize = normalize
        self.shard = shard

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch(self, epoch: int, *, shuffled: bool = False, start: int = 0) -> Iterator[Batch]:
        """Training: the epoch's seeded order and augmentation, from step `start` on (a run resumed mid-epoch).
        Test: in order, or (`shuffled`) in one fixed random order, the same for every run: batches that mix
        the classes, as training's do."""
        rank, ranks = self.shard
        if not self.train:
            order = torch.randperm(self.num_samples, generator=epoch_generator(0, 0, self.images.device),
                                   device=self.images.device) if shuffled else None
            for start in range(rank * self.batch_size, self.num_samples, ranks * self.batch_size):
                index = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
                yield self.normalize(self.images[index]), self.labels[index]
            return
        generator = epoch_generator(self.seed, epoch, self.images.device)
        order = torch.randperm(self.num_samples, generator=generator, device=self.images.device)
        per_rank = self.batch_size // ranks
        share = slice(rank * per_rank, (rank + 1) * per_rank)
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            if step < start:  # done before the run stopped: its draws only, so the generator is where it was
                if self.augment:
                    draw_crop_flip(len(index), self.padding, self.flip, generator, self.images.device)
                continue
            images = self.images[index[share]]
            if self.augment:
                images = random_crop_flip(images, self.padding, self.flip, generator, share, len(index))
            yield self.normalize(images), self.labels[index[share]]
