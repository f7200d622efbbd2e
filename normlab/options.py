"""Checking keyword options against the factory that will receive them.

Norms and models are both built by name from config; a misspelt option must fail with a
message that names the thing being built and lists what it does take.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


def accepted_options(factory: Callable[..., Any]) -> dict[str, Any]:
    """The keyword-only parameters of `factory` and their defaults: its configurable options."""
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_options(kind: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Raise ValueError if `options` holds a key that `factory` does not take."""
    valid = accepted_options(factory)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k}={options[k]!r}" for k in unknown)
        raise ValueError(
            f"{kind}: unknown option(s) {listed}; {kind} takes: {', '.join(sorted(valid)) or 'no options'}"
        )
