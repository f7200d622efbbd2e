"""A multirun's exit code, so that a script can trust ``normlab-train -m``: 0 when every job finished (done or
diverged, in this sweep or an earlier one), 1 when any did not (invalid, failed, busy, or never reported back).

The sweep goes on past such jobs; the code only says, at the end, that the tally has some. The progress
callback (normlab/sweep.py) records the tally here in the launching process; ``normlab-train`` exits with it.
"""

from __future__ import annotations

from collections.abc import Iterable

from normlab.records import FINAL_STATUSES

_unfinished: int = 0  # jobs of the last multirun in this process that did not finish


def count_unfinished(statuses: Iterable[str], total: int | None) -> int:
    """Jobs that did not finish: a reported status other than done or diverged ("done (already done,
    skipped)" is done), and every job of ``total`` that reported nothing."""
    statuses = list(statuses)
    unfinished = sum(1 for s in statuses if s.split(" ", 1)[0] not in FINAL_STATUSES)
    return unfinished + max(0, (total or 0) - len(statuses))


def record(statuses: Iterable[str], total: int | None) -> int:
    global _unfinished
    _unfinished = count_unfinished(statuses, total)
    return _unfinished


def exit_code() -> int:
    """1 when the last multirun of this process left a job unfinished, else 0 (single runs included)."""
    return int(_unfinished > 0)
