"""Puts events on Redis: the events of concurrent requests share one Lua call.

While one call is in flight, new requests gather in the next batch; when it returns, the whole
batch goes in one round trip. Each request waits for the call that carries its events and is
acknowledged only when Redis has them, so coalescing costs no guarantee.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from importlib import resources

from redis.asyncio import Redis

from ingest import metrics
from ingest.envelope import Routed
from shared import keys
from shared.codec import JOB_TTL_MS
from shared.errors import QueueUnavailable
from shared.settings import Settings

ENQUEUE_LUA = resources.files("ingest").joinpath("enqueue.lua").read_text()

class Enqueuer:
    """Coalesces concurrent `put` calls into single atomic enqueue-with-dedupe Lua calls."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(ENQUEUE_LUA)
        self._header: tuple[str | int, ...] = (
            keys.SEEN_PREFIX, settings.dedupe_ttl_s, keys.ARQ_JOB_PREFIX, settings.queue_name,
        )
        self._max_events = settings.job_max_events
        self._deadline_s = settings.redis_timeout_s + 0.4
        self._id_prefix = os.urandom(6).hex()
        self._batch_ids = itertools.count()
        self._args: list[str | bytes] = []
        self._waiters: list[asyncio.Future[int]] = []
        self._task: asyncio.Task[None] | None = None
        self.last_batch_size = 0

    async def put(self, events: list[Routed]) -> None:
        """Return once every event is on Redis (or was a duplicate); else raise QueueUnavailable."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        args = self._args
        for event in events:
            args += event[:3]  # id, kind, blob: one triple per event for enqueue.lua
        self._waiters.append(waiter)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        try:
            async with asyncio.timeout(self._deadline_s):
                await asyncio.shield(waiter)
        except TimeoutError:
            raise QueueUnavailable("Redis did not answer in time") from None

    async def _drain(self) -> None:
        try:
            while self._waiters:
                args, waiters = self._args, self._waiters
                self._args, self._waiters = [], []
                self.last_batch_size = len(waiters)
                started = time.perf_counter()
                try:
                    new = await self._script(args=[*self._header, *self._batch_header(), *args])
                except Exception as exc:  # noqa: BLE001 - any Redis failure means "not queued"
                    metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
                    metrics.ENQUEUE_FAILURES.inc()
                    error = QueueUnavailable(f"Redis refused the events: {type(exc).__name__}")
                    for w in waiters:
                        if not w.done():
                            w.set_exception(error)
                            w.exception()  # mark retrieved: a timed-out request never reads it
                else:
                    metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
                    metrics.ENQUEUE_BATCH.observe(len(waiters))
                    duplicates = len(args) // 3 - int(new)
                    if duplicates:
                        metrics.DUPLICATES.inc(duplicates)
                    for w in waiters:
                        if not w.done():
                            w.set_result(int(new))
        finally:
            self._task = None

    def _batch_header(self) -> tuple[str | int, ...]:
        job_prefix = f"{self._id_prefix}{next(self._batch_ids):x}-"
        return (job_prefix, int(time.time() * 1000), JOB_TTL_MS, self._max_events)
