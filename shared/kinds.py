"""Which kind an item of `messaging[]` or `standby[]` is, from the key that carries its event."""

from __future__ import annotations

from typing import Any, Final

UNKNOWN: Final = "unknown"

# Item key -> kind, in the order they are tried. `message` becomes `message_echo` when
# `message.is_echo` is true; `policy-enforcement` (hyphen) is an old spelling of the same event.
EVENT_KEYS: Final[dict[str, str]] = {
    "message": "message",
    "postback": "postback",
    "referral": "referral",
    "delivery": "delivery",
    "read": "read",
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
    *dict.fromkeys(k for k in EVENT_KEYS.values() if k != "message"),
    UNKNOWN,
)
"""Every built-in kind; each has its own arq job function and its own stream."""

ENVELOPE_KEYS: Final = frozenset({"sender", "recipient", "timestamp"})


def classify(item: Any) -> str:
    """The kind of one raw item (a decoded JSON value); anything unrecognised is `unknown`."""
    if not isinstance(item, dict):
        return UNKNOWN
    for key, kind in EVENT_KEYS.items():
        if key in item:
            body = item[key]
            if not isinstance(body, dict):
                return UNKNOWN
            if kind == "message" and body.get("is_echo") is True:
                return "message_echo"
            return kind
    return UNKNOWN


def event_key(item: Any) -> str | None:
    """The key that carries an unrecognised item's event (`message_request`, `foo`), if any."""
    if not isinstance(item, dict):
        return None
    for key in item:
        if key not in ENVELOPE_KEYS:
            return str(key).replace("-", "_")
    return None
