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
from typing import Any

from redis.asyncio import Redis

from ingest import metrics
from ingest.envelope import Routed
from shared.errors import QueueUnavailable
from shared.lanes import ENQUEUE_LUA, enqueue_parts
from shared.packed_call import bulk, call
from shared.pinned import Pinned
from shared.redis import wait_replicas
from shared.settings import Settings

IN_FLIGHT = 2
"""Enqueue calls on the wire at once: two keep both the ingest and Redis busy."""

BATCH_EVENTS = 400
"""A batch holding this many events is closed and the next requests start another: with one
huge batch, Redis runs it while the ingest waits, then the ingest reads the next requests while
Redis waits; with several, one is parsed while Redis runs the other."""



class _Batch:
    __slots__ = ("events", "timer", "waiters")

    def __init__(self) -> None:
        self.events: list[Routed] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None


class Enqueuer:
    """Coalesces concurrent `put` calls into atomic enqueue-with-dedupe Lua calls."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._sha = redis.register_script(ENQUEUE_LUA).sha
        self._clients = Pinned(redis)  # a call goes out as soon as it is built
        self._settings = settings
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
            head, blobs = self._args(batch.events)
            new = await call(client, self._sha, ENQUEUE_LUA, head, [bulk(*blobs)], len(blobs))
            # ACK_REPLICAS: 200 only once that many replicas hold the events, within the deadline.
            left_ms = int((self._deadline_s - (time.perf_counter() - started)) * 1000)
            await wait_replicas(client, self._settings.ack_replicas, left_ms)
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

    def _args(self, events: list[Routed]) -> tuple[list[Any], list[bytes]]:
        """The enqueue script's arguments: the events by lane (shared/lanes.py), and a prefix
        that makes the ids of the jobs it may create unique."""
        prefix = f"{self._id_prefix}{next(self._batch_ids):x}-"
        return enqueue_parts(self._settings, prefix, int(time.time() * 1000), events)


def _fail(batch: _Batch, error: QueueUnavailable) -> None:
    for w in batch.waiters:
        if not w.done():
            w.set_exception(error)
