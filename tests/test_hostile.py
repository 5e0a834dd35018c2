"""Hostile and malformed requests: each gets the status it should, and a refused one queues nothing.

The opposite holds too: a correctly signed body with an `entry` list is accepted whatever odd
things its items hold, and every item is routed to a stream.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.envelope import MAX_DEPTH, parse
from ingest.signature import sign
from shared.settings import Settings
from tests.conftest import SECRET, Post, stream_rows

ITEM = {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1_700_000_000_000,
        "message": {"mid": "m-hostile", "text": "hi"}}
GOOD = json.dumps({"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": [ITEM]}]})


def nested(depth: int) -> bytes:
    """A signed-looking envelope whose one item holds `depth` nested arrays."""
    return (GOOD[:-5] + ', "x": ' + "[" * depth + "]" * depth + "}]}]}").encode()


@dataclass(frozen=True)
class Case:
    status: int | tuple[int, ...]
    body: bytes = GOOD.encode()
    headers: Callable[[bytes], dict[str, str]] = lambda body: {
        "Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)}
    method: str = "POST"
    signed_body: bytes | None = None
    """When set, the signature is computed over these bytes and `body` is what is sent."""
    reason: str = ""
    """A phrase the answer must contain: the request was refused for this reason."""


def unsigned(body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json"}


def header(name: str, value: str) -> Callable[[bytes], dict[str, str]]:
    return lambda body: {"Content-Type": "application/json", name: value}


def signed_with(secret: bytes, content_type: str = "application/json",
                ) -> Callable[[bytes], dict[str, str]]:
    return lambda body: {"Content-Type": content_type, "X-Hub-Signature-256": sign(secret, body)}


def sha1_only(body: bytes) -> dict[str, str]:
    digest = hmac.new(SECRET, body, hashlib.sha1).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature": f"sha1={digest}"}


REFUSED: dict[str, Case] = {
    "no-signature": Case(403, headers=unsigned),
    "empty-signature": Case(403, headers=header("X-Hub-Signature-256", "")),
    "wrong-signature": Case(403, headers=header("X-Hub-Signature-256", "sha256=" + "0" * 64)),
    "signature-without-prefix": Case(
        403, headers=header("X-Hub-Signature-256", sign(SECRET, GOOD.encode())[7:])),
    "signature-of-another-secret": Case(403, headers=signed_with(b"someone-elses-secret")),
    "only-old-sha1-header": Case(403, headers=sha1_only),
    "body-altered-after-signing": Case(
        403, body=GOOD.replace("hi", "ho").encode(), signed_body=GOOD.encode()),
    "body-truncated-after-signing": Case(403, body=GOOD.encode()[:-1], signed_body=GOOD.encode()),
    "empty-body": Case(400, body=b""),
    "not-json": Case(400, body=b"entry=1&object=page"),
    "truncated-json": Case(400, body=GOOD.encode()[:-1]),
    "json-array": Case(400, body=b'[{"entry": []}]'),
    "json-string": Case(400, body=b'"entry"'),
    "object-without-entry": Case(400, body=b'{"object": "page"}'),
    "entry-is-an-object": Case(400, body=b'{"object": "page", "entry": {"id": "1"}}'),
    "entry-is-a-string": Case(400, body=b'{"object": "page", "entry": "[]"}'),
    "entry-is-null": Case(400, body=b'{"object": "page", "entry": null}'),
    "non-utf8-bytes": Case(
        400, body=GOOD.replace("hi", "h\udcff").encode("utf-8", "surrogateescape"),
        reason="not valid JSON"),
    "latin1-body": Case(400, body=GOOD.replace("hi", "caf\u00e9").encode("latin-1"),
                        reason="not valid JSON"),
    "body-over-the-limit": Case(413, body=GOOD.replace("hi", "x" * 1_100_000).encode()),
    "body-over-the-limit-unsigned": Case(
        413, body=GOOD.replace("hi", "x" * 1_100_000).encode(), headers=unsigned),
    "nested-past-the-limit": Case(400, body=nested(MAX_DEPTH), reason="deeper than"),
    "nested-near-the-recursion-limit": Case(400, body=nested(950), reason="deeper than"),
    "nested-past-the-recursion-limit": Case(400, body=nested(100_000), reason="deeper than"),
    "content-type-text-plain": Case(415, headers=signed_with(SECRET, "text/plain")),
    "content-type-form": Case(
        415, headers=signed_with(SECRET, "application/x-www-form-urlencoded")),
    "method-put": Case(405, method="PUT"),
    "method-delete": Case(405, method="DELETE"),
    "method-patch": Case(405, method="PATCH"),
}


async def queued_anything(redis: Redis, settings: Settings) -> list[str]:
    """What a request may have left in Redis: dedupe markers, arq jobs, queue entries."""
    found = [k.decode() async for k in redis.scan_iter("fb:seen:*")]
    found += [k.decode() async for k in redis.scan_iter("arq:*")]
    found += [f"queue:{m.decode()}" for m in await redis.zrange(settings.queue_name, 0, -1)]
    return found


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
async def test_refused_request_gets_its_status_and_queues_nothing(
    case: Case, client: TestClient[Any, Any], redis: Redis, settings: Settings
) -> None:
    headers = case.headers(case.signed_body if case.signed_body is not None else case.body)
    data = io.BytesIO(case.body) if len(case.body) > 65_536 else case.body  # large: no warning
    response = await client.request(case.method, "/webhook", data=data, headers=headers)
    text = await response.text()
    assert response.status == case.status, text
    assert case.reason in text
    assert await queued_anything(redis, settings) == []


async def test_the_good_body_of_the_table_is_accepted(
    client: TestClient[Any, Any], redis: Redis, settings: Settings
) -> None:
    """The table's bodies differ from an accepted one only in what each case changes."""
    body = GOOD.encode()
    response = await client.post("/webhook", data=body, headers=Case(200).headers(body))
    assert response.status == 200
    assert "fb:seen:message:m-hostile" in await queued_anything(redis, settings)


@pytest.mark.parametrize("headers", [
    {"X-Hub-Signature-256": "sha256=" + sign(SECRET, GOOD.encode())[7:].upper()},
    {"X-Hub-Signature-256": sign(SECRET, GOOD.encode()),
     "X-Hub-Signature": "sha1=" + "0" * 40},
    {"X-Hub-Signature-256": sign(SECRET, GOOD.encode()), "Content-Type": "text/json"},
    {"X-Hub-Signature-256": sign(SECRET, GOOD.encode()),
     "Content-Type": "application/json; charset=utf-8"},
], ids=["uppercase-hex", "with-a-wrong-sha1-header-too", "text-json", "json-with-charset"])
async def test_harmless_header_variations_are_accepted(
    headers: dict[str, str], client: TestClient[Any, Any], redis: Redis
) -> None:
    sent = {"Content-Type": "application/json", **headers}
    response = await client.post("/webhook", data=GOOD.encode(), headers=sent)
    assert response.status == 200, await response.text()
    assert await redis.exists("fb:seen:message:m-hostile")


async def test_nesting_up_to_the_limit_is_accepted_and_processed(
    post: Post, drain: Any, redis: Redis
) -> None:
    # The item sits 5 levels deep in the envelope: 5 + 59 = MAX_DEPTH.
    body = nested(MAX_DEPTH - 5)
    assert (await post(None, raw=body)).status == 200
    await drain()
    rows = await stream_rows(redis, "message")
    assert len(rows) == 1
    raw = json.loads(rows[0]["event"])
    assert raw["id"] == "message:m-hostile"
    assert (await post(None, raw=nested(MAX_DEPTH - 4))).status == 400


async def test_a_huge_messaging_list_is_accepted_and_drained_in_order(
    post: Post, drain: Any, redis: Redis, settings: Settings
) -> None:
    """More events of one user than a lane job reads at once: one lane, one job, read a batch
    at a time, every event written in the order sent."""
    count = settings.job_max_events * 2 + 37
    items = [dict(ITEM, message={"mid": f"m-{i}", "text": "x"}) for i in range(count)]
    body = {"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": items}]}
    assert (await post(body)).status == 200
    job_ids = await redis.zrange(settings.queue_name, 0, -1)
    assert len(job_ids) == 1
    job = msgspec.msgpack.decode(await redis.get(b"arq:job:" + job_ids[0]))
    assert job["f"] == "lane"
    assert await redis.llen(f"fb:lane:{job['k']['lane']}") == count
    await drain()
    rows = await stream_rows(redis, "message")
    assert [r["id"] for r in rows] == [f"message:m-{i}" for i in range(count)]


ODD: dict[str, Any] = {
    "wrong-types": {"entry": [{"id": 12.5, "time": "soon", "messaging": [
        {"sender": {"id": 123}, "recipient": "p", "timestamp": "1700000000",
         "message": {"mid": 7, "text": ["not", "text"], "attachments": "none"}}]}]},
    "missing-fields": {"entry": [{"messaging": [{"message": {}}, {"postback": {}}, {}]}]},
    "unknown-keys": {"object": "instagram", "extra": True, "entry": [
        {"id": "p", "surprise": {"a": 1}, "messaging": [
            {"sender": {"id": "u"}, "brand_new_event": {"x": 1}, "timestamp": 1}]}]},
    "entry-elements-not-objects": {"entry": [1, "two", None, [3], True]},
    "messaging-not-a-list": {"entry": [{"id": "p", "messaging": {"sender": {"id": "u"},
                                                                "message": {"mid": "solo"}}}]},
    "messaging-scalars": {"entry": [{"id": "p", "messaging": [1, "x", None, False, []]}]},
    "standby-and-changes": {"entry": [{"id": "p", "standby": [{"sender": {"id": "u"},
                                                               "postback": {"title": "t"}}],
                                       "changes": [{"field": "messages", "value": {
                                           "sender": {"id": "u"}, "message": {"mid": "c1"}}},
                                                   {"field": "feed", "value": {"post": 1}},
                                                   "not a change"]}]},
    "event-body-not-an-object": {"entry": [{"id": "p", "messaging": [
        {"sender": {"id": "u"}, "message": "hello"}, {"sender": {"id": "u"}, "referral": 5}]}]},
    "empty-entry": {"entry": []},
    "nulls-everywhere": {"entry": [{"id": None, "messaging": None, "standby": None,
                                    "changes": None}]},
    "referral-with-odd-ads-context": {"entry": [{"id": "p", "messaging": [
        {"sender": {"id": "odd-ads"}, "timestamp": 1_700_000_000_000, "referral": {
            "source": "ADS", "ad_id": "1", "ads_context_data": {
                "ad_title": None, "photo_url": "", "nested": {"empty": {}, "list": [1, None, 3]},
                "deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {
                    "k": {"l": {"m": {"n": {"o": {"p": {"q": {"r": 1}}}}}}}}}}}}}}}}}},
            }}}]}]},
}


@pytest.mark.parametrize("body", ODD.values(), ids=ODD.keys())
async def test_odd_but_signed_envelopes_are_accepted_and_every_item_routed(
    body: Any, post: Post, drain: Any, redis: Redis, client: TestClient[Any, Any]
) -> None:
    raw = json.dumps(body).encode()
    expected = {e.id for e in parse(raw, 0)}
    response = await post(None, raw=raw)
    assert response.status == 200, await response.text()
    await drain()
    rows = await stream_rows(redis)
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert await redis.zcard("fb:queue") == 0
    assert await redis.xlen("fb:dead") == 0
    async for key in redis.scan_iter("fb:attr:*"):
        user = key.decode().removeprefix("fb:attr:")
        answer = await client.get(f"/attribution/{user}",
                                  headers={"Authorization": "Bearer api-token-4567890"})
        assert answer.status == 200, await answer.text()
        if user == "odd-ads":
            view = await answer.json()
            sent = body["entry"][0]["messaging"][0]["referral"]["ads_context_data"]
            assert view["last"]["ads_context_data"] == sent, "stored exactly as received"
