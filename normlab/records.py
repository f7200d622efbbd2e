"""The run directory: the one contract between training and analysis.

```
<run_dir>/
  config.yaml      the resolved config
  metrics.jsonl    one JSON object per epoch (METRIC_KEYS, and val_error_top5 for > 10 classes)
  summary.json     written once at the end, atomically: status, final metrics, identifying config
  checkpoint.pt    model, optimizer, schedule, RNG state and metrics so far, for resume
  checkpoint.prev.pt  the one before, kept in case the latest is damaged
  .lock            held (an OS advisory lock) by the one process working in the folder
```
Every file that a reader may see half-written is written to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from normlab.errors import RunFolderBusy

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"
PREVIOUS_CHECKPOINT, LOCK = "checkpoint.prev.pt", ".lock"
METRIC_KEYS = ("epoch", "train_loss", "train_error", "val_loss", "val_error", "lr", "images_per_sec", "epoch_time_s")
FINAL_STATUSES = ("done", "diverged")  # "failed" runs resume from their checkpoint when rerun


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through `write(file)` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: write them as null (the status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    text = json.dumps({k: _json_safe(v) for k, v in data.items()}, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in `path`; None if there is none, or if it is not a readable JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why the JSON or YAML record at `path` cannot be read, or None (readable, or absent)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None if isinstance(data, dict) else f"not a mapping ({type(data).__name__})"


def _metrics_line(row: dict[str, Any]) -> str:
    return json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n"


def write_metrics(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write all epoch rows at once (atomically), e.g. to realign the file with a checkpoint."""
    text = "".join(_metrics_line(row) for row in rows)
    atomic_write(path, lambda f: f.write(text.encode()))


def append_metrics(path: str | os.PathLike, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(_metrics_line(row))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of a metrics file; a torn last line (a killed writer) is skipped."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunDir:
    """Paths of one run's records."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config, self.metrics = self.path / CONFIG, self.path / METRICS
        self.summary, self.checkpoint = self.path / SUMMARY, self.path / CHECKPOINT
        self.previous_checkpoint, self.lock = self.path / PREVIOUS_CHECKPOINT, self.path / LOCK

    def unreadable(self) -> list[str]:
        """'file: reason' for each identity record (config, summary) that is there but cannot be read."""
        return [f"{path.name} ({reason})" for path in (self.config, self.summary)
                if (reason := unreadable_reason(path)) is not None]

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the folder's lock for the job's life; RunFolderBusy at once if another process holds it.

        An OS advisory lock (flock) on ``.lock``: the OS releases it when the process ends, however it
        ends, so a killed job never leaves a stale lock. The file names the holder, for the message.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not said who it is"
            os.close(fd)
            raise RunFolderBusy(f"{self.path} is in use by another normlab job ({holder}); nothing was changed. "
                                "Wait for it to end, or give this job another hydra.run.dir") from None
        try:
            os.ftruncate(fd, 0)
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode())
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary)

    def is_final(self) -> bool:
        """Done or diverged: rerunning would only repeat it (or, on a GPU, silently change it)."""
        summary = self.read_summary()
        return summary is not None and summary.get("status") in FINAL_STATUSES
