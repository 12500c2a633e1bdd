"""Durations as people write them: `90s`, `15m`, `1h`, `30d` (and `2w`), or compound like
`1h30m` and `1d12h` (largest unit first, each once), as whole seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:\s*[0-9]+\s*[smhdw])+\s*")
_PART = re.compile(r"([0-9]+)\s*([smhdw])")
_ORDER = "wdhms"
_HOW = "write it like 90s, 15m, 1h30m or 30d"


def parse_duration(text: str | int | float, *, allow_zero: bool = False) -> int:
    """Seconds in `text`; a bare number is seconds. Raises ValueError naming the input."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration; {_HOW}")
    if isinstance(text, int | float):
        if not math.isfinite(text):
            raise ValueError(f"{text!r} is not a duration; {_HOW}")
        value = int(text)
    else:
        if _DURATION.fullmatch(text) is not None:
            parts = _PART.findall(text)
            units = [_ORDER.index(unit) for _, unit in parts]
            if units != sorted(set(units)):
                raise ValueError(f"{text!r} is not a duration; give each unit once, largest first ({_HOW})")
            value = sum(int(number) * _UNITS[unit] for number, unit in parts)
        elif text.strip().isascii() and text.strip().isdigit():
            value = int(text)
        else:
            raise ValueError(f"{text!r} is not a duration; {_HOW}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{text!r} is not a positive duration")
    return value


def format_duration(seconds: int) -> str:
    """The largest whole unit up to days (as people type TTLs): 2592000 -> '30d', 5400 -> '90m',
    91 days -> '91d' (not '13w')."""
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
