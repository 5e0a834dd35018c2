"""The arq job functions: one per kind, each taking a batch of events.

A job decodes its events, runs the handlers registered for their kind, then writes the built-in
outputs (stream entry, attribution touch) in one atomic call that skips what is already done.
A handler that raises is retried with backoff; after `JOB_MAX_TRIES` its events are dead-lettered.
Redis outages retry the whole job for as long as they last; an error reply that persists (a
script error) is retried `JOB_MAX_TRIES` times, then the job's events are dead-lettered. Nothing
is dropped.

arq fails a job that overruns `JOB_TIMEOUT_SECONDS` and deletes it, events and all, so a job never
lets that happen: handlers get `HANDLER_SHARE` of the timeout (a handler still running then is a
failure of its event), and a job still running at `GUARD_SHARE` of it hands itself back with Retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from arq import Retry
from redis.exceptions import RedisError, ResponseError

from shared import keys
from shared.codec import QueuedEvent, decode_event
from shared.events import Event
from shared.jsontext import loads
from shared.kinds import refine
from shared.settings import Settings
from workers import metrics, registry
from workers.deadletters import bury
from workers.effects import NEW_USER, RETURNING_USER, SKIPPED, Effects, JobEnd, Row
from workers.normalize import normalize

log = logging.getLogger("fbhook.worker")

Job = Callable[..., Awaitable[int]]


@dataclass(slots=True)
class Runtime:
    """What every job needs, built once when the worker starts (ctx["fbhook"])."""

    settings: Settings
    effects: Effects
    finished: set[str] = field(default_factory=set)
    """Jobs whose end the effects call already wrote (`ClaimingWorker.finish_job` skips them)."""


HANDLER_SHARE = 0.5
GUARD_SHARE = 0.9


_TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOSCRIPT")


def _transient(exc: ResponseError) -> bool:
    """A Redis error reply that passes (out of memory, loading, busy): retry without counting."""
    return str(exc).startswith(_TRANSIENT_REPLIES)


def backoff_s(job_try: int) -> float:
    return float(min(2 ** job_try, 60))


def make_job(kind: str) -> Job:
    async def job(ctx: dict[str, Any], *, events: list[str]) -> int:
        return await run_batch(ctx, kind, events)

    job.__name__ = job.__qualname__ = kind
    job.__doc__ = f"Process a batch of `{kind}` events."
    return job


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


class _Batch:
    """A job's events as read back: each decoded event with its queued form, the payload of
    every event by id (for the dead letters), and the events that failed, with why."""

    __slots__ = ("events", "failures", "payloads")

    def __init__(self) -> None:
        self.events: list[tuple[Event, QueuedEvent]] = []
        self.payloads: dict[str, str] = {}
        self.failures: dict[str, str] = {}


async def run_batch(ctx: dict[str, Any], kind: str, blobs: list[str]) -> int:
    runtime: Runtime = ctx["fbhook"]
    redis = ctx["redis"]
    started = time.perf_counter()
    job_try = int(ctx.get("job_try", 1))
    batch = _decode(blobs)
    failures = batch.failures
    codes: list[int] = []
    outcome, error = "error", ""
    now, timeout_s = asyncio.get_running_loop().time(), runtime.settings.job_timeout_s
    try:
        async with asyncio.timeout_at(now + timeout_s * GUARD_SHARE):
            done = await _run_handlers(ctx, redis, batch, now + timeout_s * HANDLER_SHARE)
            rows = _rows(done, failures)
            end = JobEnd(ctx["job_id"], runtime.settings.queue_name, job_try) \
                if not failures and "job_id" in ctx else None
            codes, ended = await _write(runtime.effects, rows, end, failures)
            if ended and end is not None:
                runtime.finished.add(end.job_id)
            if failures:
                error = next(iter(failures.values())).partition(":")[0]
                if job_try < runtime.settings.job_max_tries:
                    raise Retry(defer=backoff_s(job_try))
                for event_id, failure in failures.items():
                    await bury(redis, kind, event_id, batch.payloads[event_id], failure, job_try,
                               runtime.settings.dedupe_ttl_s)
                metrics.DEAD.labels(kind).inc(len(failures))
        outcome = "dead_letter" if failures else "ok"
    except Retry:
        outcome = "retry"
        raise
    except ResponseError as exc:
        error = f"{type(exc).__name__}: {exc}"
        if _transient(exc) or job_try < runtime.settings.job_max_tries:
            outcome = "retry"
            raise Retry(defer=backoff_s(job_try)) from exc
        # Redis refused this job try after try, outside the effects call: keep every event.
        for event_id, payload in batch.payloads.items():
            await bury(redis, kind, event_id, payload, error, job_try,
                       runtime.settings.dedupe_ttl_s)
        metrics.DEAD.labels(kind).inc(len(batch.payloads))
        outcome = "dead_letter"
    except (RedisError, TimeoutError) as exc:
        outcome, error = "retry", type(exc).__name__
        raise Retry(defer=backoff_s(job_try)) from exc
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        _record(ctx, kind, blobs, [e for e, _ in batch.events], codes, len(failures), outcome,
                error, time.perf_counter() - started)
    return len(codes) - codes.count(SKIPPED)


def _decode(blobs: list[str]) -> _Batch:
    """Each blob decoded and normalised on its own: one that fails is a failure of that event
    alone (normalisation never raises, so this is a guard, not a path)."""
    batch = _Batch()
    for blob in blobs:
        try:
            queued = decode_event(blob)
        except msgspec.DecodeError as exc:
            key = "undecodable:" + hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()
            batch.failures[key] = f"undecodable event: {exc}"
            batch.payloads[key] = blob
            continue
        batch.payloads[queued.id] = blob
        try:
            item = loads(queued.raw)
            event = normalize(queued, item, refine(queued.kind, item, registry.has_handlers))
        except Exception as exc:  # noqa: BLE001 - one event's failure, kept and dead-lettered
            batch.failures[queued.id] = f"normalize: {type(exc).__name__}: {exc}"
            continue
        batch.events.append((event, queued))
    return batch


def _rows(done: list[tuple[Event, QueuedEvent]], failures: dict[str, str]) -> list[Row]:
    """effects.lua's arguments for each event; an event that cannot be encoded fails alone."""
    rows: list[Row] = []
    for event, queued in done:
        try:
            rows.append(Effects.row(event, queued))
        except Exception as exc:  # noqa: BLE001 - one event's failure, kept and dead-lettered
            failures[event.id] = f"encode: {type(exc).__name__}: {exc}"
    return rows


async def _write(effects: Effects, rows: list[Row], end: JobEnd | None,
                 failures: dict[str, str]) -> tuple[list[int], bool]:
    """Write the rows in one call (ending the job with them when `end` is given). Should Redis
    refuse the call for good (an error reply that does not pass), each row is written alone,
    so that the one it refuses fails alone and every other is written once (the rows written
    before the refusal carry done marks and are skipped). Returns the codes and whether the
    job was ended."""
    try:
        return await effects.write(rows, end), True
    except ResponseError as exc:
        if _transient(exc):
            raise
    codes: list[int] = []
    for row in rows:
        try:
            codes += await effects.write([row])
        except ResponseError as exc:
            if _transient(exc):
                raise
            failures[row.values[0]] = f"{type(exc).__name__}: {exc}"
    return codes, False


_LEVELS = {"ok": logging.DEBUG, "retry": logging.WARNING}


def _record(ctx: dict[str, Any], kind: str, blobs: list[str], events: list[Event],
            codes: list[int], failed: int, outcome: str, error: str, seconds: float) -> None:
    """The job's metrics and its one log line (debug when all went well)."""
    written = len(codes) - codes.count(SKIPPED)
    skipped = len(codes) - written
    if kind in metrics.JOB_SECONDS_BY_KIND:
        metrics.JOB_SECONDS_BY_KIND[kind].observe(seconds)
        metrics.PROCESSED_BY_KIND[kind].inc(written)
        if skipped:
            metrics.ALREADY_DONE_BY_KIND[kind].inc(skipped)
        metrics.JOBS_BY_OUTCOME[kind, outcome].inc()
    level = _LEVELS.get(outcome, logging.ERROR)
    if not log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "kind": kind, "job_id": ctx.get("job_id"), "try": ctx.get("job_try", 1),
        "events": len(blobs), "written": written, "already_done": skipped, "failed": failed,
        "new_users": codes.count(NEW_USER), "returning_users": codes.count(RETURNING_USER),
        "outcome": outcome, "ms": round(seconds * 1000, 2),
    }
    if len(events) == 1:
        fields["page"], fields["user"] = events[0].page_id, events[0].sender
    if error:
        fields["error"] = error
    log.log(level, "job %s", outcome, extra=fields)


async def _run_handlers(ctx: dict[str, Any], redis: Any, batch: _Batch,
                        deadline: float) -> list[tuple[Event, QueuedEvent]]:
    """Run registered handlers for events not yet done; return the events that succeeded.
    Handlers still running at `deadline` (event-loop time) fail their event."""
    events, failures = batch.events, batch.failures
    with_handlers = [e for e, _ in events if registry.has_handlers(e.kind)]
    if not with_handlers:
        return events
    states = await redis.mget([keys.seen(e.id) for e in with_handlers])
    already = {e.id for e, state in zip(with_handlers, states, strict=True) if state == b"d"}
    ok: list[tuple[Event, QueuedEvent]] = []
    for event, queued in events:
        if event.id not in already:
            try:
                async with asyncio.timeout_at(deadline) as limit:
                    for handler in registry.handlers_for(event.kind):
                        await handler(ctx, event)
            except TimeoutError as exc:
                failures[event.id] = "TimeoutError: " + (
                    "handlers overran the job's deadline" if limit.expired() else str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a handler's failure is recorded, not fatal
                failures[event.id] = f"{type(exc).__name__}: {exc}"
                continue
        ok.append((event, queued))
    return ok
