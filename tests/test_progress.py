"""Progress: a bar per epoch with the whole run's ETA, off for jobs that share a terminal with others, and the
sweep's ETA in its line per job."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from normlab.loggers.progress import ProgressBar, runs_beside_others
from normlab.pace import eta
from normlab.train import CONFIG_DIR


def totals(loss: float, count: int):
    return SimpleNamespace(loss=torch.tensor(loss * count), count=count)


def test_the_bar_shows_the_epoch_and_the_whole_runs_eta_and_clears_itself():
    out = io.StringIO()
    bar = ProgressBar(enabled=True, every=1, stream=out, min_interval_s=0)  # draw every update
    for epoch in (1, 2):
        update = bar.epoch(epoch, epochs=4, steps=3, batch_size=16)
        for step in (1, 2, 3):
            update(step, totals(0.5, step))
    text = out.getvalue()
    assert "epoch 1/4" in text and "epoch 2/4" in text and "run ETA " in text and "img/s · loss 0.500" in text
    assert bar.run_steps_done == 6
    assert ProgressBar(enabled=False).epoch(1, 4, 3, 16) is None


def test_a_resumed_epochs_bar_starts_at_its_step_and_counts_only_the_steps_this_process_trains():
    out = io.StringIO()
    bar = ProgressBar(enabled=True, every=1, stream=out, min_interval_s=0)
    update = bar.epoch(2, epochs=3, steps=10, batch_size=16, first=6)  # stopped after step 6 of epoch 2
    for step in (7, 8, 9, 10):
        update(step, totals(0.5, 16 * step))
    assert " 6/10 " in out.getvalue() and bar.run_steps_done == 4  # the ETA's pace: 4 steps in this time


def test_eta_is_the_pace_so_far_times_what_is_left():
    assert eta(60.0, 2, 6) == "02:00"  # 30 s a unit, 4 left
    assert eta(3600.0, 1, 3) == "2:00:00"
    assert eta(5.0, 0, 6) == "?" and eta(5.0, 6, 6) == "00:00"


def _hydra(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        HydraConfig.instance().set_config(compose("train", overrides=overrides, return_hydra_config=True))


def test_jobs_side_by_side_draw_no_bar():
    try:
        _hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
        assert runs_beside_others() and not ProgressBar.wanted("auto") and ProgressBar.wanted("true")
        _hydra(["hydra/launcher=submitit_local"])
        assert runs_beside_others()
        _hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"])
        assert not runs_beside_others()
        _hydra([])
        assert not runs_beside_others()
    finally:
        HydraConfig.instance().cfg = None


def test_a_job_alone_draws_a_bar_on_a_terminal_only(monkeypatch):
    """Logs stay clean: with "auto", a job whose stderr is a file or a pipe draws no bar."""
    HydraConfig.instance().cfg = None  # a plain run: no launcher beside it
    monkeypatch.setattr("sys.stderr", SimpleNamespace(isatty=lambda: False))
    assert not ProgressBar.wanted("auto") and ProgressBar.wanted("true")
    monkeypatch.setattr("sys.stderr", SimpleNamespace(isatty=lambda: True))
    assert ProgressBar.wanted("auto") and not ProgressBar.wanted("false")
