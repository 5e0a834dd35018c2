"""Writes the built-in outputs of processed events in one atomic Lua call per job."""

from __future__ import annotations

from importlib import resources

import msgspec
from redis.asyncio import Redis

from shared import keys
from shared.attribution import encode_touch, touch_dict
from shared.events import Event
from shared.report import RETENTION_DAYS, day_of
from shared.settings import Settings
from workers import metrics
from workers.touches import touch_of

EFFECTS_LUA = resources.files("workers").joinpath("effects.lua").read_text()

SKIPPED, WRITTEN, NEW_USER, RETURNING_USER = 0, 1, 2, 3

_json = msgspec.json.Encoder().encode


class Effects:
    """Stream entries, attribution touches and referral notifications, exactly once in effect."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(EFFECTS_LUA)
        self._header = (
            settings.dedupe_ttl_s, settings.stream_maxlen, settings.history_cap,
            keys.REFERRALS_STREAM, keys.REPORT_ADS, RETENTION_DAYS * 86400,
        )

    async def write(self, events: list[Event]) -> list[int]:
        """One code per event: SKIPPED (already done), WRITTEN, NEW_USER or RETURNING_USER."""
        if not events:
            return []
        args: list[str | int | bytes] = list(self._header)
        sources: list[str | None] = []
        for event in events:
            touch = touch_of(event)
            sender = event.sender or ""
            args += (
                keys.seen(event.id), keys.stream(event.kind), event.id, event.kind,
                event.channel, event.page_id or "", sender, event.timestamp, _json(event),
            )
            if touch is None:
                args += ("", "", "", "")
                sources.append(None)
            else:
                args += (keys.attribution(sender), encode_touch(touch), _json(touch_dict(touch)),
                         keys.report_day(day_of(touch.timestamp)))
                sources.append(touch.source)
        codes = [int(c) for c in await self._script(args=args)]
        for code, source in zip(codes, sources, strict=True):
            if code >= NEW_USER:
                metrics.count_touch(source, code == RETURNING_USER)
        return codes
