"""Forwarding to the bot's own webhook (FORWARD_URL): a real aiohttp receiver on a free port.

The receiver checks each request's signature with the forward secret, as a bot's existing
handler would, and records what it got; workers run in this process against the test Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post
from tests.redis_server import free_port
from workers.leased_worker import LeasedWorker
from workers.settings import worker_settings

FORWARD_SECRET = b"bot-forward-secret"


@dataclasses.dataclass
class Receiver:
    """The bot: answers with `status` (a list is used in turn, then its last value), records
    every request."""

    url: str
    got: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    answers: list[tuple[int, dict[str, str]]] = dataclasses.field(default_factory=list)
    bad_signatures: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(FORWARD_SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Hub-Signature-256", ""), expected):
            self.bad_signatures += 1
            return web.Response(status=403)
        status, headers = self.answers.pop(0) if len(self.answers) > 1 else (
            self.answers[0] if self.answers else (200, {}))
        self.got.append({"body": body, "headers": dict(request.headers), "status": status})
        return web.Response(status=status, headers=headers, text="EVENT_RECEIVED")

    def delivered(self) -> list[dict[str, Any]]:
        return [g for g in self.got if 200 <= g["status"] < 300]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    rec = Receiver(f"http://127.0.0.1:{port}/webhook")
    app = web.Application()
    app.router.add_post("/webhook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield rec
    await runner.cleanup()


@pytest.fixture
def forwarding(settings: Settings, receiver: Receiver) -> Settings:
    return dataclasses.replace(settings, forward_url=receiver.url, forward_secret=FORWARD_SECRET)


@pytest.fixture
async def workers(forwarding: Settings) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    import workers.handlers  # noqa: F401

    started: list[LeasedWorker] = []
    mains: list[asyncio.Task[None]] = []

    async def start(count: int = 1) -> None:
        for _ in range(count):
            worker = LeasedWorker(**worker_settings(forwarding), handle_signals=False)
            started.append(worker)
            mains.append(asyncio.get_running_loop().create_task(worker.main()))

    yield start
    for task in mains:  # stop polling first, then let each worker close its jobs and pool
        task.cancel()
    await asyncio.gather(*mains, return_exceptions=True)
    for worker in started:
        await worker.close()


async def wait_for(predicate: Callable[[], Any], seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.05)):
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_every_event_reaches_the_bot_in_facebooks_envelope_signed_with_the_forward_secret(
    post: Post, redis: Redis, receiver: Receiver, workers: Any
) -> None:
    await workers(1)
    item = ('{"sender":{"id":"u1"},"recipient":{"id":"1122334455"},"timestamp":1700000000000,'
            '"message":{"mid":"m-fwd","text":"caf\\u00e9  \\ud83d"}}')
    body = ('{"object":"page","entry":[{"id":"1122334455","time":1,"messaging":['
            + item + "]}]}").encode()
    assert (await post(None, raw=body)).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 1)

    [got] = receiver.delivered()
    assert receiver.bad_signatures == 0
    sent = json.loads(got["body"])
    assert sent["object"] == "page" and sent["entry"][0]["id"] == "1122334455"
    assert item.encode() in got["body"], "the item exactly as Facebook sent it"
    assert got["headers"]["X-Fbhook-Event-Id"] == "message:m-fwd"
    assert got["headers"]["X-Fbhook-Referral"] == "0"
    assert json.loads(got["headers"]["X-Fbhook-Attribution"]) == {
        "_fbRefSource": None, "_fbRefParam": None, "_fbRefAdId": None}
    # The streams are written as ever.
    assert await redis.xlen("fb:events:message") == 1


async def test_the_bot_gets_the_users_attribution_and_the_referral_moment(
    post: Post, receiver: Receiver, workers: Any
) -> None:
    await workers(1)
    assert (await post(p.body(p.shortlink_referral("spring", sender="ana")))).status == 200
    assert (await post(p.body(p.text_message(mid="after", sender="ana")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 2)
    first, second = receiver.delivered()
    assert first["headers"]["X-Fbhook-Referral"] == "1"
    assert second["headers"]["X-Fbhook-Referral"] == "0"
    for got in (first, second):
        assert json.loads(got["headers"]["X-Fbhook-Attribution"]) == {
            "_fbRefSource": "SHORTLINK", "_fbRefParam": "spring", "_fbRefAdId": None}


async def test_a_failing_bot_is_retried_honouring_retry_after_and_gets_each_users_events_in_order(
    post: Post, redis: Redis, receiver: Receiver, workers: Any
) -> None:
    receiver.answers = [(503, {}), (429, {"Retry-After": "1"}), (200, {})]
    await workers(2)
    for n in range(5):
        assert (await post(p.body(p.text_message(mid=f"o-{n}", sender="bob")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 5)
    ids = [g["headers"]["X-Fbhook-Event-Id"] for g in receiver.delivered()]
    assert ids == [f"message:o-{n}" for n in range(5)]
    assert [g["status"] for g in receiver.got[:2]] == [503, 429]
    assert await redis.xlen("fb:fwd:dead") == 0


async def test_a_4xx_is_dead_lettered_at_once_with_the_answer(
    post: Post, redis: Redis, receiver: Receiver, workers: Any
) -> None:
    receiver.answers = [(400, {}), (200, {})]
    await workers(1)
    assert (await post(p.body(p.text_message(mid="refused", sender="cy")))).status == 200
    assert (await post(p.body(p.text_message(mid="next", sender="cy")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 1)
    [(_, dead)] = await redis.xrange("fb:fwd:dead")
    assert dead[b"id"] == b"message:refused" and dead[b"status"] == b"400"
    assert b"EVENT_RECEIVED" in dead[b"answer"]
    assert receiver.delivered()[0]["headers"]["X-Fbhook-Event-Id"] == "message:next"
