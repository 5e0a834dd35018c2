"""Webhook bodies for tests, built from the seed documents' examples with placeholders filled."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from arq.constants import retry_key_prefix
from redis.asyncio import Redis

from shared import keys
from shared.codec import QueuedEvent
from workers.effects import Effects, Outcome, Row, Step
from workers.normalize import normalize

PAGE = "1122334455"
PSID = "2233445566"


def body(
    *items: dict[str, Any], page: str = PAGE, channel: str = "messaging", time: int = 1458692752478
) -> dict[str, Any]:
    return {"object": "page", "entry": [{"id": page, "time": time, channel: list(items)}]}


def item(
    event: dict[str, Any],
    *,
    sender: str | None = PSID,
    ts: Any = 1458692752478,
    user_ref: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"recipient": {"id": PAGE}, "timestamp": ts, **event}
    if user_ref is not None:
        out["sender"] = {"user_ref": user_ref}
    elif sender is not None:
        out["sender"] = {"id": sender}
    return out


def shortlink_referral(ref: str = "myparam", **kw: Any) -> dict[str, Any]:
    """Seed 000, m.me link: the user already has a thread."""
    return item({"referral": {"ref": ref, "source": "SHORTLINK", "type": "OPEN_THREAD"}}, **kw)


def ad_referral(
    ad_id: str = "6045246247433", ref: str | None = "myparam", **kw: Any
) -> dict[str, Any]:
    """Seed 000, ad referral with ads_context_data."""
    referral: dict[str, Any] = {
        "ad_id": ad_id,
        "source": "ADS",
        "type": "OPEN_THREAD",
        "ads_context_data": {
            "ad_title": "Chunky peanut butter",
            "photo_url": "https://example.com/p.jpg",
            "video_url": "https://example.com/v.jpg",
            "post_id": "9988776655",
            "product_id": "12345",
            "flow_id": "777",
        },
    }
    if ref is not None:
        referral["ref"] = ref
    return item({"referral": referral}, **kw)


def postback_with_referral(**kw: Any) -> dict[str, Any]:
    """Seed 002: a Get Started postback from the chat plugin; string timestamp in seconds and
    the `SHORT-URL` source exactly as the postbacks page writes them."""
    kw.setdefault("user_ref", "USER-REF-ID")
    kw.setdefault("ts", "1527459824")
    return item(
        {
            "postback": {
                "mid": "m_MESSAGE-ID",
                "title": "TITLE-FOR-THE-CTA",
                "payload": "USER-DEFINED-PAYLOAD",
                "referral": {"ref": "get-started", "source": "SHORT-URL", "type": "OPEN_THREAD"},
            }
        },
        **kw,
    )


def text_message(
    mid: str = "mid.1457764197618:41d102a3e1ae206a38", text: str = "hello, world!", **kw: Any
) -> dict[str, Any]:
    """Seed 003, text message with a quick reply."""
    return item(
        {
            "message": {
                "mid": mid,
                "text": text,
                "quick_reply": {"payload": "DEVELOPER_DEFINED_PAYLOAD"},
            }
        },
        **kw,
    )


def reply_message(**kw: Any) -> dict[str, Any]:
    return item(
        {
            "message": {
                "mid": "m_1457764197618:41d102a3e1ae206a38",
                "text": "hello, world!",
                "reply_to": {"mid": "m_1fTq8oLumEyIp3Q2MR-aY7IfLZDamVrALniheU"},
            }
        },
        **kw,
    )


def attachment_message(**kw: Any) -> dict[str, Any]:
    return item(
        {
            "message": {
                "mid": "mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_c",
                "attachments": [
                    {"type": "image", "payload": {"url": "https://example.com/attachment.jpg"}}
                ],
            }
        },
        ts=1518479195308,
        **kw,
    )


def product_template_message(**kw: Any) -> dict[str, Any]:
    return item(
        {
            "message": {
                "mid": "mid.$cAAJdkrCd2ORnva8ErFhjGm0X_Q_d",
                "attachments": [
                    {
                        "type": "template",
                        "payload": {
                            "product": {
                                "elements": [
                                    {
                                        "id": "PRODUCT_ID",
                                        "retailer_id": "EXTERNAL_ID",
                                        "image_url": "https://fb.cdn.com/sdsd",
                                        "title": "Some product title",
                                        "subtitle": "$40",
                                    }
                                ]
                            }
                        },
                    }
                ],
            }
        },
        ts=1518479195308,
        **kw,
    )


def fallback_message(**kw: Any) -> dict[str, Any]:
    return item(
        {
            "message": {
                "mid": "m_toDnmD",
                "text": "This is where I want to go: https://youtu.be/bbo_fZAjIhg",
                "attachments": [
                    {
                        "type": "fallback",
                        "payload": {
                            "url": "https://example.com/fallback",
                            "title": "TAHITI - Heaven on Earth",
                        },
                    }
                ],
            }
        },
        ts=1583173666767,
        **kw,
    )


def shops_product_message(product_id: str = "PRODUCT_ID", **kw: Any) -> dict[str, Any]:
    """Seed 003, a message from a Facebook Shops product detail page: `message.referral`."""
    return item(
        {
            "message": {
                "mid": "mid.1457764197618:shops",
                "text": "hello, world!",
                "referral": {"product": {"id": product_id}},
            }
        },
        **kw,
    )


def read_event(watermark: int = 1458668856253, **kw: Any) -> dict[str, Any]:
    return item({"read": {"watermark": watermark}}, **kw)


def row(kind: str, event_id: str, channel: str, page: str | None, received_ms: int,
        item: Any, obj: str = "page") -> Row:
    """What a worker hands effects.lua for one item, as if ingest had queued it."""
    queued = QueuedEvent(event_id, kind, channel, obj, page, received_ms,
                         msgspec.Raw(json.dumps(item).encode()))
    return Effects.row(normalize(queued, item), queued)


async def step(effects: Effects, redis: Redis, rows: list[Row], lane: int = 0,
               job_try: int = 1) -> Outcome:
    """One step of a lane's run, as a worker makes it: the rows sit at the head of lane `lane`,
    whose owner is a job claimed `job_try` times."""
    job = f"test-job-{lane}"
    await redis.set(keys.lane_job(lane), job)
    await redis.set(retry_key_prefix + job, job_try)
    if rows:
        await redis.rpush(keys.lane(lane), *[r.id for r in rows])
    return await effects.write(rows, Step(lane, job, job_try))


async def write(effects: Effects, redis: Redis, rows: list[Row], lane: int = 0) -> list[int]:
    """The codes of one lane step writing `rows`."""
    return (await step(effects, redis, rows, lane)).codes
