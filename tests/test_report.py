"""The attribution report: users counted by the workers, read by GET /report(.json) with work
bounded by the rows shown, the page rendered by a real headless browser, and the CSV export."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from shared import keys
from shared.report import SHOPS_PRODUCT, ReportRangeError, build_report, parse_range
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import API_TOKEN, Post
from workers.effects import NEW_USER, RETURNING_USER, Effects, LaneLost, Step

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
TODAY = dt.datetime.now(dt.UTC).date()
D1, D2, D3 = (TODAY - dt.timedelta(days=n) for n in (2, 1, 0))


def at(day: dt.date, hour: int = 12, minute: int = 0) -> int:
    """A timestamp in ms at `hour`:`minute` UTC on `day`."""
    moment = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def referral(user: str, ts: int, **ref: Any) -> dict[str, Any]:
    return {"sender": {"id": user}, "recipient": {"id": "PAGE1"}, "timestamp": ts,
            "referral": {"type": "OPEN_THREAD", **ref}}


def shops(user: str, ts: int, product: str) -> dict[str, Any]:
    """A message sent from a Facebook Shops product page: a referral with no source."""
    return {"sender": {"id": user}, "recipient": {"id": "PAGE1"}, "timestamp": ts,
            "message": {"mid": f"mid.{user}.{ts}", "text": "is it in stock?",
                        "referral": {"product": {"id": product}}}}


def body(*items: dict[str, Any]) -> dict[str, Any]:
    return {"object": "page", "entry": [{"id": "PAGE1", "time": 1, "messaging": list(items)}]}


AD = {"source": "ADS", "ad_id": "6045246247433", "ref": "pb",
      "ads_context_data": {"ad_title": "Chunky peanut butter", "photo_url": "x"}}
DOGS = {"source": "SHORTLINK", "ref": "dogs"}

SCENARIO = [
    # day 1: alice and bob arrive through the same ad (both new)
    referral("alice", at(D1, 9), **AD),
    referral("bob", at(D1, 13), **AD),
    # day 2: alice comes back three times (returning once, under her first touch of the day:
    # the m.me link); carol is new through the link and back through the ad the same day (new
    # once); dave arrives through the chat plugin with no ref (new)
    referral("alice", at(D2, 8), **DOGS),
    referral("alice", at(D2, 9), **DOGS),
    referral("alice", at(D2, 10), **AD),
    referral("carol", at(D2, 1), **DOGS),
    referral("carol", at(D2, 2), **AD),
    referral("dave", at(D2, 23), source="CUSTOMER_CHAT_PLUGIN"),
    # day 3: bob comes back through the ad and alice through the link (both returning); erin's
    # referral names no source and frank writes from a Shops product page (both new)
    referral("bob", at(D3, 0), **AD),
    referral("erin", at(D3, 0, 5), ref="dogs"),
    shops("frank", at(D3, 0, 10), "P-42"),
    referral("alice", at(D3, 0, 15), **DOGS),
]

EXPECTED_DAILY = {D1.isoformat(): (2, 0, 2), D2.isoformat(): (2, 1, 6),
                  D3.isoformat(): (2, 2, 4)}
"""day -> (new users, returning users, referral touches)"""
EXPECTED_TOTALS = {"new": 6, "returning": 2, "users": 6, "touches": 12, "user_days": 9}
EXPECTED_SOURCE = {"ADS": (2, 1), "SHORTLINK": (1, 2), "CUSTOMER_CHAT_PLUGIN": (1, 0),
                   "": (1, 0), SHOPS_PRODUCT: (1, 0)}
EXPECTED_LABELS = {"ADS": "Ad", "SHORTLINK": "m.me link", "CUSTOMER_CHAT_PLUGIN": "Chat plugin",
                   "": "No source", SHOPS_PRODUCT: "Shops product"}
EXPECTED_REF = {"pb": (2, 1), "dogs": (2, 2)}
EXPECTED_AD = {"6045246247433": (2, 1)}


async def seed(post: Post, drain: Any) -> None:
    """The scenario, one webhook per touch, processed in order (new/returning follows it)."""
    for item in SCENARIO:
        assert (await post(body(item))).status == 200
        await drain()


def by_key(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {r["key"]: (r["new"], r["returning"]) for r in rows}


async def get_report(client: TestClient[Any, Any], **params: str) -> dict[str, Any]:
    resp = await client.get("/report.json", params=params, headers=AUTH)
    assert resp.status == 200, await resp.text()
    report: dict[str, Any] = await resp.json()
    return report


async def test_report_counts_each_user_once_a_day_new_or_returning_by_source_ref_and_ad(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    report = await get_report(client, **{"from": D1.isoformat(), "to": D3.isoformat()})
    assert report["from"] == D1.isoformat() and report["to"] == D3.isoformat()
    assert report["days"] == [D1.isoformat(), D2.isoformat(), D3.isoformat()]
    assert {d["day"]: (d["new"], d["returning"], d["touches"])
            for d in report["daily"]} == EXPECTED_DAILY
    # alice and bob came back on three days between them: two returning users over the range
    assert report["totals"] == EXPECTED_TOTALS
    assert by_key(report["source"]) == EXPECTED_SOURCE
    assert by_key(report["ref"]) == EXPECTED_REF
    assert by_key(report["ad"]) == EXPECTED_AD
    assert report["ad"][0]["title"] == "Chunky peanut butter"
    # per day, per key
    ads = report["source"][0]
    assert ads["key"] == "ADS"
    assert ads["days"] == {D1.isoformat(): {"new": 2, "returning": 0},
                           D3.isoformat(): {"new": 0, "returning": 1}}
    dogs = next(r for r in report["ref"] if r["key"] == "dogs")
    assert dogs["days"] == {D2.isoformat(): {"new": 1, "returning": 1},
                            D3.isoformat(): {"new": 1, "returning": 1}}
    assert report["omitted"] == {"source": 0, "ref": 0, "ad": 0}


async def test_rows_carry_readable_names_raw_keys_and_their_share_of_the_total(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    report = await get_report(client, **{"from": D1.isoformat(), "to": D3.isoformat()})
    assert {r["key"]: r["label"] for r in report["source"]} == EXPECTED_LABELS
    assert [r["key"] for r in report["source"]] == [
        "ADS", "SHORTLINK", "", SHOPS_PRODUCT, "CUSTOMER_CHAT_PLUGIN"]
    assert [r["share"] for r in report["source"]] == [0.3333, 0.3333, 0.1111, 0.1111, 0.1111]
    assert {r["key"]: r["share"] for r in report["ref"]} == {"pb": 0.3333, "dogs": 0.4444}
    assert {r["key"]: r["label"] for r in report["ref"]} == {"pb": "pb", "dogs": "dogs"}


async def effects_write(effects: Effects, items: list[tuple[str, dict[str, Any]]]) -> list[int]:
    """Write items as a worker would, one batch: (kind, item) pairs, ids from their position."""
    rows = [p.row(kind, f"h:{kind}:{item['sender']['id']}:{item['timestamp']}", "messaging",
                  "PAGE1", item["timestamp"], item) for kind, item in items]
    return await p.write(effects, effects.redis, rows)


async def test_a_user_back_three_times_in_a_day_counts_once_and_two_users_count_two(
    redis: Redis, settings: Settings,
) -> None:
    effects = Effects(redis, settings)
    day = D2.isoformat()
    # ana is new on D1; on D2 she comes back three times (two of them in one batch)
    assert await effects_write(effects, [("referral", referral("ana", at(D1), **DOGS))]) \
        == [NEW_USER]
    assert await effects_write(effects, [("referral", referral("ana", at(D2, 8), **DOGS))]) \
        == [RETURNING_USER]
    assert await effects_write(effects, [
        ("referral", referral("ana", at(D2, 9), **AD)),
        ("referral", referral("ana", at(D2, 10), **DOGS)),
    ]) == [RETURNING_USER, RETURNING_USER]
    report = await build_report(redis, D2, D2)
    assert (report.totals.new, report.totals.returning, report.totals.users) == (0, 1, 1)
    assert report.totals.touches == 3
    assert {r.key: (r.new, r.returning) for r in report.source} == {"SHORTLINK": (0, 1)}
    assert await redis.hgetall(keys.report_day(day, "n")) == {b"ret": b"1", b"touches": b"3"}
    assert await redis.pfcount(keys.report_day(day, "ret")) == 1

    # ben comes back on D2 too: two returning users
    await effects_write(effects, [("referral", referral("ben", at(D1), **AD)),
                                  ("referral", referral("ben", at(D2, 11), **AD))])
    report = await build_report(redis, D2, D2)
    assert (report.totals.new, report.totals.returning, report.totals.users) == (0, 2, 2)
    assert {r.key: (r.new, r.returning) for r in report.source} == {
        "SHORTLINK": (0, 1), "ADS": (0, 1)}
    # over both days: two new users, two returning, two users in all
    both = await build_report(redis, D1, D2)
    assert (both.totals.new, both.totals.returning, both.totals.users) == (2, 2, 2)
    assert [(d.new, d.returning) for d in both.daily] == [(2, 0), (0, 2)]
    await effects.aclose()


async def test_report_defaults_to_the_last_30_days_and_honours_the_range(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    resp = await client.get("/report", params={"format": "json"}, headers=AUTH)
    report = await resp.json()
    assert report["to"] == TODAY.isoformat()
    assert len(report["days"]) == 30
    assert report["totals"] == EXPECTED_TOTALS
    only_day_2 = await get_report(client, **{"from": D2.isoformat(), "to": D2.isoformat()})
    assert only_day_2["totals"] == {"new": 2, "returning": 1, "users": 3, "touches": 6,
                                    "user_days": 3}
    assert by_key(only_day_2["ad"]) == {}
    assert by_key(only_day_2["source"]) == {"SHORTLINK": (1, 1), "CUSTOMER_CHAT_PLUGIN": (1, 0)}


async def test_report_rows_are_limited_and_exact_while_totals_count_every_row(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    report = await get_report(client, **{"from": D1.isoformat(), "limit": "1"})
    # Each day's top row is a candidate: ADS (2 on day 1) and SHORTLINK (2 on day 2; on day 3
    # four sources tie at 1 and Redis lists SHORTLINK first). SHORTLINK adds up to more, and its
    # figures are then read for every day: exact.
    assert by_key(report["source"]) == {"SHORTLINK": (1, 2)}
    assert report["source"][0]["share"] == 0.3333
    # at least 3 more: day 3 alone has 4 sources (the range has 5)
    assert report["omitted"]["source"] == 3
    assert report["totals"] == EXPECTED_TOTALS


@pytest.mark.parametrize(("days", "limit", "shown"), [
    (30, 50, 50), (30, 0, 500), (30, 10_000, 500), (40, 500, 500), (90, 500, 222),
    (401, 500, 50), (401, 20, 20),
])
async def test_rows_are_capped_by_days_times_rows_never_below_the_default(
    redis: Redis, days: int, limit: int, shown: int,
) -> None:
    report = await build_report(redis, TODAY - dt.timedelta(days=days - 1), TODAY, limit)
    assert report.limit == shown


async def test_report_needs_the_api_token(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/report")).status == 401
    assert (await client.get("/report.json")).status == 401
    assert (await client.get("/report", params={"token": "wrong-token-1"})).status == 401
    assert (await client.get("/report.json", headers={"Authorization": "Bearer nope"})).status \
        == 401
    ok = await client.get("/report", params={"token": API_TOKEN})
    assert ok.status == 200
    assert ok.content_type == "text/html"
    assert "script-src" not in ok.headers["Content-Security-Policy"]
    assert "default-src 'none'" in ok.headers["Content-Security-Policy"]
    assert (await client.get("/report.json", headers=AUTH)).status == 200


@pytest.mark.parametrize("params", [
    {"from": "yesterday"}, {"from": "2024-05-02", "to": "2024-05-01"},
    {"from": "2020-01-01", "to": "2024-01-01"}, {"limit": "-1"}, {"limit": "many"},
])
async def test_report_rejects_bad_ranges(client: TestClient[Any, Any],
                                         params: dict[str, str]) -> None:
    resp = await client.get("/report.json", params=params, headers=AUTH)
    assert resp.status == 400
    assert "error" in await resp.json()


def test_parse_range() -> None:
    today = dt.date(2024, 5, 31)
    assert parse_range(None, None, today) == (dt.date(2024, 5, 2), today)
    assert parse_range("2024-05-01", "2024-05-01", today) == (dt.date(2024, 5, 1),) * 2
    with pytest.raises(ReportRangeError):
        parse_range("2024-05-02", "2024-05-01", today)


async def test_report_days_follow_the_touch_timestamp_in_utc(
    redis: Redis, post: Post, drain: Any,
) -> None:
    late = at(D1, 23, 59)
    assert (await post(body(referral("zoe", late, **DOGS)))).status == 200
    assert (await post(body(referral("zoe", late + 120_000, **DOGS)))).status == 200
    await drain()
    day1, day2 = D1.isoformat(), D2.isoformat()
    assert await redis.hgetall(keys.report_day(day1, "n")) == {b"new": b"1", b"touches": b"1"}
    assert await redis.hgetall(keys.report_day(day2, "n")) == {b"ret": b"1", b"touches": b"1"}
    assert await redis.zrange(keys.report_day(day1, "ref"), 0, -1, withscores=True) \
        == [(b"dogs", 1.0)]
    assert await redis.zrange(keys.report_day(day1, "ref:new"), 0, -1, withscores=True) \
        == [(b"dogs", 1.0)]
    assert await redis.zrange(keys.report_day(day2, "ref:new"), 0, -1) == []
    for part in ("n", "new", "source", "source:new", "ref", "ref:new"):
        ttl = await redis.ttl(keys.report_day(day1, part))
        assert 397 * 86400 < ttl <= 400 * 86400, part  # 400 days after the day ends
    report = await build_report(redis, D1, D2)
    assert report.totals.new == 1 and report.totals.returning == 1 and report.totals.users == 1


async def test_a_touch_that_arrives_late_counts_as_returning_on_its_own_day(
    redis: Redis, settings: Settings,
) -> None:
    effects = Effects(redis, settings)
    assert await effects_write(effects, [("referral", referral("lou", at(D3), **DOGS))]) \
        == [NEW_USER]
    assert await effects_write(effects, [("referral", referral("lou", at(D1), **AD))]) \
        == [RETURNING_USER]
    report = await build_report(redis, D1, D3)
    assert [(d.new, d.returning) for d in report.daily] == [(0, 1), (0, 0), (1, 0)]
    assert (report.totals.new, report.totals.returning, report.totals.users) == (1, 1, 1)
    await effects.aclose()


async def test_a_job_run_again_counts_a_touch_once(redis: Redis, settings: Settings) -> None:
    item = referral("yann", at(D3), **AD)
    event = p.row("referral", "h:yann", "messaging", "PAGE1", at(D3), item)
    effects = Effects(redis, settings)
    assert await p.write(effects, redis, [event]) == [NEW_USER]
    # The job's run again (it was presumed dead) is fenced: the touch is not counted twice.
    await redis.rpush("fb:lane:0", event.id)
    with pytest.raises(LaneLost):
        await effects.write([event], Step(0, "test-job-0", 1))
    report = await build_report(redis, D3, D3)
    assert report.totals.new == 1 and report.totals.returning == 0
    assert report.totals.touches == 1
    assert await redis.hgetall(keys.REPORT_ADS) == {b"6045246247433": b"Chunky peanut butter"}
    await effects.aclose()


async def _report_cost(redis: Redis, first: dt.date, last: dt.date) -> tuple[dict[str, int], int]:
    """The commands a report sends, by name, and the bytes Redis answers it with."""
    await redis.ping()  # the connection is set up before the counts start
    await redis.config_resetstat()
    await build_report(redis, first, last)
    sent: int = (await redis.info("stats"))["total_net_output_bytes"]
    commands = await redis.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in commands.items()}
    for admin in ("config|resetstat", "info"):
        calls.pop(admin, None)
    return calls, sent


async def test_the_report_reads_the_same_whatever_the_number_of_refs(
    redis: Redis, settings: Settings,
) -> None:
    """Bounded work: with 7,000 and with 9,800 distinct refs (a new user each, over 7 days, one
    user in 5 back the next day through the chat plugin), the report sends the same commands and
    Redis answers it with the same number of bytes."""
    effects = Effects(redis, settings)
    first = D3 - dt.timedelta(days=6)

    async def add_refs(start: int, stop: int) -> None:
        items = []
        for n in range(start, stop):
            back = n % 7
            ts = at(D3 - dt.timedelta(days=back), 10) + n
            items.append(("referral", referral(f"user-{n:05}", ts, source="SHORTLINK",
                                               ref=f"ref-{n:05}")))
            if n % 5 == 0 and back:
                items.append(("referral", referral(f"user-{n:05}", ts + 86_400_000,
                                                   source="CUSTOMER_CHAT_PLUGIN")))
        for i in range(0, len(items), 500):
            await effects_write(effects, items[i:i + 500])

    await add_refs(0, 7_000)
    calls, sent = await _report_cost(redis, first, D3)
    # per day: the totals, and each dimension's top 50 and size; the days' HyperLogLogs of
    # returning and then of all users merged 8 at a time; per day the chosen rows' counts
    # (source and ref: no ads)
    assert calls == {"hmget": 7, "zrevrange": 21, "zcard": 21, "pfmerge": 2, "pexpire": 2,
                     "pfcount": 2, "del": 1, "zmscore": 28}
    assert sent < 16_384
    await add_refs(7_000, 9_800)
    assert await redis.zcard(keys.report_day(D3.isoformat(), "ref")) == 1_400
    assert await _report_cost(redis, first, D3) == (calls, sent)
    assert await redis.keys(keys.REPORT_SCRATCH + "*") == []
    report = await build_report(redis, first, D3)
    assert (report.totals.new, report.totals.touches) == (9_800, 9_800 + 1_680)
    assert len(report.ref) == 50
    assert report.omitted["ref"] == 1_400 - 50  # at least: the most refs in a day, less 50
    await effects.aclose()


class _Cells(HTMLParser):
    """Collect `table id -> row data-key -> column data-col -> text` from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, dict[str, str]]] = {}
        self.ids: dict[str, str] = {}
        self._table = self._row = self._col = self._id = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = {}
        elif tag == "tr" and self._table and a.get("data-key") is not None:
            self._row = a["data-key"]
            self.tables[self._table][self._row] = {}
        elif tag == "td" and self._row is not None and a.get("data-col"):
            self._col, self._text = a["data-col"], []
        elif tag == "div" and a.get("id"):
            self._id, self._text = a["id"], []

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._col is not None:
            assert self._table is not None and self._row is not None
            self.tables[self._table][self._row][self._col] = "".join(self._text).strip()
            self._col = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "div" and self._id is not None:
            self.ids[self._id] = "".join(self._text).strip()
            self._id = None


def cells(html: str) -> _Cells:
    parser = _Cells()
    parser.feed(html)
    return parser


def check_page(html: str) -> None:
    page = cells(html)
    assert page.ids["total-users"] == "Users6"
    assert page.ids["total-new"] == "New users6"
    assert page.ids["total-returning"] == "Returning users2"
    assert page.ids["total-touches"] == "Referral touches12"
    for table, expected in (("by-source", EXPECTED_SOURCE), ("by-ref", EXPECTED_REF),
                            ("by-ad", EXPECTED_AD)):
        got = {k: (int(v["new"]), int(v["returning"])) for k, v in page.tables[table].items()}
        assert got == expected, table
    assert {k: v["share"] for k, v in page.tables["by-source"].items()} == {
        "ADS": "33.3%", "SHORTLINK": "33.3%", "": "11.1%", SHOPS_PRODUCT: "11.1%",
        "CUSTOMER_CHAT_PLUGIN": "11.1%"}
    per_day = {k: (int(v["new"]), int(v["returning"]), int(v["touches"]))
               for k, v in page.tables["per-day"].items()}
    assert per_day == EXPECTED_DAILY
    for label in ("Chunky peanut butter", "m.me link", "Chat plugin", "Shops product",
                  "No source"):
        assert label in html
    assert html.count("<rect") >= 6  # the chart's bars


async def test_report_page_shows_the_figures(client: TestClient[Any, Any], post: Post,
                                             drain: Any) -> None:
    await seed(post, drain)
    resp = await client.get("/report", params={"from": D1.isoformat(), "to": D3.isoformat()},
                            headers=AUTH)
    html = await resp.text()
    check_page(html)
    assert "<script" not in html


async def test_report_page_escapes_what_facebook_sends(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    evil = '<img src=x onerror="alert(1)">'
    item = referral("mallory", at(D3), source="ADS", ref=evil, ad_id="1",
                    ads_context_data={"ad_title": "<script>alert(2)</script>"})
    assert (await post(body(item))).status == 200
    await drain()
    html = await (await client.get("/report", headers=AUTH)).text()
    assert evil not in html and "<script>" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_DIR = Path(tempfile.gettempdir()) / "fbhook-report"


def chromium_args(profile: str) -> list[str]:
    assert CHROMIUM is not None
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,900"]


async def run_chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="fbhook-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            *chromium_args(profile), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install -y chromium) so the page cannot be checked in a browser")
async def test_report_page_renders_in_a_headless_browser(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    url = str(client.make_url("/report").with_query(
        {"from": D1.isoformat(), "to": D3.isoformat(), "token": API_TOKEN}))
    dom = await run_chromium("--dump-dom", url)
    check_page(dom)
    assert re.search(r'<svg id="chart"', dom)
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    shot = SCREENSHOT_DIR / "report.png"
    shot.unlink(missing_ok=True)
    await run_chromium(f"--screenshot={shot}", url)
    assert shot.stat().st_size > 10_000  # a page with a chart, not a blank one


async def test_cli_report_prints_the_same_figures(
    post: Post, drain: Any, settings: Settings, capsys: pytest.CaptureFixture[str],
) -> None:
    from cli.main import main

    await seed(post, drain)
    argv = ["report", "--from", D1.isoformat(), "--to", D3.isoformat(),
            "--redis-url", settings.redis_url]
    assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"] == EXPECTED_TOTALS
    assert by_key(report["source"]) == EXPECTED_SOURCE

    assert await asyncio.to_thread(main, argv) == 0
    text = capsys.readouterr().out
    assert "users: 6, 6 new, 2 returning" in text
    assert "referral touches: 12" in text
    assert re.search(r"m\.me link \(SHORTLINK\)\s+1\s+2\s+33\.3%", text)
    assert re.search(r"Shops product\s+1\s+0\s+11\.1%", text)
    assert re.search(r"6045246247433\s+2\s+1\s+33\.3%\s+Chunky peanut butter", text)
    assert re.search(rf"{D2.isoformat()}\s+2\s+1\s+6", text)


FORMULAS = ["=HYPERLINK(\"http://x.example\",\"click\")", "+1+2", "-2+3", "@SUM(A1)",
            "\tfoo", "\rbar"]


async def test_csv_export_neutralises_cells_a_spreadsheet_would_run(
    redis: Redis, settings: Settings, capsys: pytest.CaptureFixture[str],
) -> None:
    from cli.main import main

    effects = Effects(redis, settings)
    items = [("referral", referral(f"u{n}", at(D3) + n, source="SHORTLINK", ref=ref))
             for n, ref in enumerate([*FORMULAS, "dogs", "a=b"])]
    items.append(("referral", referral("=cmd|' /C calc'!A0", at(D3), source="ADS", ad_id="7",
                                       ref="-1")))
    await effects_write(effects, items)
    await effects.aclose()
    argv = ["attribution", "export", "--format", "csv", "--redis-url", settings.redis_url]
    assert await asyncio.to_thread(main, argv) == 0
    rows = {r["user"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    refs = {user: row["last_ref"] for user, row in rows.items()}
    assert refs == {
        **{f"u{n}": "'" + ref for n, ref in enumerate(FORMULAS)},
        "u6": "dogs", "u7": "a=b", "'=cmd|' /C calc'!A0": "'-1",
    }
    assert rows["u6"]["first_ref"] == "dogs" and rows["u0"]["first_ref"] == "'" + FORMULAS[0]
    assert rows["u6"]["touches"] == "1"
