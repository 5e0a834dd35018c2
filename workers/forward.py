"""Forwarding: every event, after dedupe, POSTed to the bot's own webhook (FORWARD_URL) in
Facebook's envelope, signed as Facebook signs it, in each user's order.

A lane's step that writes an event's outputs also appends it to the lane's forward list
(`fb:fwd:<n>`, workers/effects.lua) with the user's attribution at that moment, and queues a
forward job for a list that has none. A forward job drains its list like a lane job drains its
lane (workers/lanes.py: the same lease, the same fencing): one POST at a time, in order. A 2xx
is delivered; a timeout, a connection error, a 429 or a 5xx is retried with exponential backoff
and jitter (a `Retry-After` is honoured), its list waiting meanwhile, until the event is older
than FORWARD_MAX_AGE_SECONDS; any other answer dead-letters it at once (`fb:fwd:dead`, with the
last answer; `fbhook forward replay`). The per-kind streams and attribution never wait for the
bot: a bot that is down only builds a backlog.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import time
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

import aiohttp
import msgspec
from arq.constants import job_key_prefix, retry_key_prefix
from arq.worker import Retry
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.codec import JOB_TTL_MS
from shared.lanes import with_queue_job
from shared.settings import Settings
from shared.signing import sign
from workers import metrics
from workers.effects import ForwardRecord
from workers.lanes import HANDLER_SHARE, RUN_SECONDS, lease

FORWARD_LUA = with_queue_job(resources.files("workers").joinpath("forward.lua").read_text())

BATCH = 100
"""Events a step reads from its list (delivered one by one, then taken off together)."""

BACKOFF_CAP_S = 300.0
BUSY_DEFER_S = 1.0
"""How long a forward job waits, outside the worker's job slots, when FORWARD_CONCURRENCY runs
are going: this times its tries, at most FORWARD_TIMEOUT_SECONDS, with jitter."""
RETRY_AFTER_CAP_S = 3600.0

log = logging.getLogger("fbhook.forward")
_decode_record = msgspec.json.Decoder(ForwardRecord).decode


class Attempt(NamedTuple):
    """One POST: its HTTP status (0 for none), the start of the answer, what went wrong."""

    status: int
    answer: str
    error: str
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status in (408, 429) or self.status >= 500


@dataclass(slots=True)
class Forwarder:
    """What every forward job of a worker shares, built when the worker starts."""

    settings: Settings
    session: aiohttp.ClientSession
    slots: asyncio.Semaphore
    """FORWARD_CONCURRENCY: forward runs, so POSTs, this worker has at once, at most. A run holds
    one from start to end; a job that finds none free is deferred, not left waiting in one of
    the worker's WORKER_MAX_JOBS job slots, which the lanes need while the bot hangs."""

    @classmethod
    def start(cls, settings: Settings) -> Forwarder:
        timeout = aiohttp.ClientTimeout(total=settings.forward_timeout_s)
        return cls(settings, aiohttp.ClientSession(timeout=timeout),
                   asyncio.Semaphore(settings.forward_concurrency))

    async def aclose(self) -> None:
        await self.session.close()

    async def post(self, record: ForwardRecord, attribution: bytes) -> Attempt:
        body = envelope(record)
        vars_ = json.loads(attribution) if attribution else {}
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": sign(self.settings.forward_secret, body),
            "X-Fbhook-Event-Id": header_id(record.id),
            "X-Fbhook-Kind": record.kind,
            "X-Fbhook-Referral": "1" if vars_.get("__fbref__") else "0",
        }
        headers.update(attribution_headers({k: v for k, v in vars_.items() if k != "__fbref__"}))
        started = time.perf_counter()
        try:
            async with self.session.post(
                self.settings.forward_url, data=body, headers=headers, allow_redirects=False,
            ) as answer:
                text = (await answer.content.read(500)).decode(errors="replace")
                attempt = Attempt(answer.status, text, "" if 200 <= answer.status < 300 else
                                  f"HTTP {answer.status}", retry_after(answer.headers))
        except (aiohttp.ClientError, TimeoutError) as exc:
            attempt = Attempt(0, "", redacted(f"{type(exc).__name__}: {exc}")[:300])
        metrics.count_delivery(attempt.status, attempt.delivered, time.perf_counter() - started)
        # Set on failures too: while the bot is down, the retried head events keep it growing.
        metrics.FORWARD_LAG.set(max(0.0, time.time() - record.time / 1000))
        return attempt


_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


ATTRIBUTION_MAX = 4096
"""The longest `X-Fbhook-Attribution` sent (bots' servers refuse headers over about 8 KB, and
a refusal dead-letters the event): a value that would make it longer (a ref of thousands of
characters) is sent as null and named in `X-Fbhook-Attribution-Cut`; the bot reads it whole from
`GET /attribution/<user>`."""


def attribution_headers(attribution: dict[str, Any]) -> dict[str, str]:
    """`X-Fbhook-Attribution` (and `X-Fbhook-Attribution-Cut` when values had to be left out)."""
    text = json.dumps(attribution, ensure_ascii=True)
    if len(text) <= ATTRIBUTION_MAX:
        return {"X-Fbhook-Attribution": text}
    cut = sorted(k for k, v in attribution.items()
                 if len(json.dumps(v, ensure_ascii=True)) > ATTRIBUTION_MAX // 4)
    kept = {k: (None if k in cut else v) for k, v in attribution.items()}  # three values, each
    return {"X-Fbhook-Attribution": json.dumps(kept, ensure_ascii=True),  # under a quarter
            "X-Fbhook-Attribution-Cut": ",".join(cut)}


_URL_PARTS = re.compile(r"(https?://)(?:[^/\s'\"@]*@)?([^\s'\"?#]*)(?:\?[^\s'\"#]*)?")


def redacted(text: str) -> str:
    """`text` (an error from aiohttp, which quotes the URL it failed on) with every URL's
    user, password and query left out: a bot's URL may carry its key there."""
    return _URL_PARTS.sub(r"\1\2", text)


def header_id(event_id: str) -> str:
    """The event id as a header value: as it is when it is printable ASCII without `%` or
    spaces (every id Facebook's mids and the hashes give), else %-encoded (UTF-8), so that a
    mid holding a line break neither injects a header nor makes every POST of its lane fail."""
    return urllib.parse.quote(event_id, safe=_HEADER_SAFE)


def envelope(record: ForwardRecord) -> bytes:
    """Facebook's envelope around the item exactly as it was sent."""
    page = json.dumps(record.page)
    channel = record.channel if record.channel in ("messaging", "standby", "changes") else None
    obj = json.dumps(record.object)
    if channel is None:  # an entry[] element that was not an object: kept as it came
        return f'{{"object":{obj},"entry":[{record.raw}]}}'.encode()
    return (f'{{"object":{obj},"entry":[{{"id":{page},"time":{record.time},'
            f'"{channel}":[{record.raw}]}}]}}').encode()


def retry_after(headers: Any) -> float | None:
    """`Retry-After` in seconds (a number of seconds or an HTTP date), capped; None if absent."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(0.0, seconds), RETRY_AFTER_CAP_S)


def backoff_s(tries: int) -> float:
    """Exponential backoff with jitter before try `tries + 1`: about 1, 2, 4 ... s, at most 300."""
    return float(min(BACKOFF_CAP_S, 2 ** (tries - 1)) * random.uniform(0.5, 1.0))


async def forward_job(ctx: dict[str, Any], *, lane: int) -> int:
    """The arq job function: deliver forward list `lane`, in order. Returns events delivered."""
    forwarder: Forwarder = ctx["fbhook_forwarder"]
    redis: Redis = ctx["redis"]
    job_id, job_try = str(ctx["job_id"]), int(ctx.get("job_try", 1))
    script = redis.register_script(FORWARD_LUA)
    settings = forwarder.settings
    # Hand the list on well within arq's job timeout, which would cancel the run before its step
    # takes the delivered events off: they would be sent again, forever.
    until = time.monotonic() + min(RUN_SECONDS, settings.job_timeout_s * HANDLER_SHARE)
    delivered_total = 0
    if forwarder.slots.locked():  # longer each time: a slot frees when a run ends
        wait = min(BUSY_DEFER_S * job_try, settings.forward_timeout_s)
        raise Retry(defer=wait * random.uniform(0.5, 1.5))
    async with forwarder.slots, lease(redis, job_id, settings.worker_lease_s):
        while True:
            items: list[bytes] = await redis.lrange(  # type: ignore[misc]
                keys.forward_lane(lane), 0, BATCH - 1)
            delivered, failed, first = 0, None, ""
            for item in items:
                record_json, _, attribution = item.rpartition(b"\n")
                record = _decode_record(record_json)
                attempt = await forwarder.post(record, attribution)
                if not attempt.delivered:
                    failed = await _failure(redis, settings, record, attempt)
                    break
                first = first or record.id
                delivered += 1
                if time.monotonic() >= until:
                    break
            step = [
                keys.forward_lane(lane), keys.forward_job(lane), job_id,
                retry_key_prefix + job_id, job_try, delivered, failed or False,
                "handoff" if time.monotonic() >= until else "more",
                f"fwd-{os.urandom(6).hex()}-{lane}", lane, settings.queue_name,
                int(time.time() * 1000), keys.FORWARD_TRIES, keys.FORWARD_DEAD, job_key_prefix,
                JOB_TTL_MS, first, keys.STEPS, os.urandom(8).hex(),
            ]
            try:
                status, _ = await script(args=[msgspec.msgpack.encode(step)])
            except ResponseError as exc:
                if str(exc).startswith("LANELOST"):
                    return delivered_total
                raise
            delivered_total += delivered
            if not (status.decode() if isinstance(status, bytes) else status).endswith("more"):
                return delivered_total


async def _failure(redis: Redis, settings: Settings, record: ForwardRecord,
                   attempt: Attempt) -> list[Any]:
    """What the step does with an event whose delivery failed: retry at a time, or give up."""
    tries = int(await redis.hget(keys.FORWARD_TRIES, record.id) or 0) + 1  # type: ignore[misc]
    wait = max(backoff_s(tries), attempt.retry_after_s or 0.0)
    # Its age counts from when it came in, or from when `fbhook forward dead replay` sent it
    # again (else a replayed delivery, old already, would get a single try).
    replayed = await redis.get(keys.forward_replayed(record.id))
    since_ms = max(record.time, int(replayed) if replayed and replayed.isdigit() else 0)
    too_old = time.time() + wait - since_ms / 1000 > settings.forward_max_age_s
    give_up = not attempt.retryable or too_old
    error = attempt.error + (" (gave up: older than FORWARD_MAX_AGE_SECONDS)"
                             if too_old and attempt.retryable else "")
    log.warning("forward attempt failed", extra={
        "event_id": record.id, "kind": record.kind, "status": attempt.status, "try": tries,
        "error": attempt.error, "next": "dead letter" if give_up else f"retry in {wait:.1f}s"})
    metrics.count_forward_failure(give_up)
    return [record.id, attempt.status, attempt.answer, error, 1 if give_up else 0,
            int((time.time() + wait) * 1000)]
