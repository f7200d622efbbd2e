"""The errors normlab reports to a user as one message, not a traceback; imported by every layer, importing none."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input, found before any work starts. The message names the key, the value and what is valid."""


class RunFolderBusy(ConfigError):
    """Another process holds the run folder: this job changes nothing there and stops (or, in a sweep, is skipped)."""
