"""The jobs a multirun will launch, expanded before it starts as Hydra's basic sweeper will, and those of them
that ``validate`` will refuse (said once at sweep start; each is skipped again at its own start).

The expansion uses Hydra's public override grammar (``OverridesParser``, ``Override.sweep_string_iterator``): the
cartesian product of every swept key's values, in the order the basic sweeper runs them.
"""

from __future__ import annotations

import itertools

from omegaconf import DictConfig, OmegaConf

MAX_PRECHECKED_JOBS = 500  # a larger grid is checked job by job only


def count_jobs(config: DictConfig) -> int | None:
    """How many jobs a multirun launches with Hydra's basic sweeper. None for other sweepers."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    return len(job_overrides(config))


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Every job's overrides, in the order Hydra's basic sweeper launches them: the product of each override's
    values (a sweep ``norm=bn,gn`` gives two, a plain ``seed=1`` one), the last key varying fastest."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: dict[str, list[str]] = {}  # a key given twice keeps its first place and its last values
    for override in OverridesParser.create().parse_overrides(sweep_arguments(config)):
        key = override.get_key_element()
        if override.is_interval_sweep():
            raise ValueError(f"{key}: an interval sweep needs a sweeper that samples it, not the basic sweeper")
        if override.is_sweep_override():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def invalid_jobs(config: DictConfig, config_name: str = "train") -> list[tuple[list[str], str]]:
    """The jobs that ``validate`` will refuse, found before the sweep starts: (overrides, reason)."""
    from hydra import compose

    from normlab.errors import ConfigError
    from normlab.validation import validate

    found = []
    for overrides in job_overrides(config):
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except Exception:  # noqa: BLE001 - an option Hydra cannot find: Hydra refuses the whole sweep, naming it
            continue
        try:
            validate(cfg)
        except ConfigError as e:
            found.append((overrides, refusal(e)))
    return found


def refusal(error: Exception) -> str:
    """Why a job is invalid, on one line: the error's first two lines."""
    return " ".join(line.strip() for line in str(error).splitlines()[:2])


def sweep_arguments(config: DictConfig) -> list[str]:
    """The overrides a multirun sweeps over, as the sweeper sees them: ``hydra.sweeper.params``, then the
    command line's."""
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys that take more than one value in a multirun (``norm`` in ``norm=bn,gn``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(sweep_arguments(config))
    return [o.get_key_element() for o in overrides if o.is_sweep_override()]
