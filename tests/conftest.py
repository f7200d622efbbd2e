"""Shared helpers: compose the real configs with Hydra's compose API, and run a job without the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import normlab.train  # noqa: F401 - registers the schemas and the experiments search path
from normlab.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

# A tiny, fast job: synthetic 8×8 images, a ResNet-8 whose widths (32/64/128) every norm's default fits.
TINY = ["data=synthetic", "data.num_train=64", "data.num_test=32", "data.size=8", "model=resnet8",
        "model.width=32", "batch.per_worker=4", "batch.workers=2", "trainer.epochs=1", "trainer.progress=false"]


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides or [])


@pytest.fixture
def tiny():
    return lambda *extra: compose_config(TINY + list(extra))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """`python -m normlab.train ARGS` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "normlab.train", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
