"""SGD with the paper's settings, and the learning-rate schedules, stepped once per iteration.

The learning rate itself comes from the job's batch plan (``protocol.BatchPlan.lr``, the linear scaling rule
``base_lr · N·W / base_batch`` unless ``optim.lr`` is set).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from normlab.settings import OptimConfig, ScheduleConfig, ScheduleName


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """One group with decay; with ``decay_norm_and_bias=False``, 1-D parameters (norm γ/β and the like,
    biases) go in a second group without it."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float, *, capturable: bool = False) -> torch.optim.SGD:
    """SGD with momentum, fused on the CPU and CUDA: one kernel per step instead of three ops per parameter.

    `capturable`: the lr lives in a device tensor and the fused kernel reads it there, so a captured CUDA
    graph sees every change the schedule makes (a float would be baked into the graph)."""
    groups = parameter_groups(model, optim.weight_decay, optim.decay_norm_and_bias)
    device = next(model.parameters()).device
    if capturable:
        for group in groups:
            group["lr"] = torch.tensor(lr, device=device)
    fused = device.type in ("cpu", "cuda") or None  # None: torch's own choice elsewhere
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=fused)


class LRFactor:
    """The lr multiplier at iteration `step`: linear warm-up, then step (÷10 at fractions of training) or cosine."""

    def __init__(self, schedule: ScheduleConfig, steps_per_epoch: int, epochs: int) -> None:
        self.name, self.total = schedule.name, steps_per_epoch * epochs
        self.milestones = [round(m * self.total) for m in schedule.milestones]
        self.gamma, self.min_factor = schedule.gamma, schedule.min_lr_factor
        self.warmup = round(schedule.warmup_epochs * steps_per_epoch)
        self.warmup_start = schedule.warmup_start_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup
        if self.name == ScheduleName.step:
            return self.gamma ** sum(step >= m for m in self.milestones)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Schedule:
    """Sets every group's lr to its base lr × factor(step) after each step; checkpointed as the step count.

    A tensor lr is filled in place (no host sync, and a captured CUDA graph keeps reading the same
    tensor), which torch's own schedulers only do in recent releases.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor) -> None:
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        factor = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * factor)
            else:
                group["lr"] = base * factor

    def lr_at(self, step: int) -> float:
        """The first group's lr during iteration `step` (0-based): an epoch's lr is that of its first step."""
        return self.base_lrs[0] * self.factor(step)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.base_lrs = state["last_step"], list(state["base_lrs"])
        self._apply()


def build_schedule(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, steps_per_epoch: int,
                   epochs: int) -> Schedule:
    return Schedule(optimizer, LRFactor(schedule, steps_per_epoch, epochs))
