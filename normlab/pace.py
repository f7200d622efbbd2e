"""The time left at the pace so far: for a run's steps (the progress bar) and a sweep's jobs (its line per job)."""

from __future__ import annotations


def eta(elapsed_s: float, done: int, total: int) -> str:
    """The time left, as tqdm writes intervals ([H:]MM:SS); '?' before anything is done."""
    from tqdm import tqdm

    return tqdm.format_interval(elapsed_s / done * max(0, total - done)) if done > 0 else "?"
