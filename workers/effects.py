"""Writes the built-in outputs of a lane's head events, and the lane's next step, in one atomic
Lua call (workers/effects.lua)."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from itertools import chain
from typing import Any, NamedTuple

import msgspec
from arq.constants import job_key_prefix, retry_key_prefix
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.attribution import POSITIONS, Touch, pack_touch
from shared.codec import JOB_TTL_MS, QueuedEvent
from shared.events import Event
from shared.lanes import with_queue_job
from shared.packed_call import bulk_pair, call, command
from shared.pinned import Pinned
from shared.report import RETENTION_DAYS, day_of
from shared.settings import Settings
from workers import metrics
from workers.touches import touch_of


def _load_script() -> str:
    """effects.lua, with the positions of a stored touch's values that it reads filled in from
    shared/attribution.py (the one definition of a touch)."""
    text = resources.files("workers").joinpath("effects.lua").read_text()
    names = ("timestamp", "source", "ref", "ad_id", "tie", "product_id")
    positions = ", ".join(str(POSITIONS.index(name) + 1) for name in names)
    text = text.replace("= POSITIONS\n", f"= {positions}\n", 1)
    return with_queue_job(text.replace("= ROW_WIDTH\n", f"= {ROW_WIDTH}\n", 1))


ROW_WIDTH = 13
"""How many values `Effects.row` gives an event (effects.lua reads them by position)."""


EFFECTS_LUA = _load_script()

WRITTEN, NEW_USER, RETURNING_USER = 1, 2, 3


class LaneLost(Exception):
    """This run no longer owns its lane (it was presumed dead and the lane was taken over)."""

log = logging.getLogger("fbhook.worker")

_json = msgspec.json.Encoder().encode
_pack = msgspec.msgpack.Encoder().encode


def _text(value: Any) -> str:
    """JSON as str: Redis's Lua MessagePack decoder knows str but not bin."""
    return _json(value).decode()


def _text_of(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _ad_title(touch: Touch) -> str | bool:
    """The ad's title for the report, or false (Lua's "none")."""
    title = (touch.ads_context_data or {}).get("ad_title")
    return title if isinstance(title, str) and title else False


class Row(msgspec.Struct, frozen=True):
    """One event's arguments to effects.lua, and its touch's source (for the metrics). (A
    Struct: built in C, a third of a NamedTuple's cost, once per event.)"""

    values: tuple[Any, ...]
    """Packed with the other rows' into one flat MessagePack argument (effects.lua WIDTH)."""
    texts: bytes
    """The event's JSON and its raw item, as two arguments of their own (shared/packed_call)."""
    source: str | None

    @property
    def id(self) -> str:
        """The event's id."""
        return str(self.values[0])


class ForwardRecord(msgspec.Struct):
    """An event waiting in a forward list: enough to rebuild Facebook's envelope around the item
    exactly as it was sent (workers/forward.py)."""

    id: str
    kind: str
    object: str
    page: str | None
    channel: str
    time: int
    raw: str


class Failed(NamedTuple):
    """The event right after a step's rows, which failed before it could be written."""

    id: str
    kind: str
    error: str


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a lane's run: which run it is (the fence), what failed, what comes next."""

    lane: int
    job_id: str
    job_try: int
    failed: Failed | None = None
    handoff: bool = False
    """True when the run's time is up: a new job takes the lane over if it still has events."""
    backoffs_ms: tuple[int, ...] = ()
    """How long the lane waits before try n + 1 of a failed head event, by n (from 1)."""


class Outcome(NamedTuple):
    codes: list[int]
    """One per row written: WRITTEN, NEW_USER or RETURNING_USER."""
    status: str
    """`more`, `ended`, `handed` or `retry`; `dead` first when an event was dead-lettered."""
    tries: int
    """The failed event's tries so far (0 when none failed)."""
    head: list[bytes]
    """When the lane goes on (`more`): its next events, read right behind the call (in the
    same round trip)."""


class Effects:
    """Stream entries, attribution touches and referral notifications, exactly once in effect."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self._sha = redis.register_script(EFFECTS_LUA).sha
        self._clients = Pinned(redis)
        self._queue, self._max_tries = settings.queue_name, settings.job_max_tries
        self._last_index = str(settings.job_max_events - 1).encode()
        self._forward, self._forward_kinds = bool(settings.forward_url), settings.forward_kinds
        self._header = [str(value).encode() for value in (
            settings.dedupe_ttl_s, settings.stream_maxlen, settings.history_cap,
            keys.REFERRALS_STREAM, keys.REPORT_ADS, RETENTION_DAYS * 86400,
            keys.SEEN_PREFIX, keys.STREAM_PREFIX, keys.ATTR_PREFIX, keys.REPORT_PREFIX,
        )]

    def forwards(self, kind: str) -> bool:
        """Whether events of `kind` are forwarded to FORWARD_URL (FORWARD_KINDS, else all)."""
        return self._forward and (not self._forward_kinds or kind in self._forward_kinds)

    @staticmethod
    def row(event: Event, queued: QueuedEvent, forward: bool = False) -> Row:
        """What effects.lua writes for one event (and, with `forward`, queues for FORWARD_URL).
        Raises if the event cannot be encoded: the caller then fails that event alone."""
        touch = touch_of(event, queued.received_ms)
        head = (event.id, event.kind, event.channel, event.page_id or "", event.user or "",
                str(event.timestamp))
        texts = bulk_pair(_json(event), queued.raw if queued.text is None else queued.raw_bytes())
        record = _text(ForwardRecord(event.id, event.kind, queued.object, event.page_id,
                                     queued.channel, queued.received_ms,
                                     queued.raw_text())) if forward else False
        tail = (queued.object, event.sender or "", record)
        if touch is None:
            return Row((*head, False, False, False, False, *tail), texts, None)
        return Row((*head, pack_touch(touch), _json(touch).decode(), day_of(touch.timestamp),
                    _ad_title(touch), *tail), texts, touch.source)

    async def write(self, rows: list[Row], step: Step) -> Outcome:
        """Write the rows (the lane's head, in order), take them off the lane and decide the
        lane's next step, in one atomic call fenced to the run that owns the lane. Raises
        LaneLost when that run no longer owns it."""
        next_id = f"{step.job_id.partition('~')[0]}~{os.urandom(4).hex()}"
        args = [
            keys.lane(step.lane), keys.lane_job(step.lane), step.job_id,
            retry_key_prefix + step.job_id, step.job_try,
            list(step.failed) if step.failed is not None else False,
            "handoff" if step.handoff else "more", next_id, step.lane, self._queue,
            int(time.time() * 1000),
            self._max_tries, keys.LANE_TRIES, keys.DEAD_LETTERS, job_key_prefix, JOB_TTL_MS,
            list(step.backoffs_ms) or [0],
            keys.forward_lane(step.lane), keys.forward_job(step.lane),
            f"fwd-{os.urandom(6).hex()}-{step.lane}", keys.STEPS, os.urandom(8).hex(),
        ]
        head = command(b"LRANGE", keys.lane(step.lane).encode(), b"0", self._last_index)
        client = self._clients.take()
        try:
            reply, following = await call(
                client, self._sha, EFFECTS_LUA,
                [*self._header, _pack(list(chain.from_iterable([r.values for r in rows]))),
                 _pack(args)],
                [r.texts for r in rows], 2 * len(rows), then=head)
        except ResponseError as exc:
            if str(exc).startswith("LANELOST"):
                raise LaneLost(str(exc)) from None
            raise
        finally:
            self._clients.give(client)
        codes = [int(c) for c in reply[0]]
        for kind, n in Counter(row.values[1] for row in rows[:len(codes)]).items():
            metrics.count_processed(kind, n)
        for code, row in zip(codes, rows, strict=False):
            if code >= NEW_USER:
                metrics.count_touch(row.source, code == RETURNING_USER)
        status = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        if len(reply) > 3 and reply[3]:
            log.warning("the report's counters of a step were not written",
                        extra={"lane": step.lane, "error": _text_of(reply[3])})
        return Outcome(codes, status, int(reply[2]), following if status.endswith("more") else [])

    async def aclose(self) -> None:
        await self._clients.aclose()
