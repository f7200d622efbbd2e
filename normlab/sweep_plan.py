"""``normlab-train -m ARGS --dry-run``: a sweep's jobs, each with its folder and what running the sweep would do
with it (train, resume, skip as done, or skip as invalid and why), without training or writing anything: the
job's own decision (engine/rerun.py ``folder_action``), a folder of another config's run refused as the job would.

The jobs are the ones Hydra's basic sweeper would launch (normlab/sweep_jobs.py ``job_overrides``), each composed
and validated as the job itself would be. Exit code 1 when some job is invalid, as the sweep would end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from normlab.records import RunDir


@dataclass
class PlannedJob:
    name: str             # what the sweep varies: "norm=gn batch.per_worker=8"
    run_dir: Path | None
    action: str           # "train", "resume", "skip: done", "invalid: REASON" (engine/rerun.py folder_action)


def plan(args: list[str], config_dir: str, config_name: str = "train") -> list[PlannedJob]:
    """Every job of ``normlab-train -m ARGS``, composed and validated; nothing is run or written."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from normlab import sweep_jobs
    from normlab.engine.rerun import folder_action
    from normlab.errors import ConfigError
    from normlab.validation import resolve_run, validate

    parsed = OverridesParser.create().parse_overrides(args)
    fixed = [arg for arg, o in zip(args, parsed) if not o.is_sweep_override()]
    hydra_args = [arg for arg, o in zip(args, parsed) if o.is_hydra_override()]
    task_args = [arg for arg, o in zip(args, parsed) if not o.is_hydra_override()]
    jobs = []
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        base = compose(config_name, overrides=fixed, return_hydra_config=True)
        base.hydra.overrides.task = task_args
        keys = sweep_jobs.swept_keys(base)
        for overrides in sweep_jobs.job_overrides(base):
            name = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys) or " ".join(overrides)
            try:
                cfg = compose(config_name, overrides=overrides + hydra_args, return_hydra_config=True)
            except Exception as e:  # noqa: BLE001 - Hydra's own refusal, shown like validate's
                jobs.append(PlannedJob(name, None, f"invalid: {sweep_jobs.refusal(e)}"))
                continue
            HydraConfig.instance().set_config(cfg)
            run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
            try:
                task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                action = folder_action(resolve_run(task, validate(task)), RunDir(run_dir))
            except ConfigError as e:
                action = f"invalid: {sweep_jobs.refusal(e)}"
            jobs.append(PlannedJob(name, run_dir, action))
    return jobs


def main(args: list[str], config_dir: str) -> int:
    """Print the plan, one line per job and a tally; 1 when some job is invalid."""
    jobs = plan(args, config_dir)
    counts: dict[str, int] = {}
    for num, job in enumerate(jobs):
        print(f"#{num} {job.name} · {job.action} · {job.run_dir or 'no folder'}")
        kind = job.action.split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    print(f"dry run: {len(jobs)} jobs · " + ", ".join(f"{n} {k}" for k, n in counts.items()) + " · nothing was run")
    return int(counts.get("invalid", 0) > 0)
