"""The live referral signal: `fb:referrals`, read by a bot through a consumer group."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from shared import keys
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post
from workers.effects import Effects


def referral(user: str, ts: int, **ref: Any) -> dict[str, Any]:
    return {"sender": {"id": user}, "recipient": {"id": "PAGE1"}, "timestamp": ts,
            "referral": {"type": "OPEN_THREAD", **ref}}


def body(*items: dict[str, Any]) -> dict[str, Any]:
    return {"object": "page", "entry": [{"id": "PAGE1", "time": 1, "messaging": list(items)}]}


async def read_group(redis: Redis, group: str, consumer: str) -> list[tuple[bytes, dict[str, str]]]:
    """What docs/referrals.md's consumer does: XREADGROUP new entries, then XACK them."""
    out: list[tuple[bytes, dict[str, str]]] = []
    reply = await redis.xreadgroup(group, consumer, {keys.REFERRALS_STREAM: ">"}, count=100,
                                   block=100)
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            out.append((entry_id, {k.decode(): v.decode() for k, v in fields.items()}))
            await redis.xack(keys.REFERRALS_STREAM, group, entry_id)
    return out


async def test_a_consumer_group_sees_new_and_returning_users(
    redis: Redis, post: Post, drain: Any,
) -> None:
    await redis.xgroup_create(keys.REFERRALS_STREAM, "greeter", id="$", mkstream=True)
    ad = {"source": "ADS", "ad_id": "6045246247433", "ref": "pb",
          "ads_context_data": {"ad_title": "Peanut butter"}}
    assert (await post(body(referral("ann", 1_700_000_000_000, **ad)))).status == 200
    await drain()
    assert (await post(body(
        referral("ann", 1_700_000_100_000, source="SHORTLINK", ref="dogs"),
        referral("ben", 1_700_000_100_000, source="CUSTOMER_CHAT_PLUGIN"),
    ))).status == 200
    await drain()

    # Each user's entries in the order sent; two users' entries in either order (two lanes).
    seen = sorted(await read_group(redis, "greeter", "bot-1"), key=lambda e: e[1]["user"])
    assert [(f["user"], f["returning"], f["touches"]) for _, f in seen] == [
        ("ann", "0", "1"), ("ann", "1", "2"), ("ben", "0", "1")]
    first, again, ben = (f for _, f in seen)
    assert json.loads(first["vars"]) == {
        "_fbRefSource": "ADS", "_fbRefParam": "pb", "_fbRefAdId": "6045246247433"}
    assert json.loads(first["touch"])["ads_context_data"] == {"ad_title": "Peanut butter"}
    assert json.loads(again["vars"]) == {
        "_fbRefSource": "SHORTLINK", "_fbRefParam": "dogs", "_fbRefAdId": None}
    assert json.loads(again["touch"])["via"] == "referral"
    assert json.loads(ben["vars"])["_fbRefSource"] == "CUSTOMER_CHAT_PLUGIN"

    # everything was acknowledged: nothing pending, nothing new for the group
    assert (await redis.xpending(keys.REFERRALS_STREAM, "greeter"))["pending"] == 0
    assert await read_group(redis, "greeter", "bot-2") == []


async def test_a_duplicate_delivery_publishes_once(redis: Redis, post: Post, drain: Any) -> None:
    item = referral("cat", 1_700_000_000_000, source="SHORTLINK", ref="x")
    for _ in range(2):
        assert (await post(body(item))).status == 200
        await drain()
    assert await redis.xlen(keys.REFERRALS_STREAM) == 1


async def test_the_referrals_stream_is_capped_at_stream_maxlen(
    redis: Redis, settings: Settings,
) -> None:
    effects = Effects(redis, replace(settings, stream_maxlen=100))
    events = [
        p.row("referral", f"h:{n}", "messaging", "P", n,
                                           referral(f"user{n}", 1_700_000_000_000 + n,
                                                    source="SHORTLINK"))
        for n in range(1000)
    ]
    for start in range(0, 1000, 250):
        await p.write(effects, redis, events[start:start + 250])
    length = await redis.xlen(keys.REFERRALS_STREAM)
    assert 100 <= length < 200  # MAXLEN ~ trims whole nodes: about the cap, never far above
    await effects.aclose()
