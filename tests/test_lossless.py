"""Lossless (issue 10), end to end: signed POST, a real worker, Redis.

Every acknowledged item is kept whole (`raw` as sent, `object`), every `changes[]` item is routed,
Instagram bodies flow like Messenger ones, PSIDs, IGSIDs and user_refs are three identity
spaces, one odd or failing event never takes others with it, and odd timestamps cannot decide a
user's first or last touch. Bodies are written as bytes where the exact text matters.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from redis.asyncio import Redis

import workers.lanes
from shared import keys
from shared.attribution import AttributionView, read_record
from shared.codec import QueuedEvent, decode_event, encode_event, job_serializer, lane_job
from shared.events import Event
from shared.report import day_of
from shared.settings import Settings
from tests.conftest import API_TOKEN, Post, stream_rows
from tests.test_corpus import CASES
from workers import registry
from workers.deadletters import list_dead, replay
from workers.normalize import normalize
from workers.touches import touch_of

Drain = Callable[[], Awaitable[None]]
Handler = Callable[[dict[str, Any], Event], Awaitable[None]]

PAGE = "1122334455"
IG_ACCOUNT = "17841400000000001"
IGSID = "6454400000000002"
T = 1_700_000_000_000
"""A trusted event time (Nov 2023): in the past, so never replaced by the received time."""


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers.lanes, "backoff_s", lambda job_try: 0.0)


# --- building bodies as text ---------------------------------------------------------------


def text(value: Any, **literals: str) -> str:
    """`value` as JSON text, each string `"@name"` in it replaced by the literal `literals[name]`
    (numbers Python's json cannot write, such as `1e400`)."""
    out = json.dumps(value)
    for name, literal in literals.items():
        out = out.replace(json.dumps(f"@{name}"), literal)
    return out


def item(sender: str | None, event: dict[str, Any], *, ts: Any = T, recipient: str = PAGE,
         user_ref: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"recipient": {"id": recipient}}
    if ts is not None:
        out["timestamp"] = ts
    if user_ref is not None:
        out["sender"] = {"user_ref": user_ref}
    elif sender is not None:
        out["sender"] = {"id": sender}
    return {**out, **event}


def message(sender: str, mid: str, words: str = "hello", **kw: Any) -> dict[str, Any]:
    return item(sender, {"message": {"mid": mid, "text": words}}, **kw)


def referral(sender: str | None, ref: str | None = None, *, source: str = "SHORTLINK",
             **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"source": source, "type": "OPEN_THREAD"}
    if ref is not None:
        body["ref"] = ref
    return item(sender, {"referral": body}, **kw)


def ig(event: dict[str, Any], ts: int = T, sender: str = IGSID,
       recipient: str = IG_ACCOUNT) -> dict[str, Any]:
    return item(sender, event, ts=ts, recipient=recipient)


def envelope(items: list[str], *, obj: str | None = "page", page: str = PAGE,
             channel: str = "messaging") -> bytes:
    """A body whose items are the given texts, exactly as given."""
    head = "" if obj is None else f'"object": {json.dumps(obj)}, '
    entry = f'{{"id": {json.dumps(page)}, "time": {T}, "{channel}": [{", ".join(items)}]}}'
    return f'{{{head}"entry": [{entry}]}}'.encode()


def dumped(*items: dict[str, Any]) -> list[str]:
    return [json.dumps(i) for i in items]


async def accepted(post: Post, body: bytes) -> None:
    response = await post(None, raw=body)
    assert response.status == 200, await response.text()
    assert await response.text() == "EVENT_RECEIVED"


async def record(redis: Redis, key: str) -> AttributionView:
    """The attribution record stored under `fb:attr:<key>`."""
    view = read_record(key, await redis.get(keys.attribution(key)))
    assert view is not None, f"no record fb:attr:{key}"
    return view


async def attribution_keys(redis: Redis) -> set[str]:
    return {k.decode() async for k in redis.scan_iter("fb:attr:*")}


def events_received(kind: str, channel: str) -> float:
    """The ingest's counter of routed events for one kind and channel (0 when never counted)."""
    value = REGISTRY.get_sample_value(
        "fbhook_events_received_total", {"kind": kind, "channel": channel})
    return value or 0.0


def now_ms() -> int:
    return int(time.time() * 1000)


# --- isolated failures -----------------------------------------------------------------------

YEAR_10000 = 253_402_300_800_000


async def test_a_job_with_healthy_events_of_several_users_and_odd_values_writes_each_once(
    post: Post, drain: Drain, redis: Redis
) -> None:
    """Out-of-range and wrongly typed values, in the same jobs as healthy events of other users
    sent at the same time: every event is written exactly once and nothing is dead-lettered."""
    first = [
        text(referral("ana", "spring")),
        text(referral("ben", None, source="ADS") | {"referral": {
            "source": "ADS", "type": "OPEN_THREAD", "ad_id": "42", "ads_context_data": {
                "ad_title": "half \ud83d", "big": "@inf", "huge": 10**400}}}, inf="1e400"),
        text(referral("cy", "year-10000", ts=YEAR_10000)),
        text(referral("dee", "inf-ts", ts="@inf"), inf="1e400"),
        text(referral("eve", "huge-ts", ts=10**400)),
        text(item("ana", {"message_edit": {"mid": "m-a", "text": "x", "num_edit": 1}})),
        text(item("ben", {"message_edit": {"mid": "m-b", "text": "x", "num_edit": "abc"}})),
        text(item("cy", {"message_edit": {"mid": "m-c", "text": "x", "num_edit": "@inf"}}),
             inf="1e400"),
        text(item("dee", {"message_edit": {"mid": "m-d", "text": "x", "num_edit": 2**80}})),
        text(item("ana", {"game_play": {"game_id": "g", "player_id": "p", "score": 12.5}})),
        text(item("ben", {"game_play": {"game_id": "g", "player_id": "p", "score": "@inf"}}),
             inf="1e400"),
        text(item("cy", {"game_play": {"game_id": "g", "player_id": "p", "score": 10**400}})),
    ]
    second = [
        text(message("fay", "m-fay-1")),
        text(message("gus", "m-gus-1", "half an emoji \ud83d")),
        text(message("hal", "m-hal-1") | {"sender": {"id": 10**30}}),
        text(message("ivy", "m-ivy-1") | {"message": {"mid": 2**80, "text": "huge mid"}}),
        text(referral("fay", "autumn")),
        text(item("gus", {"message_edit": {"mid": "m-gus-1", "num_edit": -(2**70)}})),
    ]
    third = [
        text(message("ana", "m-ana-1")),
        text(referral("ivy", "winter", ts=0)),
        text(item("hal", {"game_play": {"game_id": "g", "score": "1e400"}})),
    ]
    bodies = [envelope(first), envelope(second), envelope(third)]
    await asyncio.gather(*(accepted(post, body) for body in bodies))
    await drain()

    rows = await stream_rows(redis)
    assert Counter(r["kind"] for r in rows) == {
        "referral": 7, "message_edit": 5, "game_play": 4, "message": 5}
    assert len({r["id"] for r in rows}) == len(rows) == 21, "each event exactly once"
    assert await list_dead(redis) == []
    sent = {t for body in (first, second, third) for t in body}
    assert {r["raw"] for r in rows} == sent, "every item's text exactly as sent"

    by_raw = {r["raw"]: json.loads(r["event"]) for r in rows}
    assert by_raw[first[6]]["num_edit"] is None
    assert by_raw[first[7]]["num_edit"] is None
    assert by_raw[first[8]]["num_edit"] is None
    assert by_raw[first[5]]["num_edit"] == 1
    assert by_raw[first[10]]["score"] is None
    assert by_raw[first[11]]["score"] is None
    assert by_raw[first[9]]["score"] == 12.5
    assert by_raw[second[1]]["text"] == "half an emoji \ufffd"
    assert by_raw[second[2]]["sender"] is None, "an id past 64 bits is no id"

    for user in ("ana", "ben", "cy", "dee", "eve", "fay", "ivy"):
        assert (await record(redis, user)).touches == 1, user
    assert len(await attribution_keys(redis)) == 7
    ad = (await record(redis, "ben")).last
    assert (ad["ad_id"], ad["ads_context_data"]["ad_title"]) == ("42", "half \ufffd")
    for user in ("cy", "dee", "eve", "ivy"):
        assert (await record(redis, user)).last["timestamp_from"] == "received", user


async def test_integers_longer_than_python_reads_cost_no_event(
    post: Post, drain: Drain, redis: Redis
) -> None:
    """An integer literal of more digits than CPython converts (4,300; msgspec raises on it),
    wherever it stands: the body is acknowledged, every item is written once with its text as
    sent, the value reads as out of range, and nothing goes to the dead letters (the worker read
    such items the long way and dead-lettered them; the ingest answered 500 for some places)."""
    big, minus = "9" * 4301, "-" + "9" * 5000
    items = [
        text(message("k1", "m-big-text", "@big"), big=big),
        text(message("k2", "m-big-ts", ts="@big"), big=big),
        text(item("k3", {"postback": {"mid": "pb-big", "title": "t", "payload": "@big"}}),
             big=big),
        text(item("k4", {"message": {"mid": "@big", "text": "a mid of 4,301 digits"}}), big=big),
        text(item("k5", {"delivery": {"mids": ["m-x"], "watermark": "@minus"}}), minus=minus),
        text(message("k6", "m-fine")),
    ]
    change = text({"field": "feed", "value": {"n": "@big", "s": "@big"}}, big=big)
    big_id = envelope([text(message("k7", "m-entry-id"))]).replace(
        json.dumps(PAGE).encode(), big.encode(), 1)
    big_object = envelope([text(message("k8", "m-object"))]).replace(
        b'"page"', minus.encode(), 1)
    bodies = [envelope(items), f'{{"object": "page", "entry": [{{"id": "{PAGE}", '
              f'"changes": [{change}]}}]}}'.encode(), big_id, big_object]
    for body in bodies:
        await accepted(post, body)
    await drain()

    rows = await stream_rows(redis)
    assert await list_dead(redis) == []
    assert len(rows) == len(items) + 3
    sent = {*items, change, text(message("k7", "m-entry-id")), text(message("k8", "m-object"))}
    assert {r["raw"] for r in rows} == sent, "every item's text exactly as sent"
    by_raw = {r["raw"]: r for r in rows}
    assert [by_raw[t]["kind"] for t in items] == [
        "message", "message", "postback", "message", "delivery", "message"]
    events = {t: json.loads(by_raw[t]["event"]) for t in items}
    assert events[items[0]]["text"] is None  # a number where text belongs is no text
    assert events[items[1]]["timestamp_from"] == "received"  # an out-of-range time
    assert events[items[4]]["watermark"] is None
    assert by_raw[text(message("k7", "m-entry-id"))]["page_id"] == ""  # an id out of range
    assert by_raw[change]["kind"] == "feed"


async def test_an_event_whose_handler_keeps_raising_is_dead_lettered_alone_with_its_item(
    post: Post, drain: Drain, redis: Redis, settings: Settings, no_backoff: None,
    handlers: Callable[[str, Handler], None],
) -> None:
    """The failing event (an odd one, with a lone surrogate and a number out of range) is tried
    JOB_MAX_TRIES times and kept in `fb:dead` with its item exactly as sent; the other events of
    its job, odd ones included, are written once and their handlers run once."""
    calls: list[str] = []
    broken = {"on": True}

    async def fails_on_bad(ctx: dict[str, Any], event: Event) -> None:
        calls.append(event.id)
        if event.id == "message:m-bad" and broken["on"]:
            raise ValueError("cannot take this one")

    handlers("message", fails_on_bad)
    bad = text(message("u2", "m-bad", "\ud83d") | {"x": "@inf"}, inf="1e400")
    items = [
        text(message("u1", "m-good")),
        bad,
        text(message("u3", "m-odd", "tail \udc00")),
        text(message("u4", "m-num") | {"timestamp": 10**400}),
    ]
    await accepted(post, envelope(items))
    await drain()

    rows = await stream_rows(redis, "message")
    assert sorted(r["id"] for r in rows) == ["message:m-good", "message:m-num", "message:m-odd"]
    assert Counter(calls) == {"message:m-good": 1, "message:m-odd": 1, "message:m-num": 1,
                              "message:m-bad": settings.job_max_tries}
    [letter] = await list_dead(redis)
    assert (letter.event_id, letter.tries) == ("message:m-bad", settings.job_max_tries)
    assert letter.error == "ValueError: cannot take this one"
    assert decode_event(letter.payload).raw_text() == bad, "its raw item, byte for byte"
    assert await redis.get("fb:seen:message:m-bad") == b"x"

    broken["on"] = False
    assert await replay(redis, settings) == 1
    await drain()
    rows = await stream_rows(redis, "message")
    assert len(rows) == 4
    [replayed] = [r for r in rows if r["id"] == "message:m-bad"]
    assert replayed["raw"] == bad
    assert await list_dead(redis) == []


async def test_an_undecodable_event_in_a_job_is_dead_lettered_alone(
    redis: Redis, drain: Drain, settings: Settings, no_backoff: None
) -> None:
    good = encode_event(QueuedEvent(
        "message:m-fine", "message", "messaging", "page", PAGE, T,
        msgspec.Raw(json.dumps(message("u1", "m-fine")).encode()))).decode()
    garbage, wrong_shape = "not json {", '{"id": "x"}'
    # A lane holding them in this order, owned by a queued job, as ingest leaves one.
    await redis.rpush("fb:lane:0", garbage, good, wrong_shape)
    await redis.set("fb:lanejob:0", "mixed")
    await redis.set("arq:job:mixed", lane_job(0, T))
    await redis.zadd(settings.queue_name, {"mixed": 1})
    await drain()

    assert [r["id"] for r in await stream_rows(redis)] == ["message:m-fine"]
    dead = await list_dead(redis)
    assert sorted(d.payload for d in dead) == sorted([garbage, wrong_shape])
    assert all(d.event_id.startswith("undecodable:") for d in dead)
    assert len({d.event_id for d in dead}) == 2
    assert await redis.exists("arq:job:mixed") == 0


UNREADABLE_JOBS = {
    "garbage": b"\x00\xff garbage, not MessagePack",
    "pickle": pickle.dumps({"t": 0, "f": "message", "a": [], "k": {"events": []}, "et": 1}),
    "unknown-function": job_serializer(
        {"t": 0, "f": "os.system", "a": [], "k": {"events": []}, "et": 1}),
    "events-not-text": job_serializer(
        {"t": 0, "f": "message", "a": [], "k": {"events": [1, 2]}, "et": 1}),
    "no-kwargs": job_serializer({"t": 0, "f": "message", "a": ["x"], "et": 1}),
}


@pytest.mark.parametrize("name", list(UNREADABLE_JOBS))
async def test_an_unreadable_job_is_dead_lettered_whole_with_its_bytes(
    name: str, post: Post, drain: Drain, redis: Redis, settings: Settings
) -> None:
    data = UNREADABLE_JOBS[name]
    await redis.set(f"arq:job:{name}", data)
    await redis.zadd(settings.queue_name, {name: 1})
    await accepted(post, envelope(dumped(message("u1", "m-beside"))))
    await drain()

    assert [r["id"] for r in await stream_rows(redis)] == ["message:m-beside"]
    [letter] = await list_dead(redis)
    assert (letter.event_id, letter.kind) == (f"job:{name}", "job")
    assert letter.error.startswith("unreadable job")
    [(_, fields)] = await redis.xrange("fb:dead")
    assert fields[b"payload"] == data
    assert await redis.exists(f"arq:job:{name}") == 0


# --- whole items and objects -----------------------------------------------------------------

ODD_ITEMS = [
    # Key order, whitespace and escapes Facebook might use; each must come back byte for byte.
    '{ "message" : {"text":"caf\\u00e9 \\/ \\ud83d\\ude00 \\"q\\"","mid":"m-ws"} ,\n'
    '\t"timestamp":1.7E12, "sender" :{"id":"ws"},"recipient":{"id":"1122334455"}  }',
    '{"recipient":{"id":"1122334455"},"sender":{"id":"ws"},"timestamp":1700000000000,'
    '"read":{"watermark":1700000000000,"extra":[1 , 2.50 ,{ }]}}',
    '{"sender":{"id":"ws"},"recipient":{"id":"1122334455"},"timestamp":1700000000000,'
    '"referral":{"ref":"tab\\there","source":"SHORTLINK","type":"OPEN_THREAD","zz":null}}',
]


@pytest.mark.parametrize("lone", [False, True], ids=["plain", "with-a-lone-surrogate"])
async def test_each_item_is_stored_exactly_as_it_stood_in_the_body(
    lone: bool, post: Post, drain: Drain, redis: Redis
) -> None:
    """Whitespace, key order, escapes and number spellings are kept; with a lone surrogate
    elsewhere in the body (read through a copy) every item's text is still cut exactly."""
    items = list(ODD_ITEMS)
    if lone:
        items.append('{"sender":{"id":"ws"},"recipient":{"id":"1122334455"},"timestamp":1,'
                     '"message":{"mid":"m-lone",'
                     '"text":"\\\\\\ud83d \\uD83D \\udc00\\ud83d \\\\ud83d",'
                     '"\\udc00key":1e400}}')
    body = ('{ "entry" :[ {"time":1, "messaging" : [ ' + " ,\n ".join(items)
            + ' ] , "id" : "1122334455"} ] ,"object":"page" }').encode()
    await accepted(post, body)
    await drain()

    rows = await stream_rows(redis)
    assert sorted(r["raw"] for r in rows) == sorted(items)
    assert {r["object"] for r in rows} == {"page"}
    assert {r["page_id"] for r in rows} == {PAGE}
    assert {(r["sender"], r["user"]) for r in rows} == {("ws", "ws")}
    assert len(rows) == len(items)
    [text_message] = [json.loads(r["event"]) for r in rows if r["id"] == "message:m-ws"]
    assert text_message["text"] == 'caf\u00e9 / \U0001f600 "q"'


@pytest.mark.parametrize(("obj", "stored"), [
    (None, ""), ("page", "page"), ("instagram", "instagram"), ("whatsapp_business_account",
                                                               "whatsapp_business_account"),
])
async def test_every_entry_keeps_the_envelopes_object_as_sent(
    obj: str | None, stored: str, post: Post, drain: Drain, redis: Redis
) -> None:
    await accepted(post, envelope(dumped(message("u1", "m-obj"), referral("u1", "r")), obj=obj))
    await drain()
    rows = await stream_rows(redis)
    assert sorted(r["kind"] for r in rows) == ["message", "referral"]
    assert [r["object"] for r in rows] == [stored, stored]
    view = await record(redis, "ig:u1" if obj == "instagram" else "u1")
    assert view.last["object"] == stored
    [(_, notice)] = await redis.xrange("fb:referrals")
    assert notice[b"object"] == stored.encode()


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
async def test_every_corpus_entry_carries_its_object_and_its_item_as_sent(
    path: Path, post: Post, drain: Drain, redis: Redis
) -> None:
    case = json.loads(path.read_text())
    sent = json.dumps(case["body"]).encode()
    await accepted(post, sent)
    await drain()
    rows = await stream_rows(redis)
    assert len(rows) == len(case["expect"]["events"])
    obj = case["body"].get("object")
    for row in rows:
        assert row["object"] == (obj if isinstance(obj, str) else "")
        assert row["raw"].encode() in sent, "the item's text, cut from the body"
        json.loads(row["raw"])


# --- lone surrogates -----------------------------------------------------------------------------


async def test_a_lone_surrogate_anywhere_in_a_signed_body_costs_no_event(
    post: Post, drain: Drain, redis: Redis
) -> None:
    """Half an emoji in a text, a key, the envelope and an entry's unknown field: 200, every
    event written, each stored text keeping its escapes byte for byte."""
    items = [
        text(message("s1", "m-s1", "truncated \ud83d")),
        text(message("s2", "m-s2", "fine")),
        text(item("s3", {"brand_new": {"\udc00": "\ud800"}})),
        text(referral("s4", "ref-\udbff")),
    ]
    body = ('{"object":"page","note":"\\ud83d","entry":[{"id":"1122334455","x":"\\udfff",'
            '"messaging":[' + ",".join(items) + "]}]}").encode()
    response = await post(None, raw=body)
    assert response.status == 200, await response.text()
    await drain()
    rows = await stream_rows(redis)
    assert sorted(r["raw"] for r in rows) == sorted(items)
    assert Counter(r["kind"] for r in rows) == {"message": 2, "unknown": 1, "referral": 1}
    assert "\\ud83d" in next(r["raw"] for r in rows if r["id"] == "message:m-s1")
    assert (await record(redis, "s4")).last["ref"] == "ref-\ufffd"


async def test_an_items_text_is_cut_from_its_own_place_when_it_also_appears_earlier(
    post: Post, drain: Drain, redis: Redis
) -> None:
    """With a lone surrogate in the body, items are found by their text in a copy where each lone
    surrogate reads U+FFFD: an earlier `standby` item holding that same text (with a real
    U+FFFD) must not be taken for the `messaging` item."""
    standby = '{"sender":{"id":"a"},"recipient":{"id":"1122334455"},"note":{"k":"\\ufffd"}}'
    messaging = '{"k":"\\ud83d"}'
    body = ('{"object":"page","entry":[{"id":"1122334455","standby":[' + standby
            + '],"messaging":[' + messaging + "]}]}").encode()
    await accepted(post, body)
    await drain()
    rows = await stream_rows(redis)
    assert sorted((r["channel"], r["raw"]) for r in rows) == [
        ("messaging", messaging), ("standby", standby)]


COPIES_BEFORE = {
    "the list under an unknown key before it": (
        '{"object":"page","entry":[{"id":"1","x":[{"sender":{"id":"5"},"t":"\\ud800"}],'
        '"messaging":[%s]}]}', '{"sender":{"id":"5"},"t":"\\ufffd"}', "messaging"),
    "an identical standby list before it": (
        '{"object":"page","entry":[{"id":"1","standby":[{"sender":{"id":"5"},"t":"\\ud800"}],'
        '"messaging":[%s]}]}', '{"sender":{"id":"5"},"t":"\\ufffd"}', "messaging"),
    "its entry under an unknown key before the entry list": (
        '{"object":"page","x":[{"messaging":[{"sender":{"id":"5"},"t":"\\ud800"}]}],'
        '"entry":[{"messaging":[%s]}]}', '{"sender":{"id":"5"},"t":"\\ufffd"}', "messaging"),
    "a change value's copy earlier in the change": (
        '{"object":"page","entry":[{"id":"1","changes":[{"x":{"sender":{"id":"5"},'
        '"message":{"mid":"m2","text":"\\ud800"}},"field":"messages","value":%s}]}]}',
        '{"sender":{"id":"5"},"message":{"mid":"m2","text":"\\ufffd"}}', "messaging"),
    "a single item (no list) after a copy": (
        '{"object":"page","entry":[{"id":"1","x":{"sender":{"id":"5"},"t":"\\ud800"},'
        '"messaging":%s}]}', '{"sender":{"id":"5"},"t":"\\ufffd"}', "messaging"),
}


@pytest.mark.parametrize("case", list(COPIES_BEFORE))
async def test_an_items_text_comes_from_its_own_place_in_the_bodys_structure(
    case: str, post: Post, drain: Drain, redis: Redis
) -> None:
    """A body with a lone surrogate is read from a copy that has U+FFFD in its place; each item's
    text as sent is cut from the body where the body's structure puts the item, not where its
    text first appears (a copy under another key, in another list, earlier in a change): that
    stored another item's text, and dropped the item as a duplicate of it."""
    shape, own, channel = COPIES_BEFORE[case]
    body = (shape % own).encode()
    await accepted(post, body)
    await drain()
    rows = await stream_rows(redis)
    mine = [r for r in rows if r["channel"] == channel]
    assert [r["raw"] for r in mine] == [own]
    if "standby" in case:  # the standby item is an event too, with its own text
        assert [r["raw"] for r in rows if r["channel"] == "standby"] == [
            '{"sender":{"id":"5"},"t":"\\ud800"}']
        assert len(rows) == 2
    else:
        assert len(rows) == 1
    if '"mid"' in own:
        return  # a mid names the message: the same mid again is the same message
    # The same item with the lone surrogate, sent alone, is another event, not a duplicate.
    twin = own.replace("\\ufffd", "\\ud800")
    await accepted(post, envelope([twin]))
    await drain()
    assert len(await stream_rows(redis)) == len(rows) + 1


@pytest.mark.parametrize(("one", "other"), [
    ('"x \\ud83d"', '"x \\ud83e"'),
    ('"x \\ud83d"', '"x \\ufffd"'),
    ("1e400", "null"),
], ids=["two-halves", "half-and-replacement", "out-of-range-and-null"])
async def test_two_items_that_differ_as_sent_are_two_events(
    one: str, other: str, post: Post, drain: Drain, redis: Redis
) -> None:
    """Dedupe ids come from what was sent: two changes that differ only in a value msgspec could
    not decode as sent must not be taken for one delivered twice."""
    changes = [f'{{"field":"feed","value":{{"post_id":"1_2","message":{v}}}}}'
               for v in (one, other)]
    await accepted(post, envelope(changes, channel="changes"))
    await drain()
    rows = await stream_rows(redis, "feed")
    assert sorted(r["raw"] for r in rows) == sorted(changes)


DIFFERENT_AS_SENT = {
    "mids of two different lone surrogates": (
        '{"sender":{"id":"5"},"timestamp":1700000000000,"message":{"mid":"m-\\ud83d","text":"a"}}',
        '{"sender":{"id":"5"},"timestamp":1700000000001,"message":{"mid":"m-\\ud83e","text":"b"}}'),
    "a mid's lone surrogate and a real U+FFFD": (
        '{"sender":{"id":"5"},"timestamp":1700000000000,"message":{"mid":"m-\\ud83d","text":"a"}}',
        '{"sender":{"id":"5"},"timestamp":1700000000001,"message":{"mid":"m-\\ufffd","text":"b"}}'),
    "a mid as a number and as a string": (
        '{"sender":{"id":"5"},"message":{"mid":1,"text":"a"}}',
        '{"sender":{"id":"5"},"message":{"mid":"1","text":"b"}}'),
    "a number that underflows and zero": (
        '{"sender":{"id":"5"},"brand_new":{"v":1e-400}}',
        '{"sender":{"id":"5"},"brand_new":{"v":0.0}}'),
    "two floats that round alike": (
        '{"sender":{"id":"5"},"brand_new":{"v":0.1}}',
        '{"sender":{"id":"5"},"brand_new":{"v":0.10000000000000001}}'),
}


@pytest.mark.parametrize("pair", list(DIFFERENT_AS_SENT))
async def test_two_messaging_items_that_differ_as_sent_are_two_events_each_once(
    pair: str, post: Post, drain: Drain, redis: Redis
) -> None:
    """Each in its own request, each acknowledged: both are written (the second was dropped as a
    duplicate of the first, their mids or values reading alike), and each sent again is a
    duplicate (dropped: written once)."""
    items = DIFFERENT_AS_SENT[pair]
    for _ in range(2):
        for one in items:
            await accepted(post, envelope([one]))
    await drain()
    rows = await stream_rows(redis)
    assert sorted(r["raw"] for r in rows) == sorted(items)


# --- changes[] -----------------------------------------------------------------------------------

LABELS = [
    '{"field":"inbox_labels","value":{"action":"add","label":{"id":"L1",'
    '"page_label_name":"vip"},"user":{"id":"psid-7"}}}',
    '{"value": {"user": {"id": "psid-7"}, "label": {"id": "L1"}, "action": "remove"},\n'
    '  "field": "inbox_labels"}',
]
UNDOCUMENTED = '{"field":"Brand-New.Field","value":{"anything":[1,2.0,{"x":null}],"big":1e400}}'
DASHBOARD_VALUE = ('{"sender":{"id":"psid-8"},"recipient":{"id":"1122334455"},'
                   '"timestamp":1700000000000,"message":{"mid":"m-dash","text":"test"}}')
DASHBOARD = '{"field":"messages","value":' + DASHBOARD_VALUE + "}"


async def test_every_changes_item_is_routed_to_its_own_kind_and_counted(
    post: Post, drain: Drain, redis: Redis
) -> None:
    counted = {
        ("inbox_labels", "changes"): 2, ("brand_new_field", "changes"): 1,
        ("message", "messaging"): 1, ("change_message", "changes"): 1,
        ("a" * 64, "changes"): 1, ("unknown", "changes"): 1, ("feed", "changes"): 1,
    }
    before = {pair: events_received(*pair) for pair in counted}
    builtin = '{"field":"message","value":{"x":1}}'
    long = '{"field":"' + "A" * 100 + '","value":{}}'
    fieldless = '{"value":{"y":2}}'
    feed = '{"field":"Feed","value":{"item":"status","verb":"add","from":{"id":"psid-9"}}}'
    changes = [*LABELS, UNDOCUMENTED, DASHBOARD, builtin, long, fieldless, feed]
    await accepted(post, envelope(changes, channel="changes"))
    await drain()

    rows = await stream_rows(redis)
    got = Counter((r["kind"], r["channel"]) for r in rows)
    assert got == counted
    assert {pair: events_received(*pair) - before[pair] for pair in counted} == counted
    assert len(rows) == 8 and await list_dead(redis) == []

    by_kind: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    labels = by_kind["inbox_labels"]
    assert sorted(r["raw"] for r in labels) == sorted(LABELS)
    assert {(r["sender"], r["user"], r["object"], r["page_id"]) for r in labels} == {
        ("psid-7", "psid-7", "page", PAGE)}
    event = json.loads(labels[0]["event"])
    assert event["field"] == "inbox_labels" and event["value"]["user"] == {"id": "psid-7"}
    assert by_kind["brand_new_field"][0]["raw"] == UNDOCUMENTED
    assert json.loads(by_kind["brand_new_field"][0]["event"])["field"] == "Brand-New.Field"
    assert by_kind["message"][0]["raw"] == DASHBOARD_VALUE, "a Messenger-shaped value is the item"
    assert by_kind["message"][0]["id"] == "message:m-dash"
    assert by_kind["change_message"][0]["raw"] == builtin
    assert by_kind["a" * 64][0]["raw"] == long
    assert by_kind["unknown"][0]["raw"] == fieldless
    assert (by_kind["feed"][0]["sender"], by_kind["feed"][0]["raw"]) == ("psid-9", feed)
    assert await attribution_keys(redis) == set(), "a change carries no referral"

    # Delivered again: nothing new.
    await accepted(post, envelope(changes, channel="changes"))
    await drain()
    assert len(await stream_rows(redis)) == 8


async def test_instagram_comments_and_mentions_are_kept_in_the_instagram_space(
    post: Post, drain: Drain, redis: Redis
) -> None:
    comment = ('{"field":"comments","value":{"from":{"id":"6454400000000002","username":"ana"},'
               '"media":{"id":"m1","media_product_type":"FEED"},"id":"c1","text":"nice"}}')
    mention = '{"field":"mentions","value":{"media_id":"m2","comment_id":"c2"}}'
    test_value = json.dumps(ig({"message": {"mid": "aWdf-t", "text": "test"}}))
    test_message = '{"field":"messages","value":' + test_value + "}"
    await accepted(post, envelope([comment, mention, test_message], obj="instagram",
                                  page=IG_ACCOUNT, channel="changes"))
    await drain()
    rows = await stream_rows(redis)
    assert sorted((r["kind"], r["sender"], r["user"], r["object"], r["raw"]) for r in rows) == [
        ("comments", IGSID, f"ig:{IGSID}", "instagram", comment),
        ("mentions", "", "", "instagram", mention),
        ("message", IGSID, f"ig:{IGSID}", "instagram", test_value),
    ]


async def test_a_handler_failing_on_one_change_dead_letters_that_change_alone(
    post: Post, drain: Drain, redis: Redis, settings: Settings, no_backoff: None,
    handlers: Callable[[str, Handler], None],
) -> None:
    async def refuse_removals(ctx: dict[str, Any], event: Event) -> None:
        if '"remove"' in json.dumps(getattr(event, "value", None)):
            raise RuntimeError("label service down")

    handlers("inbox_labels", refuse_removals)
    await accepted(post, envelope([*LABELS, UNDOCUMENTED], channel="changes"))
    await drain()
    rows = await stream_rows(redis)
    assert sorted(r["raw"] for r in rows) == sorted([LABELS[0], UNDOCUMENTED])
    [letter] = await list_dead(redis)
    queued = decode_event(letter.payload)
    assert (queued.kind, queued.channel, queued.raw_text()) == (
        "inbox_labels", "changes", LABELS[1])
    assert letter.tries == settings.job_max_tries

    registry.remove("inbox_labels", refuse_removals)
    assert await replay(redis, settings) == 1
    await drain()
    assert sorted(r["raw"] for r in await stream_rows(redis, "inbox_labels")) == sorted(LABELS)


# --- Instagram -----------------------------------------------------------------------------------


async def test_instagram_bodies_flow_like_messenger_ones_in_their_own_identity_space(
    post: Post, drain: Drain, redis: Redis, client: TestClient[Any, Any]
) -> None:
    ads_context = {"ad_title": "Spring", "photo_url": "https://example.com/p.jpg"}
    items = [
        ig({"message": {"mid": "aWdf-m1", "text": "hello", "reply_to": {"story": {
            "url": "https://example.com/s", "id": "st1"}}}}),
        ig({"message": {"mid": "aWdf-m1", "is_deleted": True}}, ts=T + 5),
        ig({"messaging_seen": {"mid": "aWdf-m1", "watermark": T + 1}}, ts=T + 1),
        ig({"reaction": {"mid": "aWdf-m1", "action": "react", "reaction": "love",
                         "emoji": "\u2764"}}, ts=T + 2),
        ig({"postback": {"mid": "aWdf-pb1", "title": "Start", "payload": "START"}}, ts=T + 3),
        ig({"referral": {"ref": "spring-sale", "source": "IG_ME", "type": "OPEN_THREAD"}},
           ts=T + 10),
        ig({"referral": {"ad_id": "120200000001", "source": "ADS", "type": "OPEN_THREAD",
                         "ads_context_data": ads_context}}, ts=T + 20),
        ig({"message": {"mid": "aWdf-echo", "text": "hi!", "is_echo": True}},
           sender=IG_ACCOUNT, recipient=IGSID, ts=T + 4),
    ]
    await accepted(post, envelope(dumped(*items), obj="instagram", page=IG_ACCOUNT))
    await drain()

    rows = await stream_rows(redis)
    assert Counter(r["kind"] for r in rows) == {
        "message": 1, "message_unsend": 1, "read": 1, "reaction": 1, "postback": 1,
        "referral": 2, "message_echo": 1}
    assert {r["object"] for r in rows} == {"instagram"}
    assert {r["page_id"] for r in rows} == {IG_ACCOUNT}
    for row in rows:
        assert row["user"] == "ig:" + row["sender"]
    assert sorted(r["raw"] for r in rows) == sorted(dumped(*items))
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["message_unsend"]["id"] == "message_unsend:aWdf-m1"
    assert json.loads(by_kind["message_unsend"]["event"])["mid"] == "aWdf-m1"
    assert json.loads(by_kind["message"]["raw"])["message"]["reply_to"]["story"]["id"] == "st1"

    assert await attribution_keys(redis) == {f"fb:attr:ig:{IGSID}"}
    view = await record(redis, f"ig:{IGSID}")
    assert view.touches == 2
    assert (view.first["ref"], view.first["source"]) == ("spring-sale", "IG_ME")
    assert (view.last["ad_id"], view.last["source"]) == ("120200000001", "ADS")
    assert {t["object"] for t in view.history} == {"instagram"}
    notices = [fields for _, fields in await redis.xrange("fb:referrals")]
    assert [(n[b"user"], n[b"object"]) for n in notices] == [
        (f"ig:{IGSID}".encode(), b"instagram")] * 2

    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    response = await client.get(f"/attribution/{IGSID}?space=igsid", headers=auth)
    assert response.status == 200
    assert (await response.json())["last"]["ad_id"] == "120200000001"
    response = await client.get(f"/attribution/{IGSID}", headers=auth)
    assert response.status == 404, "an IGSID is not a PSID"


async def test_an_unsend_and_an_edit_are_each_their_own_event_whatever_the_order(
    post: Post, drain: Drain, redis: Redis
) -> None:
    original = ig({"message": {"mid": "aWdf-e1", "text": "helo"}})
    edit = ig({"message_edit": {"mid": "aWdf-e1", "text": "hello", "num_edit": 1}}, ts=T + 1)
    unsend = ig({"message": {"mid": "aWdf-e1", "is_deleted": True}}, ts=T + 2)
    second_edit = ig({"message_edit": {"mid": "aWdf-e1", "text": "hello!", "num_edit": 2}},
                     ts=T + 3)

    # The unsend and the edit arrive first, in one body with the message after them.
    await accepted(post, envelope(dumped(unsend, edit, original), obj="instagram"))
    await drain()
    # Each again on its own (Facebook's retries): duplicates of themselves only.
    for one in (original, edit, unsend):
        await accepted(post, envelope(dumped(one), obj="instagram"))
        await drain()
    await accepted(post, envelope(dumped(second_edit), obj="instagram"))
    await drain()

    rows = await stream_rows(redis)
    assert Counter(r["kind"] for r in rows) == {
        "message": 1, "message_edit": 2, "message_unsend": 1}
    assert {r["id"] for r in rows if r["kind"] != "message_edit"} == {
        "message:aWdf-e1", "message_unsend:aWdf-e1"}
    edits = sorted(json.loads(r["event"])["num_edit"] for r in rows if r["kind"] == "message_edit")
    assert edits == [1, 2]


async def test_an_unsend_on_a_messenger_page_is_not_a_duplicate_either(
    post: Post, drain: Drain, redis: Redis
) -> None:
    await accepted(post, envelope(dumped(message("u1", "m-gone"))))
    await drain()
    unsend = item("u1", {"message": {"mid": "m-gone", "is_deleted": True}}, ts=T + 1)
    await accepted(post, envelope(dumped(unsend)))
    await drain()
    assert sorted(r["id"] for r in await stream_rows(redis)) == [
        "message:m-gone", "message_unsend:m-gone"]


# --- identity spaces ------------------------------------------------------------------------------


async def test_the_same_string_in_three_identity_spaces_is_three_users(
    post: Post, drain: Drain, redis: Redis, client: TestClient[Any, Any]
) -> None:
    same = "12345"
    await accepted(post, envelope(dumped(
        referral(same, "psid-ref"),
        referral(None, "plugin-ref", source="CUSTOMER_CHAT_PLUGIN", user_ref=same),
        referral("ig:12345", "colon-ref"),
        referral("ref:12345", "ref-colon-ref"),
    )))
    await accepted(post, envelope(dumped(referral(same, "ig-ref")), obj="instagram",
                                  page=IG_ACCOUNT))
    await drain()

    assert await attribution_keys(redis) == {
        "fb:attr:12345", "fb:attr:ig:12345", "fb:attr:ref:12345", "fb:attr:psid:ig:12345",
        "fb:attr:psid:ref:12345"}
    for key, ref in [("12345", "psid-ref"), ("ig:12345", "ig-ref"), ("ref:12345", "plugin-ref"),
                     ("psid:ig:12345", "colon-ref"), ("psid:ref:12345", "ref-colon-ref")]:
        view = await record(redis, key)
        assert (view.touches, view.last["ref"]) == (1, ref), key
    rows = await stream_rows(redis, "referral")
    assert sorted((r["sender"], r["user"]) for r in rows) == [
        ("12345", "12345"), ("12345", "ig:12345"), ("12345", "ref:12345"),
        ("ig:12345", "psid:ig:12345"), ("ref:12345", "psid:ref:12345")]

    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for query, ref in [("12345", "psid-ref"), ("12345?space=psid", "psid-ref"),
                       ("12345?space=igsid", "ig-ref"), ("12345?space=user_ref", "plugin-ref"),
                       ("ig:12345", "colon-ref"), ("ref:12345", "ref-colon-ref")]:
        response = await client.get(f"/attribution/{query}", headers=auth)
        assert response.status == 200, query
        assert (await response.json())["last"]["ref"] == ref, query
    response = await client.get("/attribution/12345?space=nope", headers=auth)
    assert response.status == 400
    assert "space must be one of" in (await response.json())["error"]


# --- odd timestamps and attribution -------------------------------------------------------------


async def test_equal_timestamps_give_the_same_first_and_last_touch_in_any_arrival_order(
    post: Post, drain: Drain, redis: Redis
) -> None:
    alpha, beta = referral("tie", "alpha"), referral("tie", "beta")
    seen: list[tuple[Any, ...]] = []
    for order in ([alpha, beta], [beta, alpha]):
        for together in (False, True):
            await redis.flushall()
            if together:
                await accepted(post, envelope(dumped(*order)))
                await drain()
            else:
                for one in order:
                    await accepted(post, envelope(dumped(one)))
                    await drain()
            view = await record(redis, "tie")
            assert view.touches == 2
            assert view.first["timestamp"] == view.last["timestamp"] == T
            assert view.first["ref"] != view.last["ref"]
            assert view.last["tie"] > view.first["tie"]
            seen.append((view.first, view.last, view.history, view.vars))
    assert seen[1:] == seen[:1] * 3


async def test_a_missing_zero_or_untrusted_timestamp_counts_as_the_time_received(
    post: Post, drain: Drain, redis: Redis
) -> None:
    hour, day = 3_600_000, 86_400_000
    before = now_ms()
    received = {
        "zero": 0, "missing": None, "two-days-ahead": before + 2 * day,
        "seconds-2286": 9_999_999_999, "year-10000": YEAR_10000, "negative": -1,
        "not-a-time": "soon", "zero-text": "0", "nan-ish": "NaN",
    }
    trusted = {"an-hour-ahead": before + hour, "past": 1_600_000_000_000, "seconds": 1_600_000_000}
    items = [referral(user, user, ts=ts) for user, ts in {**received, **trusted}.items()]
    await accepted(post, envelope(dumped(*items)))
    after = now_ms()
    await drain()

    rows = await stream_rows(redis, "referral")
    assert len(rows) == len(items)
    for row in rows:  # the entry's timestamp: the event's, as digits, whatever its size
        assert row["timestamp"] == str(json.loads(row["event"])["timestamp"]), row["id"]
    for user in received:
        touch = (await record(redis, user)).last
        assert touch["timestamp_from"] == "received", user
        assert before <= touch["timestamp"] <= after, user
    for user, ts in trusted.items():
        touch = (await record(redis, user)).last
        assert touch["timestamp_from"] == "event", user
        assert touch["timestamp"] == (ts * 1000 if ts < 10**11 else ts), user
    days = {k.decode().split(":")[2] async for k in redis.scan_iter("fb:report:2*")}
    assert days <= {day_of(before), day_of(after), day_of(before + hour), day_of(after + hour),
                    day_of(1_600_000_000_000)}, "no touch is counted on a day it did not happen"


async def test_a_received_time_never_beats_an_earlier_real_touch_to_first(
    post: Post, drain: Drain, redis: Redis
) -> None:
    """A touch without a timestamp, or with one from the far future, stands at the time it was
    received: an older genuine touch arriving after it is still the first, and a genuine touch
    after it is the last (the far-future one is not the last forever)."""
    await accepted(post, envelope(dumped(referral("late", "no-time", ts=None))))
    await drain()
    await accepted(post, envelope(dumped(referral("late", "future", ts=YEAR_10000))))
    await drain()
    await accepted(post, envelope(dumped(referral("late", "genuine-old", ts=T))))
    await drain()
    view = await record(redis, "late")
    assert view.touches == 3
    assert view.first["ref"] == "genuine-old"
    assert view.last["ref"] == "future", "received after the other, at a later received time"
    assert [t["timestamp_from"] for t in view.history] == ["received", "received", "event"]
    await accepted(post, envelope(dumped(referral("late", "fresh", ts=now_ms()))))
    await drain()
    view = await record(redis, "late")
    assert (view.touches, view.first["ref"], view.last["ref"]) == (4, "genuine-old", "fresh")
    assert view.last["timestamp_from"] == "event"


@pytest.mark.parametrize("stamp", [T, "received"])
def test_a_genuine_timestamp_equal_to_the_received_time_is_the_events_own(stamp: Any) -> None:
    """Whether the received time stood in is recorded when normalising, never guessed from the
    value: a genuine timestamp of the very millisecond ingest received the event is `event`."""
    item: dict[str, Any] = {"sender": {"id": "u"}, "recipient": {"id": PAGE},
                            "referral": {"ref": "r", "source": "SHORTLINK", "type": "OPEN_THREAD"}}
    if stamp != "received":
        item["timestamp"] = stamp
    queued = QueuedEvent("h:1", "referral", "messaging", "page", PAGE, T,
                         msgspec.Raw(msgspec.json.encode(item)))
    event = normalize(queued, item)
    touch = touch_of(event, queued.received_ms)
    assert touch is not None
    assert (event.timestamp, touch.timestamp) == (T, T)
    expected = "event" if stamp == T else "received"
    assert (event.timestamp_from, touch.timestamp_from) == (expected, expected)
