"""W&B in the report: the end-of-sweep summary run (offline) and reading runs back through the API (faked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from normlab.analysis.wandb_source import collect_wandb
from tests.conftest import REPO, read_wandb_records, record_key
from tests.test_report import fake_run


class FakeRun(SimpleNamespace):
    pass


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.asked = []

    def runs(self, path):
        self.asked.append(path)
        return self._runs


def test_report_reads_runs_back_from_a_fake_wandb_api():
    config = {"name": "demo", "seed": 1, "model": {"name": "resnet20"}, "norm": {"name": "gn", "groups": 8},
              "batch": {"per_worker": 4, "workers": 8}, "optim": {"base_lr": 0.1, "base_batch": 256, "lr": None},
              "data": {"name": "digits"}, "trainer": {"epochs": 3}}
    finished = FakeRun(path=["me", "normlab", "a1"], state="finished", job_type="bn", config={},
                       summary={"status": "done", "norm": "bn", "per_worker_batch": 32, "seed": 0, "val_error": 5.0,
                                "val_error_median5": 5.5, "_runtime": 3})
    crashed = FakeRun(path=["me", "normlab", "b2"], state="crashed", job_type="gn", summary={"_runtime": 1},
                      config={k: {"value": v, "desc": None} for k, v in config.items()})
    summary_run = FakeRun(path=["me", "normlab", "c3"], state="finished", job_type="summary", summary={}, config={})
    api = FakeApi([finished, crashed, summary_run])
    runs = collect_wandb("me/normlab", api=api)
    assert api.asked == ["me/normlab"]
    assert runs["run_dir"].tolist() == ["wandb:me/normlab/a1", "wandb:me/normlab/b2"]
    assert runs["status"].tolist() == ["done", "failed"]
    assert runs.loc[0, "val_error_median5"] == 5.5 and runs.loc[0, "per_worker_batch"] == 32
    assert runs.loc[1, "norm"] == "gn" and runs.loc[1, "groups"] == 8 and runs.loc[1, "total_batch"] == 32


def test_sweep_summary_callback_logs_a_table_and_a_plot_offline(tmp_path):
    pytest.importorskip("wandb")
    from normlab.loggers.wandb_sweep import WandbSweepSummary

    for seed in (0, 1):
        for n, bn_error, gn_error in ((32, 10.0, 11.0), (2, 20.0, 11.5)):
            fake_run(tmp_path, f"bn{n}s{seed}", "bn", n, seed, bn_error + seed)
            fake_run(tmp_path, f"gn{n}s{seed}", "gn", n, seed, gn_error + seed, groups=32)
    config = OmegaConf.create({"name": "wbsweep", "logger": {"name": "wandb", "project": "normlab", "entity": None,
                                                              "mode": "offline"},
                               "hydra": {"sweep": {"dir": str(tmp_path)}}})
    WandbSweepSummary().on_multirun_end(config)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged, run_info = set(), None
    for record in read_wandb_records(next(runs[0].glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            logged |= {record_key(item) for item in record.history.item}
        elif kind == "run":
            run_info = record.run
    assert run_info.run_group == "wbsweep" and run_info.job_type == "summary"
    assert any(k.startswith("runs_table") for k in logged)
    assert any(k.startswith("error_vs_batch_size") for k in logged)
    tables = list(runs[0].rglob("runs_table*.table.json"))
    assert tables, "the table's file is written beside the run"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["norm", "groups", "per_worker_batch", "seed", "val_error", "val_error_median5"]
    assert len(table["data"]) == 8


def test_sweep_summary_callback_is_silent_without_wandb_logger(tmp_path):
    from normlab.loggers.wandb_sweep import WandbSweepSummary

    config = OmegaConf.create({"name": "x", "logger": {"name": "none"}, "hydra": {"sweep": {"dir": str(tmp_path)}}})
    WandbSweepSummary().on_multirun_end(config)
    assert not (tmp_path / "wandb").exists()


def run_report(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normlab.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_normlab_report_attaches_its_report_to_a_wandb_run_offline(tmp_path):
    pytest.importorskip("wandb")
    for n, error in ((32, 10.0), (2, 20.0)):
        fake_run(tmp_path / "sweep", f"bn{n}", "bn", n, 0, error)
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("WANDB_SERVICE", None)
    result = run_report(str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--attach", "me/normlab/abc123",
                        env=env)
    assert result.returncode == 0, result.stderr
    assert "attached to W&B run me/normlab/abc123" in result.stdout
    (run_dir,) = (tmp_path / "report" / "wandb").glob("offline-run-*-abc123")
    records = read_wandb_records(next(run_dir.glob("*.wandb")))
    logged = {record_key(i) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert "report/fig_batch_size/_type" in logged
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, a.name) for a in artifacts] == [("report", "report-abc123")]


@pytest.mark.parametrize("bad", ["me/normlab", "me//abc", "a/b/c/d"])
def test_an_attach_path_that_is_not_entity_project_run_is_refused_before_any_work(tmp_path, bad):
    result = run_report(str(tmp_path), "--attach", bad)
    assert result.returncode == 2 and f"--attach {bad!r}: expected ENTITY/PROJECT/RUN_ID" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "report").exists()
