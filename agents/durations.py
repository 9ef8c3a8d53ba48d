"""Durations as users write them in definitions and config: `90s`, `5m`, `2h`, `30d` (also `500ms`, `1w`).

One parser for every place a window, retention or timeout is written down, so they all mean the same thing.
"""

from __future__ import annotations

import re

DAY_MS = 86_400_000
_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration_ms(text: str | int | float) -> int:
    """Milliseconds in `text`; a bare number is taken as seconds (YAML users write `timeout: 30`)."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"a duration can't be negative: {text!r}")
        return int(text * 1000)
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (write it like 90s, 5m, 2h or 30d)")
    amount, unit = match.groups()
    ms = float(amount) * _UNITS_MS[unit]
    if not ms < 2**63:  # also inf, for a thousand digits: a duration must fit a Kafka long
        raise ValueError(f"duration {text[:40]!r} is too long")
    return int(ms)


def format_duration_ms(ms: int) -> str:
    """The shortest exact spelling of `ms`, e.g. 86400000 -> '1d'; used when printing settings back."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
