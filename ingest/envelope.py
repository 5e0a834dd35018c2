"""Turns a webhook body into queued events: one per item, wherever it is in the body.

Every item of every `entry[].messaging[]` and `standby[]` is one event; so is every item of
`entry[].changes[]`: routed like a messaging item when its value is a Messenger event (the App
Dashboard's test format), else an event of the change's own kind (its `field`). An `entry[]`
element that is not an object is kept whole as one `unknown` event. Nothing in a correctly
signed body with an `entry` list is refused or dropped.

The envelope is decoded into typed Structs that keep every item as its raw JSON text, exactly as
sent; an item is decoded to Python values only when a typed glance cannot route it. A body that
holds a lone UTF-16 surrogate escape (valid JSON that msgspec refuses) is read through a copy
in which each one is U+FFFD, and each item's text is then taken from the body as received.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from ingest.places import Path, places
from shared.codec import QueuedEvent, encode_event
from shared.errors import BadRequest
from shared.identity import SenderIds, as_id, sender_from, sender_of
from shared.jsontext import decode, without_lone_surrogates
from shared.kinds import MID_KINDS, UNKNOWN, change_kind, classify, is_messaging_value, message_kind

CHANNELS = ("messaging", "standby")


class _Entry(msgspec.Struct):
    id: msgspec.Raw = msgspec.Raw()
    """Read by `decode` (shared/jsontext.py), as `_Envelope.object`."""
    messaging: msgspec.Raw = msgspec.Raw()
    standby: msgspec.Raw = msgspec.Raw()
    changes: msgspec.Raw = msgspec.Raw()


class _Envelope(msgspec.Struct):
    entry: list[msgspec.Raw]
    object: msgspec.Raw = msgspec.Raw()
    """Read by `decode` (shared/jsontext.py): any valid JSON value, a 5,000-digit integer too."""


class _UsualEntry(msgspec.Struct):
    """An entry in its usual shape (its item lists are lists or absent), read in the same pass as
    the envelope; an entry of another shape fails that decode and the body is read the long way."""

    id: Any = None
    messaging: list[msgspec.Raw] | None = None
    standby: list[msgspec.Raw] | None = None
    changes: list[msgspec.Raw] | None = None


class _UsualEnvelope(msgspec.Struct):
    entry: list[_UsualEntry]
    object: Any = None


class _Change(msgspec.Struct):
    field: Any = None
    value: msgspec.Raw = msgspec.Raw()


class _MidHead(msgspec.Struct):
    mid: Any = None
    is_echo: Any = None
    is_deleted: Any = None


class _Head(msgspec.Struct):
    """A typed glance at an item: enough to route a message or postback that has a mid (most
    traffic) without building the item as Python objects. UNSET: the key is absent."""

    message: _MidHead | UnsetType | None = UNSET
    postback: _MidHead | UnsetType | None = UNSET
    sender: SenderIds | None = None
    """An item whose `sender` is not an object takes the plain-values path (same result)."""


class Routed(msgspec.Struct, frozen=True):
    """One event ready for the queue: its dedupe id, its kind and its bytes (the first three go
    to Redis), then where it was, for metrics and the request's log line. (A Struct: built in C,
    a third of a NamedTuple's cost, once per event.)"""

    id: str
    kind: str
    blob: bytes
    channel: str = "messaging"
    page: str | None = None
    object: str = ""
    user: str | None = None
    """The key of the sender (shared/identity.py): ingest puts a user's events in one lane."""


# Numbers out of a float's range decode as infinities (shared/jsontext.py), never as errors.
_usual_decoder = msgspec.json.Decoder(_UsualEnvelope, float_hook=float)
_envelope_decoder = msgspec.json.Decoder(_Envelope, float_hook=float)
_entry_decoder = msgspec.json.Decoder(_Entry, float_hook=float)
_change_decoder = msgspec.json.Decoder(_Change, float_hook=float)
_items_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_head_decoder = msgspec.json.Decoder(_Head, float_hook=float)
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
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(None, _NOT_STRUCTURE)  # one pass; what follows reads a tenth
    if structure.count(b"[") + structure.count(b"{") <= MAX_DEPTH:
        return False
    # Adjacent quotes hold nothing: dropping them keeps every other quote's parity.
    structure = structure.replace(b'""', b"")
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[::2])
    nesting = structure.translate(_PARENS)
    for _ in range(MAX_DEPTH):
        if not nesting:
            return False
        nesting = nesting.replace(b"()", b"")
    return bool(nesting)


def parse(body: bytes, received_ms: int) -> list[Routed]:
    """Every event in the body, in order. Raises BadRequest only for a body that is not JSON, is
    no envelope, or nests deeper than MAX_DEPTH."""
    try:
        body.decode()  # JSON is UTF-8: checked once for the whole body
    except UnicodeDecodeError:
        raise BadRequest(NOT_JSON) from None
    try:
        usual = _usual_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):  # any other shape: read the long way
        usual = None
    if usual is not None:
        if _too_deep(body):
            raise BadRequest(TOO_DEEP)
        return _Reader(body, body, _object(usual.object), received_ms).read_usual(usual)
    return read_the_long_way(body, received_ms)


def read_the_long_way(body: bytes, received_ms: int) -> list[Routed]:
    """`parse` for a body of any shape (valid UTF-8): each entry and list read on its own. A body
    in the usual shape gives the same events read in one pass (tests/test_properties.py)."""
    envelope, readable = _decode_envelope(body)
    obj = _object(decode(envelope.object)[0]) if envelope.object else ""
    return _Reader(body, readable, obj, received_ms).read(envelope)


def _decode_envelope(body: bytes) -> tuple[_Envelope, bytes]:
    """The typed envelope and the text it was read from: the body, or its copy without lone
    surrogates when it holds any."""
    readable = body
    try:
        try:
            envelope = _envelope_decoder.decode(body)
        except msgspec.ValidationError:
            raise
        except msgspec.DecodeError:
            readable = without_lone_surrogates(body)
            if readable is body:
                raise
            envelope = _envelope_decoder.decode(readable)
    except msgspec.ValidationError:
        raise BadRequest(NOT_ENVELOPE) from None
    except msgspec.DecodeError:
        raise BadRequest(NOT_JSON) from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    if _too_deep(body):
        raise BadRequest(TOO_DEEP)
    return envelope, readable


def _object(value: Any) -> str:
    """The envelope's `object` as sent: a string as it is, empty when absent, else its JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else _plain(value).decode()


class _Reader:
    """Routes the items of one body. `readable` is the body, or its copy without lone
    surrogates (same length, same offsets): an item's text as sent is then cut from the body
    at the place its readable text was found."""

    def __init__(self, body: bytes, readable: bytes, obj: str, received_ms: int) -> None:
        self.body, self.readable, self.obj, self.now = body, readable, obj, received_ms
        self.out: list[Routed] = []
        self._places: dict[Path, int] | None = None

    def read(self, envelope: _Envelope) -> list[Routed]:
        for i, raw in enumerate(envelope.entry):
            start = self._place(("entry", i), raw)
            try:
                entry = _entry_decoder.decode(raw)
            except msgspec.ValidationError:
                # Not an entry object: no page, no items; kept whole as one unknown event.
                self._add(raw, UNKNOWN, "entry", None, decode(raw), start)
                continue
            page = as_id(decode(entry.id)[0]) if entry.id else None
            for channel in CHANNELS:
                for item, at in self._items(getattr(entry, channel), ("entry", i, channel)):
                    self._route(item, channel, page, at)
            for n, (change, at) in enumerate(self._items(entry.changes, ("entry", i, "changes"))):
                self._route_change(change, page, at, ("entry", i, "changes", n, "value"))
        return self.out

    def read_usual(self, envelope: _UsualEnvelope) -> list[Routed]:
        """`read`, for a body read in one pass (no lone surrogates: no place to find)."""
        for entry in envelope.entry:
            page = as_id(entry.id)
            for channel in CHANNELS:
                for item in getattr(entry, channel) or ():
                    self._route(item, channel, page, -1)
            for change in entry.changes or ():
                self._route_change(change, page, -1)
        return self.out

    def _items(self, raw: msgspec.Raw, path: Path) -> list[tuple[msgspec.Raw, int]]:
        """The items of a `messaging`, `standby` or `changes` value (at `path`) with their places:
        a list's elements, or the value itself when it is not a list (absent or null: none)."""
        if not raw or bytes(raw) == b"null":
            return []
        try:
            items = _items_decoder.decode(raw)
        except msgspec.ValidationError:
            return [(raw, self._place(path, raw))]
        return [(item, self._place((*path, n), item)) for n, item in enumerate(items)]

    def _place(self, path: Path, raw: msgspec.Raw) -> int:
        """Where `raw`, the value at `path`, stands in the body (only needed when the body was
        read from a copy: ingest/places.py walks the copy's structure once)."""
        if self.readable is self.body:
            return -1
        if self._places is None:
            self._places = places(self.readable)
        at, text = self._places.get(path, -1), bytes(raw)
        if at < 0 or not self.readable.startswith(text, at):  # never seen: search, as before
            return self.readable.find(text)
        return at

    def _route(self, raw: msgspec.Raw, channel: str, page: str | None, at: int) -> None:
        """A messaging or standby item: the typed glance when it is a message or postback with
        a mid, else the item decoded to plain values. Both give the same kind and id."""
        try:
            head: _Head | None = _head_decoder.decode(raw)
        except msgspec.ValidationError:
            head = None
        if head is not None:
            body, kind = head.message, ""
            if isinstance(body, _MidHead):
                kind = message_kind(body.is_echo, body.is_deleted)
            elif body is UNSET and isinstance(head.postback, _MidHead):
                body, kind = head.postback, "postback"
            # A mid is Facebook's string: any other value is hashed with the item instead
            # (`1` and "1" must not be one message).
            mid = body.mid if isinstance(body, _MidHead) and isinstance(body.mid, str) \
                else None
            sender = sender_from(self.obj, head.sender)
            if mid:
                self._add(raw, kind, channel, page, None, at, f"{kind}:{mid}", sender)
                return
        else:
            sender = None
        item = decode(raw)
        self._add(raw, classify(item[0]), channel, page, item, at, sender=sender)

    def _route_change(self, raw: msgspec.Raw, page: str | None, at: int,
                      value_path: Path = ()) -> None:
        try:
            change = _change_decoder.decode(raw)
        except msgspec.ValidationError:  # not an object
            self._add(raw, UNKNOWN, "changes", page, decode(raw), at)
            return
        if change.value:
            value = decode(change.value)
            if is_messaging_value(value[0]):
                at = self._place(value_path, change.value) if at >= 0 else -1
                self._add(change.value, classify(value[0]), "messaging", page, value, at)
                return
        self._add(raw, change_kind(change.field), "changes", page, decode(raw), at)

    def _add(self, raw: msgspec.Raw, kind: str, channel: str, page: str | None,
             item: tuple[Any, bool] | None, at: int, event_id: str | None = None,
             sender: tuple[str, str] | None = None) -> None:
        """Queue one event. `item` is the decoded item and whether decoding changed values
        (None when the typed glance gave the id and the sender)."""
        if sender is None and item is not None:  # not read from the typed glance
            sender = sender_of(self.obj, channel, item[0])
        text = None
        if at >= 0:
            sent = self.body[at:at + len(raw)]
            if sent != bytes(raw):
                text = sent.decode()
        if event_id is not None and text is not None and "\ufffd" in event_id:
            # Its mid may hold a lone surrogate read as U+FFFD (`m-\ud83d` and `m-\ud83e` read
            # alike): the id comes from the text as sent instead.
            event_id, item = None, decode(raw)
        if event_id is None:
            assert item is not None
            value, changed = item
            # Values that decoding changed (a lone surrogate, 1e400) hash with the text as sent,
            # so that two items that differ as sent never share an id.
            exact = (text.encode() if text is not None else bytes(raw)) \
                if changed or text is not None else None
            event_id = dedupe_id(kind, value, page, exact)
        blob = encode_event(QueuedEvent(event_id, kind, channel, self.obj, page, self.now, raw,
                                        text))
        self.out.append(Routed(event_id, kind, blob, channel, page, self.obj,
                               None if sender is None else sender[1]))


def dedupe_id(kind: str, item: Any, page: str | None, exact: bytes | None = None) -> str:
    """`<kind>:<mid>` where Facebook gives a mid; else a hash of the item's canonical JSON.

    The item (not the entry) is hashed: `entry.time` changes when Facebook retries, the item
    does not. Keys are sorted so that a re-serialised copy hashes the same. An unsend and an
    edit have kinds of their own, so neither is ever a duplicate of the message it changes.
    """
    key = MID_KINDS.get(kind)
    if key is not None:
        mid = item[key].get("mid")
        # A mid as Facebook sends it, a string, read as sent (no lone surrogate read as U+FFFD).
        if isinstance(mid, str) and mid and (exact is None or "\ufffd" not in mid):
            return f"{kind}:{mid}"
    digest = hashlib.blake2b(_canonical(item), digest_size=16, person=b"fbhook-item")
    if page is not None:
        digest.update(page.encode())
    if exact is not None:
        digest.update(b"\0" + exact)
    return "h:" + digest.hexdigest()
