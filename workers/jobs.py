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
from shared.codec import DecodedEvent, decode_event
from shared.events import Event
from shared.kinds import UNKNOWN, event_key
from shared.settings import Settings
from workers import metrics, registry
from workers.deadletters import bury
from workers.effects import NEW_USER, RETURNING_USER, SKIPPED, Effects, JobEnd
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


def _kind_for(kind: str, queued: DecodedEvent) -> str:
    """An unknown item whose key has a registered handler becomes that kind (an extension)."""
    if kind != UNKNOWN:
        return kind
    key = event_key(queued.raw)
    return key if key is not None and registry.has_handlers(key) else UNKNOWN


def make_job(kind: str) -> Job:
    async def job(ctx: dict[str, Any], *, events: list[str]) -> int:
        return await run_batch(ctx, kind, events)

    job.__name__ = job.__qualname__ = kind
    job.__doc__ = f"Process a batch of `{kind}` events."
    return job


async def run_batch(ctx: dict[str, Any], kind: str, blobs: list[str]) -> int:
    runtime: Runtime = ctx["fbhook"]
    redis = ctx["redis"]
    started = time.perf_counter()
    job_try = int(ctx.get("job_try", 1))
    events, payloads, failures = _decode(kind, blobs)
    codes: list[int] = []
    outcome, error = "error", ""
    now, timeout_s = asyncio.get_running_loop().time(), runtime.settings.job_timeout_s
    try:
        async with asyncio.timeout_at(now + timeout_s * GUARD_SHARE):
            done = await _run_handlers(ctx, redis, events, failures,
                                       now + timeout_s * HANDLER_SHARE)
            end = JobEnd(ctx["job_id"], runtime.settings.queue_name, job_try) \
                if not failures and "job_id" in ctx else None
            codes = await runtime.effects.write(done, end)
            if end is not None:
                runtime.finished.add(end.job_id)
            if failures:
                error = next(iter(failures.values())).partition(":")[0]
                if job_try < runtime.settings.job_max_tries:
                    raise Retry(defer=backoff_s(job_try))
                for event_id, failure in failures.items():
                    await bury(redis, kind, event_id, payloads[event_id], failure, job_try,
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
        # Redis refused this batch try after try (a script error, say): keep every event.
        for event_id, payload in payloads.items():
            await bury(redis, kind, event_id, payload, error, job_try,
                       runtime.settings.dedupe_ttl_s)
        metrics.DEAD.labels(kind).inc(len(payloads))
        outcome = "dead_letter"
    except (RedisError, TimeoutError) as exc:
        outcome, error = "retry", type(exc).__name__
        raise Retry(defer=backoff_s(job_try)) from exc
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        _record(ctx, kind, blobs, events, codes, len(failures), outcome, error,
                time.perf_counter() - started)
    return len(codes) - codes.count(SKIPPED)


def _decode(kind: str, blobs: list[str]) -> tuple[list[Event], dict[str, str], dict[str, str]]:
    """The job's events, the payload of each by id, and the blobs that did not decode."""
    events: list[Event] = []
    payloads: dict[str, str] = {}
    failures: dict[str, str] = {}
    for blob in blobs:
        try:
            queued = decode_event(blob)
        except msgspec.DecodeError as exc:
            key = "undecodable:" + hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()
            failures[key] = f"undecodable event: {exc}"
            payloads[key] = blob
            continue
        event = normalize(_kind_for(kind, queued), queued)
        events.append(event)
        payloads[event.id] = blob
    return events, payloads, failures


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


async def _run_handlers(ctx: dict[str, Any], redis: Any, events: list[Event],
                        failures: dict[str, str], deadline: float) -> list[Event]:
    """Run registered handlers for events not yet done; return the events that succeeded.
    Handlers still running at `deadline` (event-loop time) fail their event."""
    with_handlers = [e for e in events if registry.has_handlers(e.kind)]
    if not with_handlers:
        return events
    states = await redis.mget([keys.seen(e.id) for e in with_handlers])
    already = {e.id for e, state in zip(with_handlers, states, strict=True) if state == b"d"}
    ok: list[Event] = []
    for event in events:
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
        ok.append(event)
    return ok
