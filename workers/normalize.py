"""Raw Facebook items to normalised events, tolerant of every inconsistency seen in real traffic.

Each reader takes plain decoded JSON and never raises: a field of the wrong type or out of range
becomes None, so an odd item still yields an event of its kind (tests/test_properties.py feeds
arbitrary JSON values into every field of every kind). What a reader does not model is still on
the stream entry: its `raw` field holds the item as Facebook sent it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared import events as ev
from shared.codec import QueuedEvent
from shared.identity import as_id, sender_of
from shared.kinds import event_key
from shared.timestamps import to_millis

Reader = Callable[[dict[str, Any], dict[str, Any]], ev.Event]

s = as_id
"""A string id or text (shared/identity.py: the one id coercer of ingest, workers and CLI)."""

_INT64 = 2**63


def i(value: Any) -> int | None:
    """A whole number that fits 64 bits, from a number or a string of digits; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    elif isinstance(value, str):
        digits = value.strip()
        value = int(digits) if 0 < len(digits.lstrip("-")) <= 19 and \
            digits.lstrip("-").isdigit() and digits.count("-") <= 1 else None
    if isinstance(value, int) and -_INT64 <= value < _INT64:
        return value
    return None


def f(value: Any) -> float | None:
    """A finite number as a float; else None (an integer too large for a float is None too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if number - number == 0 else None


def d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def referral(value: Any) -> ev.Referral | None:
    """A referral object; the Shops form `{"product": {"id": ...}}` gives `product_id`."""
    if not isinstance(value, dict):
        return None
    ads = value.get("ads_context_data")
    return ev.Referral(
        source=s(value.get("source")),
        type=s(value.get("type")),
        ref=s(value.get("ref")),
        ad_id=s(value.get("ad_id")),
        ads_context_data=ads if isinstance(ads, dict) and ads else None,
        referer_uri=s(value.get("referer_uri")) or s(value.get("origin_domain")),
        product_id=s(d(value.get("product")).get("id")),
    )


def _message(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    m = d(item.get("message"))
    attachments = m.get("attachments")
    return ev.Message(
        **base,
        mid=s(m.get("mid")),
        text=s(m.get("text")),
        quick_reply_payload=s(d(m.get("quick_reply")).get("payload")),
        reply_to_mid=s(d(m.get("reply_to")).get("mid")),
        attachments=attachments if isinstance(attachments, list) else [],
        referral=referral(m.get("referral")),
        app_id=s(m.get("app_id")),
        metadata=s(m.get("metadata")),
        is_unsupported=m.get("is_unsupported") is True,
    )


def _unsend(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    return ev.MessageUnsend(**base, mid=s(d(item.get("message")).get("mid")))


def _postback(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    p = d(item.get("postback"))
    return ev.Postback(
        **base, mid=s(p.get("mid")), title=s(p.get("title")), payload=s(p.get("payload")),
        referral=referral(p.get("referral")),
    )


def _referral(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    return ev.ReferralEvent(**base, referral=referral(item.get("referral")) or ev.Referral())


def _delivery(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    dl = d(item.get("delivery"))
    mids = dl.get("mids")
    return ev.Delivery(
        **base,
        mids=[m for m in (s(x) for x in mids) if m] if isinstance(mids, list) else [],
        watermark=to_millis(dl.get("watermark")),
    )


def _read(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    r = d(item.get("read") or item.get("messaging_seen"))
    return ev.Read(**base, watermark=to_millis(r.get("watermark")))


def _reaction(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    r = d(item.get("reaction"))
    return ev.Reaction(
        **base, mid=s(r.get("mid")), reaction=s(r.get("reaction")), emoji=s(r.get("emoji")),
        action=s(r.get("action")),
    )


def _edit(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    e = d(item.get("message_edit"))
    return ev.MessageEdit(**base, mid=s(e.get("mid")), text=s(e.get("text")),
                          num_edit=i(e.get("num_edit")))


def _optin(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    o = d(item.get("optin"))
    return ev.Optin(
        **base, ref=s(o.get("ref")), user_ref=s(o.get("user_ref")), type=s(o.get("type")),
        payload=s(o.get("payload")), title=s(o.get("title")),
        notification_messages_token=s(o.get("notification_messages_token")),
        notification_messages_status=s(o.get("notification_messages_status")),
        token_expiry_timestamp=to_millis(o.get("token_expiry_timestamp")),
        user_token_status=s(o.get("user_token_status")),
    )


def _account_linking(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    a = d(item.get("account_linking"))
    return ev.AccountLinking(**base, status=s(a.get("status")),
                             authorization_code=s(a.get("authorization_code")))


def _policy(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    p = d(item.get("policy_enforcement") or item.get("policy-enforcement"))
    return ev.PolicyEnforcement(**base, action=s(p.get("action")), reason=s(p.get("reason")))


def _game_play(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    g = d(item.get("game_play"))
    return ev.GamePlay(
        **base, game_id=s(g.get("game_id")), player_id=s(g.get("player_id")),
        context_type=s(g.get("context_type")), context_id=s(g.get("context_id")),
        score=f(g.get("score")),
        payload=s(g.get("payload")),
    )


def _thread_control(key: str) -> Reader:
    def read(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
        t = d(item.get(key))
        return ev.ThreadControl(
            **base,
            new_owner_app_id=s(t.get("new_owner_app_id")),
            previous_owner_app_id=s(t.get("previous_owner_app_id")),
            requested_owner_app_id=s(t.get("requested_owner_app_id")),
            metadata=s(t.get("metadata")),
        )

    return read


def _app_roles(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    roles = {
        str(app): [r for r in (s(x) for x in value) if r is not None]
        if isinstance(value, list) else []
        for app, value in d(item.get("app_roles")).items()
    }
    return ev.AppRoles(**base, roles=roles)


def _feedback(base: dict[str, Any], item: dict[str, Any]) -> ev.Event:
    f = d(item.get("response_feedback"))
    return ev.ResponseFeedback(**base, mid=s(f.get("mid")), feedback=s(f.get("feedback")))


def _unknown(base: dict[str, Any], item: Any) -> ev.Event:
    return ev.Unknown(**base, key=event_key(item), raw=item)


READERS: dict[str, Reader] = {
    "message": _message,
    "message_echo": _message,
    "message_unsend": _unsend,
    "postback": _postback,
    "referral": _referral,
    "delivery": _delivery,
    "read": _read,
    "reaction": _reaction,
    "message_edit": _edit,
    "optin": _optin,
    "account_linking": _account_linking,
    "policy_enforcement": _policy,
    "game_play": _game_play,
    "pass_thread_control": _thread_control("pass_thread_control"),
    "take_thread_control": _thread_control("take_thread_control"),
    "request_thread_control": _thread_control("request_thread_control"),
    "app_roles": _app_roles,
    "response_feedback": _feedback,
}


def _change(base: dict[str, Any], change: dict[str, Any]) -> ev.Event:
    return ev.Change(**base, field=s(change.get("field")), value=change.get("value"))


def base_of(queued: QueuedEvent, kind: str, found: tuple[str, str] | None,
            recipient: str | None, stamp: int | None) -> dict[str, Any]:
    """The fields every event has (shared/events.py Event), for either way of reading an item
    (this module, or workers/wire.py for the usual shapes): `found` is the sender as
    (id as sent, user key), `stamp` the item's timestamp in ms (None or 0: the received time).
    A field left at its default is left out: a Struct's keyword arguments cost per argument."""
    base = {"kind": kind, "id": queued.id, "channel": queued.channel, "object": queued.object,
            "page_id": queued.page_id, "sender": None, "recipient": recipient,
            "timestamp": stamp or queued.received_ms}
    if found is not None:
        base["sender"], base["user"] = found
    if not stamp:
        base["timestamp_from"] = "received"
    return base


def normalize(queued: QueuedEvent, item: Any, kind: str | None = None) -> ev.Event:
    """The normalised event of one queued item (`item`: its decoded JSON), of `kind` (by default
    the kind ingest gave it). Unknown kinds keep the decoded item in `raw`."""
    kind = queued.kind if kind is None else kind
    body = item if isinstance(item, dict) else {}
    change = queued.channel == "changes"
    base = base_of(queued, kind, sender_of(queued.object, queued.channel, body),
                   s(d(body.get("recipient")).get("id")),
                   None if change else to_millis(body.get("timestamp")))
    if change:
        return _change(base, body)
    reader = READERS.get(kind)
    if reader is None:
        return _unknown(base, item)
    return reader(base, body)
