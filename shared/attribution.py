"""Referral touches: how they are stored per user in Redis and how they are read back.

A user's record is the hash `fb:attr:<user>` with fields `n` (touch count), `h` (the history:
a MessagePack array of touches, latest timestamp first, capped) and `f` (the earliest touch, kept
only once it has fallen out of the history). Touches use one-letter keys to keep a user small.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Touch(msgspec.Struct, frozen=True, omit_defaults=True, rename={
    "timestamp": "t", "via": "v", "source": "s", "type": "y", "ref": "r", "ad_id": "a",
    "ads_context_data": "c", "referer_uri": "u", "product_id": "p", "page_id": "g",
}):
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


encode_touch = msgspec.msgpack.Encoder().encode
_decode_touches = msgspec.msgpack.Decoder(list[Touch]).decode
_decode_touch = msgspec.msgpack.Decoder(Touch).decode

_FIELDS = tuple(Touch.__struct_fields__)


def touch_dict(touch: Touch) -> dict[str, Any]:
    """A touch with its full field names, every field present (null where absent)."""
    return {name: getattr(touch, name) for name in _FIELDS}


def fb_ref_vars(touch: Touch) -> dict[str, str | None]:
    """The three variables a bot platform branches on (seed 001), from one touch."""
    return {"_fbRefSource": touch.source, "_fbRefParam": touch.ref, "_fbRefAdId": touch.ad_id}


def read_record(user: str, fields: dict[bytes, bytes]) -> AttributionView | None:
    """Turn the raw hash of `fb:attr:<user>` into the API's view; None when the user has none."""
    history_raw = fields.get(b"h")
    if not history_raw:
        return None
    history = _decode_touches(history_raw)
    if not history:
        return None
    first_raw = fields.get(b"f")
    first = _decode_touch(first_raw) if first_raw else history[-1]
    last = history[0]
    return AttributionView(
        user=user,
        touches=int(fields.get(b"n", b"0")),
        first=touch_dict(first),
        last=touch_dict(last),
        history=[touch_dict(t) for t in history],
        vars=fb_ref_vars(last),
    )
