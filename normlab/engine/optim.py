"""SGD with the paper's settings, and the learning-rate schedules, stepped once per iteration.

The learning rate itself comes from the linear scaling rule (``config.effective``):
``base_lr · N·W / base_batch``, 0.1 at 32 images × 8 workers in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """One group with decay; with ``decay_norm_and_bias=False``, 1-D parameters (norm γ/β and the like,
    biases) go in a second group without it."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.SGD:
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


class LRFactor:
    """The lr multiplier at iteration `step`: linear warm-up, then step (÷10 at fractions of training) or cosine."""

    def __init__(self, cfg, steps_per_epoch: int, epochs: int) -> None:
        self.name, self.total = cfg.name, steps_per_epoch * epochs
        self.milestones = [round(m * self.total) for m in cfg.milestones]
        self.gamma, self.min_factor = cfg.gamma, cfg.min_lr_factor
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.warmup_start = cfg.warmup_start_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup
        if self.name == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, steps_per_epoch, epochs))
