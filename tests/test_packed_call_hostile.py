"""Hostile tests of the hand-packed script calls (shared/packed_call.py): the ingest's enqueue
call (ingest/queue.py) and the worker's step call (workers/effects.py), against real Redis
processes only.

Faults are real: a TCP proxy between the clients and Redis cuts a connection at a chosen point
of a chosen script call (before the request, half way through it, after Redis ran it but before
its reply, half way through the reply); Redis itself sleeps (DEBUG SLEEP), pauses its clients
(CLIENT PAUSE), forgets its scripts (SCRIPT FLUSH), restarts, runs out of memory (maxmemory) or
becomes a replica (REPLICAOF). After each, an acknowledged event must be on its stream exactly
once, unaltered, in its user's order, and the connection must never be left with a reply that
a later call would read as its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

import ingest.queue
from ingest.envelope import parse
from ingest.queue import Enqueuer
from shared import keys
from shared.errors import QueueUnavailable
from shared.lanes import ENQUEUE_LUA, lane_of
from shared.packed_call import bulk, call
from shared.redis import ReadOnlyError as RedisReadOnly
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post, drain_with, stream_rows
from tests.redis_server import RedisProcess, free_port, server_binary, wait_ready
from workers import deadletters
from workers import lanes as jobs
from workers.effects import EFFECTS_LUA, WRITTEN, Effects, Step

ENQUEUE_SHA = hashlib.sha1(ENQUEUE_LUA.encode()).hexdigest().encode()
EFFECTS_SHA = hashlib.sha1(EFFECTS_LUA.encode()).hexdigest().encode()


# --- A proxy that cuts connections at chosen points of chosen script calls --------------------

FAULTS = ("drop_request", "cut_request", "drop_reply", "cut_reply")
"""drop_request: the connection is reset before any byte of the call reaches Redis.
cut_request: Redis gets half of the call's first packet, then the connection is reset.
drop_reply: Redis runs the call; the connection is reset before any byte of the reply.
cut_reply: Redis runs the call; half of the reply's first packet arrives, then the reset."""


@dataclasses.dataclass
class Fault:
    kind: str
    sha: bytes
    skip: int = 0
    """Matching calls to let through first."""


class Proxy:
    """A TCP proxy in front of a real Redis. Each pending fault fires once, on the first call of
    its script (EVALSHA of its sha) after `skip` others; `fired` lists the faults that fired."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.pending: list[Fault] = []
        self.fired: list[str] = []
        self.calls: dict[bytes, int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._pairs):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _match(self, tail: bytes) -> Fault | None:
        for sha in {f.sha for f in self.pending} | {ENQUEUE_SHA, EFFECTS_SHA}:
            if b"$7\r\nEVALSHA\r\n$40\r\n" + sha in tail:
                self.calls[sha] = self.calls.get(sha, 0) + 1
                for fault in self.pending:
                    if fault.sha == sha:
                        if fault.skip:
                            fault.skip -= 1
                            return None
                        return fault
        return None

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._pairs |= {cw, uw}
        armed: list[Fault] = []  # the fault waiting for this connection's next reply

        def reset() -> None:
            for w in (cw, uw):
                with contextlib.suppress(Exception):
                    w.transport.abort()

        async def up() -> None:
            tail = b""
            while data := await cr.read(1 << 16):
                head = tail + data[:128]
                tail = data[-64:]
                fault = self._match(head)
                if data.startswith(b"*"):  # a new command (not the next packet of a long one)
                    armed.clear()
                if fault is not None and fault.kind in ("drop_request", "cut_request"):
                    self.pending.remove(fault)
                    self.fired.append(fault.kind)
                    if fault.kind == "cut_request":
                        uw.write(data[: len(data) // 2])
                        await uw.drain()
                        await asyncio.sleep(0.05)
                    reset()
                    return
                if fault is not None:
                    armed.append(fault)
                uw.write(data)
                await uw.drain()

        async def down() -> None:
            while data := await ur.read(1 << 16):
                if armed and not data.startswith(b"-NOSCRIPT"):
                    fault = armed.pop()
                    self.pending.remove(fault)
                    self.fired.append(fault.kind)
                    if fault.kind == "cut_reply":
                        cw.write(data[: max(1, len(data) // 2)])
                        await cw.drain()
                        await asyncio.sleep(0.05)
                    reset()
                    return
                armed.clear()
                cw.write(data)
                await cw.drain()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            reset()
            self._pairs -= {cw, uw}


@pytest.fixture
async def proxy(redis_proc: RedisProcess) -> AsyncIterator[Proxy]:
    server = Proxy(redis_proc.port)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def settings(settings: Settings, proxy: Proxy) -> Settings:
    """Every client of the ingest and the workers reaches Redis through the proxy."""
    return dataclasses.replace(settings, redis_url=proxy.url)


@pytest.fixture
async def direct(redis_proc: RedisProcess) -> AsyncIterator[Redis]:
    """A client that reaches the test Redis without the proxy."""
    client = Redis.from_url(redis_proc.url)
    yield client
    await client.aclose()


async def cmd(client: Redis, *args: Any) -> Any:
    """A raw command (redis-py's execute_command is untyped)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def lrange(client: Redis, key: Any) -> list[bytes]:
    return await client.lrange(key, 0, -1)  # type: ignore[misc, no-any-return]


async def hlen(client: Redis, key: str) -> int:
    return await client.hlen(key)  # type: ignore[misc, no-any-return]


def messages(user: str, count: int, start: int = 0) -> list[dict[str, Any]]:
    return [p.text_message(mid=f"{user}-{n}", sender=user, ts=1_700_000_000_000 + n,
                           text=f"{user} says {n}") for n in range(start, start + count)]


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [f"message:{item['message']['mid']}" for item in items]


async def stream_ids(redis: Redis, kind: str = "message") -> list[str]:
    return [row["id"] for row in await stream_rows(redis, kind)]


async def assert_lanes_empty(redis: Redis) -> None:
    assert [k async for k in redis.scan_iter(keys.LANE_PREFIX + "*")] == []
    assert [k async for k in redis.scan_iter(keys.LANE_JOB_PREFIX + "*")] == []
    assert await deadletters.list_dead(redis) == []


# --- The enqueue call under connection faults --------------------------------------------------


@pytest.mark.parametrize("count", [3, 1500])
@pytest.mark.parametrize("fault", FAULTS)
async def test_an_enqueue_call_cut_anywhere_is_acknowledged_only_once_queued_exactly_once(
    fault: str, count: int, post: Post, proxy: Proxy, direct: Redis, settings: Settings,
    drain: Any,
) -> None:
    """The connection of the ingest's enqueue call is reset before, while or after Redis runs it
    (1,500 events: a call of many packets, cut in its first). The call is sent once more on a
    new connection; the POST is answered 200 and every event is queued once, in order. The
    next POST on the same (reconnected) pinned client reads its own reply."""
    items = messages("u1", count)
    proxy.pending.append(Fault(fault, ENQUEUE_SHA))
    assert (await post(p.body(*items))).status == 200
    assert proxy.fired == [fault]
    later = messages("u1", 2, start=count)
    assert (await post(p.body(*later))).status == 200
    await drain()
    assert await stream_ids(direct) == ids(items + later)
    await assert_lanes_empty(direct)


# --- The step call under connection faults ------------------------------------------------------


@pytest.mark.parametrize("text_bytes", [10, 40_000])
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_step_call_cut_anywhere_in_a_run_writes_each_event_once_in_order(
    fault: str, text_bytes: int, post: Post, proxy: Proxy, direct: Redis, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run of four steps (two events each) whose second step call is cut: before Redis got
    it, half way through it, after Redis ran it (reply lost), or half way through its reply
    (with 40 KB texts, a call and a reply, which holds the next head, of many packets). The
    step is sent again (or the job tried again); Redis runs it at most once (a replayed call
    gives the reply it gave), so each event is on its stream once, in order, unaltered."""
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    items = messages("u1", 8)
    for n, item in enumerate(items):
        item["message"]["text"] = (f"{n}:" + "\r\n$9\r\n" * text_bytes)[:text_bytes]
    assert (await post(p.body(*items))).status == 200
    proxy.pending.append(Fault(fault, EFFECTS_SHA, skip=1))
    await drain_with(dataclasses.replace(settings, job_max_events=2))
    assert proxy.fired == [fault]
    rows = await stream_rows(direct, "message")
    assert [r["id"] for r in rows] == ids(items)
    assert [json.loads(r["raw"]) for r in rows] == items
    await assert_lanes_empty(direct)
    assert await hlen(direct, keys.LANE_TRIES) == 0


async def test_every_step_call_losing_its_reply_still_writes_each_event_once(
    post: Post, proxy: Proxy, direct: Redis, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each of a run's step calls loses its reply once after Redis ran it, the last cut half way
    through: ten retries in one run, each answered by the replayed reply."""
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    items = messages("u1", 10)
    assert (await post(p.body(*items))).status == 200
    proxy.pending += [Fault("drop_reply", EFFECTS_SHA) for _ in range(4)]
    proxy.pending.append(Fault("cut_reply", EFFECTS_SHA))
    await drain_with(dataclasses.replace(settings, job_max_events=2))
    assert proxy.fired == ["drop_reply"] * 4 + ["cut_reply"]
    assert await stream_ids(direct) == ids(items)
    await assert_lanes_empty(direct)


@pytest.mark.parametrize("case", ["handoff", "failing"])
async def test_a_lost_reply_of_a_step_that_gave_the_lane_away_is_fenced_not_run_again(
    case: str, post: Post, proxy: Proxy, direct: Redis, settings: Settings,
    monkeypatch: pytest.MonkeyPatch, handlers: Any,
) -> None:
    """Steps whose call hands the lane to a new job (a run out of time: `handed`; or a failed
    event: `retry`, its next try queued) lose their reply after Redis ran them. The retried
    call finds the lane owned by the next job and is refused (LANELOST): it writes nothing and
    counts no try again. Each event is written once, in order; the failing one is
    dead-lettered after exactly JOB_MAX_TRIES (3) counted tries."""
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    tried: list[str] = []
    if case == "handoff":
        monkeypatch.setattr(jobs, "RUN_SECONDS", 0.0)  # every step hands the lane on
    else:
        async def fail_m1(ctx: dict[str, Any], event: Any) -> None:
            tried.append(event.id)
            if event.id == "message:u1-1":
                raise RuntimeError("handler refuses u1-1")

        handlers("message", fail_m1)
    items = messages("u1", 5)
    assert (await post(p.body(*items))).status == 200
    proxy.pending += [Fault("drop_reply", EFFECTS_SHA) for _ in range(3)]
    await drain_with(dataclasses.replace(settings, job_max_events=2))
    assert proxy.fired == ["drop_reply"] * 3
    dead = await deadletters.list_dead(direct)
    if case == "handoff":
        assert await stream_ids(direct) == ids(items)
        assert dead == []
    else:
        assert await stream_ids(direct) == ids(items[:1] + items[2:])
        assert [(d.event_id, d.tries) for d in dead] == [("message:u1-1", 3)]
        # Three counted tries, and one more run of the handler in the fenced run that arq
        # retried after the retried call lost its reply too (handlers run at least once).
        assert tried.count("message:u1-1") == 4
        assert [t for t in tried if t != "message:u1-1"] == ids(items[:1] + items[2:])
    assert [k async for k in direct.scan_iter(keys.LANE_PREFIX + "*")] == []
    assert [k async for k in direct.scan_iter(keys.LANE_JOB_PREFIX + "*")] == []
    assert await hlen(direct, keys.LANE_TRIES) == 0


# --- NOSCRIPT in the middle of a run -----------------------------------------------------------


async def test_scripts_flushed_before_every_call_and_a_reply_lost_after_the_reload(
    post: Post, proxy: Proxy, direct: Redis, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SCRIPT FLUSH before every enqueue call and every step call (a Redis that forgets its
    scripts again and again: restarts, failovers): each call gets NOSCRIPT, loads its script
    and is sent again. Twice, the reply of the call sent after the reload is lost as well
    (NOSCRIPT, load, run, reset, retry: a replay). Each event is written once, in order."""
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    original_write = Effects.write
    flushes = 0

    async def flushing_write(self: Effects, rows: Any, step: Step) -> Any:
        nonlocal flushes
        await direct.script_flush()
        flushes += 1
        return await original_write(self, rows, step)

    async def flushing_call(*args: Any) -> Any:
        nonlocal flushes
        await direct.script_flush()
        flushes += 1
        return await call(*args)

    monkeypatch.setattr(Effects, "write", flushing_write)
    monkeypatch.setattr(ingest.queue, "call", flushing_call)
    proxy.pending += [Fault("drop_reply", ENQUEUE_SHA), Fault("drop_reply", EFFECTS_SHA, skip=1)]
    first, second = messages("u1", 3), messages("u1", 4, start=3)
    assert (await post(p.body(*first))).status == 200
    assert (await post(p.body(*second))).status == 200
    await drain_with(dataclasses.replace(settings, job_max_events=2))
    assert proxy.fired == ["drop_reply", "drop_reply"]
    # Two enqueue calls, then 4 steps (2, 2, 2, 1 events), the last one ending the lane.
    assert flushes == 2 + 4
    assert await stream_ids(direct) == ids(first + second)
    await assert_lanes_empty(direct)


# --- Hostile bytes -----------------------------------------------------------------------------

RESP_TEXT = "\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n$-1\r\n:1\r\n+OK\r\n-ERR x\r\n"
"""A message text that is a RESP stream of its own: if the packer counted it wrong, Redis would
read a PING (and more) out of it, and the next call would read their replies as its own."""


def _raw_item(mid: str, text_json: str, *, crlf: bool = False) -> bytes:
    """An item's JSON exactly as sent; with `crlf`, CR LF (and a tab) between its tokens."""
    sep = "\r\n\t" if crlf else ""
    return (f'{{"sender":{{"id":"u1"}},{sep}"recipient":{{"id":"{p.PAGE}"}},{sep}'
            f'"timestamp":1700000000000,"message":{sep}{{"mid":"{mid}","text":{text_json}}}}}'
            ).encode()


async def test_hostile_bytes_reach_the_stream_unaltered_and_in_order(
    post: Post, direct: Redis, drain: Any
) -> None:
    """Texts made of RESP, raw CR LF between an item's tokens, NUL and control characters,
    non-ASCII, an escaped pair and a lone surrogate, and a text of 400 KB of `\\r\\n$40\\r\\n`:
    every item's raw JSON is on the stream byte for byte, its text as sent, the events in the
    order sent, and the calls after it read their own replies (the next POST is written too)."""
    big = "\r\n$40\r\n" * 50_000
    texts = [RESP_TEXT, "*3\r\n$7\r\nEVALSHA\r\n$40\r\n", "\x00\x01\x1b[0m\u2028\u2029",
             "é 中文 🎉 \U0001f600", "\U0001f389 as an escaped pair", big]
    raws = [_raw_item(f"h{n}", json.dumps(text, ensure_ascii=n % 2 == 0), crlf=n % 2 == 1)
            for n, text in enumerate(texts)]
    lone = _raw_item("lone", '"a\\ud800b"')
    raws.append(lone)
    body = (b'{"object":"page","entry":[{"id":"' + p.PAGE.encode()
            + b'","time":1,"messaging":[' + b",".join(raws) + b"]}]}")
    assert len(body) < 1_048_576
    assert (await post(None, raw=body)).status == 200
    after = messages("u1", 2)
    assert (await post(p.body(*after))).status == 200
    await drain()
    rows = await stream_rows(direct, "message")
    assert [r["id"] for r in rows] == [f"message:h{n}" for n in range(len(texts))] + [
        "message:lone", *ids(after)]
    assert [r["raw"].encode() for r in rows[: len(raws)]] == raws
    assert [json.loads(r["event"])["text"] for r in rows[: len(texts)]] == texts
    assert json.loads(rows[len(texts)]["event"])["text"] == "a\ufffdb"


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                 b"\xe2\x82"])
async def test_invalid_utf8_is_refused_before_redis(
    bad: bytes, post: Post, direct: Redis, proxy: Proxy
) -> None:
    """A correctly signed body whose text is not UTF-8 (a stray byte, an overlong form, an
    encoded surrogate, a code point past U+10FFFF, a truncated sequence) is refused with 400,
    and no script call is made: nothing is marked seen or queued."""
    body = (b'{"object":"page","entry":[{"id":"P","time":1,"messaging":[{"sender":{"id":"u"},'
            b'"message":{"mid":"bad","text":"a' + bad + b'b"}}]}]}')
    assert (await post(None, raw=body)).status == 400
    assert proxy.calls.get(ENQUEUE_SHA, 0) == 0
    assert await direct.dbsize() == 0


# --- Huge batches ------------------------------------------------------------------------------


def _compact_body(items: list[bytes]) -> bytes:
    return (b'{"object":"page","entry":[{"id":"P","time":1,"messaging":['
            + b",".join(items) + b"]}]}")


def _compact_item(user: str, mid: str, n: int) -> bytes:
    return (f'{{"sender":{{"id":"{user}"}},"recipient":{{"id":"P"}},"timestamp":{n},'
            f'"message":{{"mid":"{mid}","text":"t"}}}}').encode()


async def test_concurrent_huge_posts_keep_every_event_once_and_each_users_order(
    post: Post, direct: Redis, drain: Any
) -> None:
    """Eight POSTs of 500 events at once (five users each, interleaved): the enqueue calls of
    coalesced batches of hundreds of events, two in flight. Every event is queued once and
    every user's events reach the stream in the order sent."""
    bodies, sent = [], {}
    for k in range(8):
        users = [f"k{k}u{j}" for j in range(5)]
        items: list[bytes] = []
        for_user: dict[str, list[str]] = {u: [] for u in users}
        for n in range(100):
            for user in users:
                items.append(_compact_item(user, f"{user}-{n}", n))
                for_user[user].append(f"message:{user}-{n}")
        bodies.append(_compact_body(items))
        sent.update(for_user)
    statuses = await asyncio.gather(*(post(None, raw=body) for body in bodies))
    assert [s.status for s in statuses] == [200] * 8
    await drain()
    rows = await stream_rows(direct, "message")
    assert len(rows) == 4000
    got: dict[str, list[str]] = {}
    for row in rows:
        got.setdefault(row["sender"], []).append(row["id"])
    assert got == sent
    await assert_lanes_empty(direct)


async def test_one_users_eight_thousand_events_in_one_post_are_queued_whole(
    post: Post, direct: Redis, settings: Settings, drain: Any
) -> None:
    """One POST (under MAX_BODY_BYTES) with 8,200 messages of one user, one lane: the ingest
    must queue them all, or refuse them without a trace so that Facebook's retry queues them.
    Answered as Facebook retries (until a 200), every event must then be in the lane once, in
    order."""
    count = 8200
    body = _compact_body([_compact_item("u1", f"b{n}", n) for n in range(count)])
    assert len(body) < settings.max_body_bytes
    statuses = []
    for _ in range(3):
        statuses.append((await post(None, raw=body)).status)
        if statuses[-1] == 200:
            break
    assert statuses[-1] == 200
    lanes = [k async for k in direct.scan_iter(keys.LANE_PREFIX + "*")]
    assert len(lanes) == 1
    queued = [json.loads(blob)["id"] for blob in await lrange(direct, lanes[0])]
    assert queued == [f"message:b{n}" for n in range(count)]
    await drain()
    assert await stream_ids(direct) == queued


# --- Redis that sleeps, pauses, refuses, forgets, or drops its clients ----------------------


@pytest.fixture(scope="module")
def debug_redis() -> Iterator[RedisProcess]:
    """A Redis of this module's own that accepts DEBUG SLEEP (and may be made a replica, run
    out of memory or restarted without touching the session's)."""
    with tempfile.TemporaryDirectory(prefix="fbhook-redis-") as tmp:
        port = free_port()
        args = [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--maxmemory-policy", "noeviction",
                "--enable-debug-command", "yes", "--dir", tmp]
        proc = RedisProcess(port, Path(tmp),
                            subprocess.Popen(args, cwd=tmp, stdout=subprocess.DEVNULL), args)
        try:
            wait_ready(port)
            yield proc
        finally:
            proc.stop()


@pytest.fixture
async def admin(debug_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(debug_redis.url)
    await client.flushall()
    await client.script_flush()
    yield client
    await client.aclose()
    client = Redis.from_url(debug_redis.url)
    await client.config_set("maxmemory", 0)
    await cmd(client, "REPLICAOF", "NO", "ONE")
    await client.aclose()


@pytest.fixture
def fast(settings: Settings, debug_redis: RedisProcess) -> Settings:
    """The ingest's settings on the debug Redis, replies timed out after 0.3 s."""
    return dataclasses.replace(settings, redis_url=debug_redis.url, redis_timeout_s=0.3)


ECHO_LUA = """
redis.call('RPUSH', 'calls', ARGV[1])
if ARGV[1] == 'fail' then
  return redis.error_reply('ERR refused on purpose')
end
return {ARGV[1], #ARGV, ARGV[2], ARGV[3]}
"""
ECHO_SHA = hashlib.sha1(ECHO_LUA.encode()).hexdigest()
PACKED = [bulk(b"x" * 70_000, RESP_TEXT.encode())]


async def echo(client: Redis, token: str) -> Any:
    return await call(client, ECHO_SHA, ECHO_LUA, [token], PACKED, 2)


def echoed(token: str) -> list[Any]:
    return [token.encode(), 3, b"x" * 70_000, RESP_TEXT.encode()]


async def _in_background(admin: Redis, *command: Any) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(cmd(admin, *command))
    await asyncio.sleep(0.05)  # sent: Redis is asleep from now on
    return task


SCENARIOS = ["sleep_timeout", "sleep_cancel", "pause_timeout", "pause_cancel", "error_reply",
             "noscript", "client_kill", "oom", "readonly", "restart"]


async def _fault(scenario: str, client: Redis, admin: Redis, proc: RedisProcess) -> list[str]:
    """Make call `a` meet the fault; returns the calls Redis ran for it."""
    if scenario.startswith("sleep"):
        task = await _in_background(admin, "DEBUG", "SLEEP", 0.6)
        if scenario == "sleep_timeout":
            with pytest.raises(RedisTimeoutError):
                await echo(client, "a")
        else:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(echo(client, "a"), 0.1)
        await task
        return ["a"]  # Redis read the call before the client gave up: it ran, unanswered
    if scenario.startswith("pause"):
        await cmd(admin, "CLIENT", "PAUSE", 500, "ALL")
        if scenario == "pause_timeout":
            with pytest.raises(RedisTimeoutError):
                await echo(client, "a")
        else:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(echo(client, "a"), 0.1)
        await asyncio.sleep(0.6)
        return []  # a paused client that went away: its call never ran
    if scenario == "error_reply":
        with pytest.raises(ResponseError, match=r"^refused on purpose$"):  # "ERR " cut off
            await echo(client, "fail")
        return ["fail"]
    if scenario == "noscript":
        await admin.script_flush()
    elif scenario == "client_kill":
        assert await cmd(admin, "CLIENT", "KILL", "TYPE", "normal", "SKIPME",
                                           "yes") == 1
    elif scenario == "restart":
        proc.stop()
        proc.start()
    elif scenario == "oom":
        await admin.config_set("maxmemory", 1)
        with pytest.raises(OutOfMemoryError, match=r"^command not allowed when used memory"):
            await echo(client, "a")
        await admin.config_set("maxmemory", 0)
        return []
    else:
        await cmd(admin, "REPLICAOF", "127.0.0.1", free_port())
        with pytest.raises(ReadOnlyError, match=r"^You can't write against a read only replica"):
            await echo(client, "a")
        await cmd(admin, "REPLICAOF", "NO", "ONE")
        return []
    assert await echo(client, "a") == echoed("a")
    return ["a"]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_after_any_fault_the_next_calls_read_their_own_replies(
    scenario: str, fast: Settings, admin: Redis, debug_redis: RedisProcess
) -> None:
    """One pinned client of the ingest's pool (0.3 s reply timeout) makes a call that meets a
    fault: a timeout or a cancellation while Redis sleeps (the call then runs unanswered) or
    pauses its clients (it never runs), an error reply, NOSCRIPT, its connection killed,
    a restart, OOM, READONLY. Its next calls, on the same client, each get their own reply
    (a token, and the 70 KB and RESP-looking arguments they carried), and each call ran at most
    once."""
    from shared.pinned import Pinned
    from shared.redis import connect

    redis = connect(fast)
    pinned = Pinned(redis)
    client = pinned.take()
    try:
        assert await echo(client, "warm") == echoed("warm")
        await admin.delete("calls")
        ran = await _fault(scenario, client, admin, debug_redis)
        for token in ("b", "c", "d"):
            assert await echo(client, token) == echoed(token)
        check = Redis.from_url(debug_redis.url)
        assert await lrange(check, "calls") == [t.encode() for t in [*ran, "b", "c", "d"]]
        await check.aclose()
    finally:
        await pinned.aclose()
        await redis.aclose()


def _lane(config: Settings, items: list[dict[str, Any]]) -> int:
    """The one lane the items' user has."""
    routed = parse(json.dumps(p.body(*items)).encode(), 0)
    found = {lane_of(r.object, r.page, r.user, r.id, config.lanes) for r in routed}
    assert len(found) == 1
    return found.pop()


async def _enqueue(config: Settings, items: list[dict[str, Any]]) -> None:
    """Queue the items as the ingest does (its Enqueuer, its client)."""
    from shared.redis import connect

    redis = connect(config)
    enqueuer = Enqueuer(redis, config)
    try:
        await enqueuer.put(parse(json.dumps(p.body(*items)).encode(), int(time.time() * 1000)))
    finally:
        await enqueuer.aclose()
        await redis.aclose()


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
async def test_a_step_refused_by_a_full_or_demoted_redis_is_retried_not_dead_lettered(
    refusal: str, fast: Settings, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refuses a lane's step call three tries in a row (JOB_MAX_TRIES) as a full Redis
    (maxmemory) or a primary just demoted (REPLICAOF) does, then recovers. Both are passing
    states (workers/lanes.py retries them without counting): the events must be written once
    the refusals end, and none dead-lettered."""
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    items = messages("u1", 3)
    await _enqueue(fast, items)
    original = Effects.write
    refused: list[str] = []

    async def refuse(on: bool) -> None:
        if refusal == "oom":
            await admin.config_set("maxmemory", 1 if on else 0)
        elif on:
            await cmd(admin, "REPLICAOF", "127.0.0.1", free_port())
        else:
            await cmd(admin, "REPLICAOF", "NO", "ONE")

    async def refused_write(self: Effects, rows: Any, step: Step) -> Any:
        if len(refused) == 3:
            return await original(self, rows, step)
        await refuse(True)
        try:
            return await original(self, rows, step)
        except ResponseError as exc:
            refused.append(type(exc).__name__)
            raise
        finally:
            await refuse(False)

    monkeypatch.setattr(Effects, "write", refused_write)
    await drain_with(fast)
    assert refused == ["OutOfMemoryError" if refusal == "oom" else "ReadOnlyError"] * 3
    assert await deadletters.list_dead(admin) == []
    assert await stream_ids(admin) == ids(items)


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
async def test_the_step_calls_real_refusals_are_seen_as_transient(
    refusal: str, fast: Settings, admin: Redis
) -> None:
    """The errors a real Redis gives the step call when it is full or a replica, as the worker
    sees them, are those workers/lanes.py means to retry without counting a try."""
    from workers.redis_pool import arq_pool

    redis = arq_pool(fast)
    effects = Effects(redis, fast)
    row = p.row("message", "message:x", "messaging", p.PAGE, 1, p.text_message(mid="x"))
    await admin.set(keys.lane_job(0), "j")
    await admin.set("arq:retry:j", 1)
    await cmd(admin, "RPUSH", keys.lane(0), row.id)
    if refusal == "oom":
        await admin.config_set("maxmemory", 1)
    else:
        await cmd(admin, "REPLICAOF", "127.0.0.1", free_port())
    try:
        with pytest.raises(ResponseError) as refused:
            await effects.write([row], Step(0, "j", 1))
    finally:
        await admin.config_set("maxmemory", 0)
        await cmd(admin, "REPLICAOF", "NO", "ONE")
        await effects.aclose()
        await redis.aclose()
    assert type(refused.value) is (OutOfMemoryError if refusal == "oom" else RedisReadOnly)
    assert await lrange(admin, keys.lane(0)) == [row.id.encode()]  # nothing written
    assert await stream_rows(admin) == []
    assert jobs._transient(refused.value)


# --- Timeouts and cancellations in the middle of a call ----------------------------------------


@pytest.mark.parametrize("redis_state", ["asleep", "paused"])
async def test_a_step_cancelled_mid_call_is_written_once_and_the_next_try_reads_its_own_reply(
    redis_state: str, fast: Settings, admin: Redis
) -> None:
    """A job timeout cancels a lane's step while its call is on the wire: Redis asleep (DEBUG
    SLEEP: it runs the call after the worker gave up) or pausing its clients (it never runs
    it). The job's next try, on the same Effects (its pinned connection), reads the lane's
    head afresh and writes the rest; its reply is its own (`ended`, not the lost `more`), and
    each event is on the stream once, in order."""
    from workers.redis_pool import arq_pool

    redis = arq_pool(fast)
    effects = Effects(redis, fast)
    rows = [p.row("message", f"message:c{n}", "messaging", p.PAGE, 1,
                  p.text_message(mid=f"c{n}")) for n in range(4)]
    try:
        assert (await p.step(effects, admin, [])).status == "ended"  # loaded, connected
        await admin.set(keys.lane_job(0), "test-job-0")
        await cmd(admin, "RPUSH", keys.lane(0), *[r.id for r in rows])
        if redis_state == "asleep":
            sleeping = await _in_background(admin, "DEBUG", "SLEEP", 0.5)
        else:
            await cmd(admin, "CLIENT", "PAUSE", 400, "ALL")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(effects.write(rows[:2], Step(0, "test-job-0", 1)), 0.1)
        if redis_state == "asleep":
            await sleeping
        else:
            await asyncio.sleep(0.5)
        ran = redis_state == "asleep"
        await admin.set("arq:retry:test-job-0", 2)  # arq claims the job again
        head = await lrange(admin, keys.lane(0))
        assert head == [r.id.encode() for r in (rows[2:] if ran else rows)]
        rest = rows[2:] if ran else rows
        outcome = await effects.write(rest, Step(0, "test-job-0", 2))
        assert (outcome.codes, outcome.status, outcome.head) == (
            [WRITTEN] * len(rest), "ended", [])
        assert await stream_ids(admin) == [r.id for r in rows]
        assert await admin.exists(keys.lane(0), keys.lane_job(0)) == 0
    finally:
        await effects.aclose()
        await redis.aclose()


async def test_an_enqueue_call_that_timed_out_but_ran_makes_facebooks_retry_a_duplicate(
    fast: Settings, admin: Redis
) -> None:
    """Redis sleeps past the ingest's reply timeout while it holds an enqueue call: the request
    is refused (503) though Redis runs the call afterwards. Facebook's retry is then a
    duplicate, acknowledged without queuing the events again; the next request's call, on the
    same pinned connection, reads its own reply and queues its events after them."""
    from shared.redis import connect

    redis = connect(fast)
    enqueuer = Enqueuer(redis, fast)
    first, second = messages("u1", 3), messages("u1", 2, start=3)
    now = int(time.time() * 1000)
    try:
        await enqueuer.put(parse(json.dumps(p.body(*messages("w", 1))).encode(), now))
        sleeping = await _in_background(admin, "DEBUG", "SLEEP", 0.7)
        with pytest.raises(QueueUnavailable):
            await enqueuer.put(parse(json.dumps(p.body(*first)).encode(), now))
        await sleeping
        lane = keys.lane(_lane(fast, first))
        queued = [json.loads(b)["id"] for b in await lrange(admin, lane)]
        assert queued == ids(first)  # refused, yet queued: Redis ran the call once awake
        await enqueuer.put(parse(json.dumps(p.body(*first)).encode(), now))  # the retry
        await enqueuer.put(parse(json.dumps(p.body(*second)).encode(), now))
    finally:
        await enqueuer.aclose()
        await redis.aclose()
    queued = [json.loads(b)["id"] for b in await lrange(admin, lane)]
    assert queued == ids(first + second)


# --- A Redis restart between steps -------------------------------------------------------------


async def test_a_redis_restart_between_calls_reconnects_reloads_and_loses_nothing(
    settings: Settings, own_redis: RedisProcess, rclient: Redis
) -> None:
    """Redis (AOF on) restarts between two enqueue calls and between two steps of a run: each
    pinned connection is stale, so the next call fails on it, is sent again on a new one, meets
    NOSCRIPT (the restarted Redis has no scripts), loads it and runs once."""
    from shared.redis import connect
    from workers.redis_pool import arq_pool

    config = dataclasses.replace(settings, redis_url=own_redis.url, job_max_events=2)
    ingest_redis, worker_redis = connect(config), arq_pool(config)
    enqueuer, effects = Enqueuer(ingest_redis, config), Effects(worker_redis, config)
    items = messages("u1", 4)
    now = int(time.time() * 1000)
    try:
        await enqueuer.put(parse(json.dumps(p.body(*items[:2])).encode(), now))
        own_redis.stop()
        own_redis.start()
        await enqueuer.put(parse(json.dumps(p.body(*items[2:])).encode(), now))
        number = _lane(config, items)
        lane, job = keys.lane(number), await rclient.get(keys.lane_job(number))
        assert job is not None
        await rclient.set("arq:retry:" + job.decode(), 1)  # arq's claim of the lane's job
        rows = [Effects.row(*jobs._decode(blob)) for blob in await lrange(rclient, lane)]
        first = await effects.write(rows[:2], Step(number, job.decode(), 1))
        assert (first.codes, first.status) == ([WRITTEN, WRITTEN], "more")
        own_redis.stop()
        own_redis.start()
        second = await effects.write(rows[2:], Step(number, job.decode(), 1))
        assert (second.codes, second.status) == ([WRITTEN, WRITTEN], "ended")
    finally:
        await enqueuer.aclose()
        await effects.aclose()
        await ingest_redis.aclose()
        await worker_redis.aclose()
    assert await stream_ids(rclient) == ids(items)
    assert await rclient.exists(lane, keys.lane_job(number)) == 0
