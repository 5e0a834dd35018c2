"""Puts events on Redis: the events of concurrent requests share one Lua call.

Requests that arrive while calls are in flight gather in an open batch; the batch goes out in one
round trip as soon as one of `IN_FLIGHT` call slots is free, so the ingest prepares the next batch
while Redis runs the last. Each request waits for the call that carries its events and is
acknowledged only when Redis has them, so coalescing costs no guarantee. One timer per batch (not
per request) answers its requests with QueueUnavailable when Redis has not taken them in time.
"""

from __future__ import annotations

import asyncio
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
from shared.codec import JOB_TTL_MS
from shared.errors import QueueUnavailable
from shared.settings import Settings

ENQUEUE_LUA = resources.files("ingest").joinpath("enqueue.lua").read_text()

IN_FLIGHT = 2
"""Enqueue calls on the wire at once: two keep both the ingest and Redis busy."""

_pack = msgspec.msgpack.Encoder().encode


class _Batch:
    __slots__ = ("events", "timer", "waiters")

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None


class Enqueuer:
    """Coalesces concurrent `put` calls into atomic enqueue-with-dedupe Lua calls."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(ENQUEUE_LUA)
        self._header: tuple[str | int, ...] = (
            keys.SEEN_PREFIX, settings.dedupe_ttl_s, keys.ARQ_JOB_PREFIX, settings.queue_name,
        )
        self._max_events = settings.job_max_events
        self._deadline_s = settings.redis_timeout_s + 0.4
        self._id_prefix = os.urandom(6).hex()
        self._batch_ids = itertools.count()
        self._open: _Batch | None = None
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
                loop.call_soon(self._send_open)  # after this loop pass: let others join
        # Redis's Lua MessagePack decoder knows str but not bin: the event goes as text.
        batch.events += [(e.id, e.kind, e.blob.decode()) for e in events]
        waiter: asyncio.Future[None] = loop.create_future()
        batch.waiters.append(waiter)
        await waiter

    def _send_open(self) -> None:
        batch, self._open = self._open, None
        if batch is None:
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: _Batch) -> None:
        started = time.perf_counter()
        try:
            new = await self._script(args=[*self._header, *self._batch_header(),
                                           _pack(batch.events)])
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
            metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
            if batch.timer is not None:
                batch.timer.cancel()
            self._in_flight -= 1
            if self._open is not None:
                self._send_open()

    def _expire(self, batch: _Batch) -> None:
        """The batch's deadline passed: its requests are answered 503 (Facebook will retry).
        A batch not sent yet is dropped; one in flight may still land, and the retry is then a
        duplicate that the dedupe check drops."""
        if self._open is batch:
            self._open = None
        _fail(batch, QueueUnavailable("Redis did not answer in time"))

    def _batch_header(self) -> tuple[Any, ...]:
        job_prefix = f"{self._id_prefix}{next(self._batch_ids):x}-"
        return (job_prefix, int(time.time() * 1000), JOB_TTL_MS, self._max_events)


def _fail(batch: _Batch, error: QueueUnavailable) -> None:
    for w in batch.waiters:
        if not w.done():
            w.set_exception(error)
