"""Which kind an event is: the one place that decides it, for ingest, workers and the CLI.

An item of `messaging[]` or `standby[]` is of the kind named by the key that carries its event;
a `changes[]` item that is not Messenger-shaped is of the kind named by its `field`.
"""

from __future__ import annotations

import re
from typing import Any, Final

UNKNOWN: Final = "unknown"

# Item key -> kind, in the order they are tried. `message` is refined by `message_kind`;
# `policy-enforcement` (hyphen) is an old spelling, `messaging_seen` Instagram's read receipt.
EVENT_KEYS: Final[dict[str, str]] = {
    "message": "message",
    "postback": "postback",
    "referral": "referral",
    "delivery": "delivery",
    "read": "read",
    "messaging_seen": "read",
    "reaction": "reaction",
    "message_edit": "message_edit",
    "optin": "optin",
    "account_linking": "account_linking",
    "policy_enforcement": "policy_enforcement",
    "policy-enforcement": "policy_enforcement",
    "game_play": "game_play",
    "pass_thread_control": "pass_thread_control",
    "take_thread_control": "take_thread_control",
    "request_thread_control": "request_thread_control",
    "app_roles": "app_roles",
    "response_feedback": "response_feedback",
}

KINDS: Final[tuple[str, ...]] = (
    "message",
    "message_echo",
    "message_unsend",
    *dict.fromkeys(k for k in EVENT_KEYS.values() if k != "message"),
    UNKNOWN,
)
"""Every built-in kind; each has its own stream. A change's kind is named by its field."""

_BUILT_IN: Final = frozenset(KINDS)

MID_KINDS: Final[dict[str, str]] = {
    "message": "message", "message_echo": "message", "message_unsend": "message",
    "postback": "postback",
}
"""Kinds deduplicated by a mid, and the key of the item that holds it."""

ENVELOPE_KEYS: Final = frozenset({"sender", "recipient", "timestamp"})
_NOT_KEY_SAFE = re.compile(r"[^a-z0-9_]")
MAX_KIND_LENGTH: Final = 64


def message_kind(is_echo: Any, is_deleted: Any) -> str:
    """A `message` item's kind: an unsend (`is_deleted`) is its own event, never a duplicate of
    the message it deletes; an echo is the Page's own message."""
    if is_deleted is True:
        return "message_unsend"
    if is_echo is True:
        return "message_echo"
    return "message"


def classify(item: Any) -> str:
    """The kind of one raw item (a decoded JSON value); anything unrecognised is `unknown`."""
    if not isinstance(item, dict):
        return UNKNOWN
    for key, kind in EVENT_KEYS.items():
        if key in item:
            body = item[key]
            if not isinstance(body, dict):
                return UNKNOWN
            if kind == "message":
                return message_kind(body.get("is_echo"), body.get("is_deleted"))
            return kind
    return UNKNOWN


def change_kind(field: Any) -> str:
    """The kind of a `changes[]` item that is not a Messenger event: its `field`, lowercased and
    made safe for a key name. A field that would name a built-in kind is prefixed `change_`,
    so a change never lands in a messaging kind's stream with another shape."""
    if not isinstance(field, str) or not field:
        return UNKNOWN
    kind = _NOT_KEY_SAFE.sub("_", field.lower())[:MAX_KIND_LENGTH]
    return f"change_{kind}" if kind in _BUILT_IN else kind


def is_messaging_value(value: Any) -> bool:
    """A `changes[].value` that is a Messenger event (the App Dashboard's test format) rather
    than a Page or Instagram change: it has a `sender` or `recipient` object."""
    return isinstance(value, dict) and (
        isinstance(value.get("sender"), dict) or isinstance(value.get("recipient"), dict))


def event_key(item: Any) -> str | None:
    """The key that carries an unrecognised item's event (`message_request`, `foo`), if any."""
    if not isinstance(item, dict):
        return None
    for key in item:
        if key not in ENVELOPE_KEYS:
            return str(key).replace("-", "_")
    return None


def refine(kind: str, item: Any, has_handlers: Any) -> str:
    """An `unknown` item whose key has a registered handler becomes that kind (an extension:
    `@on("message_request")` needs no edit in ingest). `has_handlers` is the worker's registry."""
    if kind != UNKNOWN:
        return kind
    key = event_key(item)
    return key if key is not None and has_handlers(key) else UNKNOWN
