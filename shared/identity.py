"""Ids and users: how an id in a body becomes a string, and which identity space a user is in.

Facebook writes ids as strings, sometimes as numbers (old payloads and other SDKs' fixtures);
ingest, workers and the CLI all read them through `as_id`. A user is one of three identity
spaces, each with its own attribution record: a Page-scoped id (PSID) on a Messenger body, an
Instagram-scoped id (IGSID) on an Instagram body, and a chat plugin's `user_ref`, which the
website embedding the plugin chooses. The same string in two spaces is two users: `user_key`
makes keys that cannot collide, a PSID staying as it is (the default everywhere, as before).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

_INT_RANGE: Final = (-(2**63), 2**64)

PSID: Final = "psid"
IGSID: Final = "igsid"
USER_REF: Final = "user_ref"
SPACES: Final = (PSID, IGSID, USER_REF)
_PREFIX: Final = {PSID: "psid:", IGSID: "ig:", USER_REF: "ref:"}


def as_id(value: Any) -> str | None:
    """A string id or text: strings as they are, whole numbers as digits (`12.0` too), other
    finite numbers as written (`1.5`); None for anything else (booleans, null, objects)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if _INT_RANGE[0] <= value < _INT_RANGE[1] else None
    if isinstance(value, float) and value - value == 0:  # finite
        return str(int(value)) if value.is_integer() and abs(value) < 2**63 else repr(value)
    return None


def space_of(envelope_object: str, sender: Any) -> tuple[str, str] | None:
    """The identity space and id of an item's `sender`: `sender.id` (an IGSID on an Instagram
    body, else a PSID), else the chat plugin's `sender.user_ref`; None when there is neither."""
    if not isinstance(sender, dict):
        return None
    return _space(envelope_object, sender.get("id"), sender.get("user_ref"))


def _space(envelope_object: str, sender_id: Any, user_ref: Any) -> tuple[str, str] | None:
    sender_id = as_id(sender_id)
    if sender_id:
        return (IGSID if envelope_object == "instagram" else PSID), sender_id
    user_ref = as_id(user_ref)
    if user_ref:
        return USER_REF, user_ref
    return None


def user_key(space: str, value: str) -> str:
    """The user's key (`fb:attr:<key>`, the `user` of an event): a PSID as it is, unless it holds
    a colon; `ig:<id>` and `ref:<user_ref>` for the other two spaces. No two users share one."""
    if space == PSID and ":" not in value:
        return value
    return _PREFIX[space] + value


def sender_of(envelope_object: str, channel: str, item: Any) -> tuple[str, str] | None:
    """The sender of one item as (id as sent, user key): for a messaging or standby item its
    `sender` (see `space_of`); for a change, who it is about: `value.user.id` (inbox labels),
    else `value.from.id` (comments). Ingest (to pick the user's lane) and workers (the event's
    `sender` and `user`) both read it here."""
    if not isinstance(item, dict):
        return None
    if channel == "changes":
        value = item.get("value")
        value = value if isinstance(value, dict) else {}
        found = None
        for holder in (value.get("user"), value.get("from")):
            if isinstance(holder, dict) and (found := as_id(holder.get("id"))):
                break
        if not found:
            return None
        return found, user_key(IGSID if envelope_object == "instagram" else PSID, found)
    space = space_of(envelope_object, item.get("sender"))
    return None if space is None else (space[1], user_key(*space))


class SenderIds(msgspec.Struct):
    """An item's `sender` object read by type (ingest's typed glance, workers/wire.py): an item
    whose `sender` is not an object fails that decode and is read from plain values instead."""

    id: Any = None
    user_ref: Any = None


def sender_from(envelope_object: str, sender: SenderIds | None) -> tuple[str, str] | None:
    """`sender_of` for a messaging or standby item whose `sender` object was read by type."""
    if sender is None:
        return None
    found = sender.id
    if type(found) is str and found:  # the usual shape, first: what _space and user_key give
        if envelope_object == "instagram":
            return found, _PREFIX[IGSID] + found
        if ":" not in found:
            return found, found
    space = _space(envelope_object, sender.id, sender.user_ref)
    return None if space is None else (space[1], user_key(*space))
