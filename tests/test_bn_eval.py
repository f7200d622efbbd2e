"""BN at test time: EMA, precise (recomputed population statistics) and batch statistics, against slow references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import ConfigError
from normlab.validation import validate
from normlab.engine import bn_eval
from normlab.train import train
from normlab.norms import build_norm
from normlab.records import read_metrics
from tests.conftest import compose_config

CPU = torch.device("cpu")


def batches(n_steps: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 4, 4, generator=g) * (1 + step) + step, torch.zeros(batch, dtype=torch.long))
            for step in range(n_steps)]


@pytest.mark.parametrize("workers", [1, 4])
def test_precise_statistics_are_the_average_of_what_each_worker_saw(workers):
    """The mean over every step and worker of the worker's mean and unbiased variance, computed directly."""
    layer = build_norm("bn", 3, workers=workers).double()
    data = [(x.double(), y) for x, y in batches(5, 8)]
    bn_eval.precise_statistics(layer, data, steps=5, device=CPU, precision="fp32")
    chunks = [chunk for x, _ in data for chunk in x.chunk(workers)]
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3), correction=1) for c in chunks]).mean(0)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)


@pytest.mark.parametrize("per_worker, batch", [(2, 8), (4, 10), (3, 3)])
def test_batch_statistics_normalize_each_chunk_of_n_test_images_by_its_own(per_worker, batch):
    layer = build_norm("bn", 3, workers=5).double().eval()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    x = torch.randn(batch, 3, 4, 4, dtype=torch.float64) * 2 + 1
    y = bn_eval.with_batch_statistics(layer, per_worker)(x)
    expected = torch.cat([F.batch_norm(c, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
                          for c in x.split(per_worker)])
    torch.testing.assert_close(y, expected)


def test_a_model_with_batch_statistics_is_a_copy_and_the_model_is_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), build_norm("bn", 4, workers=3), nn.ReLU(), build_norm("bn", 4, workers=3))
    model.train()
    chunked = bn_eval.with_batch_statistics(model, 2)
    assert [type(m).__name__ for m in model] == ["Conv2d", "PerWorkerBatchNorm2d", "ReLU", "PerWorkerBatchNorm2d"]
    assert model.training and not chunked.training
    assert [type(m).__name__ for m in chunked][1::2] == ["ChunkStatisticsBatchNorm2d"] * 2
    x = torch.randn(6, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)  # train mode, 3 workers: each chunk of 2 images by its own statistics
    torch.testing.assert_close(chunked(x), expected)


def test_precise_and_batch_evaluations_leave_the_running_statistics_exactly_as_they_were():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), build_norm("bn", 3, workers=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(4, 3, 4, 4))
    for x, _ in batches(3, 4):
        model.train()(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test = batches(2, 6, seed=1)
    for mode in bn_eval.MODES:
        bn_eval.evaluate_bn(mode, model, test, train_batches=iter(batches(4, 4, seed=2)), per_worker=2, total_batch=4,
                            precise_images=16, device=CPU, precision="fp32")
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), mode
    assert model[1].momentum == 0.1


def test_comparing_every_mode_changes_no_number_of_training(tiny, tmp_path):
    """compare_bn_stats adds columns; the training and the EMA evaluation are bit for bit those of a plain run."""
    common = ("trainer.epochs=2", "eval.precise_images=16")
    plain = train(tiny(*common), tmp_path / "plain")
    compared = train(tiny(*common, "eval.compare_bn_stats=true"), tmp_path / "compared")
    rows = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("plain", "compared")}
    for a, b in zip(rows["plain"], rows["compared"]):
        assert (a["train_loss"], a["val_error"], a["val_loss"]) == (b["train_loss"], b["val_error"], b["val_loss"])
        assert b["val_error_ema"] == b["val_error"] and {"val_error_precise", "val_error_batch"} <= set(b)
    assert compared["val_error_median5"] == plain["val_error_median5"]
    assert {"val_error_ema_median5", "val_error_precise_median5", "val_error_batch_median5"} <= set(compared)
    assert compared["bn_stats"] == "ema"


def test_the_chosen_mode_is_val_error(tiny, tmp_path):
    summary = train(tiny("eval.bn_stats=batch", "eval.compare_bn_stats=true"), tmp_path)
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert row["val_error"] == row["val_error_batch"] and summary["bn_stats"] == "batch"


def test_a_batch_independent_norm_gives_the_same_error_in_every_mode(tiny, tmp_path):
    summary = train(tiny("norm=gn", "norm.groups=8", "eval.compare_bn_stats=true", "eval.precise_images=16"), tmp_path)
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert row["val_error_ema"] == row["val_error_precise"] == row["val_error_batch"]
    assert summary["bn_stats"] == "n/a (batch-independent norm)"


@pytest.mark.parametrize("overrides, message", [
    (["norm=brn", "eval.bn_stats=precise"], r"eval\.bn_stats='precise' is invalid: .*built for norm=bn"),
    (["eval.precise_images=0"], r"eval\.precise_images=0 is invalid"),
])
def test_bad_eval_options_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


@pytest.mark.slow
def test_every_mode_works_with_a_compiled_model(tiny, tmp_path):
    """EMA evaluates the compiled forward; precise and batch the eager model that shares its parameters."""
    summary = train(tiny("trainer.compile=true", "eval.compare_bn_stats=true", "eval.precise_images=16",
                         "trainer.precision=fp32"), tmp_path)
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert summary["status"] == "done" and summary["compiled"] is True
    assert row["val_error"] == row["val_error_ema"] and {"val_error_precise", "val_error_batch"} <= set(row)
