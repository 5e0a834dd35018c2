"""Every example payload of the seed documents flows through and lands where it should."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from shared.attribution import load
from tests import payloads as p
from tests.conftest import Post, stream_rows


async def _one_event(post: Post, drain: Any, redis: Redis, item: dict[str, Any]) -> dict[str, Any]:
    response = await post(p.body(item))
    assert response.status == 200
    await drain()
    rows = await stream_rows(redis)
    assert len(rows) == 1
    return {**rows[0], "event": json.loads(rows[0]["event"])}


async def _record(redis: Redis, user: str, space: str = "psid") -> Any:
    view = await load(redis, user, space)
    assert view is not None, f"no attribution stored for {user}"
    return view


async def test_seed_000_shortlink_referral(post: Post, drain: Any, redis: Redis) -> None:
    row = await _one_event(post, drain, redis, p.shortlink_referral())
    assert (row["kind"], row["sender"], row["page_id"]) == ("referral", p.PSID, p.PAGE)
    assert row["event"]["referral"] == {
        "source": "SHORTLINK",
        "type": "OPEN_THREAD",
        "ref": "myparam",
    }
    view = await _record(redis, p.PSID)
    assert view.vars == {"_fbRefSource": "SHORTLINK", "_fbRefParam": "myparam", "_fbRefAdId": None}
    assert view.last["via"] == "referral"


async def test_seed_000_ad_referral_keeps_ads_context_data(
    post: Post, drain: Any, redis: Redis
) -> None:
    row = await _one_event(post, drain, redis, p.ad_referral())
    assert row["event"]["referral"]["ads_context_data"]["ad_title"] == "Chunky peanut butter"
    view = await _record(redis, p.PSID)
    assert view.vars == {
        "_fbRefSource": "ADS",
        "_fbRefParam": "myparam",
        "_fbRefAdId": "6045246247433",
    }
    assert view.last["ads_context_data"]["flow_id"] == "777"


async def test_ad_referral_without_ref_is_still_a_touch(
    post: Post, drain: Any, redis: Redis
) -> None:
    await _one_event(post, drain, redis, p.ad_referral(ref=None))
    view = await _record(redis, p.PSID)
    assert view.vars == {"_fbRefSource": "ADS", "_fbRefParam": None, "_fbRefAdId": "6045246247433"}


async def test_seed_002_postback_referral_from_chat_plugin(
    post: Post, drain: Any, redis: Redis
) -> None:
    row = await _one_event(post, drain, redis, p.postback_with_referral())
    assert row["kind"] == "postback"
    assert row["sender"] == "USER-REF-ID"
    assert row["timestamp"] == "1527459824000", "seconds given as a string become milliseconds"
    assert row["event"]["payload"] == "USER-DEFINED-PAYLOAD"
    view = await _record(redis, "USER-REF-ID", "user_ref")
    assert view.last["source"] == "SHORT-URL", "sources are kept as Facebook wrote them"
    assert view.last["via"] == "postback"
    assert view.last["timestamp"] == 1527459824000


async def test_seed_002_in_the_dashboard_changes_format(
    post: Post, drain: Any, redis: Redis
) -> None:
    value = p.postback_with_referral()
    body = {
        "object": "page",
        "entry": [
            {
                "id": p.PAGE,
                "time": 1527459824,
                "changes": [{"field": "messaging_postbacks", "value": value}],
            }
        ],
    }
    assert (await post(body)).status == 200
    await drain()
    rows = await stream_rows(redis, "postback")
    assert [r["sender"] for r in rows] == ["USER-REF-ID"]


async def test_seed_003_text_message(post: Post, drain: Any, redis: Redis) -> None:
    row = await _one_event(post, drain, redis, p.text_message())
    event = row["event"]
    assert (event["kind"], event["text"], event["quick_reply_payload"]) == (
        "message",
        "hello, world!",
        "DEVELOPER_DEFINED_PAYLOAD",
    )
    assert row["id"] == "message:mid.1457764197618:41d102a3e1ae206a38"
    assert await redis.keys("fb:attr:*") == []


async def test_seed_003_reply_message(post: Post, drain: Any, redis: Redis) -> None:
    row = await _one_event(post, drain, redis, p.reply_message())
    assert row["event"]["reply_to_mid"] == "m_1fTq8oLumEyIp3Q2MR-aY7IfLZDamVrALniheU"


async def test_seed_003_attachments(post: Post, drain: Any, redis: Redis) -> None:
    for builder in (p.attachment_message, p.product_template_message, p.fallback_message):
        await redis.flushall()
        row = await _one_event(post, drain, redis, builder())
        assert row["kind"] == "message"
        assert row["event"]["attachments"][0]["type"] in {"image", "template", "fallback"}


async def test_seed_003_shops_product_message_is_a_touch(
    post: Post, drain: Any, redis: Redis
) -> None:
    row = await _one_event(post, drain, redis, p.shops_product_message())
    assert row["event"]["referral"] == {"product_id": "PRODUCT_ID"}
    view = await _record(redis, p.PSID)
    assert (view.last["via"], view.last["product_id"], view.last["source"]) == (
        "message",
        "PRODUCT_ID",
        None,
    )
