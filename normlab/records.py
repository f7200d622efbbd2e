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
Every file that a reader may see half-written is written to a temporary file and renamed. A write that fails
(no space, no permission, a read-only file system, a quota) raises ``WriteFailed``, whose message names the file,
the cause and what to do, and leaves the file as it was: the temporary file is removed, an append is cut back.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from normlab.errors import RunFolderBusy

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"
PREVIOUS_CHECKPOINT, LOCK = "checkpoint.prev.pt", ".lock"
METRIC_KEYS = ("epoch", "train_loss", "train_error", "val_loss", "val_error", "lr", "images_per_sec", "epoch_time_s")
FINAL_STATUSES = ("done", "diverged")  # "failed" and "preempted" runs resume from their checkpoint when rerun
WRITE_FAILED_EXIT = 74  # sysexits.h EX_IOERR: the exit code of a job or report whose write failed (bad input: 2)
RUN_FOLDER_ELSEWHERE = "give the job another hydra.run.dir (hydra.sweep.dir in a sweep)"
DISK_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # errors only a write raises
MAX_RECORD_BYTES = 64 * 2**20  # far above any real record: a larger "record" is read as unreadable, not into memory
# What reading a record from disk can raise (JSON's and the int-digit limit's errors are ValueErrors; deep nesting
# is a RecursionError): a record that raises any of them is unreadable, never a crash.
READ_ERRORS = (OSError, ValueError, RecursionError, yaml.YAMLError)

_WHAT_TO_DO = {
    errno.ENOSPC: "free space on the file system that holds {folder}",
    errno.EDQUOT: "free space in your quota on the file system that holds {folder}",
    errno.EROFS: "{folder} is on a read-only file system: remount it read-write",
    errno.EACCES: "this user may not write in {folder}: fix its permissions",
    errno.EPERM: "this user may not write in {folder}: fix its permissions",
}


class WriteFailed(OSError):
    """A file could not be written. What the file held before is unchanged; the message says what to do.
    An OSError, so that a caller to whom a write is optional (a cache) may still pass over it."""

    def __init__(self, path: str | os.PathLike, cause: OSError, elsewhere: str = RUN_FOLDER_ELSEWHERE) -> None:
        self.path, self.cause = Path(path), cause
        code = errno.errorcode.get(cause.errno, "") if cause.errno else ""
        reason = cause.strerror or str(cause)
        remedy = _WHAT_TO_DO.get(cause.errno, "check the file system that holds {folder}").format(
            folder=self.path.parent)
        super().__init__(f"cannot write {self.path}: {reason}{f' ({code})' if code else ''}. What it held before is "
                         f"unchanged. To go on, {remedy}, or {elsewhere}; then rerun")


class _Recording:
    """A file that remembers the OSError a write raised: torch.save reports a failed write as a RuntimeError."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, keep_previous: Path | None = None,
                 elsewhere: str = RUN_FOLDER_ELSEWHERE) -> None:
    """Write through `write(file)` to a temporary file beside `path`, then rename it over `path` (the file it
    replaces renamed to `keep_previous` first, if given). A failed write raises WriteFailed, `path` unchanged."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteFailed(path, e, elsewhere) from None
    recording = None
    try:
        with os.fdopen(fd, "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else getattr(recording, "error", None)
        if cause is not None:
            raise WriteFailed(path, cause, elsewhere) from None
        raise


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: write them as null (the status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    text = json.dumps({k: _json_safe(v) for k, v in data.items()}, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_record_text(path: str | os.PathLike) -> str:
    """A record's text, read only from a regular file of at most MAX_RECORD_BYTES: a FIFO, a device (a link to
    /dev/zero) or a huge file is refused (ValueError) before it can block or fill memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{Path(path).name} is not a regular file")
        if info.st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{Path(path).name} is {info.st_size:,} bytes, more than a record can be "
                             f"({MAX_RECORD_BYTES:,})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_RECORD_BYTES + 1).decode("utf-8")
    finally:
        os.close(fd)


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML record as plain data (``safe_load``: no tags that build objects); READ_ERRORS if it cannot be read."""
    return yaml.safe_load(read_record_text(path))


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in `path`; None if there is none, or if it is not a readable JSON object."""
    try:
        data = json.loads(read_record_text(path))
    except READ_ERRORS:
        return None
    return data if isinstance(data, dict) else None


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why the JSON or YAML record at `path` cannot be read, or None (readable, or absent)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = read_yaml(path) if path.suffix in (".yaml", ".yml") else json.loads(read_record_text(path))
    except READ_ERRORS as e:
        message = "nested too deeply" if isinstance(e, RecursionError) else (str(e).splitlines() or [""])[0]
        return f"{type(e).__name__}: {message}"
    return None if isinstance(data, dict) else f"not a mapping ({type(data).__name__})"


def _metrics_line(row: dict[str, Any]) -> str:
    return json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n"


def write_metrics(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write all epoch rows at once (atomically), e.g. to realign the file with a checkpoint."""
    text = "".join(_metrics_line(row) for row in rows)
    atomic_write(path, lambda f: f.write(text.encode()))


def append_metrics(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """One line at the end; a write that fails is cut back off (WriteFailed), leaving the file as it was."""
    data = _metrics_line(row).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteFailed(path, e) from None
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            os.ftruncate(fd, start)
            raise WriteFailed(path, e) from None
    finally:
        os.close(fd)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of a metrics file that is a JSON object; a torn last line (a killed writer) is skipped,
    and so is a file that cannot be read as a record (read_record_text), with a warning."""
    rows = []
    try:
        lines = read_record_text(path).splitlines()
    except FileNotFoundError:
        return rows
    except READ_ERRORS as e:
        logging.getLogger("normlab").warning("%s cannot be read (%s): no epochs read from it", path, e)
        return rows
    return parse_rows(lines)


def parse_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The lines of a JSON-lines record that are JSON objects (one epoch's, one job's); the rest are skipped."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WriteFailed(self.lock, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not said who it is"
            os.close(fd)
            raise RunFolderBusy(f"{self.path} is in use by another normlab job ({holder}); nothing was changed. "
                                "Wait for it to end, or give this job another hydra.run.dir") from None
        try:
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            with contextlib.suppress(OSError):  # only a note for the busy message; a full disk stops the job later
                os.ftruncate(fd, 0)
                os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode())
            yield
        finally:
            os.close(fd)  # releases the lock

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json. Called while an error is already on its way out (a full disk), a failed write
        is logged and the first error goes on: it is the one that says what happened."""
        pending = sys.exc_info()[1]
        try:
            write_json(self.summary, summary)
        except WriteFailed as e:
            if pending is None:
                raise
            logging.getLogger("normlab").error("%s", e)

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary)

    def is_final(self) -> bool:
        """Done or diverged: rerunning would only repeat it (or, on a GPU, silently change it)."""
        summary = self.read_summary()
        return summary is not None and summary.get("status") in FINAL_STATUSES
