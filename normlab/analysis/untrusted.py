"""Values read from disk (summaries, metrics, a published runs.csv), made safe before the report uses them: a number
only where it is a finite number in its column's range, a name only where it can be part of a file name.

Anything else is missing (a metrics row) or makes its run invalid (``collect.tidy``): a value from disk never
crashes the report, never decides where a file is written, and never becomes markup.
"""

from __future__ import annotations

import math
import numbers
import re
import reprlib
from dataclasses import dataclass
from typing import Any

import pandas as pd

MAX_WHOLE = 2 ** 53  # whole numbers above it are not exact as floats, and pandas reads integer columns through them
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a norm's name: also a part of a file name (no '/', no '.', not too long)


@dataclass(frozen=True)
class Range:
    """The numbers a value may be; its text says so in a problem message."""

    lowest: float = -math.inf
    highest: float = math.inf
    whole: bool = False

    def admits(self, number: float) -> bool:
        return self.lowest <= number <= self.highest and (not self.whole or number.is_integer())

    def __str__(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        if math.isinf(self.lowest) and math.isinf(self.highest):
            return f"a finite {kind.removeprefix('a ')}"
        highest = "2^53" if self.highest == MAX_WHOLE else f"{self.highest:.0f}" if self.whole else f"{self.highest:g}"
        return f"{kind} ≥ {self.lowest:g}" if math.isinf(self.highest) else f"{kind} in [{self.lowest:g}, {highest}]"


REAL = Range()
PERCENT = Range(0, 100)  # an error rate
COUNT = Range(1, MAX_WHOLE, whole=True)  # images per worker, workers, groups, planned epochs, a data set's size
INDEX = Range(0, MAX_WHOLE, whole=True)  # a seed, an epoch, epochs done


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA: a value not recorded, not a bad one."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def finite_number(value: Any, valid: Range = REAL) -> float | None:
    """`value` as a float if it is a real number `valid` admits; None for anything else (missing, a bool, text,
    a list, NaN or ±inf, an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and valid.admits(number) else None


def is_name(value: Any) -> bool:
    """Whether `value` is a name the report may show and build a file name from (a norm's: ``gn_ws``)."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def file_token(value: Any) -> str:
    """`value` as a part of a file name: letters, digits, '_' and '-' (any other character becomes '_'), at most
    64 characters, never empty; so a file named from data stays in the report's folder under the name its
    link gives (a '.' would be read as the suffix)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(value))[:64] or "_"


def shown(value: Any) -> str:
    """`value` as a problem message quotes it: its repr, cut short (a 400-digit number, a long text)."""
    return reprlib.repr(value)
