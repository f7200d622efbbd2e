"""Preemption as schedulers send it: SIGTERM, SIGUSR1 or SIGUSR2 some time before the job is killed.

SLURM sends one of them (``--signal``, or SIGTERM on ``scancel`` and at the time limit); submitit binds
SIGUSR2 to its checkpoint-and-requeue and SIGTERM to a bypass. While a job trains, ``deferred()`` holds
these signals: the current step finishes, the epoch stops there (``requested()``; on several processes at
the next step at which the ranks agree, engine/loop.py), the trainer checkpoints that step (the stopped
epoch's steps, totals and time with the model, optimizer, schedule and RNG) and raises ``Preempted``, and
the run is recorded as ``preempted``. A rerun goes on from the next step and ends with an uninterrupted
run's metrics. Once the job's records are closed, ``hand_on`` passes the signal to the handler that was
installed before normlab's (submitit's, say), or, with none, exits with 128 + the signal's number as a
killed process would.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_received: list[int] = []  # the signals received while deferred, first first
_previous: dict[int, Any] = {}  # each signal's handler before normlab's


class Preempted(Exception):
    """The scheduler asked the job to stop: the run is recorded as preempted, then the signal handed on."""

    def __init__(self, signum: int | None, at: dict | None = None) -> None:
        self.signum, self.at = signum, at  # signum None: another rank was signalled; at: {"epoch", "step", "steps"}
        by = f"by {signal.Signals(signum).name}" if signum is not None else "(another rank was signalled)"
        where = f" in epoch {at['epoch']} after step {at['step']} of {at['steps']}" if at else ""
        super().__init__(f"preempted {by}{where}")


def _note(signum: int, frame: Any) -> None:
    _received.append(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGUSR1/SIGUSR2 while the block runs (only where signals can be caught: the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    _previous.clear()
    for signum in SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:  # a signal ignored on purpose stays ignored
            _previous[signum] = signal.signal(signum, _note)
    try:
        yield
    finally:
        for signum, handler in _previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def requested() -> bool:
    """Whether a preemption signal came: the training loop stops after the step it is in."""
    return bool(_received)


def received() -> int | None:
    """The first preemption signal this process received while deferred and has not acted on, or None."""
    return _received[0] if _received else None


def hand_on(signum: int | None) -> None:
    """Call the handler that was there before normlab's, as the signal would have (submitit's requeues and
    exits); then, or with none, exit with 128 + the signal's number: a sweep starts no further job. A rank
    stopped because another was signalled (None) exits as if sent SIGTERM, calling no handler."""
    handler: Callable | Any = _previous.get(signum, signal.SIG_DFL) if signum is not None else None
    _received.clear()
    if callable(handler):
        handler(signum, sys._getframe(1))
    sys.exit(128 + (signum if signum is not None else signal.SIGTERM))
