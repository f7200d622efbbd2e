"""A run (or sweep) folder that is not what it seems, found before Hydra or normlab writes anything.

Hydra makes ``hydra.run.dir`` (``hydra.sweep.dir`` in a multirun) itself, before the app runs: a path that is a
file, a dangling symbolic link or a folder this user cannot write ends there in a traceback. ``problem`` says
what is wrong with the folder a command line names, from the path alone, so that ``cli()`` can refuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

# The static part of conf/train.yaml's folders, where the command line names none: results/${name}/...
DEFAULT_ROOT = "results"
KEYS = ("hydra.run.dir", "hydra.sweep.dir")
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "-c")


def named_folders(argv: list[str]) -> dict[str, str]:
    """{key: value} for each of KEYS the command line sets (``+``/``++`` prefixes too)."""
    found = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key in KEYS:
            found[key] = value
    return found


def static_part(value: str) -> Path:
    """The path up to its first interpolation (``${now:...}`` is resolved by Hydra later)."""
    if "${" in value:
        value = value.split("${", 1)[0]
        value = value if value.endswith("/") or not value else os.path.dirname(value)
    return Path(os.path.expanduser(value or "."))


def _unwritable(folder: Path) -> str | None:
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "is on a read-only file system" if read_only else "is a folder this user may not write in"


def problem(path: Path) -> str | None:
    """What keeps `path` from being a run folder that can be made and written, or None."""
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if path.exists():
        if not path.is_dir():
            return "is a file, not a folder"
        return _unwritable(path)
    for parent in path.parents:  # the nearest part of the path that is there must be a folder we can write
        if parent.is_symlink() and not parent.exists():
            return f"cannot be made: {parent} is a symbolic link to {os.readlink(parent)}, which does not exist"
        if parent.exists():
            if not parent.is_dir():
                return f"cannot be made: {parent} is a file, not a folder"
            reason = _unwritable(parent)
            return f"cannot be made: {parent} {reason}" if reason else None
    return None


def hydra_notes(argv: list[str]) -> Path:
    """Where Hydra writes its notes for a command line (``.hydra/`` in the run or sweep folder): the file a failed
    write of Hydra's names, when the error itself names none."""
    folders = named_folders(argv)
    folder = folders.get("hydra.run.dir") or folders.get("hydra.sweep.dir")
    return (static_part(folder) if folder else Path(DEFAULT_ROOT)) / ".hydra"


def folder_name_problem(argv: list[str]) -> str | None:
    """`name` names a folder under results/ (results/<name>/...): one plain folder name, not a path."""
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key == "name":
            value = value.strip("'\"")
            if not value or value in (".", "..") or "/" in value or "\\" in value or len(value) > 100:
                return (f"name={value!r} is invalid: it names the folder results/<name>/, so it must be one folder "
                        "name of 1 to 100 characters, without '/'; to write elsewhere, give hydra.run.dir "
                        "(hydra.sweep.dir in a sweep)")
    return None


def check(argv: list[str]) -> str | None:
    """The one-line refusal for the run or sweep folder of a command line, or None when it looks right."""
    if any(arg in INFO_FLAGS or arg.startswith("--cfg") for arg in argv):  # prints, writes no folder
        return None
    if (reason := folder_name_problem(argv)) is not None:
        return reason
    folders = named_folders(argv) or {"hydra.run.dir": DEFAULT_ROOT}
    for key, value in folders.items():
        reason = problem(static_part(value))
        if reason is not None:
            return (f"{key}={value} {reason}; nothing was written. Give {key} a folder this user can write "
                    f"(or remove what is in the way)")
    return None
