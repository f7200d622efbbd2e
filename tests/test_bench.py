"""scripts/bench_train.py on a tiny CPU grid: the table, the CSV a sweep of benchmarks is read from, and a
reference loop that is the standard one (plain torch norms, a literal batch of N·W)."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_train  # noqa: E402

REQUIRED = ["model", "norm", "per_worker", "workers", "total_batch", "device", "normlab_img_s", "reference_img_s",
            "ratio"]


def test_the_benchmark_prints_the_table_and_writes_the_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NORMLAB_CIFAR10_JPEG", str(tmp_path / "absent.zip"))  # synthetic images of CIFAR's shape
    out = tmp_path / "bench.csv"
    assert bench_train.main(["--models", "resnet8", "--norms", "bn", "gn", "--per-worker", "2", "--workers", "4",
                             "--steps", "2", "--warmup", "1", "--rounds", "1", "--images", "64",
                             "--device", "cpu", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "data: synthetic (64 images)" in printed and "reference" in printed
    rows = list(csv.DictReader(out.open()))
    assert set(REQUIRED) <= set(rows[0]) and [r["norm"] for r in rows] == ["bn", "gn"]
    for row in rows:
        assert (row["per_worker"], row["workers"], row["total_batch"]) == ("2", "4", "8")
        ours, ref = float(row["normlab_img_s"]), float(row["reference_img_s"])
        assert ours > 0 and ref > 0 and float(row["ratio"]) == pytest.approx(ours / ref, rel=2e-3)
    table = [line.split() for line in printed.splitlines() if line.startswith("resnet8")]
    assert [line[:5] for line in table] == [["resnet8", "bn", "2", "4", "8"], ["resnet8", "gn", "2", "4", "8"]]


def test_the_reference_loop_is_the_standard_one():
    images, labels = np.zeros((32, 32, 32, 3), dtype=np.uint8), np.arange(32) % 10
    ref = bench_train.ReferenceLoop("resnet8", "bn", 16, images, labels, torch.device("cpu"), 0)
    norms = [m for m in ref.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)  # torch's own BN, not per-worker BN
    batch, _ = ref.next_batch()
    assert batch.shape == (16, 3, 32, 32) and batch.dtype == torch.float32  # a literal N·W batch, fp32
