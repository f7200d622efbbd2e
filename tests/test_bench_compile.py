"""scripts/bench_train.py --compile-vs-eager on a tiny CPU grid: one row per cell and memory format, its ratio the
two throughputs' (the sizes that mean something are the lead's to run: see the script's docstring)."""

from __future__ import annotations

import csv
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_train  # noqa: E402

pytestmark = pytest.mark.slow


def test_compile_vs_eager_prints_and_writes_the_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NORMLAB_CIFAR10_JPEG", str(tmp_path / "absent.zip"))  # synthetic images of CIFAR's shape
    out = tmp_path / "compile.csv"
    assert bench_train.main(["--compile-vs-eager", "--models", "resnet8", "--norms", "bn", "--per-worker", "2",
                             "--workers", "2", "--steps", "1", "--warmup", "1", "--rounds", "1", "--images", "32",
                             "--device", "cpu", "--channels-last", "true", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-worker BN and GN run on:" in printed
    (row,) = csv.DictReader(out.open())
    assert (row["norm"], row["per_worker"], row["workers"], row["memory_format"]) == ("bn", "2", "2", "channels_last")
    eager, compiled = float(row["eager_img_s"]), float(row["compiled_img_s"])
    assert eager > 0 and compiled > 0 and float(row["compiled_over_eager"]) == pytest.approx(compiled / eager, rel=2e-3)
    (line,) = [line.split() for line in printed.splitlines() if line.startswith("resnet8")]
    assert line[:5] == ["resnet8", "bn", "2", "2", "channels_last"]
