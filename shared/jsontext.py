"""Any valid JSON text to Python values, including what msgspec refuses by default.

Facebook's bodies are valid JSON, but three things in valid JSON make msgspec's decoder fail: a
lone UTF-16 surrogate escape (`"\\ud83d"`, half an emoji, as truncated text holds), a number
out of a float's range (`1e400`) and an integer of more digits than Python reads (4,300). One
such value must not cost the events around it, so they are decoded here: a lone surrogate
becomes U+FFFD (`\\ufffd`, the same six bytes, so offsets in the text do not move), an
out-of-range number an infinite float, and so does such an integer (its digits are never read
into an int: that is quadratic). Only the decoded copy changes: the raw text that is stored
keeps what was sent.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

_inexact = [False]
"""Set while `decode` reads a float literal that another literal reads the same as."""


def _noted_float(literal: str) -> float:
    """A float literal's value, noting one that is not the shortest text of its value
    (`0.10000000000000001` reads as `0.1`, `1e-400` as `0.0`, `1.50` as `1.5`): two texts that
    differ must not hash alike (ingest/envelope.py dedupe_id)."""
    value = float(literal)
    if repr(value) != literal:
        _inexact[0] = True
    return value


_strict = msgspec.json.Decoder(float_hook=_noted_float)
_wide = msgspec.json.Decoder(float_hook=float)

# An escaped backslash is consumed as one unit, so `\\ud83d` (a backslash, then text) is left
# alone; a high surrogate followed by a low one is a valid pair and is kept.
_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
_REPLACEMENT = b"\\ufffd"

_LONGEST_INT = 4300
"""CPython reads integers of at most this many digits (the default of
`sys.get_int_max_str_digits`); msgspec raises on a longer one."""

# A string (skipped whole, escapes included), or an integer literal longer than that: after
# `[`, `,`, `:` or whitespace (or at the start), before `]`, `}`, `,`, whitespace or the end.
_HUGE_INTS = re.compile(
    rb'"(?:[^"\\]|\\.)*"|(?:^|(?<=[\[,:\s]))(-?)\d{%d,}(?=[\]},\s]|$)' % (_LONGEST_INT + 1)
)


def _huge_to_infinity(match: re.Match[bytes]) -> bytes:
    if match.group(1) is None:  # a string
        return match.group()
    return match.group(1) + b"1e400"


def _lone_to_replacement(match: re.Match[bytes]) -> bytes:
    text = match.group()
    return text if len(text) != 6 else _REPLACEMENT


def without_lone_surrogates(text: bytes) -> bytes:
    """`text` with every lone surrogate escape replaced by `\\ufffd`: same length, same offsets."""
    if b"\\u" not in text and b"\\U" not in text:
        return text
    return _ESCAPES.sub(_lone_to_replacement, text)


def decode(text: bytes | str | msgspec.Raw) -> tuple[Any, bool]:
    """Decode valid JSON whatever its strings and numbers hold, and say whether the values had
    to change (a lone surrogate, a number out of range or rounded): two texts that differ can
    then decode alike. Raises msgspec.DecodeError only for text that is not JSON."""
    _inexact[0] = False
    try:
        value = _strict.decode(text)
        return value, _inexact[0]
    except msgspec.DecodeError:
        data = without_lone_surrogates(text.encode() if isinstance(text, str) else bytes(text))
        try:
            return _wide.decode(data), True
        except msgspec.ValidationError:  # an integer too long to read
            return _wide.decode(_HUGE_INTS.sub(_huge_to_infinity, data)), True


def loads(text: bytes | str | msgspec.Raw) -> Any:
    """The values of valid JSON text, as `decode` reads them."""
    return decode(text)[0]
