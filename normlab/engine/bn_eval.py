"""BN at test time: which statistics normalize the test images (``eval.bn_stats``).

- ``ema``: the running averages BN kept during training (torch's default).
- ``precise``: population statistics recomputed before the evaluation from ``eval.precise_images`` training
  images, passed through the model in train mode at training's own N and W, and averaged over every worker
  and step: each statistic is what training's BN saw (PreciseBN, Wu & Johnson 2021, Sec. 3).
- ``batch``: each test batch normalized by its own statistics in chunks of N, as in training: no running
  statistics at all (train/test consistent). The test set is read in one fixed random order, the same for every
  run, so this is deterministic; in its stored order (class by class) each chunk would hold one class, and its
  statistics would carry the label.

fvcore's ``update_bn_stats`` is the usual tool for ``precise``; it is not used because it pools each step's
whole-batch mean and variance, which for per-worker BN drops the spread of the W workers' means from the
variance. Here each layer's own update does the averaging (``momentum=None``: a cumulative average of the
per-worker statistics). Either way the running statistics that training keeps are restored afterwards, in
place (a CUDA graph keeps reading the same tensors), so training goes on as if nothing had happened.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from normlab.engine import dist
from normlab.engine.loop import evaluate
from normlab.engine.step import autocast
from normlab.norms import PerWorkerBatchNorm2d
from normlab.norms.per_worker_bn import ChunkStatisticsBatchNorm2d

MODES = ("ema", "precise", "batch")


def bn_layers(model: nn.Module) -> list[PerWorkerBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, PerWorkerBatchNorm2d) and m.track_running_stats]


@contextlib.contextmanager
def kept_running_stats(model: nn.Module) -> Iterator[None]:
    """Every BN buffer (running mean, var, step count) and momentum as it was, on the way out."""
    layers = bn_layers(model)
    saved = [([b.detach().clone() for b in layer.buffers(recurse=False)], layer.momentum) for layer in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, (buffers, momentum) in zip(layers, saved):
                for buffer, value in zip(layer.buffers(recurse=False), buffers):
                    buffer.copy_(value)
                layer.momentum = momentum


@torch.no_grad()
def precise_statistics(model: nn.Module, batches: Iterable, steps: int, *, device: torch.device,
                       precision: str) -> None:
    """Replace each BN layer's running statistics by their average over `steps` training batches, in train mode."""
    layers = bn_layers(model)
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average of the per-worker statistics
    was_training = model.training
    model.train()
    for images, _labels in itertools.islice(batches, steps):
        with autocast(device, precision):
            model(images)
    dist.average_buffers(model)  # each rank averaged its own workers; all of them, as one process would
    model.train(was_training)


def with_batch_statistics(model: nn.Module, per_worker: int) -> nn.Module:
    """A copy of `model` in eval mode whose BN layers normalize each chunk of `per_worker` images by that chunk's
    statistics (:class:`ChunkStatisticsBatchNorm2d`); `model` itself is left as it was."""
    if model in bn_layers(model):
        return ChunkStatisticsBatchNorm2d(model, per_worker).eval()
    chunked = copy.deepcopy(model).eval()
    layers = set(bn_layers(chunked))
    for parent in list(chunked.modules()):
        for name, child in list(parent.named_children()):
            if child in layers:
                setattr(parent, name, ChunkStatisticsBatchNorm2d(child, per_worker))
    return chunked


def precise_steps(images: int, total_batch: int) -> int:
    return max(1, math.ceil(images / total_batch))


def evaluate_bn(mode: str, model: nn.Module, test_batches: Iterable, *, train_batches: Iterable | None,
                per_worker: int, total_batch: int, precise_images: int, device: torch.device,
                precision: str, ema_model: nn.Module | None = None) -> dict[str, float]:
    """Evaluate with BN statistics of `mode`; the running statistics are left as they were.

    `ema_model` is what ``ema`` evaluates (the compiled forward, if any); the other modes use the eager `model`.
    """
    if mode == "ema":
        return evaluate(model if ema_model is None else ema_model, test_batches, device=device, precision=precision)
    if mode == "precise":
        with kept_running_stats(model):
            precise_statistics(model, train_batches, precise_steps(precise_images, total_batch), device=device,
                               precision=precision)
            return evaluate(model, test_batches, device=device, precision=precision)
    return evaluate(with_batch_statistics(model, per_worker), test_batches, device=device, precision=precision)
