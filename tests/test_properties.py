"""Properties of the decoder and the endpoint over generated bodies (hypothesis).

- `ingest.envelope.parse` never raises anything but BadRequest, whatever the bytes; every event
  it returns keeps its item's text exactly as it stands in the body.
- Normalisation never raises, whatever JSON values stand in any field of any kind, and what it
  makes can always be written (`Effects.row`).
- The endpoint never answers 500; what it accepts comes out the other side: after a worker drain
  there is one stream entry per distinct dedupe id that `parse` returned.
- A correctly signed body with an `entry` list is accepted whatever its items hold, and every
  item is routed.

Redis is flushed at the start of every example; example counts stay modest to keep the suite fast.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ingest.envelope import parse, read_the_long_way
from shared.codec import QueuedEvent, decode_event
from shared.errors import BadRequest
from shared.jsontext import loads
from shared.kinds import EVENT_KEYS, KINDS
from tests.conftest import Post, stream_rows
from workers import wire
from workers.effects import ROW_WIDTH, Effects
from workers.normalize import normalize

EXAMPLES = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# Hostile values too: integers past 64 bits, lone UTF-16 surrogates (json.dumps escapes them).
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["\ud83d", "ok\udc00", "1e400", "99999999999999999999", "-5",
                             "2021-09-08T06:34:04+0000", "", " 12 "]))
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=16,
)
ids = st.none() | st.text(max_size=6) | st.integers(min_value=0, max_value=2**63 - 1)


FIELDS = sorted({
    "mid", "text", "payload", "ref", "source", "type", "ad_id", "is_echo", "is_deleted",
    "referral", "title", "watermark", "ads_context_data", "mids", "reaction", "emoji", "action",
    "num_edit", "user_ref", "notification_messages_token", "notification_messages_status",
    "token_expiry_timestamp", "user_token_status", "status", "authorization_code", "reason",
    "game_id", "player_id", "context_type", "context_id", "score", "new_owner_app_id",
    "previous_owner_app_id", "requested_owner_app_id", "metadata", "feedback", "attachments",
    "quick_reply", "reply_to", "app_id", "product", "referer_uri", "origin_domain",
    "is_unsupported", "x",
})
"""Every field a reader looks at, and one it does not."""


@st.composite
def items(draw: st.DrawFn) -> Any:
    """Mostly item-shaped objects (one event key with random content), sometimes anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    item: dict[str, Any] = {}
    if draw(st.booleans()):
        item["sender"] = draw(st.fixed_dictionaries({"id": ids}) | json_values)
    if draw(st.booleans()):
        item["recipient"] = {"id": draw(ids)}
    if draw(st.booleans()):
        item["timestamp"] = draw(st.integers(0, 2**53) | st.text(max_size=14) | json_values)
    key = draw(st.sampled_from([*EVENT_KEYS, "message_request", "brand_new"]))
    item[key] = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))
    item.update(draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2)))
    return item


@st.composite
def entries(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    entry: dict[str, Any] = {"id": draw(ids | json_values), "time": draw(json_values)}
    for channel in ("messaging", "standby"):
        if draw(st.booleans()):
            entry[channel] = draw(st.lists(items(), max_size=4) | items())
    if draw(st.integers(0, 3)) == 0:
        entry["changes"] = draw(st.lists(
            st.fixed_dictionaries({"field": st.just("messages"), "value": items()})
            | st.fixed_dictionaries({"field": json_values, "value": json_values})
            | json_values, max_size=3))
    return entry


envelopes = st.fixed_dictionaries(
    {"entry": st.lists(entries(), max_size=4)},
    optional={"object": st.sampled_from(["page", "instagram"]) | json_values},
)
usual_bodies = st.fixed_dictionaries(
    {"entry": st.lists(st.fixed_dictionaries({"id": ids}, optional={
        "messaging": st.lists(items(), max_size=4), "standby": st.lists(items(), max_size=3),
        "changes": st.lists(st.fixed_dictionaries({"field": st.just("messages"), "value": items()})
                            | json_values, max_size=2),
    }), max_size=3)},
    optional={"object": st.sampled_from(["page", "instagram"])},
).map(lambda e: json.dumps(e).encode())
"""Envelopes in the usual shape (entries are objects, their item lists lists): read in one pass."""
NUMBERS = ["1e400", "-1e400", "1.5e-400", "123456789012345678901234567890", "-0", "1E2", "0.0"]


@st.composite
def raw_token_bodies(draw: st.DrawFn) -> bytes:
    """A well-formed envelope whose item holds a number literal json.dumps never writes (out of
    range, huge) and a string of raw bytes that may not be UTF-8."""
    item = draw(items())
    item = {**item, "n": "@@NUM@@", "s": "@@RAW@@"} if isinstance(item, dict) else {
        "n": "@@NUM@@", "s": "@@RAW@@"}
    text = json.dumps({"object": "page", "entry": [{"id": "p", "messaging": [item]}]}).encode()
    raw = draw(st.binary(max_size=6).filter(lambda b: b'"' not in b and b"\\" not in b))
    text = text.replace(b'"@@NUM@@"', draw(st.sampled_from(NUMBERS)).encode(), 1)
    return text.replace(b"@@RAW@@", raw, 1)


bodies = (
    envelopes.map(lambda e: json.dumps(e).encode())
    | raw_token_bodies()
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | envelopes.map(lambda e: json.dumps(e).encode()).flatmap(
        lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n]))
)


@EXAMPLES
@given(body=bodies | raw_token_bodies())
def test_parse_raises_nothing_but_bad_request(body: bytes) -> None:
    try:
        events = parse(body, 1_700_000_000_000)
    except BadRequest:
        return
    for event in events:
        assert event.kind in KINDS or re.fullmatch(r"[a-z0-9_]{1,64}", event.kind)
        queued = decode_event(event.blob)
        assert queued.id == event.id
        assert queued.channel in ("messaging", "standby", "changes", "entry")
        assert queued.raw_text().encode() in body, "the item's text exactly as sent"


@EXAMPLES
@given(body=usual_bodies)
def test_a_body_read_in_one_pass_gives_the_events_of_the_long_way(body: bytes) -> None:
    outcomes = []
    for read in (parse, read_the_long_way):
        try:
            outcomes.append(read(body, 1_700_000_000_000))
        except BadRequest as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


@EXAMPLES
@given(envelope=envelopes)
def test_parse_accepts_every_envelope_with_an_entry_list(envelope: dict[str, Any]) -> None:
    events = parse(json.dumps(envelope).encode(), 1_700_000_000_000)
    assert len(events) >= routable_items(envelope)


def routable_items(envelope: dict[str, Any]) -> int:
    """How many items the envelope holds in `messaging`/`standby` (a non-list counts as one)."""
    count = 0
    for entry in envelope["entry"]:
        if not isinstance(entry, dict):
            count += 1
            continue
        for channel in ("messaging", "standby"):
            value = entry.get(channel)
            if isinstance(value, list):
                count += len(value)
            elif value is not None:
                count += 1
    return count


async def post_and_drain(body: bytes, post: Post, drain: Any, redis: Redis) -> tuple[int, set[str]]:
    await redis.flushall()
    response = await post(None, raw=body)
    assert response.status != 500, await response.text()
    if response.status != 200:
        return response.status, set()
    await drain()
    return 200, {e.id for e in parse(body, 0)}


@EXAMPLES
@given(body=bodies | raw_token_bodies())
async def test_endpoint_never_500s_and_everything_accepted_comes_out(
    body: bytes, post: Post, drain: Any, redis: Redis
) -> None:
    status, expected = await post_and_drain(body, post, drain, redis)
    assert status in (200, 400)
    rows = await stream_rows(redis)
    assert len(rows) == len(expected)
    assert {r["id"] for r in rows} == expected


@EXAMPLES
@given(envelope=envelopes)
async def test_odd_but_signed_envelopes_are_accepted_and_every_item_routed(
    envelope: dict[str, Any], post: Post, drain: Any, redis: Redis
) -> None:
    body = json.dumps(envelope).encode()
    status, expected = await post_and_drain(body, post, drain, redis)
    assert status == 200
    assert len(expected) >= min(1, routable_items(envelope))
    rows = await stream_rows(redis)
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert await redis.zcard("fb:queue") == 0
    assert await redis.xlen("fb:dead") == 0
    for row in rows:
        event = msgspec.json.decode(row["event"])
        assert event["id"] == row["id"] and event["kind"] == row["kind"]


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([*KINDS, "comments", "message_request"]),
       channel=st.sampled_from(["messaging", "standby", "changes", "entry"]),
       item=items() | json_values, received=st.integers(0, 2**45))
def test_normalisation_never_raises_and_always_makes_a_writable_event(
    kind: str, channel: str, item: Any, received: int
) -> None:
    """Whatever stands in any field of any kind: an event of that kind comes out, and it can
    be encoded for its stream entry (a referral timestamp past the year 9999, a `num_edit` that
    is no integer, a `score` too large for a float: the cases that once wiped out whole jobs)."""
    text = json.dumps(item).encode()
    queued = QueuedEvent("h:x", kind, channel, "page", "PAGE", received, msgspec.Raw(text))
    event = normalize(queued, loads(text))  # as a worker decodes it
    assert event.kind == kind and event.id == "h:x"
    row = Effects.row(event, queued)
    assert row.values[0] == "h:x"
    # effects.lua reads ROW_WIDTH values an event from one flat array: a None (Lua's nil) would
    # leave a hole there and shift every later event's values.
    assert len(row.values) == ROW_WIDTH and None not in row.values
    msgspec.msgpack.encode(row.values)


# The usual shapes of the kinds workers/wire.py reads, with odd values mixed in at every level.
usual_values = st.none() | st.text(max_size=6) | st.integers(-5, 2**64) | json_values
usual_referral = st.fixed_dictionaries({}, optional={
    "ref": usual_values, "source": usual_values, "type": usual_values, "ad_id": usual_values,
    "ads_context_data": st.none() | st.just({}) | st.just({"ad_title": "t"}) | json_values,
    "referer_uri": usual_values, "origin_domain": usual_values,
    "product": st.fixed_dictionaries({}, optional={"id": usual_values}) | json_values})
usual_bodies = {
    "message": st.fixed_dictionaries({}, optional={
        "mid": usual_values, "text": usual_values, "app_id": usual_values,
        "metadata": usual_values, "is_unsupported": usual_values, "is_echo": usual_values,
        "quick_reply": st.fixed_dictionaries({}, optional={"payload": usual_values}) | json_values,
        "reply_to": st.fixed_dictionaries({}, optional={"mid": usual_values}) | json_values,
        "attachments": st.lists(json_values, max_size=2) | json_values,
        "referral": usual_referral | json_values}),
    "postback": st.fixed_dictionaries({}, optional={
        "mid": usual_values, "title": usual_values, "payload": usual_values,
        "referral": usual_referral | json_values}),
    "referral": usual_referral | json_values,
}


@st.composite
def usual_items(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["message", "message_echo", "postback", "referral"]))
    key = "message" if kind == "message_echo" else kind
    item: dict[str, Any] = {key: draw(usual_bodies[key])}
    for name in ("sender", "recipient"):
        if draw(st.integers(0, 3)):
            item[name] = draw(st.fixed_dictionaries(
                {}, optional={"id": usual_values, "user_ref": usual_values}) | json_values)
    if draw(st.booleans()):
        item["timestamp"] = draw(st.integers(0, 2**53) | usual_values)
    return kind, item


@settings(max_examples=600, deadline=None)
@given(kind_item=usual_items(), channel=st.sampled_from(["messaging", "standby", "changes"]),
       obj=st.sampled_from(["page", "instagram", ""]), received=st.integers(0, 2**45))
def test_the_typed_fast_path_makes_the_very_event_normalize_makes(
    kind_item: tuple[str, Any], channel: str, obj: str, received: int
) -> None:
    """workers/wire.py reads messages, echoes, postbacks and referrals in one typed pass; when
    it gives an event at all, it is the one the tolerant reader gives, field for field."""
    kind, item = kind_item
    text = json.dumps(item).encode()
    queued = QueuedEvent("h:x", kind, channel, obj, "PAGE", received, msgspec.Raw(text))
    fast = wire.event_of(queued)
    if fast is not None:
        assert fast == normalize(queued, loads(text))
        assert msgspec.json.encode(fast) == msgspec.json.encode(normalize(queued, loads(text)))


@pytest.mark.parametrize("text", [
    b'{"sender":{"id":"1"},"timestamp":1700000000000,"message":{"mid":"m","text":"a"}}',
    b'{"sender":{"id":"1"},"message":{"mid":"m","text":"a","text":"b"}}',
    b'{"sender":{"id":5},"message":{"text":7,"text":"b"}}',
    b'{"sender":{"id":"1"},"message":{"mid":"m"},"message":null}',
    b'{"sender":{"id":"1"},"message":{"mid":"m"},"message":5}',
    b'{"sender":{"id":"1"},"message":{"text":"\\ud83d"}}',
    b'{"sender":{"id":"1"},"message":{"text":"x","n":1e400}}',
    b'{"sender":{"id":"1"},"message":{"quick_reply":{"payload":"P"},"reply_to":{"mid":"r"}}}',
    b'[1, 2]',
])
def test_the_fast_path_agrees_on_duplicate_keys_and_odd_text(text: bytes) -> None:
    """Duplicate keys (the last one counts, as for a dict), values that make the typed decode
    fail part way, lone surrogates and numbers out of range: the same event either way."""
    queued = QueuedEvent("h:x", "message", "messaging", "page", "PAGE", 1, msgspec.Raw(text))
    fast, slow = wire.event_of(queued), normalize(queued, loads(text))
    assert fast is None or fast == slow


def test_the_usual_shapes_take_the_fast_path() -> None:
    """The fast path is taken for the shapes it is for (else it would be dead code)."""
    for kind, body in [("message", {"message": {"mid": "m", "text": "hi"}}),
                       ("postback", {"postback": {"title": "t", "payload": "p"}}),
                       ("referral", {"referral": {"ref": "r", "source": "ADS", "ad_id": "1"}})]:
        text = json.dumps({"sender": {"id": "1"}, "recipient": {"id": "2"},
                           "timestamp": 1_700_000_000_000, **body}).encode()
        queued = QueuedEvent("h:x", kind, "messaging", "page", "PAGE", 1, msgspec.Raw(text))
        assert wire.event_of(queued) == normalize(queued, loads(text)), kind


# --- where each item stands in a body read from a copy (ingest/places.py) --------------------

_SCALARS = st.one_of(st.integers(-10**20, 10**20), st.booleans(), st.none(),
                     st.sampled_from(["x", "\ufffd", "\\", '"', "a\ud800b", "\udc00", ""]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["t", "messaging", "value", "entry", "x"]), inner, max_size=3)), max_leaves=8)


def _text(value: Any, draw: Any) -> str:
    """JSON text of `value` as a hostile sender might write it: spaces anywhere between tokens,
    keys sometimes escaped, and a key sometimes written twice (the first copy a decoy)."""
    space = draw(st.sampled_from(["", " ", "\n  "]))
    if isinstance(value, dict):
        members = []
        for key, item in value.items():
            if draw(st.booleans()) and draw(st.booleans()):  # a decoy under the same key first
                members.append(f"{_key(key, draw)}:{space}{_text(draw(_VALUES), draw)}")
            members.append(f"{_key(key, draw)}{space}:{space}{_text(item, draw)}")
        return "{" + space + ("," + space).join(members) + space + "}"
    if isinstance(value, list):
        return "[" + space + ("," + space).join(_text(i, draw) for i in value) + space + "]"
    return json.dumps(value)  # a lone surrogate as its escape


def _key(key: str, draw: Any) -> str:
    return json.dumps(key) if draw(st.booleans()) else '"' + "".join(
        f"\\u{ord(c):04x}" for c in key) + '"'


@st.composite
def _bodies(draw: Any) -> tuple[str, Any]:
    def items() -> list[Any]:
        return draw(st.lists(_VALUES, max_size=3))

    entries = []
    for _ in range(draw(st.integers(1, 3))):
        entry: dict[str, Any] = {"x": draw(_VALUES)}
        for name in draw(st.permutations(["messaging", "standby", "changes"])):
            if draw(st.booleans()):
                entry[name] = items() if name != "changes" else [
                    {"x": draw(_VALUES), "field": "f", "value": draw(_VALUES)} for _ in items()]
        entries.append(entry)
    body = {"x": draw(st.lists(_VALUES, max_size=2)), "entry": entries, "object": "page"}
    return _text(body, draw), body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bodies())
def test_each_place_holds_the_value_the_bodys_structure_puts_there(body: tuple[str, Any]) -> None:
    """The offsets `places` gives (read from the copy without lone surrogates, as the ingest
    does) hold, read from there, the very value that a full reading of the body has at that
    path: copies of items under other keys, keys written twice or escaped, and spacing never
    move it."""
    from ingest.places import places
    from shared.jsontext import without_lone_surrogates

    text, _ = body  # ASCII (json.dumps escapes the rest): offsets in bytes are in characters
    whole = json.loads(text)  # the last of duplicate keys counts, as msgspec reads them
    found = places(without_lone_surrogates(text.encode()))
    wanted: list[tuple[Any, ...]] = []
    for i, entry in enumerate(whole["entry"]):
        wanted.append(("entry", i))
        for name in ("messaging", "standby", "changes"):
            if name in entry:
                wanted.append(("entry", i, name))
            if isinstance(entry.get(name), list):
                wanted += [("entry", i, name, j) for j in range(len(entry[name]))]
                if name == "changes":
                    wanted += [("entry", i, name, j, "value")
                               for j, change in enumerate(entry[name]) if "value" in change]
    decoder = json.JSONDecoder()
    for path in wanted:
        expected: Any = whole
        for step in path:
            expected = expected[step]
        assert path in found
        assert decoder.raw_decode(text, found[path])[0] == expected, path
