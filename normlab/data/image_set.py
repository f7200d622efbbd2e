"""What a data source describes (its shape, before anything is read) and loads (the whole set, uint8, in memory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataShape:
    channels: int
    size: int
    num_classes: int
    train_size: int | None = None  # training images, where known without reading them
    test_size: int | None = None  # test images, likewise


@dataclass
class ImageSet:
    """A whole data set in memory: uint8 images (N, C, H, W) and int64 labels, both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images, in [0, 1] units."""
        channels = self.train_images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        squares, count = torch.zeros(channels, dtype=torch.float64), 0
        for chunk in self.train_images.split(4096):  # bounded memory for large sets
            values = chunk.transpose(0, 1).reshape(channels, -1).double()
            total += values.sum(1)
            squares += values.square().sum(1)
            count += values.shape[1]
        mean = total / count
        std = ((squares / count - mean.square()) * count / max(1, count - 1)).clamp_min(0).sqrt()
        return (mean / 255.0).float(), (std / 255.0).clamp_min(1e-3).float()
