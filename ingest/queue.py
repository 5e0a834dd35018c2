"""Puts events on Redis: the events of concurrent requests share one Lua call.

Requests that arrive while calls are in flight gather in an open batch (closed at
`BATCH_EVENTS`); a batch goes out in one round trip as soon as one of `IN_FLIGHT` call slots is
free, so the ingest prepares the next batch while Redis runs the last. Each request waits for the
call that carries its events and is acknowledged only when Redis has them, so coalescing costs no
guarantee. One timer per batch (not per request) answers its requests with QueueUnavailable when
Redis has not taken them in time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from importlib import resources
from typing import Any

import msgspec
from redis.asyncio import Redis

from ingest import metrics
from ingest.envelope import Routed
from shared import keys
from shared.codec import JOB_TTL_MS, arq_job
from shared.errors import QueueUnavailable
from shared.kinds import job_for
from shared.pinned import Pinned
from shared.settings import Settings

ENQUEUE_LUA = resources.files("ingest").joinpath("enqueue.lua").read_text()

IN_FLIGHT = 2
"""Enqueue calls on the wire at once: two keep both the ingest and Redis busy."""

BATCH_EVENTS = 400
"""A batch holding this many events is closed and the next requests start another: with one
huge batch, Redis runs it while the ingest waits, then the ingest reads the next requests while
Redis waits; with several, one is parsed while Redis runs the other."""

_pack = msgspec.msgpack.Encoder().encode


class _Batch:
    __slots__ = ("events", "timer", "waiters")

    def __init__(self) -> None:
        self.events: list[Routed] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None


class Enqueuer:
    """Coalesces concurrent `put` calls into atomic enqueue-with-dedupe Lua calls."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(ENQUEUE_LUA)
        self._clients = Pinned(redis)  # a call goes out as soon as it is built
        self._header: tuple[str | int, ...] = (
            keys.SEEN_PREFIX, settings.dedupe_ttl_s, keys.ARQ_JOB_PREFIX, settings.queue_name,
        )
        self._max_events = settings.job_max_events
        self._deadline_s = settings.redis_timeout_s + 0.4
        self._id_prefix = os.urandom(6).hex()
        self._batch_ids = itertools.count()
        self._open: _Batch | None = None
        self._full: collections.deque[_Batch] = collections.deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def put(self, events: list[Routed]) -> None:
        """Return once every event is on Redis (or was a duplicate); else raise QueueUnavailable."""
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
            batch.timer = loop.call_later(self._deadline_s, self._expire, batch)
            if self._in_flight < IN_FLIGHT:
                loop.call_soon(self._send_next)  # after this loop pass: let others join
        batch.events += events
        if len(batch.events) >= BATCH_EVENTS:
            self._full.append(batch)
            self._open = None
        waiter: asyncio.Future[None] = loop.create_future()
        batch.waiters.append(waiter)
        await waiter

    def _send_next(self) -> None:
        """Send full batches first, then the open one, while a call slot is free."""
        while self._in_flight < IN_FLIGHT:
            if self._full:
                batch = self._full.popleft()
            elif self._open is not None:
                batch, self._open = self._open, None
            else:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: _Batch) -> None:
        started = time.perf_counter()
        client = self._clients.take()
        try:
            new = await self._script(args=[*self._header, *self._args(batch.events)],
                                     client=client)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "not queued"
            metrics.ENQUEUE_FAILURES.inc()
            _fail(batch, QueueUnavailable(f"Redis refused the events: {type(exc).__name__}"))
        else:
            metrics.ENQUEUE_BATCH.observe(len(batch.waiters))
            duplicates = len(batch.events) - int(new)
            if duplicates:
                metrics.DUPLICATES.inc(duplicates)
            for w in batch.waiters:
                if not w.done():
                    w.set_result(None)
        finally:
            self._clients.give(client)
            metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
            if batch.timer is not None:
                batch.timer.cancel()
            self._in_flight -= 1
            self._send_next()

    async def aclose(self) -> None:
        await self._clients.aclose()

    def _expire(self, batch: _Batch) -> None:
        """The batch's deadline passed: its requests are answered 503 (Facebook will retry).
        A batch not sent yet is dropped; one in flight may still land, and the retry is then a
        duplicate that the dedupe check drops."""
        if self._open is batch:
            self._open = None
        elif batch in self._full:
            self._full.remove(batch)
        _fail(batch, QueueUnavailable("Redis did not answer in time"))

    def _args(self, events: list[Routed]) -> list[Any]:
        """The script's arguments after the fixed header: the job-id prefix, the time, the job
        TTL, the events' ids with their place in the jobs, then the jobs, prebuilt here (Redis
        then only rebuilds a job that held a duplicate)."""
        now = int(time.time() * 1000)
        open_jobs: dict[str, tuple[int, list[str]]] = {}
        jobs: list[tuple[str, list[str]]] = []
        places: list[tuple[str, int, int]] = []
        for event in events:
            job = job_for(event.kind)
            current = open_jobs.get(job)
            if current is None or len(current[1]) >= self._max_events:
                jobs.append((job, []))
                current = open_jobs[job] = (len(jobs), jobs[-1][1])
            number, members = current
            # Redis's Lua MessagePack decoder knows str but not bin: events travel as text.
            members.append(event.blob.decode())
            places.append((event.id, number, len(members)))
        prefix = f"{self._id_prefix}{next(self._batch_ids):x}-"
        bodies = [arq_job(kind, members, now) for kind, members in jobs]
        return [prefix, now, JOB_TTL_MS, _pack(places), *bodies]


def _fail(batch: _Batch, error: QueueUnavailable) -> None:
    for w in batch.waiters:
        if not w.done():
            w.set_exception(error)
