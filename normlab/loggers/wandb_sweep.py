"""A Hydra callback that puts the paper's figure into W&B at the end of a multirun (``logger=wandb``).

It logs one summary run into the sweep's group: a ``wandb.Table`` of every finished job
(norm, groups, per_worker_batch, seed, val_error, val_error_median5), a line plot of error vs
batch size per norm, and normlab-report's report of the sweep (written to ``<sweep dir>/report/``): its
figures as images and all its files (tables, report.md/html, runs.csv) as an artifact. Like every W&B
path in normlab it never fails the sweep: errors only warn.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
TABLE_COLUMNS = ["norm", "groups", "per_worker_batch", "seed", "val_error", "val_error_median5"]


def log_sweep_summary(config: DictConfig, sweep_dir: str | Path) -> None:
    """Collect the sweep's runs and log the summary run. Import wandb only here."""
    import pandas as pd
    import wandb

    from normlab.analysis.collect import collect
    from normlab.analysis.metrics_info import norm_label
    from normlab.analysis.tables import main_setting, stats

    runs = collect([sweep_dir])
    done = runs[runs["status"] == "done"]
    if done.empty:
        log.warning("W&B sweep summary: no finished runs under %s", sweep_dir)
        return
    rows = [[None if pd.isna(v) else (int(v) if k in ("groups", "per_worker_batch", "seed") else float(v))
             if k != "norm" else v for k, v in zip(TABLE_COLUMNS, r)]
            for r in done[TABLE_COLUMNS].astype(object).itertuples(index=False)]
    means = stats(main_setting(done), ["norm", "per_worker_batch"])
    batches = sorted(means["per_worker_batch"].unique(), reverse=True)
    norms = list(dict.fromkeys(means["norm"]))
    lookup = means.set_index(["norm", "per_worker_batch"])["mean"]
    run = wandb.init(project=config.logger.project, entity=config.logger.entity, group=config.name,
                     job_type="summary", name=f"{config.name}-summary", mode=config.logger.mode,
                     dir=str(sweep_dir), config={"experiment": config.name, "runs": len(runs)},
                     reinit="finish_previous")
    try:
        run.log({
            "runs_table": wandb.Table(columns=TABLE_COLUMNS, data=rows),
            "error_vs_batch_size": wandb.plot.line_series(
                xs=[int(b) for b in batches], ys=[[lookup.get((n, b)) for b in batches] for n in norms],
                keys=[norm_label(n) for n in norms], title="Error vs images per worker",
                xname="images per worker (N)"),
        })
        attach_report(run, runs, Path(sweep_dir) / "report")
    finally:
        run.finish()
    log.info("W&B sweep summary: run %s (%s, group %s)%s", run.id, run.name, config.name,
             f" {run.url}" if config.logger.mode == "online" and run.url else f", {config.logger.mode}")


def attach_report(run, runs, out: Path) -> None:
    """Write normlab-report's report of the sweep into ``out`` and attach it to ``run``. A report that cannot be
    built only warns."""
    from normlab.analysis.report import build_report

    try:
        written = build_report(runs, out, sources=[str(out.parent)])
    except Exception as e:  # noqa: BLE001 - the table and the plot are logged already
        log.warning("W&B sweep summary: no report (%s: %s)", type(e).__name__, e)
        return
    attach_files(run, sorted({p for paths in written.values() for p in paths}))


def attach_files(run, files: list[Path]) -> None:
    """A report's files on a W&B run: the figures as images (``report/<name>``), every file in the artifact
    ``report-<run id>``."""
    import wandb

    run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"})
    report = wandb.Artifact(f"report-{run.id}", type="report", description="normlab-report's report of the sweep")
    for path in files:
        report.add_file(str(path), name=path.name)
    run.log_artifact(report)


class WandbSweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.logger.name != "wandb":
            return
        try:
            log_sweep_summary(config, config.hydra.sweep.dir)
        except Exception as e:  # noqa: BLE001 - an observer never fails the sweep
            log.warning("W&B sweep summary failed (%s: %s); the run directories are complete", type(e).__name__, e)
