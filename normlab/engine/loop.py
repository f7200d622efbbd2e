"""One training epoch and one evaluation pass.

Losses and counts accumulate on the device and are read once at the end: no host-device sync per
step. The progress callback, when given, may read them every few steps. In a job on several processes
each rank sees its share of the images, and the read sums the ranks' totals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normlab.engine import dist, preemption
from normlab.engine.step import TrainStep, autocast


@dataclass
class Totals:
    """Sums over an epoch, kept on the device."""

    loss: torch.Tensor
    errors: torch.Tensor
    errors_top5: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "Totals":
        z = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z())

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        with torch.no_grad():
            self.loss += loss_sum.detach().double()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            self.errors += (top[:, 0] != labels).sum()
            self.errors_top5 += (~(top == labels[:, None]).any(dim=1)).sum()
        self.count += len(labels)

    def read(self) -> dict[str, float]:
        """Mean loss and top-1/top-5 error in %, over every rank's images, read from the device once."""
        sums = dist.all_reduce_sum(torch.stack([self.loss, self.errors, self.errors_top5,
                                                self.loss.new_tensor(float(self.count))]))
        loss, errors, errors5, count = sums.tolist()
        n = max(1.0, count)
        return {"loss": loss / n, "error": 100.0 * errors / n, "error_top5": 100.0 * errors5 / n}


def train_epoch(step: TrainStep, batches, schedule, *,
                progress: Callable[[int, Totals], None] | None = None) -> tuple[dict[str, float], float]:
    """Train on every batch once with `step` (eager or a CUDA graph). Returns the epoch's mean metrics and
    its wall time in seconds."""
    step.model.train()
    totals = Totals.zeros(step.device)
    start = time.perf_counter()
    for index, (images, labels) in enumerate(batches, 1):
        logits, loss = step(images, labels)
        schedule.step()
        totals.add(logits, labels, loss * len(labels))
        if progress is not None:
            progress(index, totals)
        if preemption.requested():  # the scheduler wants the job back: the trainer records no partial epoch
            break
    metrics = totals.read()  # the one sync of the epoch
    return metrics, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, device: torch.device, precision: str) -> dict[str, float]:
    model.eval()
    totals = Totals.zeros(device)
    for images, labels in batches:
        with autocast(device, precision):
            logits = model(images)
        totals.add(logits, labels, F.cross_entropy(logits.float(), labels, reduction="sum"))
    return totals.read()
