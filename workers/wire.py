"""The usual shapes of the busiest kinds, read in one typed pass: the worker's fast path.

workers/normalize.py reads any item, however odd, from plain decoded JSON; that costs a dict per
object and a lookup per field. Messages, echoes, referrals and postbacks almost always come in
the shape Facebook documents, so they are first decoded straight into the structs below, and
the event is built from them with normalize's own coercers. An item of another shape (a value of
an unexpected type, a number out of range, a lone surrogate) fails that decode and is read by
normalize as before: both ways give the same event (tests/test_properties.py checks it on
arbitrary JSON), this one only sooner.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared import events as ev
from shared.codec import QueuedEvent
from shared.identity import SenderIds, sender_from
from shared.timestamps import to_millis
from workers.normalize import base_of, s


class _Id(msgspec.Struct):
    id: Any = None


class _Referral(msgspec.Struct):
    source: Any = None
    type: Any = None
    ref: Any = None
    ad_id: Any = None
    ads_context_data: Any = None
    referer_uri: Any = None
    origin_domain: Any = None
    product: _Id | None = None


class _Payload(msgspec.Struct):
    payload: Any = None


class _Mid(msgspec.Struct):
    mid: Any = None


class _Message(msgspec.Struct):
    mid: Any = None
    text: Any = None
    quick_reply: _Payload | None = None
    reply_to: _Mid | None = None
    attachments: Any = None
    referral: _Referral | None = None
    app_id: Any = None
    metadata: Any = None
    is_unsupported: Any = None


class _Postback(msgspec.Struct):
    mid: Any = None
    title: Any = None
    payload: Any = None
    referral: _Referral | None = None


class _Item(msgspec.Struct):
    sender: SenderIds | None = None
    recipient: _Id | None = None
    timestamp: Any = None
    message: _Message | None = None
    postback: _Postback | None = None
    referral: _Referral | None = None


_decode = msgspec.json.Decoder(_Item).decode
_NO_MESSAGE, _NO_POSTBACK = _Message(), _Postback()


def _referral(r: _Referral | None) -> ev.Referral | None:
    """normalize.referral, from a typed referral."""
    if r is None:
        return None
    ads = r.ads_context_data
    return ev.Referral(  # by position (source, type, ref, ad_id, ads_context_data, referer_uri,
        # product_id): a Struct's keywords cost per argument
        s(r.source), s(r.type), s(r.ref), s(r.ad_id),
        ads if isinstance(ads, dict) and ads else None,
        s(r.referer_uri) or s(r.origin_domain),
        s(r.product.id) if r.product is not None else None,
    )


def _message(base: dict[str, Any], item: _Item) -> ev.Event:
    m = item.message or _NO_MESSAGE
    if m.quick_reply is None and m.reply_to is None and m.attachments is None and \
            m.referral is None and m.app_id is None and m.metadata is None and \
            m.is_unsupported is None:  # a plain text: every other field at its default
        return ev.Message(**base, mid=s(m.mid), text=s(m.text))
    return ev.Message(
        **base,
        mid=s(m.mid),
        text=s(m.text),
        quick_reply_payload=s(m.quick_reply.payload) if m.quick_reply is not None else None,
        reply_to_mid=s(m.reply_to.mid) if m.reply_to is not None else None,
        attachments=m.attachments if isinstance(m.attachments, list) else [],
        referral=_referral(m.referral),
        app_id=s(m.app_id),
        metadata=s(m.metadata),
        is_unsupported=m.is_unsupported is True,
    )


def _postback(base: dict[str, Any], item: _Item) -> ev.Event:
    p = item.postback or _NO_POSTBACK
    return ev.Postback(**base, mid=s(p.mid), title=s(p.title), payload=s(p.payload),
                       referral=_referral(p.referral))


def _referral_event(base: dict[str, Any], item: _Item) -> ev.Event:
    return ev.ReferralEvent(**base, referral=_referral(item.referral) or ev.Referral())


_READERS = {"message": _message, "message_echo": _message, "postback": _postback,
            "referral": _referral_event}


def event_of(queued: QueuedEvent) -> ev.Event | None:
    """The event of a messaging or standby item of a kind read here, in its usual shape; None
    for anything else (normalize reads it then)."""
    reader = _READERS.get(queued.kind)
    if reader is None or queued.channel not in ("messaging", "standby"):
        return None
    try:
        item = _decode(queued.raw)
    except msgspec.MsgspecError:
        return None
    recipient = item.recipient.id if item.recipient is not None else None
    base = base_of(queued, queued.kind, sender_from(queued.object, item.sender),
                   s(recipient), to_millis(item.timestamp))
    return reader(base, item)
