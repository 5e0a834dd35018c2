"""The attribution report: new and returning users per day, by source, by ref and by ad.

Workers count every referral touch at write time (workers/effects.lua) in one hash per UTC day,
`fb:report:<YYYY-MM-DD>`, with fields `<side>|<dimension>|<value>`: side `new` (the user's first
touch) or `ret` (a returning user), dimension `source`, `ref` or `ad`. Building a report reads one
hash per day of the range; the API (`GET /report`) and command-line tools call `build_report`.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Final

import msgspec
from redis.asyncio import Redis

from shared import keys

RETENTION_DAYS: Final = 400
"""A day's counts expire this many days after the day ends (the ad titles are kept)."""

DEFAULT_DAYS: Final = 30
MAX_DAYS: Final = RETENTION_DAYS + 1
DEFAULT_LIMIT: Final = 50
DIMENSIONS: Final = ("source", "ref", "ad")
NO_SOURCE: Final = ""
"""The `source` key of touches whose referral named no source."""


class ReportRangeError(ValueError):
    """A `from`/`to` pair that is not two dates in order, at most MAX_DAYS apart."""


class Counts(msgspec.Struct):
    new: int = 0
    returning: int = 0


class DayCounts(msgspec.Struct):
    day: str
    new: int = 0
    returning: int = 0


class Row(msgspec.Struct):
    """One source, ref or ad: its totals over the range and its counts per day (days with none
    are left out)."""

    key: str
    new: int = 0
    returning: int = 0
    days: dict[str, Counts] = {}
    title: str | None = None
    """The ad's title (from `ads_context_data.ad_title`), ads only."""


class Report(msgspec.Struct, rename={"start": "from"}):
    start: str
    to: str
    days: list[str]
    totals: Counts
    daily: list[DayCounts]
    source: list[Row]
    ref: list[Row]
    ad: list[Row]
    omitted: dict[str, int]
    """Rows left out of each dimension by the row limit (the totals still count them)."""


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def parse_range(start: str | None, end: str | None, today: dt.date | None = None,
                ) -> tuple[dt.date, dt.date]:
    """The inclusive date range of `from` and `to` (YYYY-MM-DD); by default the last 30 days
    up to today (UTC). Raises ReportRangeError with a message fit for a 400 answer."""
    try:
        last = dt.date.fromisoformat(end) if end else (today or utc_today())
        first = (dt.date.fromisoformat(start) if start
                 else last - dt.timedelta(days=DEFAULT_DAYS - 1))
    except ValueError:
        raise ReportRangeError("from and to must be dates written YYYY-MM-DD") from None
    except OverflowError:  # the default `from` would fall before 0001-01-01
        raise ReportRangeError(
            f"without from, to must be at least {DEFAULT_DAYS - 1} days after 0001-01-01",
        ) from None
    if first > last:
        raise ReportRangeError("from must not be after to")
    if (last - first).days >= MAX_DAYS:
        raise ReportRangeError(f"the range must not exceed {MAX_DAYS} days")
    return first, last


def day_of(timestamp_ms: int) -> str:
    """The UTC day of a timestamp in ms, YYYY-MM-DD: the day a touch is counted on."""
    return _day(timestamp_ms // 86_400_000)


@functools.lru_cache(maxsize=1024)
def _day(days_since_epoch: int) -> str:
    return (_EPOCH + dt.timedelta(days=days_since_epoch)).isoformat()


_EPOCH = dt.date(1970, 1, 1)


async def build_report(redis: Redis, first: dt.date, last: dt.date,
                       limit: int = DEFAULT_LIMIT) -> Report:
    """The report for the days `first` to `last` inclusive; `limit` rows per dimension at most,
    largest first (0: no limit)."""
    days = [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
    async with redis.pipeline(transaction=False) as pipe:
        for day in days:
            pipe.hgetall(keys.report_day(day))
        hashes: list[dict[bytes, bytes]] = await pipe.execute()
    rows: dict[str, dict[str, Row]] = {dim: {} for dim in DIMENSIONS}
    daily = [DayCounts(day) for day in days]
    totals = Counts()
    for counts, fields in zip(daily, hashes, strict=True):
        _tally(rows, counts, fields)
        totals.new += counts.new
        totals.returning += counts.returning
    ranked = {dim: _ranked(rows[dim]) for dim in DIMENSIONS}
    omitted = {dim: max(0, len(ranked[dim]) - limit) if limit else 0 for dim in DIMENSIONS}
    if limit:
        ranked = {dim: ranked[dim][:limit] for dim in DIMENSIONS}
    await _add_titles(redis, ranked["ad"])
    return Report(
        start=days[0], to=days[-1], days=days, totals=totals, daily=daily,
        source=ranked["source"], ref=ranked["ref"], ad=ranked["ad"], omitted=omitted,
    )


def _tally(rows: dict[str, dict[str, Row]], counts: DayCounts, fields: dict[bytes, bytes]) -> None:
    """Add one day's hash to the rows and to the day's counts."""
    for field, raw in fields.items():
        side, _, rest = field.decode(errors="replace").partition("|")
        dim, _, key = rest.partition("|")
        by_key = rows.get(dim)
        if by_key is None or side not in ("new", "ret"):
            continue
        row = by_key.get(key)
        if row is None:
            row = by_key[key] = Row(key)
        cell = row.days.get(counts.day)
        if cell is None:
            cell = row.days[counts.day] = Counts()
        n = int(raw)
        target = counts if dim == "source" else None  # one source field per touch: the total
        if side == "new":
            row.new += n
            cell.new += n
            if target is not None:
                target.new += n
        else:
            row.returning += n
            cell.returning += n
            if target is not None:
                target.returning += n


def _ranked(rows: dict[str, Row]) -> list[Row]:
    return sorted(rows.values(), key=lambda r: (-(r.new + r.returning), r.key))


async def _add_titles(redis: Redis, ads: list[Row]) -> None:
    if not ads:
        return
    titles: list[bytes | None] = await redis.hmget(  # type: ignore[misc]
        keys.REPORT_ADS, [row.key for row in ads],
    )
    for row, title in zip(ads, titles, strict=True):
        if title is not None:
            row.title = title.decode(errors="replace")


encode_report = msgspec.json.Encoder().encode
