"""normlab's cache folder: decoded image arrays, the memory-format probe's choices, the compiled CPU kernel."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def cache_dir() -> Path:
    """``$NORMLAB_CACHE``, else ``~/.cache/normlab``."""
    return Path(os.path.expanduser(os.environ.get("NORMLAB_CACHE", "~/.cache/normlab")))


def untrusted_because(info: os.stat_result) -> str | None:
    """Why a file or folder with this status is not this user's own, or None: it must be owned by this user and
    writable by no one else (else another user could swap what normlab later loads or reads from it)."""
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not this user's ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by others (mode {stat.filemode(info.st_mode)})"
    return None


def private_folder(path: Path) -> Path:
    """`path` as a folder of this user's, made (mode 0700, parents too) if missing. It and every folder above it up
    to the cache root must be this user's own and not symlinks: OSError saying which is not."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = cache_dir()
    folders = [path, *(p for p in path.parents if root == p or root in p.parents)]
    for folder in folders:
        info = os.lstat(folder)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise OSError(f"{folder} is a symlink or not a folder")
        reason = untrusted_because(info)
        if reason:
            raise OSError(f"{folder} is {reason}")
    return path
