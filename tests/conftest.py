"""Fixtures: one real Redis server per session on a free port, flushed before every test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ingest.app import create_app
from ingest.signature import sign
from shared.settings import Settings
from tests.redis_server import RedisProcess, redis_server
from workers.leased_worker import LeasedWorker as Worker
from workers.settings import worker_settings

SECRET = b"test-app-secret"
OLD_SECRET = b"previous-app-secret"
VERIFY_TOKEN = "verify-token-123"
API_TOKEN = "api-token-4567890"


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    with redis_server() as proc:
        yield proc


@pytest.fixture
def settings(redis_proc: RedisProcess) -> Settings:
    return Settings.from_env(
        {
            "FB_APP_SECRET": f"{SECRET.decode()},{OLD_SECRET.decode()}",
            "FB_VERIFY_TOKEN": VERIFY_TOKEN,
            "API_TOKEN": API_TOKEN,
            "REDIS_URL": redis_proc.url,
            "REDIS_TIMEOUT_SECONDS": "1",
            "WORKER_POLL_DELAY_SECONDS": "0",
            "JOB_MAX_TRIES": "3",
        }
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    await client.flushall()
    yield client
    await client.aclose()


Post = Callable[..., Awaitable[Any]]


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings, redis: Redis) -> TestClient[Any, Any]:
    app = create_app(settings)
    result: TestClient[Any, Any] = await aiohttp_client(app)
    return result


@pytest.fixture
def post(client: TestClient[Any, Any]) -> Post:
    """POST a body to /webhook, signed with the current secret unless told otherwise."""

    async def send(
        body: Any,
        *,
        secret: bytes | None = SECRET,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Any:
        data = raw if raw is not None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"}
        if secret is not None:
            hdrs["X-Hub-Signature-256"] = sign(secret, data)
        hdrs.update(headers or {})
        return await client.post("/webhook", data=data, headers=hdrs)

    return send


async def drain_with(config: Settings) -> None:
    """A real arq worker with `config`, in burst mode until the queue is empty."""
    import workers.handlers  # noqa: F401

    worker = Worker(**worker_settings(config), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()


@pytest.fixture
def drain(settings: Settings) -> Callable[[], Awaitable[None]]:
    """Run a real arq worker in burst mode until the queue is empty."""

    async def run() -> None:
        await drain_with(settings)

    return run


async def stream_rows(redis: Redis, kind: str | None = None) -> list[dict[str, str]]:
    """Every entry of every `fb:events:*` stream (or of one kind), fields decoded."""
    names = (
        [f"fb:events:{kind}"]
        if kind
        else [k.decode() async for k in redis.scan_iter("fb:events:*")]
    )
    rows: list[dict[str, str]] = []
    for name in names:
        for _, fields in await redis.xrange(name):
            rows.append({k.decode(): v.decode() for k, v in fields.items()})
    return rows


RunWorkers = Callable[[Settings, int], Awaitable[None]]


@pytest.fixture
async def run_workers() -> AsyncIterator[RunWorkers]:
    """start(settings, count): `count` real workers in this process, polling until the test ends
    (then stopped: polling first, then each closes its jobs and pool)."""
    import asyncio

    import workers.handlers  # noqa: F401

    started: list[Worker] = []
    mains: list[asyncio.Task[None]] = []

    async def start(config: Settings, count: int) -> None:
        for _ in range(count):
            worker = Worker(**worker_settings(config), handle_signals=False)
            started.append(worker)
            mains.append(asyncio.get_running_loop().create_task(worker.main()))

    yield start
    for task in mains:
        task.cancel()
    await asyncio.gather(*mains, return_exceptions=True)
    for worker in started:
        # arq's close() cancels the jobs still running and gathers them without
        # return_exceptions: a job cancelled while it finished (a slow bot's forward run, on a
        # loaded machine) raised CancelledError out of this teardown, the other workers were
        # never closed, and the tests after it failed by the hundred. The jobs are ended here.
        jobs = list(worker.tasks.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        worker.tasks.clear()
        await worker.close()


async def wait_for(predicate: Callable[[], Any], seconds: float = 30) -> None:
    """Until `predicate()` (a value or an awaitable) is true; AssertionError after `seconds`."""
    import asyncio

    for _ in range(int(seconds / 0.05)):
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A Redis of the test's own (AOF on), for fault tests that stop, kill or restart it."""
    with redis_server(appendonly=True) as proc:
        yield proc


@pytest.fixture
async def rclient(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, socket_timeout=5)
    yield client
    await client.aclose()


Handler = Callable[[dict[str, Any], Any], Awaitable[None]]


@pytest.fixture
def handlers() -> Iterator[Callable[[str, Handler], None]]:
    """Register handlers for the test; every one is removed afterwards."""
    from workers import registry

    added: list[tuple[str, Handler]] = []

    def add(kind: str, fn: Handler) -> None:
        registry.on(kind)(fn)
        added.append((kind, fn))

    yield add
    for kind, fn in added:
        registry.remove(kind, fn)


def lose_one_reply(monkeypatch: pytest.MonkeyPatch, lost: Callable[[Any], bool]) -> list[Any]:
    """From now on, the first Redis reply that `lost` picks is read and then lost, as when the
    connection drops after Redis answered: the client sees a connection error (and retries).
    Returns the list the lost reply is put in."""
    from redis.asyncio.connection import AbstractConnection
    from redis.exceptions import ConnectionError as RedisConnectionError

    original = AbstractConnection.read_response
    dropped: list[Any] = []

    async def lossy(self: AbstractConnection, *args: Any, **kwargs: Any) -> Any:
        reply = await original(self, *args, **kwargs)
        if not dropped and lost(reply):
            dropped.append(reply)
            await self.disconnect(nowait=True)
            raise RedisConnectionError("Connection reset by peer (the reply was lost)")
        return reply

    monkeypatch.setattr(AbstractConnection, "read_response", lossy)
    return dropped
