"""A lane's job, from claim to end: the whole life of a worker's job, in the order it happens.

Ingest appends every event to its user's lane, a Redis list (shared/lanes.py), and queues an arq
job for a lane that has none: one job at a time owns a lane (its id is in `fb:lanejob:<n>`).

1. **Claim.** arq's poll claims the job (`arq:in-progress:<id>`, which arq gives the job timeout
   plus 10 s). `lease` shortens that claim to `WORKER_LEASE_SECONDS` and renews it while the job
   runs: a worker killed mid-job lets another claim the job within the lease.
2. **Start.** `drain` reads the head of the lane, at most `JOB_MAX_EVENTS` events.
3. **Run.** Each event is decoded and normalised on its own, then handed to the handlers of its
   kind (`@on("kind")`), one event after the other, in the lane's order. The first event that
   fails (it cannot be decoded, normalised or encoded, or a handler raised) stops the batch:
   a user's later events must not overtake it.
4. **End of a step.** One atomic call (workers/effects.lua) writes the outputs of the events
   before it, takes them off the lane, and says what the lane does next: go on (`more`, with
   the lane's next head read in the same call, so a step costs one round trip), end
   (the lane is empty: its owner key is deleted with it, so ingest queues a new job for the next
   event), or hand the lane to a new job when this run's time is up (`handed`, so that a busy
   lane shares the workers with the others). The call is fenced: a run whose lane was taken
   over (it was presumed dead) writes nothing.
5. **Retry.** A failed event stays at the head of its lane; the lane's next job is queued after
   a backoff of 2^tries s (at most 60 s). Meanwhile that lane waits, and only it: other lanes
   keep flowing. About 1/LANES of the users share a lane, so that many wait with the failing
   user, for at most the backoffs of `JOB_MAX_TRIES` tries.
6. **Dead letter.** After `JOB_MAX_TRIES` tries the event goes to `fb:dead` with its payload and
   the error, in the same call that takes it off the lane, and the lane goes on.

arq stays the runtime (its Worker, polling, claims, timeouts, signals, health check); nothing
here patches it or reads its private state. Exactly once in effect needs no done marks: an
event leaves the lane in the call that writes its outputs. Handlers run at least once (a crash
between a handler and that call runs it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
from arq import Retry
from arq.constants import in_progress_key_prefix, retry_key_prefix
from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from shared import keys
from shared.codec import QueuedEvent, decode_event
from shared.events import Event
from shared.jsontext import loads
from shared.kinds import UNKNOWN, refine
from shared.lanes import with_queue_job
from shared.settings import Settings
from workers import metrics, registry, wire
from workers.deadletters import bury
from workers.effects import Effects, Failed, LaneLost, Outcome, Row, Step
from workers.normalize import normalize

log = logging.getLogger("fbhook.worker")

BURY_LUA = with_queue_job(resources.files("workers").joinpath("bury.lua").read_text())

HANDLER_SHARE = 0.5
"""Handlers of one batch get this share of JOB_TIMEOUT_SECONDS; one still running then fails."""

YIELD_EVERY = 32
"""Events decoded between two turns of the event loop, so that one long batch does not hold up
the other jobs' Redis replies and arq's claims."""

RUN_SECONDS = 5.0
"""A run hands its lane on after this long (or half the job timeout, if less)."""


def backoff_s(tries: int) -> float:
    """How long a lane waits before retrying its head event after `tries` failed tries."""
    return float(min(2 ** tries, 60))


@dataclass(slots=True)
class Runtime:
    """What every job needs, built once when the worker starts (ctx["fbhook"])."""

    settings: Settings
    effects: Effects


async def lane_job(ctx: dict[str, Any], *, lane: int) -> int:
    """The arq job function: drain lane `lane`. Returns the number of events written."""
    runtime: Runtime = ctx["fbhook"]
    job_id, job_try = str(ctx["job_id"]), int(ctx.get("job_try", 1))
    run = _Run(ctx, runtime.settings, runtime.effects, Step(lane, job_id, job_try))
    async with lease(ctx["redis"], job_id, runtime.settings.worker_lease_s):
        return await run.drain()


@contextlib.asynccontextmanager
async def lease(redis: Redis, job_id: str, seconds: float) -> AsyncIterator[None]:
    """Hold the job's claim as a short lease, renewed a few times per lease while it runs."""
    key, ms = in_progress_key_prefix + job_id, int(seconds * 1000)

    async def renew() -> None:
        while True:  # the claim was made this short (workers/leased_worker.py): renew it later
            await asyncio.sleep(seconds / 4)
            with contextlib.suppress(RedisError, OSError):
                await redis.pexpire(key, ms)

    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Run:
    """One run of a lane's job: step after step until the lane is empty, handed on or waits."""

    def __init__(self, ctx: dict[str, Any], settings: Settings, effects: Effects,
                 step: Step) -> None:
        self.ctx, self.settings, self.effects, self.step = ctx, settings, effects, step
        self.redis: Redis = ctx["redis"]
        self.written = 0
        self.backoffs_ms = tuple(int(backoff_s(n) * 1000)
                                 for n in range(1, settings.job_max_tries + 1))

    async def drain(self) -> int:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        timeout = self.settings.job_timeout_s
        until = loop.time() + min(RUN_SECONDS, timeout * HANDLER_SHARE)
        outcome, steps, failed, error = "error", 0, 0, ""
        try:
            blobs: list[bytes] = await self.redis.lrange(  # type: ignore[misc]
                keys.lane(self.step.lane), 0, self.settings.job_max_events - 1)
            while True:
                rows, fail = await self._run(blobs, loop.time() + timeout * HANDLER_SHARE)
                step = Step(self.step.lane, self.step.job_id, self.step.job_try, fail,
                            handoff=loop.time() >= until, backoffs_ms=self.backoffs_ms)
                result = await self.effects.write(rows, step)
                steps += 1
                self.written += len(result.codes)
                if result.tries:
                    failed += 1
                    error = fail.error if fail is not None else "a Redis error reply"
                    self._failure(result, fail)
                if not result.status.endswith("more"):
                    outcome = _outcome(result)
                    return self.written
                blobs = result.head
        except LaneLost:
            outcome = "lost"
            return self.written
        except ResponseError as exc:
            # The step's call itself was refused (out of memory, a script error): nothing of it
            # was written. Retried like a failed event; should Redis refuse it try after try,
            # the events it held go to the dead letters, so that the lane goes on.
            error = f"{type(exc).__name__}: {exc}"
            if _transient(exc) or self.step.job_try < self.settings.job_max_tries:
                outcome = "retry"
                raise Retry(defer=backoff_s(self.step.job_try)) from exc
            outcome = "dead_letter"
            goes_on = await self._bury_head(error)
            if goes_on is None:
                outcome = "lost"
            elif goes_on:
                raise Retry(defer=0) from exc  # the lane's next events, in a new try
            return self.written
        except (RedisError, OSError) as exc:
            # Nothing of this step was written; the job runs again (the lane keeps its owner).
            outcome, error = "retry", type(exc).__name__
            raise Retry(defer=backoff_s(self.step.job_try)) from exc
        finally:
            self._record(outcome, steps, failed, error, time.perf_counter() - started)

    async def _bury_head(self, error: str) -> bool | None:
        """Dead-letter the events at the head of the lane (what the refused call held) and take
        them off it; when there are none, the lane's owner is released. Fenced as a step is.
        Returns whether the lane goes on in a new try (events were buried, or came in); None
        when this run no longer owns the lane."""
        lane, max_events = keys.lane(self.step.lane), self.settings.job_max_events
        blobs: list[bytes] = await self.redis.lrange(lane, 0, max_events - 1)  # type: ignore[misc]
        try:
            buried = int(await self.redis.register_script(BURY_LUA)(args=[
                lane, keys.STEPS, os.urandom(8).hex(), keys.DEAD_LETTERS, keys.SEEN_PREFIX,
                self.settings.dedupe_ttl_s, UNKNOWN, error[:2000], self.step.job_try,
                int(time.time() * 1000), keys.lane_job(self.step.lane), self.step.job_id,
                retry_key_prefix + self.step.job_id, len(blobs),
                *(_event_id(b) for b in blobs), *blobs]))
        except ResponseError as exc:
            if str(exc).startswith("LANELOST"):  # another run has the lane: it is its to bury
                return None
            raise
        if buried > 0:
            metrics.DEAD.labels(UNKNOWN).inc(buried)
        return buried != 0

    async def _run(self, blobs: list[bytes], deadline: float) -> tuple[list[Row], Failed | None]:
        """The rows of the head events whose handlers succeeded, in order, up to the first event
        that failed (then also returned)."""
        rows: list[Row] = []
        for n, blob in enumerate(blobs):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # let other jobs' replies (and arq's claims) through
            try:
                event, queued = _decode(blob)
            except Exception as exc:  # noqa: BLE001 - the event fails alone, kept whole
                return rows, Failed(_failed_id(blob), UNKNOWN, f"{type(exc).__name__}: {exc}")
            try:
                handlers = registry.handlers_for(event.kind)
                if handlers:  # most kinds have none: no coroutine to make for them
                    await self._handle(handlers, event, deadline)
                rows.append(Effects.row(event, queued, self.effects.forwards(event.kind)))
            except Exception as exc:  # noqa: BLE001 - the event fails alone, kept whole
                return rows, Failed(event.id, event.kind, _reason(exc))
        return rows, None

    async def _handle(self, handlers: list[registry.Handler], event: Event,
                      deadline: float) -> None:
        """Run the handlers registered for the event's kind, within the batch's deadline."""
        async with asyncio.timeout_at(deadline):
            for handler in handlers:
                await handler(self.ctx, event)

    def _failure(self, result: Outcome, fail: Failed | None) -> None:
        if result.status.startswith("dead"):
            metrics.DEAD.labels(fail.kind if fail is not None else UNKNOWN).inc()

    def _record(self, outcome: str, steps: int, failed: int, error: str, seconds: float) -> None:
        """The run's metrics and its one log line (debug when all went well)."""
        metrics.JOB_SECONDS.observe(seconds)
        metrics.JOBS_BY_OUTCOME[outcome].inc()
        level = logging.DEBUG if outcome in ("ok", "lost") else (
            logging.WARNING if outcome == "retry" else logging.ERROR)
        if log.isEnabledFor(level):
            fields: dict[str, Any] = {
                "lane": self.step.lane, "job_id": self.step.job_id, "try": self.step.job_try,
                "steps": steps, "written": self.written, "failed": failed, "outcome": outcome,
                "ms": round(seconds * 1000, 2),
            }
            if error:
                fields["error"] = error
            log.log(level, "lane job %s", outcome, extra=fields)


def _outcome(result: Outcome) -> str:
    if result.status == "retry":
        return "retry"
    return "dead_letter" if result.status.startswith("dead") else "ok"


def _decode(blob: bytes) -> tuple[Event, QueuedEvent]:
    """A queued event and its normalised event: the usual shapes of the busiest kinds in one
    typed pass (workers/wire.py), anything else from plain JSON (workers/normalize.py)."""
    queued = decode_event(blob)
    event = wire.event_of(queued)
    if event is None:
        item = loads(queued.raw)
        event = normalize(queued, item, refine(queued.kind, item, registry.has_handlers))
    return event, queued


_TRANSIENT_ERRORS = (OutOfMemoryError, BusyLoadingError, ReadOnlyError, NoScriptError)
"""Replies redis-py raises as their own classes, with the code (OOM, LOADING, READONLY,
NOSCRIPT) cut off the message."""

_TRANSIENT_REPLIES = ("BUSY", "MASTERDOWN", "TRYAGAIN")
"""Replies redis-py raises as a plain ResponseError, the code still first."""


def _transient(exc: ResponseError) -> bool:
    """A Redis error reply that passes (out of memory, loading, busy, a demoted primary): retry
    without counting."""
    return isinstance(exc, _TRANSIENT_ERRORS) or str(exc).startswith(_TRANSIENT_REPLIES)


def _event_id(blob: bytes) -> str:
    """The id of a queued event, from its JSON; a hash of its bytes if it has none."""
    try:
        event_id = msgspec.json.decode(blob).get("id")
    except (msgspec.DecodeError, AttributeError):
        event_id = None
    return event_id if isinstance(event_id, str) else _failed_id(blob)


def _failed_id(blob: bytes) -> str:
    """A name for an event that could not be decoded: a hash of its bytes."""
    return "undecodable:" + hashlib.blake2b(blob, digest_size=8).hexdigest()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "TimeoutError: handlers overran the job's deadline"
    return f"{type(exc).__name__}: {exc}"


async def unreadable_job(ctx: dict[str, Any], *, data: bytes, error: str) -> int:
    """A job whose payload could not be read (shared/codec.py job_deserializer): its bytes go to
    the dead letters whole, under the job's id."""
    runtime: Runtime = ctx["fbhook"]
    job_id = str(ctx.get("job_id", ""))
    await bury(ctx["redis"], "job", f"job:{job_id}", data, error, int(ctx.get("job_try", 1)),
               runtime.settings.dedupe_ttl_s)
    metrics.DEAD.labels("job").inc()
    log.error("unreadable job dead-lettered", extra={"job_id": job_id, "error": error})
    return 0
