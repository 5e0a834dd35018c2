"""Facebook sends timestamps as ms or s, as numbers, floats or strings: normalise to ms."""

from __future__ import annotations

from typing import Any

# Below this a value is taken as seconds: 1e11 ms is March 1973, 1e11 s is the year 5138.
_SECONDS_BELOW = 100_000_000_000


def to_millis(value: Any) -> int | None:
    """Integer milliseconds since the epoch, or None when the value is not a timestamp."""
    if type(value) is int:  # the usual shape, first: a bool is not one
        if not 0 <= value < 10**16:
            return None
        return value * 1000 if value < _SECONDS_BELOW else value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isascii() or "_" in value:  # float() takes "1_000" and other scripts' digits
            return None
        if value.isdigit():  # read whole: a float() keeps only 53 bits (2**53 ms is in 2255)
            digits = value.lstrip("0") or "0"  # at most 16 digits to read: never a huge int()
            return to_millis(int(digits)) if len(digits) <= 16 else None
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or value != value or value < 0:  # NaN or negative
        return None
    if value >= 1e16:  # beyond year 2286 in ms: not a timestamp
        return None
    ms = value * 1000 if value < _SECONDS_BELOW else value
    return round(ms)
