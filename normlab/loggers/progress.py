"""A one-line progress bar per epoch (steps, ETA, images/s, running loss); quiet when not on a terminal."""

from __future__ import annotations

import sys
import time

from normlab.switches import resolve_switch


class ProgressBar:
    def __init__(self, enabled: bool, every: int = 10, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled, self.every = enabled, every

    @staticmethod
    def wanted(setting: str) -> bool:
        return resolve_switch(setting, sys.stderr.isatty())

    def epoch(self, epoch: int, epochs: int, steps: int, batch_size: int):
        """A callback for ``train_epoch``: ``(step, totals)``. Reads the loss only when it draws."""
        if not self.enabled:
            return None
        start = time.perf_counter()

        def update(step: int, totals) -> None:
            if step % self.every and step != steps:
                return
            elapsed = time.perf_counter() - start
            rate = step * batch_size / max(elapsed, 1e-9)
            eta = (steps - step) * elapsed / step
            loss = totals.loss.item() / max(1, totals.count)
            width = 24
            filled = round(width * step / steps)
            self.stream.write(f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (width - filled)}] {step}/{steps} "
                              f"ETA {eta:4.0f}s {rate:7.0f} img/s loss {loss:.3f}")
            if step == steps:
                self.stream.write("\n")
            self.stream.flush()

        return update
