"""Seeded, class-stratified subsets of an in-memory data set (``data.train_subset``, ``data.test_subset``).

Each class keeps its share of the set, so a 10k subset of CIFAR-10 has 1,000 images per class; the
subset depends on ``data.subset_seed`` alone, so every run of a sweep trains on the same images.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from normlab.data.image_set import ImageSet


def stratified_indices(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """`size` sorted indices into `labels`, each class at its share (largest remainders get the rest)."""
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * size / len(labels)
    quota = exact.floor().long()
    remainder = size - int(quota.sum())
    if remainder:  # ties go to the lower class index: stable, seed-independent
        order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
        quota[order[:remainder]] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        members = (labels == cls).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:take]])
    return torch.cat(picked).sort().values


def subset(data: ImageSet, train_size: int | None, test_size: int | None, seed: int) -> ImageSet:
    """`data` with its splits cut to the given sizes (None keeps a split whole)."""
    if train_size is not None and train_size < len(data.train_labels):
        keep = stratified_indices(data.train_labels, train_size, seed)
        data = replace(data, train_images=data.train_images[keep], train_labels=data.train_labels[keep])
    if test_size is not None and test_size < len(data.test_labels):
        keep = stratified_indices(data.test_labels, test_size, seed)
        data = replace(data, test_images=data.test_images[keep], test_labels=data.test_labels[keep])
    return data
