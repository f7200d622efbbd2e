"""The optimizer's parameter groups and the learning-rate schedules, against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.engine.optim import LRFactor, build_optimizer
from normlab.models import build_model
from tests.conftest import compose_config


def factors(schedule: str, steps_per_epoch: int, epochs: int, *overrides: str) -> list[float]:
    cfg = compose_config([f"schedule={schedule}", *overrides])
    f = LRFactor(cfg.schedule, steps_per_epoch, epochs)
    return [f(step) for step in range(steps_per_epoch * epochs)]


def test_step_schedule_divides_by_ten_at_30_60_90_percent():
    got = factors("step", 10, 10)
    expected = [1.0] * 30 + [0.1] * 30 + [0.01] * 30 + [0.001] * 10
    assert got == pytest.approx(expected)


def test_cosine_schedule_follows_half_a_cosine():
    got = factors("cosine", 5, 4)
    assert got == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 20)) for s in range(20)])


def test_linear_warmup_then_the_schedule():
    got = factors("step", 10, 10, "schedule.warmup_epochs=2", "schedule.warmup_start_factor=0.1")
    assert got[:20] == pytest.approx([0.1 + 0.9 * s / 20 for s in range(20)])
    assert got[20:30] == pytest.approx([1.0] * 10) and got[30] == pytest.approx(0.1)
    cosine = factors("cosine", 10, 10, "schedule.warmup_epochs=1")
    assert cosine[10] == pytest.approx(1.0) and cosine[-1] < 0.01


def test_weight_decay_on_everything_by_default_and_optionally_not_on_norms_and_biases():
    model = build_model("resnet8", 10, "bn")
    cfg = compose_config([])
    groups = build_optimizer(model, cfg.optim, 0.1).param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4 and groups[0]["momentum"] == 0.9
    cfg = compose_config(["optim.decay_norm_and_bias=false", "optim.nesterov=true"])
    decay, no_decay = build_optimizer(model, cfg.optim, 0.1).param_groups
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == norm_params | {id(model.fc.bias)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4 and decay["nesterov"]
