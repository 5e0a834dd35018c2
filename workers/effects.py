"""Writes the built-in outputs of processed events in one atomic Lua call per job."""

from __future__ import annotations

from importlib import resources
from typing import Any, NamedTuple

import msgspec
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from shared import keys
from shared.attribution import POSITIONS, Touch, pack_touch, touch_dict
from shared.codec import QueuedEvent
from shared.events import Event
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
    return text.replace("= POSITIONS\n", f"= {positions}\n", 1)


EFFECTS_LUA = _load_script()

SKIPPED, WRITTEN, NEW_USER, RETURNING_USER = 0, 1, 2, 3

_json = msgspec.json.Encoder().encode
_pack = msgspec.msgpack.Encoder().encode


def _text(value: Any) -> str:
    """JSON as str: Redis's Lua MessagePack decoder knows str but not bin."""
    return _json(value).decode()


def _ad_title(touch: Touch) -> str | bool:
    """The ad's title for the report, or false (Lua's "none")."""
    title = (touch.ads_context_data or {}).get("ad_title")
    return title if isinstance(title, str) and title else False


class Row(NamedTuple):
    """One event's arguments to effects.lua, and its touch's source (for the metrics)."""

    values: tuple[Any, ...]
    source: str | None

    @property
    def id(self) -> str:
        """The event's id."""
        return str(self.values[0])


class JobEnd:
    """The run of an arq job whose events these are: its try, and the keys arq deletes when the
    job finishes (`Worker.finish_job` with no result kept)."""

    __slots__ = ("args", "job_id")

    def __init__(self, job_id: str, queue_name: str, job_try: int) -> None:
        self.job_id = job_id
        self.args = (job_try, in_progress_key_prefix + job_id, retry_key_prefix + job_id,
                     job_key_prefix + job_id, queue_name, abort_jobs_ss, job_id)


class Effects:
    """Stream entries, attribution touches and referral notifications, exactly once in effect."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(EFFECTS_LUA)
        self._clients = Pinned(redis)
        self._header = (
            settings.dedupe_ttl_s, settings.stream_maxlen, settings.history_cap,
            keys.REFERRALS_STREAM, keys.REPORT_ADS, RETENTION_DAYS * 86400,
            keys.SEEN_PREFIX, keys.STREAM_PREFIX, keys.ATTR_PREFIX, keys.REPORT_PREFIX,
        )

    @staticmethod
    def row(event: Event, queued: QueuedEvent) -> Row:
        """What effects.lua writes for one event. Raises if the event cannot be encoded: the
        caller then fails that event alone."""
        touch = touch_of(event, queued.received_ms)
        head = (event.id, event.kind, event.channel, event.page_id or "", event.user or "",
                event.timestamp, _text(event))
        tail = (queued.object, event.sender or "", queued.raw_text())
        if touch is None:
            return Row((*head, False, False, False, False, *tail), None)
        return Row((*head, pack_touch(touch), _text(touch_dict(touch)), day_of(touch.timestamp),
                    _ad_title(touch), *tail), touch.source)

    async def write(self, rows: list[Row], end: JobEnd | None = None) -> list[int]:
        """One code per row: SKIPPED (already done), WRITTEN, NEW_USER or RETURNING_USER.
        With `end`, the arq job is ended in the same atomic call (and on its lone first run no
        done marks are read or written: see workers/effects.lua)."""
        if not rows and end is None:
            return []
        tail = end.args if end is not None else (0,)
        client = self._clients.take()
        try:
            reply = await self._script(
                args=[*self._header, _pack([r.values for r in rows]), *tail], client=client)
        finally:
            self._clients.give(client)
        codes = [int(c) for c in reply]
        for code, row in zip(codes, rows, strict=True):
            if code >= NEW_USER:
                metrics.count_touch(row.source, code == RETURNING_USER)
        return codes

    async def aclose(self) -> None:
        await self._clients.aclose()
