"""Real processes for fault tests: `python -m ingest`, `python -m workers`, and signed load.

Every process writes its output to a log file in a temporary directory, so a test that fails can
show what the services said (`Service.tail()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from ingest.signature import sign
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"fault-test-secret"
VERIFY_TOKEN = "fault-verify-token"
API_TOKEN = "fault-api-token-123"
QUEUE = "fb:queue"


def service_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of an ingest or worker process: small timeouts, quick polling."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FB_", "REDIS_", "JOB_"))}
    env.update({
        "FB_APP_SECRET": SECRET.decode(),
        "FB_VERIFY_TOKEN": VERIFY_TOKEN,
        "API_TOKEN": API_TOKEN,
        "REDIS_URL": redis_url,
        "JOB_TIMEOUT_SECONDS": "3",
        "WORKER_POLL_DELAY_SECONDS": "0.01",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@dataclass
class Service:
    """One running `python -m <module>` process."""

    module: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> Service:
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 15 s."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Ingest(Service):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 20.0) -> Ingest:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ingest exited early:\n{self.tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    self.url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"ingest did not listen on {self.port}:\n{self.tail()}")


class Services:
    """Starts ingest and workers against one Redis and stops whatever is still running."""

    def __init__(self, redis_url: str, log_dir: Path, **extra_env: str) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.extra_env = extra_env
        self.started: list[Service] = []

    def ingest(self, **env: str) -> Ingest:
        port = free_port()
        service = Ingest(
            "ingest", service_env(self.redis_url, INGEST_PORT=str(port), INGEST_HOST="127.0.0.1",
                                  **{**self.extra_env, **env}),
            self.log_dir / f"ingest-{len(self.started)}.log", port=port,
        )
        self.started.append(service)
        return service.start().wait_listening()

    def worker(self, **env: str) -> Service:
        service = Service(
            "workers", service_env(self.redis_url, **{**self.extra_env, **env}),
            self.log_dir / f"worker-{len(self.started)}.log",
        )
        self.started.append(service)
        return service.start()

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.module} pid {s.pid} ---\n{s.tail()}" for s in self.started)


@contextlib.contextmanager
def services(redis_url: str, log_dir: Path, **extra_env: str) -> Iterator[Services]:
    running = Services(redis_url, log_dir, **extra_env)
    try:
        yield running
    finally:
        running.stop_all()


# --------------------------------------------------------------------------- events and load


def message_item(tag: str, n: int) -> dict[str, Any]:
    """A text message with a unique mid: its dedupe id is `message:<mid>`."""
    return {
        "sender": {"id": f"{tag}-s{n % 97}"}, "recipient": {"id": "page-1"},
        "timestamp": 1_700_000_000_000 + n,
        "message": {"mid": f"m-{tag}-{n}", "text": f"hello {n}"},
    }


def referral_item(tag: str, n: int, users: int) -> dict[str, Any]:
    """A referral (no mid: its dedupe id is a hash of the item) for user `n % users`."""
    return {
        "sender": {"id": f"{tag}-u{n % users}"}, "recipient": {"id": "page-1"},
        "timestamp": 1_700_000_000_000 + n * 1000,
        "referral": {"source": "ADS", "type": "OPEN_THREAD", "ref": f"r{n}", "ad_id": f"ad{n}"},
    }


def body_of(items: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps({"object": "page", "entry": [
        {"id": "page-1", "time": int(time.time() * 1000), "messaging": list(items)},
    ]}).encode()


def dedupe_ids(items: Sequence[dict[str, Any]]) -> list[str]:
    """The ids ingest gives these items (what the streams' `id` field will hold)."""
    from ingest.envelope import parse

    return [e.id for e in parse(body_of(items), 0)]


@dataclass
class Sent:
    """One POST: the events it carried, the answer and how long the answer took."""

    ids: list[str]
    touches: dict[str, str]
    """referral event id -> the user it is a touch for"""
    status: int
    seconds: float


async def post_signed(session: aiohttp.ClientSession, url: str, body: bytes,
                      secret: bytes = SECRET, within_s: float = 10.0) -> tuple[int, float]:
    """POST a signed body; status 0 means no HTTP answer at all."""
    started = time.perf_counter()
    try:
        async with session.post(
            url + "/webhook", data=body,
            headers={"Content-Type": "application/json",
                     "X-Hub-Signature-256": sign(secret, body)},
            timeout=aiohttp.ClientTimeout(total=within_s),
        ) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    return status, time.perf_counter() - started


async def send_load(url: str, batches: Sequence[Sequence[dict[str, Any]]], *, concurrency: int = 8,
                    rate: float | None = None) -> list[Sent]:
    """POST every batch (one body each) with `concurrency` requests in flight, at most `rate`
    requests per second when given. Returns one `Sent` per batch, in the order given."""
    results: list[Sent | None] = [None] * len(batches)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(batches)):
        queue.put_nowait(i)
    started = time.monotonic()

    async def sender(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            if rate:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            items = batches[i]
            status, seconds = await post_signed(session, url, body_of(items))
            ids = dedupe_ids(items)
            touches = {i: it["sender"]["id"] for i, it in zip(ids, items, strict=True)
                       if "referral" in it}
            results[i] = Sent(ids, touches, status, seconds)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- what Redis holds


async def processed_ids(redis: Redis) -> Counter[str]:
    """How many stream entries each event id has, over every `fb:events:*` stream."""
    counts: Counter[str] = Counter()
    async for name in redis.scan_iter("fb:events:*"):
        last = "-"
        while True:
            rows = await redis.xrange(name, min=last, count=5000)
            for entry_id, fields in rows:
                if entry_id != last:
                    counts[fields[b"id"].decode()] += 1
            if len(rows) < 5000:
                break
            last = rows[-1][0]
    return counts


async def processed_total(redis: Redis) -> int:
    total = 0
    async for name in redis.scan_iter("fb:events:*"):
        total += int(await redis.xlen(name))
    return total


async def in_progress(redis: Redis) -> int:
    return len([k async for k in redis.scan_iter("arq:in-progress:*")])


async def wait_processed(redis: Redis, expected: set[str], within_s: float) -> float:
    """Wait until every expected id has a stream entry and the queue is empty; return the
    seconds it took. Raises AssertionError naming what is missing at the timeout."""
    started = time.monotonic()
    deadline = started + within_s
    while True:
        if await processed_total(redis) >= len(expected) and await redis.zcard(QUEUE) == 0:
            missing = expected - set(await processed_ids(redis))
            if not missing:
                return time.monotonic() - started
        if time.monotonic() > deadline:
            missing = expected - set(await processed_ids(redis))
            raise AssertionError(
                f"{len(missing)} of {len(expected)} events not processed after {within_s}s, "
                f"queue={await redis.zcard(QUEUE)} in-progress={await in_progress(redis)}; "
                f"e.g. {sorted(missing)[:3]}")
        await asyncio.sleep(0.1)


async def attribution_counts(redis: Redis, users: set[str]) -> dict[str, int]:
    """The touch count of each user's attribution record (0 when the user has none)."""
    from shared.attribution import touch_count

    return {user: touch_count(await redis.get(f"fb:attr:{user}")) for user in users}
