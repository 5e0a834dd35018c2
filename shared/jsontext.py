"""Any valid JSON text to Python values, including what msgspec refuses by default.

Facebook's bodies are valid JSON, but two things in valid JSON make msgspec's decoder fail: a
lone UTF-16 surrogate escape (`"\\ud83d"`, half an emoji, as truncated text holds) and a number
out of a float's range (`1e400`). One such value must not cost the events around it, so they
are decoded here: a lone surrogate becomes U+FFFD (`\\ufffd`, the same six bytes, so offsets in
the text do not move) and an out-of-range number becomes an infinite float. Only the decoded
copy changes: the raw text that is stored keeps what was sent.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

_strict = msgspec.json.Decoder()
_wide = msgspec.json.Decoder(float_hook=float)

# An escaped backslash is consumed as one unit, so `\\ud83d` (a backslash, then text) is left
# alone; a high surrogate followed by a low one is a valid pair and is kept.
_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
_REPLACEMENT = b"\\ufffd"


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
    to change (a lone surrogate, a number out of range): two texts that differ can then decode
    alike. Raises msgspec.DecodeError only for text that is not JSON."""
    try:
        return _strict.decode(text), False
    except msgspec.DecodeError:
        data = text.encode() if isinstance(text, str) else bytes(text)
        return _wide.decode(without_lone_surrogates(data)), True


def loads(text: bytes | str | msgspec.Raw) -> Any:
    """The values of valid JSON text, as `decode` reads them."""
    return decode(text)[0]
