"""The worker's Prometheus metrics, label children bound once at import, and the queue gauges.

Jobs only increment prebuilt children. Queue depth and the dead-letter count are read from Redis
every few seconds by one background task per worker, never per job. Each worker serves its own
metrics on WORKER_METRICS_PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.kinds import KINDS

log = logging.getLogger("fbhook.worker")

OUTCOMES: Final = ("ok", "retry", "dead_letter", "lost", "error")
"""A lane job's outcome: its events done (the lane emptied or handed on), its head event to be
retried later (a handler or Redis failed), done with an event dead-lettered, the lane taken over
by another run (this one was presumed dead), or stopped by anything else (a shutdown)."""

SOURCES: Final = (
    "ADS", "SHORTLINK", "MESSENGER_CODE", "DISCOVER_TAB", "CUSTOMER_CHAT_PLUGIN", "none", "other",
)
"""The `source` label of touch metrics: Facebook's known sources, `none` for a referral with no
source, `other` for anything else (the label set stays bounded whatever arrives)."""

REFRESH_SECONDS: Final = 5.0

JOB_SECONDS = Histogram(
    "fbhook_job_duration_seconds", "Time to run one lane job (it drains its lane's events).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
JOBS_RUN = Counter("fbhook_jobs", "Lane jobs run, by outcome.", ["outcome"])
PROCESSED = Counter(
    "fbhook_events_processed",
    "Events written to their stream (and attribution) by a job, by kind.", ["kind"],
)
DEAD = Counter(
    "fbhook_dead_letters", "Events this worker dead-lettered into fb:dead, by kind.", ["kind"],
)
TOUCHES = Counter(
    "fbhook_attribution_touches",
    "Referral touches stored, by source and whether the user was new or returning.",
    ["source", "user"],
)
QUEUE_DEPTH = Gauge("fbhook_queue_depth", "Jobs in the arq queue (waiting or running).")
QUEUE_AGE = Gauge(
    "fbhook_queue_oldest_job_age_seconds",
    "How long the oldest job in the queue has been due (0 when the queue is empty).",
)
DEAD_STORED = Gauge("fbhook_dead_letters_stored", "Entries in the dead-letter stream fb:dead.")

JOBS_BY_OUTCOME: Final = {outcome: JOBS_RUN.labels(outcome) for outcome in OUTCOMES}
PROCESSED_BY_KIND: Final = {kind: PROCESSED.labels(kind) for kind in KINDS}
MAX_CHANGE_KINDS: Final = 200
"""Change kinds come from the bodies' `field` names: past this many, more count as `other`."""
TOUCHES_BY_SOURCE: Final = {
    (source, returning): TOUCHES.labels(source, "returning" if returning else "new")
    for source in SOURCES for returning in (False, True)
}


_KNOWN_SOURCES: Final = frozenset(SOURCES) - {"none", "other"}


def source_label(source: str | None) -> str:
    if source is None:
        return "none"
    return source if source in _KNOWN_SOURCES else "other"


def count_processed(kind: str, n: int = 1) -> None:
    child = PROCESSED_BY_KIND.get(kind)
    if child is None:
        if len(PROCESSED_BY_KIND) >= len(KINDS) + MAX_CHANGE_KINDS:
            kind = "other"
        child = PROCESSED_BY_KIND[kind] = PROCESSED.labels(kind)
    child.inc(n)


def count_touch(source: str | None, returning: bool) -> None:
    TOUCHES_BY_SOURCE[source_label(source), returning].inc()


async def refresh(redis: Redis, queue: str) -> None:
    """Read the queue depth, the oldest due job and the dead-letter count in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(queue)
        pipe.zrange(queue, 0, 0, withscores=True)
        pipe.xlen(keys.DEAD_LETTERS)
        depth, oldest, dead = await pipe.execute()
    QUEUE_DEPTH.set(depth)
    due_ms = oldest[0][1] if oldest else None
    QUEUE_AGE.set(max(0.0, time.time() - due_ms / 1000) if due_ms is not None else 0.0)
    DEAD_STORED.set(dead)


async def refresh_forever(redis: Redis, queue: str, every_s: float = REFRESH_SECONDS) -> None:
    """The worker's background task: refresh the queue gauges until cancelled."""
    while True:
        try:
            await refresh(redis, queue)
        except (RedisError, OSError) as exc:
            log.debug("queue gauges not refreshed: %s", type(exc).__name__)
        await asyncio.sleep(every_s)


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


FORWARD_DELIVERIES = Counter(
    "fbhook_forward_deliveries",
    "POSTs to FORWARD_URL by outcome (delivered, failed) and HTTP status class.",
    ["outcome", "status"],
)
FORWARD_SECONDS = Histogram(
    "fbhook_forward_attempt_seconds", "Time of one POST to FORWARD_URL, answer included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
FORWARD_LAG = Gauge(
    "fbhook_forward_lag_seconds",
    "How old the last event this worker tried to deliver was, delivered or not: the forward "
    "backlog's age.",
)
FORWARD_FAILURES = Counter(
    "fbhook_forward_failures",
    "Deliveries that failed, by what follows: a retry later, or the dead letters.", ["next"],
)
_STATUS_CLASSES: Final = {0: "error", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def count_delivery(status: int, delivered: bool, seconds: float) -> None:
    status_class = _STATUS_CLASSES.get(status // 100, "other")
    FORWARD_DELIVERIES.labels("delivered" if delivered else "failed", status_class).inc()
    FORWARD_SECONDS.observe(seconds)


def count_forward_failure(given_up: bool) -> None:
    FORWARD_FAILURES.labels("dead_letter" if given_up else "retry").inc()
