"""Whether a run folder's run is this job's, before it is skipped (done) or resumed (checkpoint).

Run folders are named by the overrides that differ, so an edited experiment file or a reused sweep folder
puts another config's run where this job looks. Skipping or resuming it would pass its results off as
this job's: that is refused, naming the keys that changed.
"""

from __future__ import annotations

import logging
from typing import Any

from normlab.errors import ConfigError
from normlab.protocol import flatten, is_runtime_key
from normlab.records import RunDir, read_metrics, read_yaml
from normlab.run_spec import RunSpec
from normlab.settings import schema_defaults

log = logging.getLogger("normlab")

def changed_keys(saved: dict, current: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) wherever two resolved configs differ, runtime keys aside.

    A key the saved config lacks (a later normlab added it) counts with its schema default from
    `defaults`; a key only the saved config has (since dropped) is no change of the job.
    """
    old, new, default = flatten(saved), flatten(current), flatten(defaults or {})
    changes = []
    for key in sorted(new):
        if is_runtime_key(key) or (key not in old and key not in default):
            continue
        before = old[key] if key in old else default[key]
        if before != new[key]:
            changes.append((key, before, new[key]))
    return changes


def job_changes(spec: RunSpec, records: RunDir) -> list[tuple[str, Any, Any]]:
    """How `spec`'s config differs from the finished or checkpointed run in `records` (nothing there: no change).

    config.yaml is read as plain YAML (``safe_load``: data only), as normlab wrote it: resolved, with the fixed
    sets of words as their words, as the spec's record holds them too."""
    if not records.config.exists() or not (records.is_final() or records.checkpoint.exists()
                                           or records.previous_checkpoint.exists() or read_metrics(records.metrics)):
        return []
    saved = read_yaml(records.config)  # a mapping: RunDir.unreadable() was asked first
    return changed_keys(saved, spec.recorded_config, schema_defaults(spec.norm.name))


def folder_action(spec: RunSpec, records: RunDir) -> str:
    """What running `spec` does with `records`, read only: "train", "train: starts over (trainer.force=true)",
    "resume" (a checkpoint) or "skip: STATUS" (a final summary). Refuses (ConfigError) a folder that holds
    another config's run, or records that cannot be read, unless trainer.force=true."""
    if spec.length.force:
        held = [p.name for p in (records.summary, records.metrics, records.checkpoint, records.previous_checkpoint)
                if p.exists()]
        return "train: starts over (trainer.force=true)" if held else "train"
    unreadable = records.unreadable()
    if unreadable:
        raise ConfigError(f"{records.path} holds records that cannot be read: {', '.join(unreadable)}; the "
                          "folder is treated as occupied, not empty. trainer.force=true discards what it holds")
    changes = job_changes(spec, records)
    if changes:
        refuse_another_job(records, changes)
    if records.is_final():
        return f"skip: {records.read_summary()['status']}"
    return "resume" if records.checkpoint.exists() or records.previous_checkpoint.exists() else "train"


def job_is_done(spec: RunSpec, records: RunDir) -> bool:
    """Whether this job is done in `records` (skip it), as ``folder_action`` decides; trainer.force=true deletes
    the folder's records here, so the job starts over."""
    action = folder_action(spec, records)
    if spec.length.force:
        for path in (records.summary, records.metrics, records.checkpoint, records.previous_checkpoint):
            path.unlink(missing_ok=True)
    if action.startswith("skip"):
        log.info("skipping %s: summary.json says %s (trainer.force=true reruns it)", records.path,
                 action.split(": ", 1)[1])
        return True
    return False


def refuse_another_job(records: RunDir, changes: list[tuple[str, Any, Any]]) -> None:
    """Raise the ConfigError that names the changed keys and the two ways on."""
    listed = "; ".join(f"{key} was {old!r}, now {new!r}" for key, old, new in changes[:6])
    more = f" (and {len(changes) - 6} more)" if len(changes) > 6 else ""
    state = records.read_summary()["status"] if records.is_final() else "interrupted"
    raise ConfigError(
        f"{records.path} holds a run ({state}) of another config: {listed}{more}. "
        "trainer.force=true replaces it; another hydra.sweep.dir (or hydra.run.dir) keeps both")
