"""The attribution report: daily aggregates written by the workers, read by GET /report(.json),
and the page rendered by a real headless browser."""

from __future__ import annotations

import asyncio
import datetime as dt
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
from shared.codec import DecodedEvent
from shared.report import ReportRangeError, build_report, parse_range
from shared.settings import Settings
from tests.conftest import API_TOKEN, Post
from workers.effects import NEW_USER, SKIPPED, Effects
from workers.normalize import normalize

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
TODAY = dt.datetime.now(dt.UTC).date()
D1, D2, D3 = (TODAY - dt.timedelta(days=n) for n in (2, 1, 0))


def at(day: dt.date, hour: int = 12) -> int:
    """A timestamp in ms at `hour` UTC on `day`."""
    return int(dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.UTC).timestamp() * 1000)


def referral(user: str, ts: int, **ref: Any) -> dict[str, Any]:
    return {"sender": {"id": user}, "recipient": {"id": "PAGE1"}, "timestamp": ts,
            "referral": {"type": "OPEN_THREAD", **ref}}


def body(*items: dict[str, Any]) -> dict[str, Any]:
    return {"object": "page", "entry": [{"id": "PAGE1", "time": 1, "messaging": list(items)}]}


AD = {"source": "ADS", "ad_id": "6045246247433", "ref": "pb",
      "ads_context_data": {"ad_title": "Chunky peanut butter", "photo_url": "x"}}

SCENARIO = [
    # day 1: alice and bob arrive through the same ad (both new)
    referral("alice", at(D1), **AD),
    referral("bob", at(D1, 13), **AD),
    # day 2: alice comes back through a shortlink (returning); carol is new through it;
    # dave arrives through the chat plugin with no ref (new)
    referral("alice", at(D2), source="SHORTLINK", ref="dogs"),
    referral("carol", at(D2, 1), source="SHORTLINK", ref="dogs"),
    referral("dave", at(D2, 23), source="CUSTOMER_CHAT_PLUGIN"),
    # day 3: bob comes back through the ad (returning); erin's referral names no source (new)
    referral("bob", at(D3, 0), **AD),
    referral("erin", at(D3, 0), ref="dogs"),
]

EXPECTED_DAILY = {D1.isoformat(): (2, 0), D2.isoformat(): (2, 1), D3.isoformat(): (1, 1)}
EXPECTED_SOURCE = {"ADS": (2, 1), "SHORTLINK": (1, 1), "CUSTOMER_CHAT_PLUGIN": (1, 0), "": (1, 0)}
EXPECTED_REF = {"pb": (2, 1), "dogs": (2, 1)}
EXPECTED_AD = {"6045246247433": (2, 1)}


async def seed(post: Post, drain: Any) -> None:
    """The scenario, one webhook per touch, processed in order (new/returning follows it)."""
    for item in SCENARIO:
        assert (await post(body(item))).status == 200
        await drain()


def by_key(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {r["key"]: (r["new"], r["returning"]) for r in rows}


async def test_report_json_counts_new_and_returning_by_source_ref_and_ad_per_day(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    resp = await client.get("/report.json", params={"from": D1.isoformat(), "to": D3.isoformat()},
                            headers=AUTH)
    assert resp.status == 200, await resp.text()
    report = await resp.json()
    assert report["from"] == D1.isoformat() and report["to"] == D3.isoformat()
    assert report["days"] == [D1.isoformat(), D2.isoformat(), D3.isoformat()]
    assert report["totals"] == {"new": 5, "returning": 2}
    assert {d["day"]: (d["new"], d["returning"]) for d in report["daily"]} == EXPECTED_DAILY
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
                            D3.isoformat(): {"new": 1, "returning": 0}}
    assert report["omitted"] == {"source": 0, "ref": 0, "ad": 0}


async def test_report_defaults_to_the_last_30_days_and_honours_the_range(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    resp = await client.get("/report", params={"format": "json"}, headers=AUTH)
    report = await resp.json()
    assert report["to"] == TODAY.isoformat()
    assert len(report["days"]) == 30
    assert report["totals"] == {"new": 5, "returning": 2}
    only_day_2 = await (await client.get(
        "/report.json", params={"from": D2.isoformat(), "to": D2.isoformat()}, headers=AUTH,
    )).json()
    assert only_day_2["totals"] == {"new": 2, "returning": 1}
    assert by_key(only_day_2["ad"]) == {}


async def test_report_rows_are_limited_but_totals_are_not(
    client: TestClient[Any, Any], post: Post, drain: Any,
) -> None:
    await seed(post, drain)
    report = await (await client.get(
        "/report.json", params={"from": D1.isoformat(), "limit": "1"}, headers=AUTH,
    )).json()
    assert [r["key"] for r in report["source"]] == ["ADS"]
    assert report["omitted"]["source"] == 3
    assert report["totals"] == {"new": 5, "returning": 2}


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
    late = at(D1, 23) + 59 * 60_000  # 23:59 UTC on day 1
    assert (await post(body(referral("zoe", late, source="SHORTLINK", ref="r1")))).status == 200
    assert (await post(body(referral("zoe", late + 120_000, source="SHORTLINK",
                                     ref="r1")))).status == 200
    await drain()
    assert await redis.hgetall(keys.report_day(D1.isoformat())) == {
        b"new|source|SHORTLINK": b"1", b"new|ref|r1": b"1"}
    assert await redis.hgetall(keys.report_day(D2.isoformat())) == {
        b"ret|source|SHORTLINK": b"1", b"ret|ref|r1": b"1"}
    ttl = await redis.ttl(keys.report_day(D1.isoformat()))
    assert 397 * 86400 < ttl <= 400 * 86400  # 400 days after the day ends
    report = await build_report(redis, D1, D2)
    assert report.totals.new == 1 and report.totals.returning == 1


async def test_a_job_run_again_counts_a_touch_once(redis: Redis, settings: Settings) -> None:
    item = referral("yann", at(D3), **AD)
    event = normalize("referral", DecodedEvent("h:yann", "messaging", "PAGE1", at(D3), item))
    effects = Effects(redis, settings)
    assert await effects.write([event]) == [NEW_USER]
    assert await effects.write([event]) == [SKIPPED]
    report = await build_report(redis, D3, D3)
    assert report.totals.new == 1 and report.totals.returning == 0
    assert await redis.hgetall(keys.REPORT_ADS) == {b"6045246247433": b"Chunky peanut butter"}
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
    assert page.ids["total-new"] == "New users5"
    assert page.ids["total-returning"] == "Returning users2"
    for table, expected in (("by-source", EXPECTED_SOURCE), ("by-ref", EXPECTED_REF),
                            ("by-ad", EXPECTED_AD)):
        got = {k: (int(v["new"]), int(v["returning"])) for k, v in page.tables[table].items()}
        assert got == expected, table
    per_day = {k: (int(v["new"]), int(v["returning"])) for k, v in page.tables["per-day"].items()}
    assert per_day == EXPECTED_DAILY
    assert "Chunky peanut butter" in html
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
    import json

    from cli.main import main

    await seed(post, drain)
    argv = ["report", "--from", D1.isoformat(), "--to", D3.isoformat(),
            "--redis-url", settings.redis_url]
    assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"] == {"new": 5, "returning": 2}
    assert by_key(report["source"]) == EXPECTED_SOURCE

    assert await asyncio.to_thread(main, argv) == 0
    text = capsys.readouterr().out
    assert "users: 5 new, 2 returning" in text
    assert re.search(r"6045246247433\s+2\s+1\s+Chunky peanut butter", text)
    assert re.search(rf"{D2.isoformat()}\s+2\s+1", text)
