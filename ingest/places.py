"""Where each entry, item list, item and change value of a body stands, as byte offsets.

Only for a body read from a copy (one holding lone surrogate escapes, which the copy replaces:
shared/jsontext.py): an item's text as sent is then cut from the body at the place its text was
read in the copy. The places come from walking the JSON's structure, never from searching for an
item's text, which would take a copy of it that stands earlier in the body (under another key,
in another list) for it. Of duplicate keys the last counts, as msgspec reads them.
"""

from __future__ import annotations

import re

from shared.jsontext import decode

Path = tuple[str | int, ...]
"""("entry", i), ("entry", i, list), ("entry", i, list, j), ("entry", i, "changes", j, "value")."""

LISTS = ("messaging", "standby", "changes")

# A string (escapes included), a structural character, or any other value (number, literal).
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:,]|[^\s\[\]{}:,"]+')


def _wanted(path: Path) -> bool:
    depth = len(path)
    if not depth or path[0] != "entry":
        return False
    if depth == 2:
        return True
    if depth in (3, 4):
        return path[2] in LISTS
    return depth == 5 and path[2] == "changes" and path[4] == "value"


class _Open:
    """An object or array being read: its path (None below the depths that matter), and the key
    or index of the value being read in it."""

    __slots__ = ("index", "is_object", "key", "key_next", "path")

    def __init__(self, is_object: bool, path: Path | None) -> None:
        self.is_object, self.path = is_object, path
        self.key, self.index, self.key_next = "", 0, is_object

    def child(self) -> Path | None:
        if self.path is None or len(self.path) >= 5:
            return None
        return (*self.path, self.key if self.is_object else self.index)


def places(text: bytes) -> dict[Path, int]:
    """The offset in `text` (valid JSON) of each value at a path `Path` names."""
    out: dict[Path, int] = {}
    stack: list[_Open] = []

    def value_at(position: int) -> Path | None:
        path = stack[-1].child() if stack else ()
        if path is not None and _wanted(path):
            out[path] = position
        return path

    for match in _TOKENS.finditer(text):
        token, position = match.group(), match.start()
        first = token[:1]
        if first in (b"{", b"["):
            stack.append(_Open(first == b"{", value_at(position)))
        elif first in (b"}", b"]"):
            stack.pop()
        elif first == b",":
            if stack[-1].is_object:
                stack[-1].key_next = True
            else:
                stack[-1].index += 1
        elif first == b":":
            continue
        elif stack and stack[-1].key_next:  # a key
            stack[-1].key, stack[-1].key_next = _key(token), False
        else:
            value_at(position)
    return out


def _key(token: bytes) -> str:
    if b"\\" not in token:
        return token[1:-1].decode()
    key = decode(token)[0]
    return key if isinstance(key, str) else ""
