"""Progress on a terminal, drawn by tqdm: a bar per epoch (steps, images/s, running loss) with the whole run's ETA
beside the epoch's, from the run's own pace.

The bar clears itself at the end of each epoch, so the trainer's line per epoch stays the record. On ``auto`` it
is drawn only on a terminal (logs stay clean in files and pipes) and only for a job that has the terminal to
itself: jobs that a launcher runs side by side (joblib with n_jobs > 1, submitit) would draw over each other, so
they log their epoch lines only, and the sweep's line per job says k of n and the sweep's ETA.
"""

from __future__ import annotations

import sys
import time

from normlab.pace import eta
from normlab.switches import resolve_switch


def runs_beside_others() -> bool:
    """Whether this process is one of several jobs a launcher runs at once on one machine's terminal."""
    from hydra.core.hydra_config import HydraConfig

    from normlab import machine_share

    if not HydraConfig.initialized():
        return False
    launcher = HydraConfig.get().get("launcher")
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    jobs = machine_share.concurrent_jobs(launcher, machine_share.cpu_count())
    return "submitit" in target or (jobs is not None and jobs > 1)


class ProgressBar:
    def __init__(self, enabled: bool, every: int = 10, stream=None, min_interval_s: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.enabled, self.every, self.min_interval_s = enabled, every, min_interval_s
        self.run_start: float | None = None
        self.run_steps_done = 0  # steps this process has trained, for the run's pace

    @staticmethod
    def wanted(setting: str) -> bool:
        return resolve_switch(setting, sys.stderr.isatty() and not runs_beside_others())

    def epoch(self, epoch: int, epochs: int, steps: int, batch_size: int, first: int = 0):
        """A callback for ``train_epoch``: ``(step, totals)``. Reads the loss only when it draws. `first`: the
        steps done before a resume, which this process neither trained nor timed."""
        if not self.enabled:
            return None
        from tqdm import tqdm

        if self.run_start is None:
            self.run_start = time.perf_counter()
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}/{epochs}", unit="step", file=self.stream,
                   leave=False, dynamic_ncols=True, mininterval=self.min_interval_s)
        left_after = (epochs - epoch) * steps  # steps of the epochs after this one
        done_before = self.run_steps_done

        def update(step: int, totals) -> None:
            if step % self.every and step != steps:
                return
            bar.update(step - bar.n)
            self.run_steps_done = done_before + step - first
            elapsed = time.perf_counter() - self.run_start
            rate = (step - first) * batch_size / max(bar.format_dict["elapsed"], 1e-9)
            loss = totals.loss.item() / max(1, totals.count)
            run_eta = eta(elapsed, self.run_steps_done, self.run_steps_done + steps - step + left_after)
            bar.set_postfix_str(f"run ETA {run_eta} · {rate:.0f} img/s · loss {loss:.3f}",
                                refresh=not self.min_interval_s)
            if step == steps:
                bar.close()  # leave=False: the line is cleared for the trainer's epoch line

        return update
