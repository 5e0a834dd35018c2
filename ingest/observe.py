"""What the ingest says about itself: the webhook request's log line and the silence watchdog.

A log line never holds the body, the signature, a token or a query string: only the outcome,
sizes, timings and, where they apply, the kind, page and user of the events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ingest import metrics
from ingest.envelope import Routed
from ingest.metrics import WebhookClock

log = logging.getLogger("fbhook.ingest")

LIST_CAP = 20
"""At most this many kinds, pages or users listed in one request's log line."""


class Outcome(NamedTuple):
    """How one POST /webhook ended: the answer, why it was refused (None when acknowledged), the
    events it carried, the body size, the time spent waiting for Redis and the queue error."""

    response: web.Response
    reason: str | None
    events: Sequence[Routed] = ()
    size: int = 0
    queue_s: float = 0.0
    error: str = ""


class _Sender(msgspec.Struct):
    id: str | int | None = None
    user_ref: str | int | None = None


class _Item(msgspec.Struct):
    sender: _Sender | None = None


class _Queued(msgspec.Struct):
    raw: _Item


_decode_sender = msgspec.json.Decoder(_Queued).decode


def user_of(event: Routed) -> str | None:
    """The sender's PSID (or the chat plugin's user_ref) of a queued event, for the log line."""
    try:
        sender = _decode_sender(event.blob).raw.sender
    except msgspec.DecodeError:  # an item that is no object, or an odd sender
        return None
    if sender is None:
        return None
    value = sender.id if sender.id is not None else sender.user_ref
    return None if value is None else str(value)


def _distinct(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(v for v in values if v is not None))[:LIST_CAP]


def request_fields(outcome: Outcome, seconds: float) -> dict[str, Any]:
    """The fields of one request's log line (built only when the line is logged)."""
    fields: dict[str, Any] = {
        "status": outcome.response.status,
        "outcome": outcome.reason or "accepted",
        "events": len(outcome.events),
        "bytes": outcome.size,
        "ms": round(seconds * 1000, 2),
    }
    if outcome.events:
        fields["queue_ms"] = round(outcome.queue_s * 1000, 2)
    if len(outcome.events) == 1:
        event = outcome.events[0]
        fields["kind"], fields["page"], fields["user"] = event.kind, event.page, user_of(event)
    elif outcome.events:
        fields["kinds"] = _distinct([e.kind for e in outcome.events])
        fields["pages"] = _distinct([e.page for e in outcome.events])
        fields["users"] = _distinct([user_of(e) for e in outcome.events])
    if outcome.error:
        fields["error"] = outcome.error
    return fields


class _QuietParseErrors(logging.Filter):
    """aiohttp logs a request it cannot parse (a bad request line, a duplicated Content-Type) at
    error level with a traceback. Count it and log one info line instead, naming only the error's
    class: its message may quote the raw bytes of the request, tokens included."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        metrics.MALFORMED.inc()
        log.log(min(record.levelno, logging.INFO), "malformed HTTP request: %s",
                type(error).__name__, extra={"status": error.code, "error": type(error).__name__})
        return False


server_log = logging.getLogger("fbhook.ingest.http")
"""The logger aiohttp's connection handler writes to (instead of `aiohttp.server`): requests it
could not parse leave one quiet line; anything else keeps its level and traceback."""
server_log.addFilter(_QuietParseErrors())


def check_every(limit_s: float) -> float:
    """How often the watchdog looks: a tenth of its limit, between 50 ms and 15 s."""
    return min(max(limit_s / 10, 0.05), 15.0)


async def watchdog(clock: WebhookClock, limit_s: float) -> None:
    """Log a warning when no signed webhook arrived for `limit_s` seconds, again every `limit_s`
    while the silence lasts, and once at info level when webhooks arrive again.

    Facebook unsubscribes an app from a Page after about an hour of failed deliveries; from here,
    that looks like silence."""
    next_warning = limit_s
    warned = False
    while True:
        await asyncio.sleep(check_every(limit_s))
        silent = clock.seconds_since()
        if silent < limit_s:
            if warned:
                log.info("webhooks arrive again", extra={"watchdog_seconds": limit_s})
                warned = False
            next_warning = limit_s
            continue
        if silent >= next_warning:
            metrics.WATCHDOG_WARNINGS.inc()
            log.warning(
                "no webhook for %d s: is the app still subscribed to the Page?", silent,
                extra={"seconds_since_last_webhook": round(silent, 1),
                       "watchdog_seconds": limit_s},
            )
            warned = True
            next_warning = silent + limit_s
