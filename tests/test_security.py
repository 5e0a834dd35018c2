"""Security properties: no pickle anywhere, secret rotation, nothing secret in the logs, the read
API's token, and a password-protected Redis reached through REDIS_URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError

from ingest.signature import sign
from shared.codec import UNREADABLE_JOB, job_deserializer
from shared.logs import JsonFormatter
from shared.settings import Settings
from tests import processes as proc
from tests.conftest import API_TOKEN, OLD_SECRET, SECRET, VERIFY_TOKEN, Post, stream_rows
from tests.processes import (
    body_of,
    message_item,
    post_signed,
    referral_item,
    services,
    wait_processed,
)
from tests.redis_server import free_port, server_binary
from workers.deadletters import list_dead

ITEM = {"sender": {"id": "u-sec"}, "recipient": {"id": "p1"}, "timestamp": 1_700_000_000_000,
        "referral": {"source": "ADS", "ref": "r1", "ad_id": "42"}}
ENVELOPE = {"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": [ITEM]}]}


class Planted:
    """Unpickling this creates a file: proof that a worker ran code from a queued job."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


async def test_queued_jobs_are_msgpack_not_pickle(post: Post, redis: Redis) -> None:
    assert (await post(ENVELOPE)).status == 200
    keys = [k async for k in redis.scan_iter("arq:job:*")]
    assert keys
    for key in keys:
        raw = await redis.get(key)
        assert raw is not None
        assert not raw.startswith(b"\x80"), "pickle protocol 2+ opcode"
        job = msgspec.msgpack.decode(raw)
        assert set(job) == {"t", "f", "a", "k", "et"}
        assert job["f"] == "lane"
        queued = await redis.lrange(f"fb:lane:{job['k']['lane']}", 0, -1)
        assert [json.loads(e)["raw"] for e in queued] == [ITEM], "events are JSON, never pickle"


def test_the_job_deserializer_refuses_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data = pickle.dumps({"t": 0, "f": "message", "a": [], "k": {"x": Planted(marker)}, "et": 1})
    job = job_deserializer(data)
    assert job["f"] == UNREADABLE_JOB, "handed to the dead letters, never unpickled"
    assert job["k"]["data"] == data
    assert not marker.exists()


async def test_the_worker_refuses_a_pickled_job(
    tmp_path: Path, redis: Redis, drain: Any, settings: Settings, post: Post
) -> None:
    marker = tmp_path / "ran"
    event = json.dumps({"id": "h:evil", "channel": "messaging", "page_id": "p1",
                        "received_ms": 1, "raw": ITEM})
    job = {"t": 0, "f": "referral", "a": [Planted(marker)], "k": {"events": [event]}, "et": 1}
    await redis.set("arq:job:evil", pickle.dumps(job))
    await redis.zadd(settings.queue_name, {"evil": 1})
    # A genuine job next to it still runs.
    assert (await post(ENVELOPE)).status == 200
    await drain()

    assert not marker.exists(), "the worker unpickled a job"
    assert await redis.exists("arq:job:evil") == 0
    assert await redis.zscore(settings.queue_name, "evil") is None
    rows = await stream_rows(redis)
    assert [r["id"] for r in rows] != [] and "h:evil" not in {r["id"] for r in rows}
    # Kept, never dropped: its bytes are in the dead letters, as they were in Redis.
    [dead] = await list_dead(redis)
    assert (dead.event_id, dead.kind) == ("job:evil", "job")
    assert "unreadable job" in dead.error
    raw = (await redis.xrange("fb:dead"))[0][1][b"payload"]
    assert raw == pickle.dumps(job)


@pytest.mark.parametrize("secret,status", [
    (SECRET, 200), (OLD_SECRET, 200), (b"a-third-secret", 403),
], ids=["current-secret", "previous-secret", "unknown-secret"])
async def test_secret_rotation_accepts_both_configured_secrets(
    secret: bytes, status: int, post: Post, redis: Redis
) -> None:
    response = await post(ENVELOPE, secret=secret)
    assert response.status == status
    assert bool([k async for k in redis.scan_iter("fb:seen:*")]) == (status == 200)


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token-123"},
    {"Authorization": f"Bearer {API_TOKEN}x"},
    {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
    {"Authorization": f"Basic {API_TOKEN}"},
    {"Authorization": API_TOKEN},
    {"Authorization": "Bearer "},
    {"X-Api-Token": API_TOKEN},
], ids=["none", "wrong", "longer", "shorter", "basic-scheme", "no-scheme", "empty", "other-header"])
@pytest.mark.parametrize("path", ["/attribution/u-sec", "/report.json"])
async def test_the_read_api_refuses_requests_without_the_token(
    headers: dict[str, str], path: str, client: TestClient[Any, Any], post: Post, drain: Any
) -> None:
    assert (await post(ENVELOPE)).status == 200
    await drain()
    response = await client.get(path, headers=headers)
    assert response.status == 401
    assert "u-sec" not in await response.text()
    good = await client.get(path, headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert good.status == 200


async def test_the_attribution_token_is_not_accepted_in_the_query(
    client: TestClient[Any, Any], post: Post, drain: Any
) -> None:
    assert (await post(ENVELOPE)).status == 200
    await drain()
    response = await client.get(f"/attribution/u-sec?token={API_TOKEN}")
    assert response.status == 401


def secret_values() -> list[str]:
    return [SECRET.decode(), OLD_SECRET.decode(), VERIFY_TOKEN, API_TOKEN]


async def test_no_secret_token_or_signature_appears_in_any_log_line(
    caplog: pytest.LogCaptureFixture, client: TestClient[Any, Any], post: Post, drain: Any,
    redis: Redis,
) -> None:
    caplog.set_level(logging.DEBUG)
    signatures: list[str] = []

    async def send(body: Any, **kw: Any) -> int:
        raw = json.dumps(body).encode()
        if kw.get("secret", SECRET) is not None:
            signatures.append(sign(kw.get("secret", SECRET), raw).removeprefix("sha256="))
        return int((await post(body, **kw)).status)

    assert await send(ENVELOPE) == 200
    assert await send(ENVELOPE, secret=OLD_SECRET) == 200  # a duplicate
    assert await send(ENVELOPE, secret=b"wrong-secret-here") == 403
    assert await send(ENVELOPE, secret=None) == 403
    assert await send({"no": "entry"}) == 400
    await redis.set("arq:job:garbage", b"\x80not-msgpack")
    await redis.zadd("fb:queue", {"garbage": 1})
    await drain()
    for query, status in [(f"?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}"
                           "&hub.challenge=42", 200),
                          ("?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1", 403)]:
        assert (await client.get("/webhook" + query)).status == status
    for token, status in [(API_TOKEN, 200), ("not-the-token-x", 401)]:
        got = await client.get("/attribution/u-sec", headers={"Authorization": f"Bearer {token}"})
        assert got.status == status
    response = await client.get(f"/report?token={API_TOKEN}")
    assert response.status == 200

    # The test server logs every request line (URLs with the handshake's token in the query);
    # `python -m ingest` runs with access_log=None, so aiohttp.access is not part of the app.
    records = [r for r in caplog.records if r.name != "aiohttp.access"]
    assert any(r.levelno >= logging.WARNING for r in records), "the run logged no rejection"
    formatter = JsonFormatter()
    text = "\n".join(formatter.format(r) for r in records)
    for value in [*secret_values(), *signatures]:
        assert value not in text


@contextlib.contextmanager
def redis_with_password(password: str) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fbhook-redis-auth-") as tmp:
        process = subprocess.Popen(
            [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", password, "--dir", tmp],
            cwd=tmp, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), 0.2) as sock:
                    sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                    time.sleep(0.05)
                    if b"+PONG" in sock.recv(64):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis with a password did not start")
                time.sleep(0.05)
            yield port
        finally:
            process.terminate()
            process.wait(10)


@pytest.mark.slow
async def test_redis_password_through_redis_url_and_no_secret_in_process_logs(
    tmp_path: Path,
) -> None:
    password = "s3cret-redis-pass-7781"
    with redis_with_password(password) as port:
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        anonymous = Redis(port=port)
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.ping()
        await anonymous.aclose()
        redis = Redis.from_url(url)
        try:
            with services(url, tmp_path, LOG_LEVEL="debug") as svc:
                ingest = svc.ingest()
                svc.worker()
                items = [message_item("auth", 1), referral_item("auth", 2, 1)]
                async with aiohttp.ClientSession() as http:
                    status, _ = await post_signed(http, ingest.url, body_of(items))
                    assert status == 200
                    bad, _ = await post_signed(http, ingest.url, body_of(items), b"nope-nope")
                    assert bad == 403
                    await wait_processed(redis, {"message:m-auth-1"}, within_s=30)
                    bearer = {"Authorization": f"Bearer {proc.API_TOKEN}"}
                    async with http.get(f"{ingest.url}/attribution/auth-u0",
                                        headers=bearer) as response:
                        assert response.status == 200
                    async with http.get(f"{ingest.url}/readyz") as response:
                        assert response.status == 200
                    async with http.get(
                            f"{ingest.url}/webhook?hub.mode=subscribe&hub.verify_token="
                            f"{proc.VERIFY_TOKEN}&hub.challenge=7") as response:
                        assert await response.text() == "7"
                await asyncio.sleep(0.2)
                logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
        finally:
            await redis.aclose()

        assert "debug" in logs, "the services logged nothing at debug level"
        for value in (password, proc.SECRET.decode(), proc.API_TOKEN, proc.VERIFY_TOKEN):
            assert value not in logs

        # A wrong password: ingest refuses to acknowledge (503), readiness fails.
        wrong = f"redis://:not-{password}@127.0.0.1:{port}/0"
        (tmp_path / "wrong").mkdir()
        with services(wrong, tmp_path / "wrong") as svc:
            ingest = svc.ingest()
            async with aiohttp.ClientSession() as http:
                status, _ = await post_signed(http, ingest.url, body_of([message_item("w", 1)]))
                assert status == 503
                async with http.get(f"{ingest.url}/readyz") as response:
                    assert response.status == 503
