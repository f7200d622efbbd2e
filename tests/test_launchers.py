"""Launchers: joblib and submitit_local run a sweep's jobs side by side, each with its share of the machine
(CPU threads, a GPU of its own); the sweep-progress callback logs a line per finished job."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from normlab import machine_share, sweep
from normlab.gpu_locks import GPU_LOCK_DIR, claim_gpu
from normlab.sweep_jobs import count_jobs, swept_keys
from normlab.validation import resolve_run, validate
from normlab.records import write_json
from normlab.train import CONFIG_DIR
from tests.conftest import TINY, compose_config, run_cli

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}


def joblib(n_jobs: int) -> dict:
    return {"_target_": JOBLIB, "n_jobs": n_jobs, "prefer": "processes"}


def submitit(kind: str, **params) -> dict:
    return {"_target_": SUBMITIT + kind, "cpus_per_task": None, "gpus_per_node": None, **params}


def _hydra_config(overrides: list[str]):
    """The composed config with its hydra node (launcher, sweeper, overrides)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def summaries(sweep_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")), key=lambda s: s["norm"])


def job_configs(sweep_dir: Path) -> list:
    return [OmegaConf.load(p) for p in sweep_dir.glob("*/config.yaml")]


# --- launchers end to end -------------------------------------------------------------------------------

def test_joblib_runs_two_jobs_side_by_side_each_with_its_threads_budget(tmp_path):
    result = run_cli("-m", *TINY, "norm=bn,gn", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     f"hydra.sweep.dir={tmp_path}", timeout=120)
    assert result.returncode == 0, result.stderr
    done = summaries(tmp_path)
    assert [(s["norm"], s["status"]) for s in done] == [("bn", "done"), ("gn", "done")]
    budget = max(1, machine_share.cpu_count() // 2)
    assert [c.trainer.threads for c in job_configs(tmp_path)] == [budget, budget]
    out = result.stdout + result.stderr
    assert f"shares the machine: trainer.threads={budget}" in out
    assert "1 of 2 finished · done" in out and "2 of 2 finished · done" in out  # logged by the workers
    assert "sweep finished: 2 of 2 jobs reported · 2 done" in out


def test_submitit_local_runs_two_jobs(tmp_path):
    result = run_cli("-m", *TINY, "norm=bn,gn", "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                     "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={tmp_path}", timeout=180)
    assert result.returncode == 0, result.stderr
    assert [(s["norm"], s["status"]) for s in summaries(tmp_path)] == [("bn", "done"), ("gn", "done")]
    assert [c.trainer.threads for c in job_configs(tmp_path)] == [1, 1]  # cpus_per_task
    assert "sweep finished: 2 of 2 jobs reported · 2 done" in result.stdout + result.stderr
    job_logs = "".join(p.read_text() for p in tmp_path.glob("*/train.log"))  # the lines of submitit's jobs
    assert "of 2 finished · done" in job_logs


def test_the_slurm_config_composes_with_requeue_and_overrides():
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"]
    launcher = OmegaConf.to_container(_hydra_config(overrides).hydra.launcher)
    assert launcher["_target_"] == SUBMITIT + "SlurmLauncher"
    assert (launcher["partition"], launcher["timeout_min"], launcher["gpus_per_node"]) == ("gpu", 30, 1)
    assert launcher["max_num_timeout"] > 0 and launcher["additional_parameters"] == {"requeue": True}
    assert {"cpus_per_task", "mem_gb", "array_parallelism", "signal_delay_s"} <= set(launcher)


EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
LAUNCHERS = {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_local": "LocalLauncher",
             "submitit_slurm": "SlurmLauncher", "slurm": "SlurmLauncher"}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_launcher(experiment, launcher):
    """An experiment says what the study is; how it is launched is the command line's choice."""
    cfg = _hydra_config([f"experiment={experiment}", f"hydra/launcher={launcher}"])
    resolved = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert resolved["_target_"].endswith(LAUNCHERS[launcher])
    assert cfg.hydra.sweeper.params, "an experiment is a sweep"


def test_the_published_studies_keep_their_launcher_on_the_command_line():
    cfg = _hydra_config(["experiment=gn_norm_batch_small", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert (cfg.hydra.launcher._target_, cfg.hydra.launcher.n_jobs) == (JOBLIB, 2)
    assert "n_jobs" not in _hydra_config(["experiment=gn_norm_batch_small"]).hydra.launcher  # basic by default


def test_cfg_hydra_prints_an_experiment_with_the_slurm_launcher():
    result = run_cli("experiment=gn_norm_batch_small", "hydra/launcher=submitit_slurm", "--cfg", "hydra",
                     "--package", "hydra.launcher", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "SlurmLauncher" in result.stdout and "n_jobs" not in result.stdout


# --- each job's share of the machine ---------------------------------------------------------------------

@pytest.mark.parametrize("launcher, cpus, expected", [
    (joblib(2), 8, 4),
    (joblib(3), 8, 2),
    (joblib(16), 8, 1),                              # more jobs than CPUs: one thread each
    (joblib(-1), 8, 1),                              # joblib's -1: one job per CPU
    (joblib(-2), 8, 1),                              # all CPUs but one: 7 jobs
    (joblib(-7), 8, 4),                              # 2 jobs
    (joblib(1), 8, None),                            # one job at a time: torch's default
    (BASIC, 8, None),
    (None, 8, None),
    (submitit("SlurmLauncher", cpus_per_task=6), 64, 6),
    (submitit("LocalLauncher", cpus_per_task=2), 8, 2),
    (submitit("SlurmLauncher"), 64, None),
])
def test_threads_budget(launcher, cpus, expected):
    assert machine_share.threads_budget(launcher, cpus) == expected


def test_share_machine_budgets_null_threads_and_keeps_a_chosen_count(monkeypatch, tmp_path):
    monkeypatch.setattr(machine_share, "cpu_count", lambda: 8)
    with machine_share.share_machine(None, "auto", launcher=joblib(4), job_num=0, sweep_dir=tmp_path) as share:
        assert share == machine_share.MachineShare(threads=2, device=None)
    with machine_share.share_machine(3, "auto", launcher=joblib(4), job_num=0, sweep_dir=tmp_path) as share:
        assert share.threads is None  # the job's own trainer.threads=3 stands
    with machine_share.share_machine(None, "auto", launcher=BASIC, job_num=0, sweep_dir=tmp_path) as share:
        assert share == machine_share.MachineShare()
    cfg = compose_config(TINY)
    spec = resolve_run(cfg, validate(cfg), threads=2)  # the share goes into the spec and config.yaml, not the config
    assert spec.runtime.threads == 2 and spec.recorded_config["trainer"]["threads"] == 2
    assert cfg.trainer.threads is None


@pytest.mark.parametrize("device, launcher, n_gpus, slots", [
    ("auto", joblib(4), 4, 1),
    ("auto", joblib(8), 4, 2),
    ("auto", joblib(3), 4, 1),
    ("auto", joblib(1), 4, 0),                       # one job at a time: torch's default device
    ("auto", joblib(4), 1, 0),                       # one GPU: every job on it
    ("cuda:1", joblib(4), 4, 0),                     # the user chose
    ("auto", BASIC, 4, 0),
    ("auto", submitit("LocalLauncher", gpus_per_node=4), 4, 1),
    ("auto", submitit("SlurmLauncher", gpus_per_node=2), 2, 0),  # a SLURM job sees only its own GPUs
])
def test_gpu_slots(device, launcher, n_gpus, slots):
    assert machine_share.gpu_slots(device, launcher, n_gpus, cpus=16) == slots


def test_submitit_local_without_gpus_per_node_is_flagged(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what submitit_local sets when gpus_per_node is unset
    assert machine_share.hides_gpus(submitit("LocalLauncher"), gpu_present=True)
    assert not machine_share.hides_gpus(submitit("LocalLauncher"), gpu_present=False)
    assert not machine_share.hides_gpus(joblib(2), gpu_present=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert not machine_share.hides_gpus(submitit("LocalLauncher", gpus_per_node=2), gpu_present=True)


def test_parallel_jobs_each_claim_a_free_gpu(tmp_path):
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(claim_gpu(tmp_path, n_gpus=2, job_num=1))
        # job 3 would take GPU 1 by its number; GPU 1 is busy, so it takes GPU 0
        second = stack.enter_context(claim_gpu(tmp_path, n_gpus=2, job_num=3))
        assert (first, second) == (1, 0)
    with claim_gpu(tmp_path, n_gpus=2, job_num=1) as again:  # released at the end of the block
        assert again == 1
    with contextlib.ExitStack() as stack:  # two jobs per GPU: every GPU's first slot before a second
        assert [stack.enter_context(claim_gpu(tmp_path, 2, slots=2, job_num=0)) for _ in range(4)] == [0, 1, 0, 1]


def test_share_machine_gives_each_parallel_job_its_own_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(machine_share, "cpu_count", lambda: 8)
    with machine_share.share_machine(None, "auto", launcher=joblib(2), job_num=0, sweep_dir=tmp_path) as first:
        with machine_share.share_machine(None, "auto", launcher=joblib(2), job_num=1, sweep_dir=tmp_path) as second:
            assert [first.device, second.device] == ["cuda:0", "cuda:1"]
            assert [first.threads, second.threads] == [4, 4]
    with machine_share.share_machine(None, "auto", launcher=joblib(2), job_num=3, sweep_dir=tmp_path) as third:
        assert third.device == "cuda:1"
    assert sorted(p.name for p in (tmp_path / GPU_LOCK_DIR).iterdir()) == ["gpu0.0.lock", "gpu1.0.lock"]


# --- sweep progress --------------------------------------------------------------------------------------

def test_progress_lines_with_the_basic_launcher_and_a_rerun(tmp_path):
    args = ["-m", *TINY, "model.width=16", "norm=gn", "norm.groups=8,32", f"hydra.sweep.dir={tmp_path}"]
    first = run_cli(*args, timeout=120)
    assert first.returncode == 1, first.stderr  # a job did not finish
    out = first.stdout + first.stderr
    assert "sweep: 1 of 2 finished · done · val error " in out and "% · norm.groups=8" in out
    assert "sweep: 2 of 2 finished · invalid · val error n/a · norm.groups=32" in out
    assert "sweep finished: 2 of 2 jobs reported · 1 done, 1 invalid · best val error" in out
    assert "· 1 not finished: exit code 1" in out
    again = run_cli(*args, timeout=120)  # the done job is skipped, and says so
    assert "sweep: 1 of 2 finished · done (already done, skipped)" in again.stdout + again.stderr


def test_count_jobs_reads_the_command_line_and_the_sweeper_params():
    demo = _hydra_config(["experiment=demo"])
    assert count_jobs(demo) == 6  # norm: bn,gn × batch.per_worker: 32,8,2
    with_seeds = OmegaConf.merge(demo, {"hydra": {"overrides": {"task": ["experiment=demo", "seed=0,1"]}}})
    assert count_jobs(with_seeds) == 12
    assert swept_keys(with_seeds) == ["norm", "batch.per_worker", "seed"]
    other = OmegaConf.merge(demo, {"hydra": {"sweeper": {"_target_": "some.OtherSweeper"}}})
    assert count_jobs(other) is None


def test_job_overrides_match_hydras_basic_sweeper():
    """The expansion uses Hydra's public override grammar; Hydra's own (private) sweeper is the reference."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from normlab.sweep_jobs import job_overrides, sweep_arguments

    demo = _hydra_config(["experiment=demo"])
    config = OmegaConf.merge(demo, {"hydra": {"overrides": {"task": [
        "experiment=demo", "seed=0,1", "norm=gn", "batch.per_worker=range(2,5)", "seed=3,4,5"]}}})
    parsed = OverridesParser.create().parse_overrides(sweep_arguments(config))
    expected = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert job_overrides(config) == expected and len(expected) == 3 * 3  # norm=gn and the last seed=... win


def _job(tmp_path: Path, num: int, summary: dict | None, mode=RunMode.MULTIRUN):
    run_dir = tmp_path / f"job{num}"
    run_dir.mkdir()
    if summary is not None:
        write_json(run_dir / "summary.json", summary)
    return OmegaConf.create({"hydra": {
        "mode": mode, "runtime": {"output_dir": str(run_dir)}, "sweep": {"dir": str(tmp_path)},
        "job": {"num": num, "override_dirname": f"norm=bn,seed={num}"},
        "overrides": {"task": ["norm=bn", f"seed={num}"]}}})


def _returned(value=None, error: Exception | None = None) -> JobReturn:
    ret = JobReturn()
    ret.status, ret._return_value = (JobStatus.FAILED, error) if error else (JobStatus.COMPLETED, value)
    return ret


def test_progress_callback_counts_jobs_reported_from_other_processes(tmp_path, caplog):
    start = OmegaConf.merge(_hydra_config(["experiment=demo"]), {"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback = sweep.SweepProgress()
    callback.on_multirun_start(config=start)
    assert callback.total == 6
    import pickle

    in_worker = pickle.loads(pickle.dumps(callback))  # what joblib and submitit do with it
    caplog.set_level(logging.INFO, logger="normlab.sweep")
    in_worker.on_job_end(config=_job(tmp_path, 0, {"status": "done", "val_error": 12.5}), job_return=_returned("done"))
    callback.on_job_end(config=_job(tmp_path, 1, {"status": "diverged", "val_error": None}),
                        job_return=_returned("diverged"))
    callback.on_job_end(config=_job(tmp_path, 2, None), job_return=_returned(error=RuntimeError("boom")))
    callback.on_job_end(config=_job(tmp_path, 3, {"status": "done"}, mode=RunMode.RUN), job_return=_returned("done"))
    callback.on_multirun_end(config=start)
    lines = [r.getMessage() for r in caplog.records if r.name == "normlab.sweep"]
    assert lines == [
        "sweep: 1 of 6 finished · done · val error 12.50% · norm=bn · sweep ETA 00:00",  # at 5 jobs a second
        "sweep: 2 of 6 finished · diverged · val error n/a · norm=bn · sweep ETA 00:00",
        "sweep: 3 of 6 finished · failed (RuntimeError) · val error n/a · norm=bn · sweep ETA 00:00",
        f"sweep finished: 3 of 6 jobs reported · 1 done, 1 diverged, 1 failed (RuntimeError) · best val error 12.50% "
        f"(norm=bn) · {tmp_path} · 4 not finished: exit code 1",  # the failed one and three that never reported
    ]


def test_the_progress_callback_never_raises(tmp_path, caplog):
    callback = sweep.SweepProgress()
    callback.on_multirun_start(config=OmegaConf.create({}))  # no hydra node at all
    callback.on_job_end(config=OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN}}), job_return=_returned("done"))
    callback.on_multirun_end(config=OmegaConf.create({}))
    assert any("sweep progress: no line" in r.getMessage() for r in caplog.records)
