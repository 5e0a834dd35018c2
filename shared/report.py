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
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, Final

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

READ_BUDGET: Final = 2_000
"""Sorted-set entries one pipelined read asks for at most: decoding and adding up that many
takes a few ms of the ingest's event loop, and webhook answers wait no longer than that."""

MERGE_KEYS: Final = 8
"""HyperLogLogs merged per call: PFCOUNT of 800 full ones takes Redis 40 ms in one command,
every webhook waiting; 8 take under half a ms."""

SCRATCH_TTL_MS: Final = 60_000


class ReportRangeError(ValueError):
    """A `from`/`to` pair that is not two dates in order, at most MAX_DAYS apart."""


class Counts(msgspec.Struct):
    """Users of one row on one day: new, and returning."""

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


class DayCounts(msgspec.Struct):
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
    largest first (0, or more than MAX_LIMIT: MAX_LIMIT)."""
    days = [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
    depth = min(limit, MAX_LIMIT) if limit > 0 else MAX_LIMIT
    daily, candidates, sizes = await _read_days(redis, days, depth)
    totals = Totals(new=sum(d.new for d in daily), touches=sum(d.touches for d in daily),
                    user_days=sum(d.new + d.returning for d in daily))
    totals.returning, totals.users = await _distinct_users(redis, days)
    chosen = {dim: _top(candidates[dim], depth) for dim in DIMENSIONS}
    rows = await _read_rows(redis, days, chosen)
    ranked = {dim: sorted(rows[dim], key=lambda r: (-(r.new + r.returning), r.key))
              for dim in DIMENSIONS}
    for dim in DIMENSIONS:
        for row in ranked[dim]:
            row.label = _label(dim, row.key)
            if totals.user_days:
                row.share = round((row.new + row.returning) / totals.user_days, 4)
    await _add_titles(redis, ranked["ad"])
    omitted = {dim: max(len(candidates[dim]), sizes[dim]) - len(chosen[dim])
               for dim in DIMENSIONS}
    return Report(
        start=days[0], to=days[-1], days=days, totals=totals, daily=daily,
        source=ranked["source"], ref=ranked["ref"], ad=ranked["ad"], omitted=omitted,
    )


def _label(dimension: str, key: str) -> str:
    return SOURCE_NAMES.get(key, key) if dimension == "source" else key


def sent_value(row: Row) -> str | None:
    """The value Facebook sent, to show beside a row's readable name when the two differ (none
    for the stand-ins NO_SOURCE and SHOPS_PRODUCT)."""
    if row.key in (NO_SOURCE, SHOPS_PRODUCT) or row.key == row.label:
        return None
    return row.key


def _chunks(days: Sequence[str], per_day: int) -> Iterator[Sequence[str]]:
    """The days in groups whose reads ask for about READ_BUDGET entries (one day at least)."""
    size = max(1, READ_BUDGET // max(1, per_day))
    for i in range(0, len(days), size):
        yield days[i:i + size]


async def _read_days(redis: Redis, days: list[str], depth: int,
                     ) -> tuple[list[DayCounts], dict[str, dict[str, int]], dict[str, int]]:
    """Each day's totals and its `depth` largest rows per dimension: the days' counts, each
    dimension's candidate rows with their partial sums, and each dimension's most rows in a day.
    A row that never makes a day's top `depth` is not a candidate (see docs/report.md)."""
    daily: list[DayCounts] = []
    candidates: dict[str, dict[str, int]] = {dim: {} for dim in DIMENSIONS}
    sizes = dict.fromkeys(DIMENSIONS, 0)
    for group in _chunks(days, depth * len(DIMENSIONS)):
        async with redis.pipeline(transaction=False) as pipe:
            for day in group:
                pipe.hmget(keys.report_day(day, "n"), ["new", "ret", "touches"])
                for dim in DIMENSIONS:
                    pipe.zrevrange(keys.report_day(day, dim), 0, depth - 1, withscores=True)
                    pipe.zcard(keys.report_day(day, dim))
            replies: list[Any] = await pipe.execute()
        per_day = 1 + 2 * len(DIMENSIONS)
        for n, day in enumerate(group):
            reply = replies[n * per_day:(n + 1) * per_day]
            new, returning, touches = (int(v or 0) for v in reply[0])
            daily.append(DayCounts(day, new, returning, touches))
            for d, dim in enumerate(DIMENSIONS):
                sums = candidates[dim]
                for member, score in reply[1 + 2 * d]:
                    key = member.decode(errors="replace")
                    sums[key] = sums.get(key, 0) + int(score)
                sizes[dim] = max(sizes[dim], int(reply[2 + 2 * d]))
    return daily, candidates, sizes


def _top(sums: dict[str, int], depth: int) -> list[str]:
    return sorted(sums, key=lambda k: (-sums[k], k))[:depth]


async def _read_rows(redis: Redis, days: list[str], chosen: dict[str, list[str]],
                     ) -> dict[str, list[Row]]:
    """The chosen rows' exact counts on every day of the range."""
    rows = {dim: {key: Row(key) for key in chosen[dim]} for dim in DIMENSIONS}
    asked = [(dim, chosen[dim]) for dim in DIMENSIONS if chosen[dim]]
    width = sum(len(members) for _, members in asked)
    for group in _chunks(days, 2 * width):
        if not asked:
            break
        async with redis.pipeline(transaction=False) as pipe:
            for day in group:
                for dim, members in asked:
                    pipe.zmscore(keys.report_day(day, dim), members)
                    pipe.zmscore(keys.report_day(day, f"{dim}:new"), members)
            replies: list[Any] = await pipe.execute()
        at = 0
        for day in group:
            for dim, members in asked:
                users, new = replies[at], replies[at + 1]
                at += 2
                for key, u, n in zip(members, users, new, strict=True):
                    if u:
                        row, cell = rows[dim][key], Counts(int(n or 0), int(u) - int(n or 0))
                        row.days[day] = cell
                        row.new += cell.new
                        row.returning += cell.returning
    return {dim: list(rows[dim].values()) for dim in DIMENSIONS}


async def _distinct_users(redis: Redis, days: list[str]) -> tuple[int, int]:
    """Users counted returning on some day of the range, and users counted at all: unions of the
    days' HyperLogLogs, merged MERGE_KEYS at a time into a scratch key (one round trip each, so
    that webhook calls get their turn in between)."""
    returning = [keys.report_day(day, "ret") for day in days]
    new = [keys.report_day(day, "new") for day in days]
    if len(returning) + len(new) <= MERGE_KEYS:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.pfcount(*returning)
            pipe.pfcount(*returning, *new)
            counts: list[int] = await pipe.execute()
        return counts[0], counts[1]
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
