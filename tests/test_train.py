"""Training runs end to end: every norm, records on disk, divergence, resume after a kill, skip-done, W&B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from normlab.errors import ConfigError
from normlab.engine.rerun import changed_keys
from normlab.train import train
from normlab.norms import NORMS
from normlab.records import METRIC_KEYS, read_metrics
from tests.conftest import REPO, TINY, compose_config, read_wandb_records, record_key, run_cli

TIMING_KEYS = {"images_per_sec", "epoch_time_s"}


@pytest.mark.parametrize("norm", NORMS)
def test_one_epoch_synthetic_run_for_every_norm(norm, tiny, tmp_path):
    summary = train(tiny(f"norm={norm}"), tmp_path)
    assert summary["status"] == "done" and summary["norm"] == norm
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 1 and set(METRIC_KEYS) <= set(rows[0])
    assert rows[0]["val_error"] is not None
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert (tmp_path / "config.yaml").exists()


def test_summary_holds_the_identifying_config_and_the_papers_metric(tiny, tmp_path):
    summary = train(tiny("norm=gn", "norm.groups=8", "trainer.epochs=7", "seed=3"), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    errors = [r["val_error"] for r in rows]
    assert summary["val_error"] == errors[-1]
    assert summary["val_error_median5"] == sorted(errors[-5:])[2]
    assert summary["best_val_error"] == min(errors)
    assert {k: summary[k] for k in ("model", "norm", "groups", "group_size", "per_worker_batch", "workers",
                                    "total_batch", "data", "seed", "experiment", "epochs")} == {
        "model": "resnet8", "norm": "gn", "groups": 8, "group_size": None, "per_worker_batch": 4, "workers": 2,
        "total_batch": 8, "data": "synthetic", "seed": 3, "experiment": "train", "epochs": 7}
    assert summary["lr"] == pytest.approx(0.1 * 8 / 256)
    assert summary["normlab_version"] and "git_commit" in summary
    assert [r["lr"] for r in rows][0] == pytest.approx(summary["lr"])


def test_lr_steps_down_tenfold_at_30_60_90_percent(tiny, tmp_path):
    train(tiny("trainer.epochs=10"), tmp_path)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    base = 0.1 * 8 / 256
    expected = [base] * 3 + [base / 10] * 3 + [base / 100] * 3 + [base / 1000]
    assert lrs == pytest.approx(expected)


def test_eval_every_k_epochs_and_after_the_last(tiny, tmp_path):
    train(tiny("trainer.epochs=5", "trainer.eval_every=2"), tmp_path)
    evaluated = [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["val_error"] is not None]
    assert evaluated == [2, 4, 5]


def test_top5_error_is_logged_for_more_than_10_classes(tiny, tmp_path):
    train(tiny("data.num_classes=20"), tmp_path)
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert 0 <= row["val_error_top5"] <= row["val_error"]


def test_a_nan_loss_ends_the_run_as_diverged(tiny, tmp_path):
    summary = train(tiny("norm=none", "optim.lr=1e12", "trainer.epochs=5"), tmp_path)
    assert summary["status"] == "diverged" and summary["diverged_epoch"] == 1
    assert summary["epochs"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    assert train(tiny("norm=none", "optim.lr=1e12", "trainer.epochs=5"), tmp_path) is None  # final: not rerun


def test_a_done_run_is_skipped_and_force_reruns_it(tiny, tmp_path):
    first = train(tiny(), tmp_path)
    assert train(tiny(), tmp_path) is None
    assert json.loads((tmp_path / "summary.json").read_text()) == first
    again = train(tiny("trainer.force=true"), tmp_path)
    assert again["status"] == "done" and len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_a_run_folder_holding_another_config_is_refused_not_skipped(tiny, tmp_path):
    first = train(tiny(), tmp_path)
    with pytest.raises(ConfigError) as e:  # an edited experiment, a reused sweep folder: not a skip
        train(tiny("optim.base_lr=0.05", "schedule.milestones=[0.5]"), tmp_path)
    assert "optim.base_lr was 0.1, now 0.05" in str(e.value) and "schedule.milestones was" in str(e.value)
    assert "trainer.force=true" in str(e.value)
    assert json.loads((tmp_path / "summary.json").read_text()) == first  # the finished run is untouched
    assert train(tiny("trainer.threads=1", "logger=none", "name=renamed", "data.max_image_pixels=1000"),
                 tmp_path) is None  # runtime keys: a skip


def test_an_interrupted_run_of_another_config_is_refused_and_force_starts_it_over(tiny, tmp_path):
    train(tiny("trainer.epochs=2"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))  # killed, checkpoint kept
    assert (tmp_path / "checkpoint.pt").exists()
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds a run \(interrupted\) of another config: "
                                          r"optim.base_lr was 0.1, now 0.05"):
        train(tiny("trainer.epochs=2", "optim.base_lr=0.05"), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == saved and (tmp_path / "checkpoint.pt").exists()
    forced = train(tiny("trainer.epochs=2", "optim.base_lr=0.05", "trainer.force=true"), tmp_path)
    lrs = [row["lr"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    assert forced["status"] == "done" and forced["lr"] == pytest.approx(0.05 * 8 / 256)  # not resumed from 0.1's
    assert lrs[0] == pytest.approx(0.05 * 8 / 256) and len(lrs) == 2


def test_changed_keys_compares_nested_configs_key_by_key():
    saved = {"optim": {"lr": 0.1, "nesterov": False}, "trainer": {"threads": 2}, "tags": [1], "norm": {"eps": 1e-5}}
    current = {"optim": {"lr": 0.2}, "trainer": {"threads": 1, "cuda_graph": "auto", "compile": True},
               "tags": [1, 2], "norm": {"eps": 1e-05}}
    defaults = {"trainer": {"cuda_graph": "auto", "compile": False}}
    # threads is a runtime key; nesterov was dropped; cuda_graph and compile are new keys, read at their defaults
    assert changed_keys(saved, current, defaults) == [("optim.lr", 0.1, 0.2), ("tags", [1], [1, 2]),
                                                      ("trainer.compile", False, True)]


def test_keys_left_out_of_run_folder_names_are_runtime_keys():
    """Runs that differ only in those keys share a folder, so they must be able to pick each other up."""
    from omegaconf import OmegaConf

    from normlab.protocol import is_runtime_key

    excluded = OmegaConf.load(REPO / "conf" / "train.yaml").hydra.job.config.override_dirname.exclude_keys
    config_keys = [key for key in excluded if not key.startswith("hydra.")]
    assert all(is_runtime_key(key) for key in config_keys), config_keys


def test_digits_smoke_learns(tmp_path):
    cfg = compose_config(["model=resnet8", "model.width=16", "norm=gn", "norm.groups=8", "batch.per_worker=16",
                          "batch.workers=2", "trainer.epochs=8", "schedule=cosine", "optim.lr=0.1",
                          "trainer.progress=false"])
    summary = train(cfg, tmp_path)
    assert summary["train_size"] == 1437 and summary["test_size"] == 360
    assert summary["val_error"] < 15.0  # chance is 90%


def test_the_summary_records_the_subset_sizes(tiny, tmp_path):
    summary = train(tiny("data.train_subset=40", "data.test_subset=20"), tmp_path)
    assert (summary["train_size"], summary["test_size"], summary["steps_per_epoch"]) == (40, 20, 5)  # 40 // (4·2)


def test_results_equal_after_a_kill_and_resume(tmp_path):
    """Kill a run with SIGKILL after two checkpoints; rerun it; the metrics equal an uninterrupted run's."""
    args = ["data=synthetic", "data.num_train=768", "data.size=16", "model=resnet8", "batch.per_worker=8",
            "batch.workers=2", "trainer.epochs=5", "trainer.progress=false", "trainer.threads=1"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "normlab.train", *args, f"hydra.run.dir={killed}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(killed / "metrics.jsonl")) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.json").exists()

    resumed = run_cli(*args, f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr + resumed.stdout
    assert run_cli(*args, f"hydra.run.dir={clean}").returncode == 0

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert comparable(read_metrics(killed / "metrics.jsonl")) == comparable(read_metrics(clean / "metrics.jsonl"))
    assert len(read_metrics(clean / "metrics.jsonl")) == 5
    done = [json.loads((d / "summary.json").read_text()) for d in (killed, clean)]
    assert done[0]["val_error"] == done[1]["val_error"] and done[0]["status"] == "done"


def test_skip_done_on_the_cli(tmp_path):
    first = run_cli(*TINY, f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr
    second = run_cli(*TINY, f"hydra.run.dir={tmp_path}")
    assert second.returncode == 0 and "summary.json says done" in second.stderr + second.stdout


def test_multirun_goes_on_past_an_invalid_job(tmp_path):
    result = run_cli("-m", *TINY, "model.width=16", "norm=gn", "norm.groups=8,32",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1, result.stderr  # the valid job ran; the sweep says one did not
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert [s["groups"] for s in summaries.values()] == [8]
    assert "invalid job, skipped" in result.stderr + result.stdout


def test_wandb_offline_run_records_the_logged_keys(tiny, tmp_path):
    pytest.importorskip("wandb")
    summary = train(tiny("logger=wandb", "logger.mode=offline", "trainer.epochs=2", "name=wbtest"), tmp_path)
    assert summary["status"] == "done"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history, summary_keys, config_keys = [], set(), set()
    for record in read_wandb_records(next(runs[0].glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({record_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary_keys |= {record_key(item) for item in record.summary.update}
        elif kind == "run":
            config_keys |= {record_key(item) for item in record.run.config.update}
            assert (record.run.run_group, record.run.job_type) == ("wbtest", "bn")
            assert record.run.display_name == "bn-N4xW2-s0"
    assert len(history) == 2 and {"epoch", "train_loss", "val_error", "lr", "images_per_sec"} <= set(history[0])
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"status", "val_error", "val_error_median5", "best_val_error"} <= summary_keys
    assert {"norm", "batch", "model", "data"} <= config_keys


def test_wandb_failure_never_stops_training(tiny, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("wandb is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    summary = train(tiny("logger=wandb"), tmp_path)
    assert summary["status"] == "done"


def test_the_demo_sweep_runs_its_whole_grid(tmp_path):
    result = run_cli("-m", "experiment=demo", "trainer.epochs=1", "trainer.progress=false",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    grid = sorted((s["norm"], s["per_worker_batch"], s["workers"], s["experiment"]) for s in summaries)
    assert grid == sorted((n, b, 8, "demo") for n in ("bn", "gn") for b in (32, 8, 2))
    assert all(s["status"] == "done" and s["data"] == "digits" for s in summaries)


def test_a_sweep_names_the_jobs_it_will_skip_before_it_starts(tmp_path):
    result = run_cli("-m", *TINY, "norm=gn", "norm.groups=32,null", "norm.group_size=null,64",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1, result.stderr  # two jobs were skipped as invalid
    out = result.stdout + result.stderr
    assert "sweep: 2 of 4 jobs will be skipped" in out
    assert "skip norm.groups=32 norm.group_size=64: " in out and "give either groups or group_size" in out
    assert "skip norm.groups=null norm.group_size=64: " in out and "does not divide num_channels=32" in out
    assert out.index("will be skipped") < out.index("Launching 4 jobs")
    assert len(list(tmp_path.glob("*/summary.json"))) == 2


# ---------------------------------------------------------------- fixed total batch: the invariance

FIXED_TOTAL = ("batch.total=8", "batch.workers=null", "trainer.epochs=2", "data.num_train=64")


@pytest.mark.parametrize("norm", ["gn", "ln", "in"])
def test_under_a_fixed_total_batch_a_batch_independent_norm_trains_identically_at_every_n(norm, tiny, tmp_path):
    """Same steps, lr and data order for every N; only BN's statistics see N, so GN, LN and IN must not."""
    runs = {n: train(tiny(f"norm={norm}", f"batch.per_worker={n}", *FIXED_TOTAL), tmp_path / f"N{n}") for n in (8, 2)}
    assert runs[8]["protocol"] == runs[2]["protocol"] == "fixed_total"
    assert (runs[8]["workers"], runs[2]["workers"]) == (1, 4) and runs[8]["lr"] == runs[2]["lr"]
    metrics = {n: [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                   for row in read_metrics(tmp_path / f"N{n}" / "metrics.jsonl")] for n in runs}
    assert metrics[8] == metrics[2]


def test_under_a_fixed_total_batch_bn_sees_the_normalization_batch(tiny, tmp_path):
    for n in (8, 2):
        train(tiny("norm=bn", f"batch.per_worker={n}", *FIXED_TOTAL), tmp_path / f"N{n}")
    losses = {n: [row["train_loss"] for row in read_metrics(tmp_path / f"N{n}" / "metrics.jsonl")] for n in (8, 2)}
    assert losses[8] != losses[2]


def test_a_job_drops_a_wandb_service_another_process_started(monkeypatch):
    """WANDB_SERVICE names the process that started the service: a job keeps its own, forgets an inherited one."""
    from normlab.loggers.wandb import SERVICE_TOKEN, drop_inherited_service

    monkeypatch.setenv(SERVICE_TOKEN, f"3-{os.getpid()}-unix-/tmp/wandb-own/socket")
    drop_inherited_service()
    assert os.environ[SERVICE_TOKEN].startswith(f"3-{os.getpid()}-")
    monkeypatch.setenv(SERVICE_TOKEN, f"3-{os.getppid()}-tcp-localhost-4242")
    drop_inherited_service()
    assert SERVICE_TOKEN not in os.environ


def test_the_summary_names_the_data_config_so_a_published_run_folder_needs_no_hydra_notes(tmp_path):
    """data.name says the source kind (imagefolder); the data config's name (cifar10_jpeg) only Hydra knows, so
    the summary records it, and a run folder published without .hydra/ still says which data set it read."""
    import shutil

    from normlab.analysis.collect import collect

    run = tmp_path / "run"
    assert run_cli(*TINY, f"hydra.run.dir={run}").returncode == 0
    assert json.loads((run / "summary.json").read_text())["dataset"] == "synthetic"
    shutil.rmtree(run / ".hydra")
    assert collect([run])["dataset"].tolist() == ["synthetic"]
