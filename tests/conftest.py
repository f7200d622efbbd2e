"""Shared helpers: compose the real configs with Hydra's compose API, and run a job without the CLI."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import normlab.train  # noqa: F401 - registers the config schemas
from normlab.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

# A tiny, fast job: synthetic 8×8 images, a ResNet-8 whose widths (32/64/128) every norm's default fits.
TINY = ["data=synthetic", "data.num_train=64", "data.num_test=32", "data.size=8", "model=resnet8",
        "model.width=32", "batch.per_worker=4", "batch.workers=2", "trainer.epochs=1", "trainer.progress=false"]


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides or [])


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """normlab's cache (memory-format probes) in a folder of the test session's own, never the user's."""
    os.environ["NORMLAB_CACHE"] = str(tmp_path_factory.mktemp("normlab_cache"))


@pytest.fixture
def tiny():
    return lambda *extra: compose_config(TINY + list(extra))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """`python -m normlab.train ARGS` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "normlab.train", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def read_wandb_records(path: Path, timeout: float = 20.0) -> list:
    """The records of a W&B transaction log, once W&B's service has written its closing ``exit`` record
    (its writes can lag ``run.finish()`` when one process has made several runs)."""
    deadline = time.time() + timeout
    while True:
        records = parse_wandb_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.1)


def parse_wandb_log(path: Path) -> list:
    """The protobuf records of a W&B transaction log (.wandb), read the plain way: a LevelDB-style log of
    32 KiB blocks, each record behind a 7-byte header (crc, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, chunk = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def record_key(item) -> str:
    return item.key or "/".join(item.nested_key)
