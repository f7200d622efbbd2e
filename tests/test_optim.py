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


def test_schedule_sets_float_and_tensor_lrs_alike_and_fills_tensors_in_place():
    from normlab.engine.optim import Schedule

    cfg = compose_config(["schedule=step"])
    factor = LRFactor(cfg.schedule, 2, 10)  # ÷10 at steps 6, 12, 18
    plain = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    lr = torch.tensor(0.4)
    tensor = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr}], lr=0.4)
    schedules = Schedule(plain, factor), Schedule(tensor, factor)
    for step in range(20):
        expected = 0.4 * factor(step)
        assert plain.param_groups[0]["lr"] == pytest.approx(expected)
        assert tensor.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(expected)  # the same tensor
        for schedule in schedules:
            schedule.step()
    resumed = Schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4), factor)
    resumed.load_state_dict(schedules[0].state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * factor(20))


@pytest.mark.parametrize("capturable", [False, True])
def test_normlab_sgd_steps_like_torch_sgd_written_out_per_parameter(capturable):
    """normlab's SGD (fused; with `capturable`, reading a tensor lr) against torch's for-loop SGD, on the CPU."""
    cfg = compose_config([])
    results = []
    for ours in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet8", 10, "bn")
        if ours:
            optimizer = build_optimizer(model, cfg.optim, 0.1, capturable=capturable)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=cfg.optim.momentum,
                                        weight_decay=cfg.optim.weight_decay, foreach=False)
        for _ in range(3):
            loss = model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append(model.state_dict())
    assert optimizer.param_groups[0]["fused"] and isinstance(optimizer.param_groups[0]["lr"], torch.Tensor) == capturable
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, msg=key)


def test_a_cuda_graph_step_refuses_a_float_lr_before_touching_cuda():
    from normlab.engine.step import CudaGraphStep, TrainStep

    model = build_model("resnet8", 10, "bn")
    optimizer = build_optimizer(model, compose_config([]).optim, 0.1)
    with pytest.raises(ValueError, match="capturable=True"):
        CudaGraphStep(TrainStep(model, optimizer, device=torch.device("cpu"), precision="fp32",
                                autocast_cache=False))


def test_resuming_keeps_the_tensor_lr_a_cuda_graph_reads(tmp_path):
    from normlab.engine.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
    from normlab.records import RunDir
    from normlab.engine.optim import build_schedule

    cfg = compose_config([])
    model = build_model("resnet8", 10, "bn")
    optimizer = build_optimizer(model, cfg.optim, 0.1, capturable=True)
    schedule = build_schedule(optimizer, cfg.schedule, 10, 10)
    for _ in range(35):  # past the first ÷10 at step 30
        schedule.step()
    save_checkpoint(RunDir(tmp_path), model=model, optimizer=optimizer, schedule=schedule, epoch=3,
                    metrics=[{"epoch": e} for e in (1, 2, 3)], wall_time_s=0.0)
    fresh = build_optimizer(model, cfg.optim, 0.1, capturable=True)
    lr = fresh.param_groups[0]["lr"]
    restore_checkpoint(read_checkpoint(RunDir(tmp_path).checkpoint), model=model, optimizer=fresh, schedule=build_schedule(fresh, cfg.schedule, 10, 10))
    assert fresh.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01)


def test_resuming_keeps_how_this_run_steps(tmp_path):
    """A checkpoint written by an unfused optimizer (another version, another device) resumes fused."""
    from normlab.engine.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
    from normlab.records import RunDir
    from normlab.engine.optim import build_schedule

    cfg = compose_config([])
    model = build_model("resnet8", 10, "bn")
    old = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    save_checkpoint(RunDir(tmp_path), model=model, optimizer=old, schedule=build_schedule(old, cfg.schedule, 10, 10),
                    epoch=1, metrics=[{"epoch": 1}], wall_time_s=0.0)
    fresh = build_optimizer(model, cfg.optim, 0.1)
    restore_checkpoint(read_checkpoint(RunDir(tmp_path).checkpoint), model=model, optimizer=fresh, schedule=build_schedule(fresh, cfg.schedule, 10, 10))
    assert fresh.param_groups[0]["fused"] is True and fresh.param_groups[0]["foreach"] is None
