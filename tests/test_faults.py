"""Faults a cluster throws, each through the CLI: full and read-only file systems, run folders that are not
folders, hostile images, sizes that cannot fit. Each ends in one message that names the file or the key, no
traceback, its exit code, and nothing written earlier lost. (Preemption signals: tests/test_preemption.py.)

Tests run as root, so permissions stop nothing: a full disk is a small mounted tmpfs, a read-only one a
read-only bind mount (both skip where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from normlab.records import WRITE_FAILED_EXIT, WriteFailed, read_metrics
from tests.conftest import REPO, TINY, run_cli
from tests.test_data import write_image_tree, zip_tree

TIMING_KEYS = {"images_per_sec", "epoch_time_s"}
QUIET_HYDRA = ["hydra.output_subdir=null", "hydra/job_logging=disabled"]  # Hydra writes nothing in the folder


def mount(*args: str) -> None:
    try:
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: the file-system faults need mount")
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()}): the file-system faults need mount")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small file system of its own at `path`, to fill up."""
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder) seen read-only, at itself, for the block's length."""
    mount("--bind", str(path), str(path))
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount a bind mount read-only here")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path, leave_pages: int = 0) -> Path:
    """Fill the file system at `fs` up to `leave_pages` free pages."""
    filler = fs / "filler"
    page = os.statvfs(fs).f_frsize  # tmpfs counts in the machine's pages
    free = os.statvfs(fs).f_bavail * page
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_pages * page))
    assert os.statvfs(fs).f_bavail == leave_pages
    return filler


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_one_message(result, *parts: str, code: int) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1, result.stderr[-3000:]
    for part in parts:
        assert part in error[0], error[0]


# ---------------------------------------------------------------- a full or read-only file system

def test_a_full_disk_at_the_checkpoint_keeps_the_one_before_and_the_rerun_ends_as_if_uninterrupted(tmp_path):
    with tmpfs(tmp_path / "fs", "8m") as fs:
        run = fs / "run"
        args = [*TINY, "trainer.epochs=2", f"hydra.run.dir={run}"]
        assert run_cli(*args).returncode == 0
        uninterrupted = comparable(read_metrics(run / "metrics.jsonl"))
        (run / "summary.json").unlink()
        (run / "checkpoint.pt").unlink()  # as if killed after epoch 1's checkpoint: checkpoint.prev.pt resumes
        before = digest(run / "checkpoint.prev.pt")
        filler = fill(fs, leave_pages=16)  # far less than a checkpoint (2.4 MB)

        failed = run_cli(*args)
        assert_one_message(failed, f"cannot write {run / 'checkpoint.pt'}: No space left on device (ENOSPC)",
                           "free space", "hydra.run.dir", code=WRITE_FAILED_EXIT)
        assert digest(run / "checkpoint.prev.pt") == before and not (run / "checkpoint.pt").exists()
        assert not list(run.glob(".*.tmp")), "a temporary file was left behind"

        filler.unlink()
        resumed = run_cli(*args)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert comparable(read_metrics(run / "metrics.jsonl")) == uninterrupted


@pytest.mark.parametrize("pages, record", [(0, "config.yaml"), (2, "metrics.jsonl"), (3, "summary.json")])
def test_a_full_disk_at_each_record_is_named_and_nothing_is_left_half_written(tmp_path, pages, record):
    """Pages: the lock's note takes one, config.yaml one, metrics.jsonl one; summary.json comes last."""
    with tmpfs(tmp_path / "fs", "256k") as fs:
        run = fs / "run"
        run.mkdir()
        fill(fs, leave_pages=pages)
        result = run_cli(*TINY, "trainer.checkpoint=false", *QUIET_HYDRA, f"hydra.run.dir={run}")
        assert_one_message(result, f"cannot write {run / record}: No space left on device (ENOSPC)",
                           code=WRITE_FAILED_EXIT)
        assert not list(run.glob(".*.tmp"))
        if record == "metrics.jsonl":
            assert (run / record).read_bytes() == b""  # the half-written line was cut back off
        else:
            assert not (run / record).exists()


def test_a_sweep_goes_on_past_a_job_whose_disk_is_full(tmp_path):
    sweep = tmp_path / "sweep"
    with tmpfs(sweep / "0", "64k") as first:  # job 0's folder is a full file system of its own
        fill(first)
        result = run_cli("-m", *TINY, "seed=0,1", "hydra.output_subdir=null", f"hydra.sweep.dir={sweep}",
                         "hydra.sweep.subdir=${hydra.job.num}")
        output = result.stdout + result.stderr
        assert f"cannot write {first / 'config.yaml'}: No space left on device" in output, output[-3000:]
        assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "done"
        assert "Traceback" not in output
        assert result.returncode == 1, output[-3000:]  # the sweep went on, then says a job did not finish


def test_a_full_disk_at_hydras_own_notes_is_one_message_and_a_sweep_stops_there_keeping_its_done_jobs(tmp_path):
    """Hydra writes .hydra/ before normlab's job starts, so a full disk there stops a sweep at that job (the
    jobs after it would meet the same disk); the jobs before it stay done, and the rerun resumes."""
    with tmpfs(tmp_path / "fs", "256k") as fs:
        run = fs / "run"
        run.mkdir()
        fill(fs)
        single = run_cli(*TINY, f"hydra.run.dir={run}")
        assert_one_message(single, f"cannot write {run / '.hydra'}", "No space left on device (ENOSPC)",
                           code=WRITE_FAILED_EXIT)
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    (sweep / "1").mkdir(parents=True)
    with tmpfs(sweep / "1", "64k") as second:  # job 1's folder is a full file system of its own
        fill(second)
        stopped = run_cli(*args)
        assert_one_message(stopped, "cannot write", "No space left on device (ENOSPC)", code=WRITE_FAILED_EXIT)
        assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "done"
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads((sweep / job / "summary.json").read_text())["status"] for job in "01"] == ["done", "done"]


def test_a_read_only_run_folder_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "trainer.epochs=2", f"hydra.run.dir={run}"]
    assert run_cli(*args).returncode == 0
    (run / "summary.json").unlink()  # unfinished: the rerun would write
    before = {p.name: digest(p) for p in run.rglob("*") if p.is_file()}
    with read_only(run):
        result = run_cli(*args)
    assert_one_message(result, f"hydra.run.dir={run}", "read-only file system", code=2)
    assert {p.name: digest(p) for p in run.rglob("*") if p.is_file()} == before


@contextlib.contextmanager
def full_tmpfs(path: Path):
    with tmpfs(path, "64k") as fs:
        fill(fs)
        yield fs


@pytest.mark.parametrize("unwritable, reason", [(full_tmpfs, "No space left on device (ENOSPC)"),
                                                (read_only, "Read-only file system (EROFS)")])
def test_a_cache_write_that_fails_names_the_cache_file_and_the_key(tmp_path, unwritable, reason):
    tree = tmp_path / "tree"
    write_image_tree(tree)
    (tmp_path / "cache").mkdir()
    with unwritable(tmp_path / "cache") as cache:
        result = run_cli("data=imagefolder", f"data.root={tree}", "data.image_size=8", f"data.cache_dir={cache}",
                         "model=resnet8", "batch.per_worker=2", "batch.workers=2", "trainer.epochs=1",
                         "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}")
        assert_one_message(result, f"cannot write {cache}/imagefolder-tree-8px-", reason, "data.cache_dir",
                           code=WRITE_FAILED_EXIT)
        assert not list(cache.glob(".*.tmp"))


@pytest.mark.parametrize("unwritable, reason", [(full_tmpfs, "No space left on device (ENOSPC)"),
                                                (read_only, "Read-only file system (EROFS)")])
def test_a_report_into_a_folder_it_cannot_write_says_so_and_leaves_the_runs_alone(tmp_path, unwritable, reason):
    run = tmp_path / "runs" / "a"
    assert run_cli(*TINY, f"hydra.run.dir={run}").returncode == 0
    (tmp_path / "out").mkdir()
    before = {p.name: digest(p) for p in run.rglob("*") if p.is_file()}
    with unwritable(tmp_path / "out") as out:
        result = subprocess.run([sys.executable, "-m", "normlab.cli", str(tmp_path / "runs"), "--out", str(out)],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert_one_message(result, f"cannot write {out}", reason, "--out", code=WRITE_FAILED_EXIT)
        assert not list(out.glob(".*.tmp"))
    assert {p.name: digest(p) for p in run.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- failed writes without a mount

@pytest.mark.parametrize("code, remedy", [(errno.ENOSPC, "free space on the file system that holds"),
                                          (errno.EDQUOT, "free space in your quota"),
                                          (errno.EROFS, "is on a read-only file system"),
                                          (errno.EACCES, "may not write in")])
def test_each_write_error_is_named_with_the_systems_words_and_what_to_do(tmp_path, code, remedy):
    error = WriteFailed(tmp_path / "run" / "summary.json", OSError(code, os.strerror(code)))
    text = str(error)
    assert text.startswith(f"cannot write {tmp_path / 'run' / 'summary.json'}: {os.strerror(code)} "
                           f"({errno.errorcode[code]})"), text
    assert remedy in text and "unchanged" in text and "hydra.run.dir" in text


class FillsUp:
    """A file whose write fails with ENOSPC once `room` bytes are written: a disk filling mid-write."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_a_checkpoint_whose_disk_fills_mid_save_keeps_the_previous_one_even_through_torch_save(tmp_path,
                                                                                              monkeypatch):
    """torch.save reports a failed write as a RuntimeError; the write still ends as WriteFailed naming ENOSPC,
    with the previous checkpoint untouched and no temporary file left."""
    import torch

    from normlab import records

    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1}, path)
    before = digest(path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(records.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode), room=100))
    with pytest.raises(WriteFailed) as raised:
        records.atomic_write(path, lambda f: torch.save({"epoch": 2, "weights": torch.zeros(10_000)}, f))
    assert "No space left on device (ENOSPC)" in str(raised.value) and raised.value.path == path
    assert digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------- run folders that are not what they seem

def test_run_folders_that_are_not_folders_are_refused_before_hydra_writes(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [(f"hydra.run.dir={a_file}", "is a file, not a folder"),
             (f"hydra.run.dir={dangling}", "is a symbolic link to"),
             (f"hydra.run.dir={a_file}/run", f"cannot be made: {a_file} is a file"),
             (f"hydra.sweep.dir={a_file}", "is a file, not a folder")]
    for setting, reason in cases:
        multirun = ["-m"] if "sweep" in setting else []
        result = run_cli(*multirun, *TINY, setting, timeout=120)
        assert_one_message(result, setting, reason, code=2)
    assert a_file.read_text() == "keep me" and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dangling"]


# ---------------------------------------------------------------- images are data, never a hazard

def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header claims width × height RGB pixels: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024, 9))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind, reason", [
    ("bomb", "is 40000×40000 pixels (1600 megapixels), more than data.max_image_pixels=40000000"),
    ("oversized", "is 64×64 pixels (0 megapixels), more than data.max_image_pixels=1000"),
    ("truncated", "is not a readable image (OSError"),
    ("not_an_image", "is not a readable image (UnidentifiedImageError"),
    ("huge_file", "is 2 MB, larger than an image of that many pixels can be, more than data.max_image_pixels=1000"),
])
@pytest.mark.parametrize("as_zip", [False, True])
def test_hostile_images_are_refused_by_member_and_archive_before_decoding(tmp_path, kind, reason, as_zip):
    tree = tmp_path / "tree"
    write_image_tree(tree, size=(64, 64) if kind == "oversized" else (10, 10))
    member = sorted((tree / "train").rglob("*.png"))[0]
    if kind == "bomb":
        member.write_bytes(png_claiming(40_000, 40_000))
    elif kind == "truncated":
        member.write_bytes(member.read_bytes()[: member.stat().st_size // 2])
    elif kind == "not_an_image":
        member.write_bytes(b"#!/bin/sh\nrm -rf /\n")
    elif kind == "huge_file":  # refused by its size (a zip member's from the archive's directory), unread
        member.write_bytes(b"\0" * 2_000_000)
    root = zip_tree(tree, tmp_path / "tree.zip") if as_zip else tree
    limit = ["data.max_image_pixels=1000"] if kind in ("oversized", "huge_file") else []
    run = tmp_path / "run"
    result = run_cli("data=imagefolder", f"data.root={root}", "data.image_size=8", *limit,
                     f"data.cache_dir={tmp_path / 'cache'}", "model=resnet8", "batch.per_worker=2",
                     "batch.workers=2", "trainer.epochs=1", "trainer.progress=false", f"hydra.run.dir={run}")
    name = member.relative_to(tree).as_posix()
    assert_one_message(result, f"'{name}' in data.root='{root}'", reason, code=2)
    assert read_metrics(run / "metrics.jsonl") == []  # refused while the data loaded: no epoch ran


def test_a_bomb_in_a_streamed_folder_is_refused_in_the_loaders_words_not_the_workers_traceback(tmp_path):
    tree = tmp_path / "tree"
    write_image_tree(tree)
    member = sorted((tree / "val").rglob("*.png"))[0]  # every test image is read (training drops a partial batch)
    member.write_bytes(png_claiming(40_000, 40_000))
    result = run_cli("data=imagefolder", f"data.root={tree}", "data.image_size=8", "data.in_memory_max_gb=0",
                     "data.loader_workers=1", "model=resnet8", "batch.per_worker=2", "batch.workers=2",
                     "trainer.epochs=1", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_message(result, f"'{member.relative_to(tree).as_posix()}' in data.root='{tree}' is 40000×40000 "
                       "pixels", "data.max_image_pixels", code=2)


# ---------------------------------------------------------------- sizes checked before allocating

def test_a_synthetic_set_too_large_for_memory_is_refused_with_its_size(tmp_path):
    run = tmp_path / "run"
    result = run_cli("data=synthetic", "data.size=200000", f"hydra.run.dir={run}", timeout=120)
    gb = (512 + 128) * 3 * 200000 * 200000 / 1e9  # the images, uint8: the independent figure
    assert_one_message(result, f"needs {gb:.1f} GB", "data.size", "this machine has free", code=2)
    assert not (run / "config.yaml").exists()


def test_an_image_folder_too_large_to_hold_names_in_memory_max_gb(tmp_path):
    tree = tmp_path / "tree"
    write_image_tree(tree)
    result = run_cli("data=imagefolder", f"data.root={tree}", "data.image_size=200000", "data.in_memory_max_gb=1e9",
                     f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    gb = 3 * (6 + 3) * 3 * 200000 ** 2 / 1e9  # the tree: 3 classes, 6 train and 3 val images each
    assert_one_message(result, f"needs {gb:.1f} GB", "data.in_memory_max_gb", code=2)


def test_a_data_set_too_large_for_the_gpus_free_memory_is_refused_with_the_figures(monkeypatch):
    """The GPU check, with the device's free memory given (no GPU needed): the set (uint8) and a batch with its
    augmented copy (float32) against what the device has free."""
    from types import SimpleNamespace

    import torch

    from normlab import memory
    from normlab.errors import ConfigError

    shape = SimpleNamespace(train_size=50_000, test_size=10_000, channels=3, size=32)
    need = 60_000 * 3 * 32 * 32 + 2 * 128 * 3 * 32 * 32 * 4
    monkeypatch.setattr(memory, "device_available_bytes", lambda device: 100_000_000)
    with pytest.raises(ConfigError) as raised:
        memory.check_on_device(shape, 128, torch.device("cuda", 0))
    assert f"needs {need / 1e9:.1f} GB, more than the 0.1 GB cuda:0 has free" in str(raised.value)
    assert "data.size" in str(raised.value)
    memory.check_on_device(shape, 128, torch.device("cpu"))  # the CPU's is the in-memory set's check
    monkeypatch.setattr(memory, "device_available_bytes", lambda device: 10 * need)
    memory.check_on_device(shape, 128, torch.device("cuda", 0))
    # a set that streams from disk holds only its batches on the GPU: ImageNet's size, 80 GB free
    imagenet = SimpleNamespace(train_size=1_281_167, test_size=50_000, channels=3, size=224)
    monkeypatch.setattr(memory, "device_available_bytes", lambda device: 80_000_000_000)
    memory.check_on_device(imagenet, 256, torch.device("cuda", 0), streamed=True)
    with pytest.raises(ConfigError, match="the data set and a batch of 256"):
        memory.check_on_device(imagenet, 256, torch.device("cuda", 0))
    monkeypatch.setattr(memory, "device_available_bytes", lambda device: 100_000_000)
    with pytest.raises(ConfigError, match=r"^a batch of 256 on cuda:0 needs 0\.3 GB"):
        memory.check_on_device(imagenet, 256, torch.device("cuda", 0), streamed=True)
