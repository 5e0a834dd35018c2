"""The ingest and a Redis that answers but will not write, or that restarted: /readyz says 503
whenever webhooks would get 503, and the first webhook after a restart is accepted.

Each test runs its own redis-server, since it changes the server's configuration or restarts it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.app import create_app
from ingest.signature import sign
from shared.settings import Settings
from tests.conftest import SECRET
from tests.redis_server import RedisProcess, free_port, redis_server


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    with redis_server() as proc:
        yield proc


@pytest.fixture
async def own_client(aiohttp_client: Any, settings: Settings,
                     own_redis: RedisProcess) -> TestClient[Any, Any]:
    app = create_app(dataclasses.replace(settings, redis_url=own_redis.url))
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


@pytest.fixture
async def admin(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    """A separate client to reconfigure the server with."""
    client = Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


def webhook(mid: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": [
        {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1_700_000_000_000,
         "message": {"mid": mid, "text": "hi"}}]}]}).encode()
    return body, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)}


async def ready_and_webhook(client: TestClient[Any, Any], mid: str) -> tuple[int, Any, int]:
    """/readyz's status and answer, then the status of a signed webhook."""
    ready = await client.get("/readyz")
    body, headers = webhook(mid)
    posted = await client.post("/webhook", data=body, headers=headers)
    return ready.status, await ready.json(), posted.status


async def test_readyz_is_ready_and_webhooks_accepted_when_redis_takes_writes(
    own_client: TestClient[Any, Any], admin: Redis
) -> None:
    status, answer, posted = await ready_and_webhook(own_client, "m-ok")
    assert (status, answer, posted) == (200, {"status": "ready"}, 200)
    assert 0 < await admin.pttl("fb:ready") <= 10_000


async def test_readyz_is_503_when_redis_is_out_of_memory(
    own_client: TestClient[Any, Any], admin: Redis
) -> None:
    await admin.config_set("maxmemory", 1)  # noeviction (the test server's policy): writes fail
    status, answer, posted = await ready_and_webhook(own_client, "m-oom")
    assert (status, answer, posted) == (
        503, {"status": "unavailable", "redis": "OutOfMemoryError",
              "error": "command not allowed when used memory > 'maxmemory'."}, 503)
    await admin.config_set("maxmemory", 0)
    assert (await ready_and_webhook(own_client, "m-oom"))[::2] == (200, 200)


async def test_readyz_is_503_when_redis_is_a_read_only_replica(
    own_client: TestClient[Any, Any], admin: Redis
) -> None:
    await admin.replicaof("127.0.0.1", free_port())  # a master that is not there
    status, answer, posted = await ready_and_webhook(own_client, "m-replica")
    assert (status, answer, posted) == (
        503, {"status": "unavailable", "redis": "ReadOnlyError",
              "error": "You can't write against a read only replica."}, 503)
    await admin.replicaof("NO", "ONE")
    assert (await ready_and_webhook(own_client, "m-replica"))[::2] == (200, 200)


async def test_readyz_is_503_when_redis_lacks_the_replicas_it_needs_to_write(
    own_client: TestClient[Any, Any], admin: Redis
) -> None:
    await admin.config_set("min-replicas-to-write", 1)
    status, answer, posted = await ready_and_webhook(own_client, "m-noreplicas")
    assert (status, answer, posted) == (
        503, {"status": "unavailable", "redis": "ResponseError",
              "error": "NOREPLICAS Not enough good replicas to write."}, 503)
    await admin.config_set("min-replicas-to-write", 0)
    assert (await ready_and_webhook(own_client, "m-noreplicas"))[::2] == (200, 200)


async def test_the_first_webhook_and_read_after_a_redis_restart_are_answered(
    own_client: TestClient[Any, Any], own_redis: RedisProcess
) -> None:
    """The restart closed every connection the ingest holds. The pool notices a closed
    connection when it hands one out, but the enqueue call's client holds its own connection
    (shared/pinned.py): without a retry, the first webhook after each restart got 503."""
    for n in range(3):
        status, _, posted = await ready_and_webhook(own_client, f"m-before-{n}")
        assert (status, posted) == (200, 200)
        own_redis.stop()
        own_redis.start()
        body, headers = webhook(f"m-after-{n}")
        assert (await own_client.post("/webhook", data=body, headers=headers)).status == 200
        assert (await own_client.get("/readyz")).status == 200
        assert (await own_client.get("/attribution/u1", headers={
            "Authorization": "Bearer api-token-4567890"})).status == 404


async def test_readyz_and_webhooks_are_503_while_redis_is_down(
    own_client: TestClient[Any, Any], own_redis: RedisProcess
) -> None:
    """The retry is for a closed connection, not a way to hide an outage."""
    assert (await own_client.get("/readyz")).status == 200
    own_redis.stop()
    status, answer, posted = await ready_and_webhook(own_client, "m-down")
    assert (status, answer, posted) == (
        503, {"status": "unavailable", "redis": "ConnectionError"}, 503)
    own_redis.start()
    assert (await ready_and_webhook(own_client, "m-down"))[::2] == (200, 200)
