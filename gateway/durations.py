"""Durations as people write them: `90s`, `15m`, `1h`, `30d` (and `2w`), as whole seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*([0-9]+)\s*([smhdw])\s*")


def parse_duration(text: str | int | float, *, allow_zero: bool = False) -> int:
    """Seconds in `text`; a bare number is seconds. Raises ValueError naming the input."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration; write it like 90s, 15m, 1h or 30d")
    if isinstance(text, int | float):
        if not math.isfinite(text):
            raise ValueError(f"{text!r} is not a duration; write it like 90s, 15m, 1h or 30d")
        value = int(text)
    else:
        match = _DURATION.fullmatch(text)
        if match is not None:
            value = int(match.group(1)) * _UNITS[match.group(2)]
        elif text.strip().isascii() and text.strip().isdigit():
            value = int(text)
        else:
            raise ValueError(f"{text!r} is not a duration; write it like 90s, 15m, 1h or 30d")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{text!r} is not a positive duration")
    return value


def format_duration(seconds: int) -> str:
    """The largest whole unit: 2592000 -> '30d', 5400 -> '90m'."""
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
