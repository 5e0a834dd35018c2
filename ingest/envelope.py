"""Turns a webhook body into queued events: one per item of every `messaging[]` and `standby[]`.

Items in `changes[]` (the App Dashboard's test format) count when their value is a Messenger
event. The fast path decodes the envelope into typed Structs and keeps each item as raw JSON bytes.
When Facebook's shapes are odd (an id of another type, `messaging` that is not a list, an entry
that is not an object), the lenient path walks plain values instead: a correctly signed body with
an `entry` list is never refused, and nothing in it is dropped.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import msgspec

from shared.codec import QueuedEvent, encode_event
from shared.errors import BadRequest
from shared.kinds import UNKNOWN, classify

CHANNELS = ("messaging", "standby")
_MID_KINDS = {"message": "message", "message_echo": "message", "postback": "postback"}


class _Change(msgspec.Struct):
    field: str | None = None
    value: msgspec.Raw | None = None


class _Entry(msgspec.Struct):
    id: str | int | None = None
    messaging: list[msgspec.Raw] | None = None
    standby: list[msgspec.Raw] | None = None
    changes: list[_Change] | None = None


class _Envelope(msgspec.Struct):
    entry: list[_Entry]


class _MidHead(msgspec.Struct):
    mid: str | int | None = None
    is_echo: Any = None


class _Head(msgspec.Struct):
    """A typed glance at an item: enough to route a message or postback that has a mid (most
    traffic) without building the item as Python objects."""

    message: _MidHead | None = None
    postback: _MidHead | None = None


class Routed(NamedTuple):
    """One event ready for the queue: its dedupe id, its kind (the job function) and its bytes
    (the first three go to Redis), then where it was, for metrics and the request's log line."""

    id: str
    kind: str
    blob: bytes
    channel: str = "messaging"
    page: str | None = None


_fast_decoder = msgspec.json.Decoder(_Envelope)
_head_decoder = msgspec.json.Decoder(_Head)
_any_decoder = msgspec.json.Decoder()
_canonical = msgspec.json.Encoder(order="sorted").encode
_plain = msgspec.json.Encoder().encode

NOT_JSON = "body is not valid JSON"
NOT_ENVELOPE = "body must be a JSON object with an 'entry' list"

MAX_DEPTH = 64
"""The deepest nesting of arrays and objects a body may have (Facebook's own stay under 15).
Decoding and encoding recurse once per level, in ingest and again in the workers, whose stacks
differ: without a fixed limit a body nested near Python's recursion limit could be acknowledged
here and then fail in every worker, or fail here with a 500."""
TOO_DEEP = f"body nests arrays and objects deeper than {MAX_DEPTH} levels"
_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


def _too_deep(body: bytes) -> bool:
    """Whether a valid JSON body nests deeper than MAX_DEPTH. Escaped backslashes and quotes go
    first, so the quotes left delimit strings; the brackets outside them are kept and one level of
    innermost pairs is removed per pass."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Adjacent quotes hold nothing: dropping them keeps every other quote's parity.
    structure = body.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[::2])
    nesting = structure.translate(_PARENS)
    for _ in range(MAX_DEPTH):
        if not nesting:
            return False
        nesting = nesting.replace(b"()", b"")
    return bool(nesting)


def parse(body: bytes, received_ms: int) -> list[Routed]:
    """Every event in the body, in order. Raises BadRequest only for a body that is no envelope
    (or nests deeper than MAX_DEPTH)."""
    try:
        # JSON is UTF-8: checked once for the whole body, since items kept raw (and the fields
        # a typed glance skips) are not decoded here.
        body.decode()
        return _parse(body, received_ms)
    except (UnicodeDecodeError, msgspec.DecodeError):
        # An item the fast path kept raw fails to decode: invalid UTF-8 inside a string, or a
        # number out of range (1e400), which the lenient path refuses the same way.
        raise BadRequest(NOT_JSON) from None


def _parse(body: bytes, received_ms: int) -> list[Routed]:
    envelope = _decode_envelope(body)
    if envelope is None:
        return _parse_lenient(body, received_ms)
    out: list[Routed] = []
    for entry in envelope.entry:
        page = None if entry.id is None else str(entry.id)
        if entry.messaging:
            for raw in entry.messaging:
                out.append(_route_raw(raw, "messaging", page, received_ms))
        if entry.standby:
            for raw in entry.standby:
                out.append(_route_raw(raw, "standby", page, received_ms))
        if entry.changes:
            for change in entry.changes:
                if change.value is not None:
                    value = _any_decoder.decode(change.value)
                    if _is_messaging_item(value):
                        out.append(_route(change.value, value, "messaging", page, received_ms))
    return out


def _decode_envelope(body: bytes) -> _Envelope | None:
    """The typed envelope, or None when its shapes are odd (the lenient path reads it then)."""
    envelope: _Envelope | None = None
    try:
        envelope = _fast_decoder.decode(body)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError:
        raise BadRequest(NOT_JSON) from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    if _too_deep(body):
        raise BadRequest(TOO_DEEP)
    return envelope


def _is_messaging_item(value: Any) -> bool:
    """A `changes[].value` that is a Messenger event (the App Dashboard's test format) rather
    than a Page change such as a feed post: it names a sender or a recipient."""
    return isinstance(value, dict) and ("sender" in value or "recipient" in value)


def _parse_lenient(body: bytes, received_ms: int) -> list[Routed]:
    try:
        doc = _any_decoder.decode(body)
    except msgspec.DecodeError:
        raise BadRequest(NOT_JSON) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entry"), list):
        raise BadRequest(NOT_ENVELOPE)
    out: list[Routed] = []
    for entry in doc["entry"]:
        if not isinstance(entry, dict):
            # Not an entry object: no page, no items; keep it whole as one unknown event.
            out.append(_route(msgspec.Raw(_plain(entry)), entry, "entry", None, received_ms))
            continue
        page = _as_id(entry.get("id"))
        for channel in CHANNELS:
            items = entry.get(channel)
            if items is None:
                continue
            for item in items if isinstance(items, list) else [items]:
                out.append(_route(msgspec.Raw(_plain(item)), item, channel, page, received_ms))
        changes = entry.get("changes")
        for change in changes if isinstance(changes, list) else []:
            value = change.get("value") if isinstance(change, dict) else None
            if _is_messaging_item(value):
                raw = msgspec.Raw(_plain(value))
                out.append(_route(raw, value, "messaging", page, received_ms))
    return out


def _route_raw(raw: msgspec.Raw, channel: str, page: str | None, now: int) -> Routed:
    """Route an item kept as raw JSON: the typed glance when it is a message or postback with a
    mid, else the item decoded to plain values. Both give the same kind and id."""
    try:
        head = _head_decoder.decode(raw)
    except msgspec.ValidationError:
        head = None
    if head is not None:
        body, kind = head.message, "message"
        if body is None:
            body, kind = head.postback, "postback"
        elif body.is_echo is True:
            kind = "message_echo"
        mid = None if body is None else body.mid
        if mid is not None and mid != "":
            event_id = f"{kind}:{mid}"
            blob = encode_event(QueuedEvent(event_id, channel, page, now, raw))
            return Routed(event_id, kind, blob, channel, page)
    return _route(raw, _any_decoder.decode(raw), channel, page, now)


def _route(raw: msgspec.Raw, item: Any, channel: str, page: str | None, now: int) -> Routed:
    kind = classify(item) if channel != "entry" else UNKNOWN
    event_id = dedupe_id(kind, item, page)
    blob = encode_event(QueuedEvent(event_id, channel, page, now, raw))
    return Routed(event_id, kind, blob, channel, page)


def dedupe_id(kind: str, item: Any, page: str | None) -> str:
    """`<kind>:<mid>` where Facebook gives a mid; else a hash of the item's canonical JSON.

    The item (not the entry) is hashed: `entry.time` changes when Facebook retries, the item
    does not. Keys are sorted so that a re-serialised copy hashes the same.
    """
    key = _MID_KINDS.get(kind)
    if key is not None:
        mid = item[key].get("mid")
        if isinstance(mid, str | int) and not isinstance(mid, bool) and mid != "":
            return f"{kind}:{mid}"
    digest = hashlib.blake2b(_canonical(item), digest_size=16, person=b"fbhook-item")
    if page is not None:
        digest.update(page.encode())
    return "h:" + digest.hexdigest()


def _as_id(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    return None
