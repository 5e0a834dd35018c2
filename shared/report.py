"""The attribution report: users per day, new and returning, by source, by ref and by ad.

Workers count at write time (workers/effects.lua), per UTC day of the touch's timestamp. A user
counts once per day: as new on the day of their first touch ever, else as returning, under the
source, ref and ad of their first touch that day. The keys of a day (`keys.report_day`):

    n           a hash: `new` and `ret` users and `touches`, exact
    new, ret    HyperLogLogs of the users counted new, and returning, that day
    <dimension> a sorted set: row -> users that day (new and returning); source, ref or ad
    <dim>:new   a sorted set: row -> new users that day

A report does work bounded by the rows it shows, not by how many rows exist: each day's totals,
each day's top rows, then the chosen rows' counts on every day, in pipelines of a bounded size;
the HyperLogLogs are merged a few at a time. The API (`GET /report`) and the command-line tools
call `build_report`; docs/report.md says what is exact and what is approximate.
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
import re
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar

import msgspec
from redis.asyncio import Redis

from shared import keys

RETENTION_DAYS: Final = 400
"""A day's counts expire this many days after the day ends (the ad titles are kept)."""

DEFAULT_DAYS: Final = 30
MAX_DAYS: Final = RETENTION_DAYS + 1
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500
"""Rows per dimension at most (and what `limit=0` asks for): the work is bounded by the rows."""
MAX_CELLS: Final = 20_000
"""Rows x days per dimension at most: over a long range fewer rows are shown (never fewer than
DEFAULT_LIMIT), so that the largest report stays well under a second."""

DIMENSIONS: Final = ("source", "ref", "ad")
NO_SOURCE: Final = ""
"""The `source` key of touches whose referral named no source (and no Shops product)."""
SHOPS_PRODUCT: Final = "(shops product)"
"""The `source` key of Shops product arrivals (`message.referral` with `product.id` and no
`source`); workers/effects.lua writes the same string."""

SOURCE_NAMES: Final = {
    "SHORTLINK": "m.me link", "SHORT-URL": "m.me link", "ADS": "Ad",
    "CUSTOMER_CHAT_PLUGIN": "Chat plugin", "MESSENGER_CODE": "Messenger code",
    "DISCOVER_TAB": "Discover tab", SHOPS_PRODUCT: "Shops product", NO_SOURCE: "No source",
}
"""Readable names of the sources Facebook sends (other values are shown as they are)."""

READ_BUDGET: Final = 500
"""Entries one pipelined read asks for, about: decoding and adding up its answer holds the
ingest's event loop for a ms or two, and webhook answers are handled between two reads."""

CANDIDATES: Final = 5_000
"""Candidate rows per dimension at most: each day's top `limit` rows, fewer per day over a long
range (at least MIN_DEPTH), so that picking the rows shown stays a step of a few ms."""
MIN_DEPTH: Final = 10

MERGE_KEYS: Final = 8
"""HyperLogLogs merged per call: PFCOUNT of 800 full ones takes Redis 40 ms in one command,
every webhook waiting; 8 take about half a ms."""

SCRATCH_TTL_MS: Final = 60_000


class ReportRangeError(ValueError):
    """A `from`/`to` pair that is not two dates in order, at most MAX_DAYS apart."""


class Counts(msgspec.Struct, gc=False):
    """Users of one row on one day: new, and returning. (Numbers only, so not tracked by the
    garbage collector: a large report makes tens of thousands, and each collection pass that
    scans them holds the event loop.)"""

    new: int = 0
    returning: int = 0


class Totals(msgspec.Struct):
    """The range's users. `new` and `touches` are exact; `returning` (users counted returning on
    some day of the range) and `users` (distinct users) merge the days' HyperLogLogs (about 0.81%
    standard error). `user_days` adds each day's users: what the rows add up to."""

    new: int = 0
    returning: int = 0
    users: int = 0
    touches: int = 0
    user_days: int = 0


class DayCounts(msgspec.Struct, gc=False):
    """One day's users (exact): new, returning, and the referral touches that day."""

    day: str
    new: int = 0
    returning: int = 0
    touches: int = 0


class Row(msgspec.Struct):
    """One source, ref or ad: its users over the range, added up day by day (a user who comes
    back on three days counts three times), and per day (days with none are left out)."""

    key: str
    """The value as Facebook sent it (for sources, SHOPS_PRODUCT and NO_SOURCE stand in)."""
    label: str = ""
    """A readable name: "m.me link" for SHORTLINK; the key itself when there is none."""
    new: int = 0
    returning: int = 0
    share: float = 0.0
    """The row's part of the range's user-days (`Totals.user_days`), 0 to 1."""
    days: dict[str, Counts] = {}
    title: str | None = None
    """The ad's title (from `ads_context_data.ad_title`), ads only."""


class Report(msgspec.Struct, rename={"start": "from"}):
    start: str
    to: str
    days: list[str]
    totals: Totals
    daily: list[DayCounts]
    source: list[Row]
    ref: list[Row]
    ad: list[Row]
    omitted: dict[str, int]
    """Rows left out of each dimension by the row limit, at least this many (the totals still
    count them)."""
    limit: int = DEFAULT_LIMIT
    """The rows per dimension this report shows at most: as asked, within MAX_LIMIT and
    MAX_CELLS."""


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


_YYYY_MM_DD = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _date(text: str) -> dt.date:
    """A date written YYYY-MM-DD, and only so (`fromisoformat` also takes `2026-W48-1` and
    `20261201`, which the error message says are not dates here)."""
    if not _YYYY_MM_DD.fullmatch(text):
        raise ValueError(text)
    return dt.date.fromisoformat(text)


def parse_range(start: str | None, end: str | None, today: dt.date | None = None,
                ) -> tuple[dt.date, dt.date]:
    """The inclusive date range of `from` and `to` (YYYY-MM-DD); by default the last 30 days
    up to today (UTC). Raises ReportRangeError with a message fit for a 400 answer."""
    try:
        last = _date(end) if end else (today or utc_today())
        first = _date(start) if start else last - dt.timedelta(days=DEFAULT_DAYS - 1)
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
    largest first (0: MAX_LIMIT; fewer over a long range, see MAX_CELLS)."""
    days = [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
    shown = min(limit, most_rows(len(days))) if limit > 0 else most_rows(len(days))
    depth = min(shown, max(MIN_DEPTH, CANDIDATES // len(days)))
    daily, candidates, sizes = await _read_days(redis, days, depth)
    totals = Totals(new=sum(d.new for d in daily), touches=sum(d.touches for d in daily),
                    user_days=sum(d.new + d.returning for d in daily))
    totals.returning, totals.users = await _distinct_users(
        redis, [d.day for d in daily if d.returning], [d.day for d in daily if d.new])
    chosen = {dim: _top(candidates[dim], shown) for dim in DIMENSIONS}
    counted = [d.day for d in daily if d.new or d.returning]
    rows = await _read_rows(redis, counted, chosen)
    for dim in DIMENSIONS:
        rows[dim].sort(key=lambda r: (-(r.new + r.returning), r.key))
        for row in rows[dim]:
            row.label = _label(dim, row.key)
            if totals.user_days:
                row.share = round((row.new + row.returning) / totals.user_days, 4)
    await _add_titles(redis, rows["ad"])
    omitted = {dim: max(len(candidates[dim]), sizes[dim]) - len(chosen[dim])
               for dim in DIMENSIONS}
    return Report(
        start=days[0], to=days[-1], days=days, totals=totals, daily=daily,
        source=rows["source"], ref=rows["ref"], ad=rows["ad"], omitted=omitted, limit=shown,
    )


def most_rows(days: int) -> int:
    """The most rows per dimension a report of `days` days shows (MAX_LIMIT, MAX_CELLS)."""
    return min(MAX_LIMIT, max(DEFAULT_LIMIT, MAX_CELLS // days))


def _label(dimension: str, key: str) -> str:
    return SOURCE_NAMES.get(key, key) if dimension == "source" else key


def sent_value(row: Row) -> str | None:
    """The value Facebook sent, to show beside a row's readable name when the two differ (none
    for the stand-ins NO_SOURCE and SHOPS_PRODUCT)."""
    if row.key in (NO_SOURCE, SHOPS_PRODUCT) or row.key == row.label:
        return None
    return row.key


_Unit = TypeVar("_Unit")


async def _batched(redis: Redis, units: list[_Unit], entries: Callable[[_Unit], int],
                   queue: Callable[[Any, _Unit], int]) -> AsyncIterator[tuple[_Unit, list[Any]]]:
    """Each unit with its replies. `queue(pipe, unit)` adds a unit's commands to a pipeline and
    says how many; units go in pipelines asking for about READ_BUDGET entries (`entries(unit)`),
    one round trip each, and the caller handles a pipeline's replies before the next is sent.
    (Sleeping after each for as long as it took, to leave webhooks the loop, made acks slower
    in `python -m bench.report_cost`: p50 7.2 ms against 4.2 ms while reports ran back to back;
    each sleep hands the process's CPU to others.)"""
    start = 0
    while start < len(units):
        end, asked = start + 1, entries(units[start])
        while end < len(units) and asked + entries(units[end]) <= READ_BUDGET:
            asked += entries(units[end])
            end += 1
        async with redis.pipeline(transaction=False) as pipe:
            counts = [queue(pipe, unit) for unit in units[start:end]]
            replies: list[Any] = await pipe.execute()
        at = 0
        for unit, count in zip(units[start:end], counts, strict=True):
            yield unit, replies[at:at + count]
            at += count
        start = end


async def _read_days(redis: Redis, days: list[str], depth: int,
                     ) -> tuple[list[DayCounts], dict[str, dict[str, int]], dict[str, int]]:
    """Each day's totals, then, for the days with users, its `depth` largest rows per dimension:
    the days' counts, each dimension's candidate rows with their partial sums, and each
    dimension's most rows in a day. A row that never makes a day's top `depth` is not a
    candidate (see docs/report.md)."""
    daily: list[DayCounts] = []

    def queue_totals(pipe: Any, day: str) -> int:
        pipe.hmget(keys.report_day(day, "n"), ["new", "ret", "touches"])
        return 1

    async for day, (reply,) in _batched(redis, days, lambda _: 3, queue_totals):
        new, returning, touches = (int(v or 0) for v in reply)
        daily.append(DayCounts(day, new, returning, touches))

    candidates: dict[str, dict[str, int]] = {dim: {} for dim in DIMENSIONS}
    sizes = dict.fromkeys(DIMENSIONS, 0)

    def queue_top(pipe: Any, unit: tuple[str, str]) -> int:
        day, dim = unit
        pipe.zrevrange(keys.report_day(day, dim), 0, depth - 1, withscores=True)
        pipe.zcard(keys.report_day(day, dim))
        return 2

    units = [(d.day, dim) for d in daily if d.new or d.returning for dim in DIMENSIONS]
    async for (_, dim), (top, size) in _batched(redis, units, lambda _: depth, queue_top):
        sums = candidates[dim]
        for member, score in top:
            key = member.decode(errors="replace")
            sums[key] = sums.get(key, 0) + int(score)
        sizes[dim] = max(sizes[dim], int(size))
    return daily, candidates, sizes


def _top(sums: dict[str, int], shown: int) -> list[str]:
    """The `shown` keys of largest sums (ties: by key), without sorting them all."""
    return [k for k, _ in heapq.nsmallest(shown, sums.items(), key=lambda kv: (-kv[1], kv[0]))]


async def _read_rows(redis: Redis, days: list[str], chosen: dict[str, list[str]],
                     ) -> dict[str, list[Row]]:
    """The chosen rows' exact counts on every day of the range."""
    rows = {dim: {key: Row(key) for key in chosen[dim]} for dim in DIMENSIONS}
    step = READ_BUDGET // 2
    units = [(day, dim, chosen[dim][i:i + step]) for day in days for dim in DIMENSIONS
             for i in range(0, len(chosen[dim]), step)]

    def queue(pipe: Any, unit: tuple[str, str, list[str]]) -> int:
        day, dim, members = unit
        pipe.zmscore(keys.report_day(day, dim), members)
        pipe.zmscore(keys.report_day(day, f"{dim}:new"), members)
        return 2

    async for (day, dim, members), (users, new) in _batched(
            redis, units, lambda u: 2 * len(u[2]), queue):
        for key, u, n in zip(members, users, new, strict=True):
            if u:
                row, cell = rows[dim][key], Counts(int(n or 0), int(u) - int(n or 0))
                row.days[day] = cell
                row.new += cell.new
                row.returning += cell.returning
    return {dim: list(rows[dim].values()) for dim in DIMENSIONS}


async def _distinct_users(redis: Redis, returning_days: list[str], new_days: list[str],
                          ) -> tuple[int, int]:
    """Users counted returning on some day of the range, and users counted at all: unions of the
    HyperLogLogs of the days that have any, merged MERGE_KEYS at a time into a scratch key (one
    round trip each, so that webhook calls get their turn in between)."""
    returning = [keys.report_day(day, "ret") for day in returning_days]
    new = [keys.report_day(day, "new") for day in new_days]
    if len(returning) + len(new) <= MERGE_KEYS:
        return await _count(redis, returning), await _count(redis, [*returning, *new])
    scratch = keys.REPORT_SCRATCH + secrets.token_hex(8)
    found: list[int] = []
    try:
        for group in (returning, new):
            for i in range(0, len(group), MERGE_KEYS):
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.pfmerge(scratch, *group[i:i + MERGE_KEYS])
                    pipe.pexpire(scratch, SCRATCH_TTL_MS)
                    await pipe.execute()
            found.append(int(await redis.pfcount(scratch)))
    finally:
        await redis.delete(scratch)
    return found[0], found[1]


async def _count(redis: Redis, hyperloglogs: list[str]) -> int:
    return int(await redis.pfcount(*hyperloglogs)) if hyperloglogs else 0


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
