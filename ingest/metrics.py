"""The ingest's Prometheus metrics, with their label children bound once at import.

The webhook handler only increments prebuilt children, and the last-webhook gauges are computed at
scrape time. Each ingest process exposes only its own counters on its own `/metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from prometheus_client import Counter, Gauge, Histogram

from shared.kinds import KINDS

if TYPE_CHECKING:
    from ingest.envelope import Routed

STATUSES: Final = (200, 400, 403, 408, 413, 415, 503)
"""Every status POST /webhook answers with."""

REASONS: Final = ("content_type", "too_large", "bad_signature", "bad_request", "queue_unavailable",
                  "body_timeout", "busy", "incomplete_body", "content_encoding", "bad_encoding")
"""Why POST /webhook refused a request: 415, 413, 403, 400 and 503 in that order, then 408 (the
body did not arrive in time), 503 (too many large bodies being read) and 400 (the client went
away, or broke its chunked encoding, before the body ended)."""

CHANNELS: Final = ("messaging", "standby", "changes", "entry")
"""Where an event was in its entry; `entry` is an entry that was not an object."""

REQUESTS = Counter(
    "fbhook_webhook_requests", "POST /webhook requests by HTTP status.", ["status"],
)
REJECTIONS = Counter(
    "fbhook_webhook_rejections", "POST /webhook requests refused, by reason.", ["reason"],
)
EVENTS = Counter(
    "fbhook_events_received",
    "Events acknowledged to Facebook (queued, or already queued), by kind and channel.",
    ["kind", "channel"],
)
DUPLICATES = Counter(
    "fbhook_duplicates_dropped",
    "Events dropped at ingest because their id was already queued within the dedupe window.",
)
ENQUEUE_SECONDS = Histogram(
    "fbhook_enqueue_duration_seconds",
    "Time of one enqueue Lua call (one batch of coalesced requests), failures included.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ENQUEUE_BATCH = Histogram(
    "fbhook_enqueue_batch_requests",
    "Requests coalesced into one enqueue Lua call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ENQUEUE_FAILURES = Counter(
    "fbhook_enqueue_failures", "Enqueue Lua calls that Redis refused or did not answer.",
)
SINCE_LAST = Gauge(
    "fbhook_seconds_since_last_webhook",
    "Seconds since the last correctly signed POST /webhook (since start-up if none yet).",
)
LAST_TIMESTAMP = Gauge(
    "fbhook_last_webhook_timestamp_seconds",
    "Unix time of the last correctly signed POST /webhook (0 if none since start-up).",
)
MALFORMED = Counter(
    "fbhook_malformed_requests",
    "Requests aiohttp could not parse as HTTP (a bad request line, a duplicated Content-Type...).",
)
WATCHDOG_WARNINGS = Counter(
    "fbhook_watchdog_warnings",
    "Warnings logged because no webhook arrived for WATCHDOG_SECONDS.",
)

REQUESTS_BY_STATUS: Final = {status: REQUESTS.labels(str(status)) for status in STATUSES}
REJECTED: Final = {reason: REJECTIONS.labels(reason) for reason in REASONS}
EVENTS_BY_KIND: Final = {
    (kind, channel): EVENTS.labels(kind, channel) for kind in KINDS for channel in CHANNELS
}


class WebhookClock:
    """When the last correctly signed webhook arrived; read by the gauges and the watchdog."""

    __slots__ = ("last", "started")

    def __init__(self) -> None:
        self.started = time.time()
        self.last = 0.0
        """Unix time of the last signed webhook, 0.0 until the first one."""

    def seconds_since(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        return max(0.0, now - (self.last or self.started))

    def bind(self) -> None:
        """Make the process's gauges read this clock (the app that starts last wins)."""
        SINCE_LAST.set_function(self.seconds_since)
        LAST_TIMESTAMP.set_function(lambda: self.last)


def count_request(status: int) -> None:
    child = REQUESTS_BY_STATUS.get(status)
    (child if child is not None else REQUESTS.labels(str(status))).inc()


MAX_CHANGE_KINDS: Final = 200
"""Change kinds come from the bodies' `field` names: past this many, more are counted as
`other`, so the metric's size stays bounded."""


def count_event(kind: str, channel: str, n: int = 1) -> None:
    child = EVENTS_BY_KIND.get((kind, channel))
    if child is None:
        if len(EVENTS_BY_KIND) >= len(KINDS) * len(CHANNELS) + MAX_CHANGE_KINDS:
            kind = "other"
        child = EVENTS_BY_KIND[kind, channel] = EVENTS.labels(kind, channel)
    child.inc(n)


def count_events(events: Sequence[Routed]) -> None:
    """Count a request's events by kind and channel: one increment per pair, not per event."""
    if len(events) == 1:
        count_event(events[0].kind, events[0].channel)
        return
    pairs: dict[tuple[str, str], int] = {}
    for event in events:
        pair = (event.kind, event.channel)
        pairs[pair] = pairs.get(pair, 0) + 1
    for (kind, channel), n in pairs.items():
        count_event(kind, channel, n)
