"""One training epoch and one evaluation pass.

Losses and counts accumulate on the device and are read once at the end: no host-device sync per
step. The progress callback, when given, may read them every few steps. In a job on several processes
each rank sees its share of the images, and the read sums the ranks' totals. An epoch that a preemption
signal stops ends as a ``StoppedEpoch`` (steps done, totals, time), which the checkpoint keeps and from
which the epoch goes on when the run resumes. On several processes the ranks agree on the step to stop
at: every ``AGREE_EVERY`` steps they ask each other whether one was signalled (a collective with a host
sync, so not every step).
"""

from __future__ import annotations

import math
import reprlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from normlab.engine import dist, preemption
from normlab.engine.step import TrainStep, autocast


AGREE_EVERY = 8  # steps between the ranks' checks for a preemption signal (several processes only)


@dataclass(frozen=True)
class StoppedEpoch:
    """An epoch stopped after `steps` steps: its sums and image count so far, and its training time."""

    steps: int
    loss: float
    errors: float
    errors_top5: float
    count: int
    time_s: float

    def state(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "StoppedEpoch":
        """Read back from a checkpoint (data from disk): ValueError unless every field is there with its type."""
        values = {}
        for field in fields(cls):
            value = state.get(field.name) if isinstance(state, dict) else None
            values[field.name] = checked_number(field.name, value, int if field.type == "int" else float)
        return cls(**values)


def checked_number(name: str, value, kind: type, owner: str = "the stopped epoch's") -> int | float:
    """A checkpoint's number read from disk (a stopped epoch's field by default), as `kind`: a finite,
    non-negative number, or ValueError naming it. The loss alone may be NaN or infinite: an epoch that diverged
    before the signal, as the whole run saw it."""
    bad = ValueError(f"{owner} {name} is {reprlib.repr(value)}: not a finite, non-negative {kind.__name__}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    try:
        number = float(value)
    except OverflowError:
        raise bad from None
    if name == "loss":
        return number
    if not math.isfinite(number) or number < 0 or (kind is int and number != int(number)):
        raise bad
    return int(number) if kind is int else number


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

    @classmethod
    def resumed(cls, stopped: StoppedEpoch, device: torch.device) -> "Totals":
        """The stopped epoch's totals (every rank's, summed) on rank 0, zeros on the others: read() sums them."""
        if not dist.current().main:
            return cls.zeros(device)
        t = lambda x: torch.tensor(x, device=device, dtype=torch.float64)  # noqa: E731
        return cls(t(stopped.loss), t(stopped.errors), t(stopped.errors_top5), stopped.count)

    def summed(self) -> list[float]:
        """[loss, errors, errors_top5, count], each summed over every rank's images, read from the device once."""
        return dist.all_reduce_sum(torch.stack([self.loss, self.errors, self.errors_top5,
                                                self.loss.new_tensor(float(self.count))])).tolist()

    def stopped(self, steps: int, time_s: float) -> StoppedEpoch:
        """Where the epoch stopped, with every rank's totals summed (the same on every rank)."""
        loss, errors, errors5, count = self.summed()
        return StoppedEpoch(steps, loss, errors, errors5, int(count), time_s)

    def read(self) -> dict[str, float]:
        """Mean loss and top-1/top-5 error in %, over every rank's images, read from the device once."""
        loss, errors, errors5, count = self.summed()
        n = max(1.0, count)
        return {"loss": loss / n, "error": 100.0 * errors / n, "error_top5": 100.0 * errors5 / n}


@dataclass(frozen=True)
class EpochResult:
    """A whole epoch's mean metrics and wall time, or, stopped by a preemption signal, where it stopped."""

    metrics: dict[str, float] | None
    time_s: float
    stopped: StoppedEpoch | None = None


def train_epoch(step: TrainStep, batches, schedule, *, steps: int, resume: StoppedEpoch | None = None,
                progress: Callable[[int, Totals], None] | None = None) -> EpochResult:
    """Train on every batch once with `step` (eager or a CUDA graph); `steps`: the epoch's, `batches` included.
    `resume`: the epoch stopped there before, and `batches` begin at its next step. A preemption signal stops
    the epoch after the step it is in."""
    step.model.train()
    totals = Totals.resumed(resume, step.device) if resume else Totals.zeros(step.device)
    done, before = (resume.steps, resume.time_s) if resume else (0, 0.0)
    start = time.perf_counter()
    for done, (images, labels) in enumerate(batches, done + 1):
        logits, loss = step(images, labels)
        schedule.step()
        totals.add(logits, labels, loss * len(labels))
        if progress is not None:
            progress(done, totals)
        if stop_after(done, steps, step.device):  # the scheduler wants the job back
            elapsed = before + time.perf_counter() - start
            return EpochResult(None, elapsed, totals.stopped(done, elapsed))
    metrics = totals.read()  # the one sync of the epoch
    return EpochResult(metrics, before + time.perf_counter() - start)


def stop_after(done: int, steps: int, device: torch.device) -> bool:
    """Whether a preemption signal stops the epoch after step `done` of `steps`: alone, as soon as it came; on
    several processes, at the next step every rank checks (every AGREE_EVERY, and the epoch's last), so that they
    all stop at the same one, before the evaluation and the epoch's checkpoint."""
    if dist.current().size == 1:
        return preemption.requested()
    return (done % AGREE_EVERY == 0 or done == steps) and dist.any_rank(preemption.requested(), device)


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, device: torch.device, precision: str) -> dict[str, float]:
    model.eval()
    totals = Totals.zeros(device)
    for images, labels in batches:
        with autocast(device, precision):
            logits = model(images)
        totals.add(logits, labels, F.cross_entropy(logits.float(), labels, reduction="sum"))
    return totals.read()
