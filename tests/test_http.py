"""The handshake, health checks and the attribution read API."""

from __future__ import annotations

import time
from typing import Any

from aiohttp.test_utils import TestClient

from ingest.app import create_app
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import API_TOKEN, VERIFY_TOKEN, Post


def _handshake(
    mode: str = "subscribe", token: str = VERIFY_TOKEN, challenge: str = "1158201444"
) -> dict[str, str]:
    return {"hub.mode": mode, "hub.verify_token": token, "hub.challenge": challenge}


async def test_handshake_echoes_the_challenge(client: TestClient[Any, Any]) -> None:
    response = await client.get("/webhook", params=_handshake())
    assert response.status == 200
    assert await response.text() == "1158201444"


async def test_handshake_refuses_a_wrong_token_or_mode(client: TestClient[Any, Any]) -> None:
    for params in (
        _handshake(token="wrong"),
        _handshake(mode="unsubscribe"),
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
        {},
    ):
        response = await client.get("/webhook", params=params)
        assert response.status == 403, params


async def test_health_and_readiness(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"


async def test_readiness_and_webhook_fail_fast_when_redis_is_unreachable(
    aiohttp_client: Any, settings: Settings
) -> None:
    from dataclasses import replace

    from tests.redis_server import free_port

    down = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = await aiohttp_client(create_app(down))
    assert (await client.get("/readyz")).status == 503
    from ingest.signature import sign

    data = b'{"object":"page","entry":[{"id":"1","messaging":[{"message":{"mid":"x"}}]}]}'
    started = time.monotonic()
    response = await client.post(
        "/webhook",
        data=data,
        headers={
            "X-Hub-Signature-256": sign(b"test-app-secret", data),
            "Content-Type": "application/json",
        },
    )
    assert response.status == 503
    assert time.monotonic() - started < 2.0


async def test_attribution_api(client: TestClient[Any, Any], post: Post, drain: Any) -> None:
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    assert (await client.get(f"/attribution/{p.PSID}")).status == 401
    assert (
        await client.get(f"/attribution/{p.PSID}", headers={"Authorization": "Bearer nope"})
    ).status == 401
    assert (await client.get("/attribution/nobody", headers=auth)).status == 404

    await post(
        p.body(p.shortlink_referral(ts=1_700_000_000_000), p.ad_referral(ts=1_700_000_100_000))
    )
    await drain()
    response = await client.get(f"/attribution/{p.PSID}", headers=auth)
    assert response.status == 200
    data = await response.json()
    assert data["user"] == p.PSID
    assert data["touches"] == 2
    assert data["first"]["source"] == "SHORTLINK"
    assert data["last"]["source"] == "ADS"
    assert [t["source"] for t in data["history"]] == ["ADS", "SHORTLINK"]
    assert data["vars"] == {
        "_fbRefSource": "ADS",
        "_fbRefParam": "myparam",
        "_fbRefAdId": "6045246247433",
    }
