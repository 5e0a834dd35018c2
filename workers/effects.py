"""Writes the built-in outputs of processed events in one atomic Lua call per job."""

from __future__ import annotations

from importlib import resources
from typing import Any

import msgspec
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from shared import keys
from shared.attribution import Touch, pack_touch, touch_dict
from shared.events import Event
from shared.pinned import Pinned
from shared.report import RETENTION_DAYS, day_of
from shared.settings import Settings
from workers import metrics
from workers.touches import touch_of

EFFECTS_LUA = resources.files("workers").joinpath("effects.lua").read_text()

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

    async def write(self, events: list[Event], end: JobEnd | None = None) -> list[int]:
        """One code per event: SKIPPED (already done), WRITTEN, NEW_USER or RETURNING_USER.
        With `end`, the arq job is ended in the same atomic call (and on its lone first run no
        done marks are read or written: see workers/effects.lua)."""
        if not events and end is None:
            return []
        rows: list[tuple[Any, ...]] = []
        sources: list[str | None] = []
        for event in events:
            touch = touch_of(event)
            head = (event.id, event.kind, event.channel, event.page_id or "", event.sender or "",
                    event.timestamp, _text(event))
            if touch is None:
                rows.append((*head, False, False, False, False))
                sources.append(None)
            else:
                rows.append((*head, pack_touch(touch), _text(touch_dict(touch)),
                             day_of(touch.timestamp), _ad_title(touch)))
                sources.append(touch.source)
        tail = end.args if end is not None else (0,)
        client = self._clients.take()
        try:
            reply = await self._script(args=[*self._header, _pack(rows), *tail], client=client)
        finally:
            self._clients.give(client)
        codes = [int(c) for c in reply]
        for code, source in zip(codes, sources, strict=True):
            if code >= NEW_USER:
                metrics.count_touch(source, code == RETURNING_USER)
        return codes

    async def aclose(self) -> None:
        await self._clients.aclose()
