"""The auto | true | false settings (trainer.channels_last, cuda_graph, progress), read one way everywhere.

YAML hands them over as booleans (``true``) or strings (``"True"``, ``auto``); every reader wants one of
three words.
"""

from __future__ import annotations

from typing import Any

SWITCH = ("auto", "true", "false")


def switch(value: Any) -> str:
    """'auto', 'true' or 'false' for a config value; anything else as its lower-case text (validate refuses it)."""
    return str(value).lower()


def resolve_switch(value: Any, auto: bool) -> bool:
    """The switch as a bool, with `auto` standing for what auto means for it."""
    word = switch(value)
    return auto if word == "auto" else word == "true"
