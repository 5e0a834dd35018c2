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

from typing import Any, Final

import msgspec
from redis.asyncio import Redis

from shared import keys


class Touch(msgspec.Struct, frozen=True):
    """One referral touch: where a user came from, when, and which part of the event said so."""

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

POSITIONS: Final = ("timestamp", "via", "source", "type", "ref", "ad_id", "ads_context_data",
                    "referer_uri", "product_id", "page_id")
"""The order of a stored touch's values; workers/effects.lua reads them by these positions."""

_FIELDS = tuple(Touch.__struct_fields__)
_json = msgspec.json.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(tuple[int, Any, list[list[Any]]]).decode


def pack_touch(touch: Touch) -> list[Any]:
    """A touch as stored: positional, `via` as an index, false for every absent value."""
    return [
        touch.timestamp, VIA.index(touch.via), touch.source or False, touch.type or False,
        touch.ref or False, touch.ad_id or False,
        _json(touch.ads_context_data).decode() if touch.ads_context_data else False,
        touch.referer_uri or False, touch.product_id or False, touch.page_id or False,
    ]


def _context(stored: Any) -> dict[str, Any] | None:
    if isinstance(stored, str | bytes):
        try:
            value = msgspec.json.decode(stored)
        except msgspec.DecodeError:
            return None
        return value if isinstance(value, dict) else None
    return None


def unpack_touch(values: list[Any]) -> Touch:
    v: list[Any] = [None if x is False else x for x in values]
    v += [None] * (len(POSITIONS) - len(v))
    via, context = v[1], _context(v[6])
    return Touch(
        timestamp=int(v[0] or 0),
        via=VIA[via] if isinstance(via, int) and 0 <= via < len(VIA) else "referral",
        source=v[2], type=v[3], ref=v[4], ad_id=v[5],
        ads_context_data=context if isinstance(context, dict) else None,
        referer_uri=v[7], product_id=v[8], page_id=v[9],
    )


def touch_dict(touch: Touch) -> dict[str, Any]:
    """A touch with its full field names, every field present (null where absent)."""
    return {name: getattr(touch, name) for name in _FIELDS}


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


async def load(redis: Redis, user: str) -> AttributionView | None:
    """A user's attribution record, or None when the user has no touch."""
    raw: bytes | None = await redis.get(keys.attribution(user))
    return read_record(user, raw)


def touch_count(raw: bytes | None) -> int:
    """How many touches a stored record has counted (0 for none)."""
    return _decode_record(raw)[0] if raw else 0
