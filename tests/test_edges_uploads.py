"""Stalled and abandoned uploads against a real `python -m ingest` process over real sockets.

The attack of issue 11: many connections each announce a body of nearly MAX_BODY_BYTES, send all
but its last byte and stall. The ingest must close them within BODY_TIMEOUT_SECONDS, answer
normal webhooks meanwhile, keep its memory bounded, and log a quiet line for each, no traceback.
Small settings keep each test to a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ingest.body import FREE_BYTES, SLOT_WAIT_S
from tests.processes import Ingest, Services, body_of, message_item, post_signed, services
from tests.redis_server import RedisProcess

pytestmark = pytest.mark.slow

STALLED = 200
SLOTS = 4
TIMEOUT_S = 2.0
MAX_BODY = 1_048_576
UVLOOP_READ = 262_144
"""The most uvloop hands over in one read: a paused connection can overshoot by this much."""
CONNECTION = 16_384
"""What aiohttp and uvloop keep for an open connection besides its body (measured: 11 KiB)."""


@pytest.fixture
def running(redis_proc: RedisProcess, tmp_path: Path) -> Iterator[Services]:
    with services(redis_proc.url, tmp_path, BODY_TIMEOUT_SECONDS=str(TIMEOUT_S),
                  MAX_BODIES_BUFFERING=str(SLOTS), MAX_BODY_BYTES=str(MAX_BODY),
                  LOG_LEVEL="info") as running:
        yield running


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def log_lines(ingest: Ingest) -> list[dict[str, Any]]:
    text = ingest.log_path.read_text()
    assert "Traceback" not in text
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@dataclass
class Upload:
    """One raw connection that announces `length` bytes and sends `sent` of them."""

    answer: bytes = b""
    closed_after_s: float | None = None


def head(port: int, length: int, extra: str = "") -> bytes:
    return (f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nX-Hub-Signature-256: sha256={'0' * 64}\r\n"
            f"{extra}Content-Length: {length}\r\n\r\n").encode()


async def stall(port: int, body: memoryview, length: int, started: float,
                within_s: float, then_close: bool = False, extra: str = "") -> Upload:
    """Connect, send the head and `body` (less than `length`), then wait for the server to
    close the connection (or close it ourselves: `then_close`)."""
    loop = asyncio.get_running_loop()
    upload = Upload()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, head(port, length, extra))
        async with asyncio.timeout(within_s):
            try:
                await loop.sock_sendall(sock, body)
                if then_close:
                    await asyncio.sleep(0.3)  # the handler is reading the body by now
                    return upload
                while chunk := await loop.sock_recv(sock, 4096):
                    upload.answer += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
            upload.closed_after_s = time.monotonic() - started
    except TimeoutError:
        pass  # still open at the deadline: closed_after_s stays None
    finally:
        sock.close()
    return upload


def status_of(upload: Upload) -> int:
    """The answer's status, 0 if there was none."""
    return int(upload.answer.split(b" ", 2)[1]) if upload.answer.startswith(b"HTTP/") else 0


async def webhook_while(ingest: Ingest, delay_s: float) -> tuple[int, float]:
    await asyncio.sleep(delay_s)
    async with aiohttp.ClientSession() as session:
        status, _ = await post_signed(session, ingest.url, body_of([message_item("edge", 1)]))
    return status, time.monotonic()


async def test_stalled_uploads_are_closed_in_time_in_bounded_memory_while_webhooks_go_through(
    running: Services,
) -> None:
    ingest = running.ingest()
    async with aiohttp.ClientSession() as session:  # warm up: the first webhook's allocations
        assert (await post_signed(session, ingest.url, body_of([message_item("w", 0)])))[0] == 200
    before_kib = memory_kib(ingest.pid, "VmRSS")
    body = memoryview(bytes(MAX_BODY - 1))  # all but the last byte, shared by every upload
    started = time.monotonic()
    within_s = SLOT_WAIT_S + 2 * TIMEOUT_S + 5.0
    *uploads, (webhook_status, webhook_at) = await asyncio.gather(
        *(stall(ingest.port, body, MAX_BODY, started, within_s) for _ in range(STALLED)),
        webhook_while(ingest, SLOT_WAIT_S + 0.3),
    )
    peak_kib = memory_kib(ingest.pid, "VmHWM")

    # A normal webhook got its answer while the uploads holding the slots were still stalled.
    assert webhook_status == 200
    timed_out = [u for u in uploads if status_of(u) == 408]
    assert all(u.closed_after_s is not None and webhook_at - started < u.closed_after_s
               for u in timed_out)
    # The first SLOTS uploads waited for their bodies, the others found no free slot.
    assert Counter(status_of(u) for u in uploads) == {408: SLOTS, 503: STALLED - SLOTS}
    # Every connection was closed by the ingest: the 408s at the body timeout; the 503s after
    # aiohttp read and dropped what came for at most the body timeout too.
    assert all(u.closed_after_s is not None for u in uploads)
    assert min(u.closed_after_s for u in timed_out) >= TIMEOUT_S  # type: ignore[type-var]
    assert b"too many uploads in progress" in uploads[[status_of(u) for u in uploads]
                                                      .index(503)].answer

    # Memory: each slot holds at most one body (twice, while read() grows its buffer), each
    # other connection what aiohttp reads before it pauses (FREE_BYTES and the read that crossed
    # the mark); without the limits every upload held a whole body (over 200 MB here).
    bound_kib = (SLOTS * 2 * MAX_BODY + STALLED * (FREE_BYTES + UVLOOP_READ + CONNECTION)) // 1024
    grew_kib = peak_kib - before_kib
    print(f"ingest RSS {before_kib} KiB before, peak {peak_kib} KiB: +{grew_kib} KiB "
          f"(bound {bound_kib} KiB)")
    assert grew_kib < bound_kib

    lines = log_lines(ingest)
    assert {line["level"] for line in lines} <= {"debug", "info"}
    outcomes = Counter(line.get("outcome") for line in lines if line["msg"].startswith("webhook"))
    assert outcomes == {"body_timeout": SLOTS, "busy": STALLED - SLOTS}
    async with aiohttp.ClientSession() as session, session.get(
            ingest.url + "/metrics") as response:
        text = await response.text()
    assert f'fbhook_webhook_rejections_total{{reason="busy"}} {STALLED - SLOTS}.0' in text
    assert f'fbhook_webhook_rejections_total{{reason="body_timeout"}} {SLOTS}.0' in text


async def test_abandoned_uploads_log_one_quiet_line_each(running: Services) -> None:
    ingest = running.ingest()
    started = time.monotonic()
    small, large = memoryview(bytes(FREE_BYTES // 2)), memoryview(bytes(MAX_BODY // 2))
    await asyncio.gather(
        *(stall(ingest.port, small, FREE_BYTES, started, 5.0, then_close=True) for _ in range(10)),
        *(stall(ingest.port, large, MAX_BODY, started, 5.0, then_close=True)
          for _ in range(SLOTS)),
    )
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        lines = [line for line in log_lines(ingest) if line["msg"].startswith("webhook")]
        if len(lines) == 10 + SLOTS:
            break
        await asyncio.sleep(0.05)
    assert [(line["level"], line["status"], line["outcome"]) for line in lines] == \
        [("info", 400, "incomplete_body")] * (10 + SLOTS)
    assert {line["level"] for line in log_lines(ingest)} <= {"debug", "info"}
    # The slots were given back: a large signed body is read and accepted.
    items = [message_item("big", n) for n in range(600)]
    assert len(body_of(items)) > FREE_BYTES
    async with aiohttp.ClientSession() as session:
        assert (await post_signed(session, ingest.url, body_of(items)))[0] == 200


async def test_compressed_uploads_are_inflated_only_whole_and_within_the_body_limit(
    running: Services,
) -> None:
    """aiohttp inflated a gzip body chunk by chunk as it came, outside the slots: 100 uploads of
    about a kilobyte, stalled before their last byte, held 1.9 MB each (a megabyte of spaces
    apiece). Now a body is inflated once it has all arrived, to at most MAX_BODY_BYTES: stalled,
    each holds its kilobyte. A signed gzip or deflate webhook still goes through; one that
    inflates past the limit gets 413, a broken one 400, another encoding 415."""
    import gzip
    import zlib

    from ingest.signature import sign
    from tests.processes import SECRET

    ingest = running.ingest()
    async with aiohttp.ClientSession() as session:
        assert (await post_signed(session, ingest.url, body_of([message_item("w", 0)])))[0] == 200
    before_kib = memory_kib(ingest.pid, "VmRSS")
    bomb = gzip.compress(b" " * MAX_BODY)
    count = 60
    started = time.monotonic()
    uploads = await asyncio.gather(*(
        stall(ingest.port, memoryview(bomb)[:-1], len(bomb), started, TIMEOUT_S + 5.0,
              extra="Content-Encoding: gzip\r\n") for _ in range(count)))
    grew_kib = memory_kib(ingest.pid, "VmHWM") - before_kib
    assert Counter(status_of(u) for u in uploads) == {408: count}
    bound_kib = count * (FREE_BYTES + UVLOOP_READ + CONNECTION) // 1024
    print(f"{count} stalled gzip uploads: ingest grew {grew_kib} KiB (bound {bound_kib} KiB, "
          f"inflated {count * MAX_BODY // 1024} KiB)")
    assert grew_kib < bound_kib

    plain = body_of([message_item("gz", 1), message_item("gz", 2)])
    signed = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, plain)}
    cases = [({"Content-Encoding": "gzip"}, gzip.compress(plain), 200),
             ({"Content-Encoding": "deflate"}, zlib.compress(plain), 200),
             ({"Content-Encoding": "GZIP "}, gzip.compress(plain), 200),
             ({"Content-Encoding": "gzip"}, gzip.compress(b" " * MAX_BODY + plain), 413),
             ({"Content-Encoding": "gzip"}, gzip.compress(plain)[:-9], 400),
             ({"Content-Encoding": "gzip"}, plain, 400),
             ({"Content-Encoding": "br"}, plain, 415),
             ({"Content-Encoding": "identity"}, plain, 200)]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for headers, data, status in cases:
            async with session.post(ingest.url + "/webhook", data=data,
                                    headers={**signed, **headers}) as response:
                assert response.status == status, (headers, await response.text())
