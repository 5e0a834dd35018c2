"""Referral touches: how they are stored per user in Redis and how they are read back.

A user's record is one string key `fb:attr:<user>` holding the MessagePack array
`[touches, first, history]`: the number of touches ever stored, the earliest touch once it has
fallen out of the history (else false), and the history, latest timestamp first, capped at
HISTORY_CAP. Each touch is a positional array (see `POSITIONS`) with false for an absent value,
so Lua keeps every position; `ads_context_data` is kept as JSON text, which Lua passes through
untouched (its MessagePack round trip would turn `[1, null]` into a map and `{}` into a list).
A string of positional arrays costs about 170 bytes for a user with one touch and 320 with
three; a hash of named fields cost twice that (a value over 64 bytes turns a small Redis hash
into a full hash table).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec
from msgspec.structs import astuple
from redis.asyncio import Redis

from shared import keys
from shared.identity import PSID, user_key


class Touch(msgspec.Struct, frozen=True):
    """One referral touch: where a user came from, when, and which part of the event said so.
    The one definition of a touch: its stored layout (`POSITIONS`), the API's and the CLI's
    columns and the positions workers/effects.lua reads are all derived from these fields."""

    timestamp: int
    via: str
    """`referral`, `postback` or `message`: where in the event the referral object was."""
    source: str | None = None
    type: str | None = None
    ref: str | None = None
    ad_id: str | None = None
    ads_context_data: dict[str, Any] | None = None
    referer_uri: str | None = None
    product_id: str | None = None
    page_id: str | None = None
    tie: int = 0
    """Orders touches of equal timestamps, whatever order they arrive in: a number derived from
    the event's id (shared/attribution.py `tie_break`)."""
    timestamp_from: str = "event"
    """`event`, or `received` when the event's timestamp was missing, 0, or more than a day
    ahead of the time ingest received it: the received time stands in for it then."""
    object: str = ""
    """The envelope's `object` (`page`, `instagram`) of the event that carried the touch."""


class AttributionView(msgspec.Struct, frozen=True):
    """What `GET /attribution/{user}` answers."""

    user: str
    touches: int
    first: dict[str, Any]
    last: dict[str, Any]
    history: list[dict[str, Any]]
    vars: dict[str, str | None]


VIA: Final = ("referral", "postback", "message")
"""`via` is stored as its index in this tuple."""

POSITIONS: Final[tuple[str, ...]] = tuple(Touch.__struct_fields__)
"""The order of a stored touch's values; workers/effects.lua reads them by these positions."""

_VIA_AT, _CONTEXT_AT = POSITIONS.index("via"), POSITIONS.index("ads_context_data")
_DEFAULTS: Final[tuple[Any, ...]] = (
    (None,) * (len(POSITIONS) - len(Touch.__struct_defaults__)) + Touch.__struct_defaults__)
_json = msgspec.json.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(tuple[int, Any, list[list[Any]]]).decode


def tie_break(event_id: str) -> int:
    """A deterministic 31-bit number from an event id (it fits Lua's numbers exactly)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=4).digest()) >> 1


def pack_touch(touch: Touch) -> list[Any]:
    """A touch as stored: positional, `via` as an index, `ads_context_data` as JSON text, false
    for every absent or default value (so that Lua keeps every position, in few bytes)."""
    values = list(astuple(touch))
    values[_VIA_AT] = VIA.index(values[_VIA_AT])
    context = values[_CONTEXT_AT]
    values[_CONTEXT_AT] = _json(context).decode() if context else None
    return [False if value is None or value == "" or value == default else value
            for value, default in zip(values, _DEFAULTS, strict=True)]


def _context(stored: Any) -> dict[str, Any] | None:
    if isinstance(stored, str | bytes):
        try:
            value = msgspec.json.decode(stored)
        except msgspec.DecodeError:
            return None
        return value if isinstance(value, dict) else None
    return None


def unpack_touch(values: list[Any]) -> Touch:
    """A stored touch back as a Touch; records written before a field existed lack it."""
    fields: dict[str, Any] = {}
    for name, value in zip(POSITIONS, values, strict=False):
        if value is False or value is None:
            continue
        if name == "via":
            value = VIA[value] if isinstance(value, int) and 0 <= value < len(VIA) else None
        elif name == "ads_context_data":
            value = _context(value)
        elif name in ("timestamp", "tie"):
            value = int(value) if isinstance(value, int | float) else None
        elif not isinstance(value, str):
            value = str(value)
        if value is not None:
            fields[name] = value
    fields.setdefault("timestamp", 0)
    fields.setdefault("via", "referral")
    return Touch(**fields)


def touch_dict(touch: Touch) -> dict[str, Any]:
    """A touch with its full field names, every field present (null where absent)."""
    return msgspec.structs.asdict(touch)


def fb_ref_vars(touch: Touch) -> dict[str, str | None]:
    """The three variables a bot platform branches on (seed 001), from one touch."""
    return {"_fbRefSource": touch.source, "_fbRefParam": touch.ref, "_fbRefAdId": touch.ad_id}


def read_record(user: str, raw: bytes | None) -> AttributionView | None:
    """Turn the stored value of `fb:attr:<user>` into the API's view; None when there is none."""
    if not raw:
        return None
    count, first_raw, history_raw = _decode_record(raw)
    history = [unpack_touch(t) for t in history_raw]
    if not history:
        return None
    first = unpack_touch(first_raw) if isinstance(first_raw, list) else history[-1]
    last = history[0]
    return AttributionView(
        user=user,
        touches=count,
        first=touch_dict(first),
        last=touch_dict(last),
        history=[touch_dict(t) for t in history],
        vars=fb_ref_vars(last),
    )


async def load(redis: Redis, user: str, space: str = PSID) -> AttributionView | None:
    """A user's attribution record, or None when the user has no touch. `user` is an id of the
    identity space `space` (shared/identity.py): a PSID by default, an IGSID, or a user_ref."""
    key = user_key(space, user)
    raw: bytes | None = await redis.get(keys.attribution(key))
    return read_record(key, raw)


def touch_count(raw: bytes | None) -> int:
    """How many touches a stored record has counted (0 for none)."""
    return _decode_record(raw)[0] if raw else 0
