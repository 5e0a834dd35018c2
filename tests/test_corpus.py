"""Every real webhook body in ../shared/corpus, end to end: signed POST, worker, outputs."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.attribution import read_record
from tests.conftest import Post, stream_rows

CORPUS = Path(
    os.environ.get(
        "FBHOOK_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus" / "cases"
    )
)
CASES = sorted(CORPUS.glob("*.json"))


def test_the_corpus_is_there() -> None:
    assert len(CASES) >= 52, f"expected the 52 corpus cases in {CORPUS}"


async def touches_in_redis(redis: Redis) -> list[tuple[Any, ...]]:
    out = []
    async for key in redis.scan_iter("fb:attr:*"):
        user = key.decode().removeprefix("fb:attr:")
        view = read_record(user, await redis.get(key))
        assert view is not None
        assert view.touches == len(view.history)
        for t in view.history:
            out.append((user, t["source"], t["ref"], t["ad_id"], t["via"]))
    return out


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
async def test_corpus_case(path: Path, post: Post, drain: Any, redis: Redis) -> None:
    case = json.loads(path.read_text())
    response = await post(case["body"])
    assert response.status == 200, await response.text()
    assert await response.text() == "EVENT_RECEIVED"
    await drain()

    rows = await stream_rows(redis)
    got = Counter((r["kind"], r["sender"] or None, r["channel"]) for r in rows)
    want = Counter((e["kind"], e["sender"], e["channel"]) for e in case["expect"]["events"])
    assert got == want

    for row in rows:
        event = json.loads(row["event"])
        assert event["kind"] == row["kind"]
        assert event["id"] == row["id"]
        assert int(row["timestamp"]) == event["timestamp"] > 0
        if row["kind"] == "unknown":
            assert event["raw"] is not None, "an unknown item must keep its raw payload"

    want_touches = Counter(
        (a["user"], a["source"], a["ref"], a["ad_id"], a["via"])
        for a in case["expect"]["attribution"]
    )
    assert Counter(await touches_in_redis(redis)) == want_touches


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
async def test_corpus_case_delivered_twice_has_one_effect(
    path: Path, post: Post, drain: Any, redis: Redis
) -> None:
    case = json.loads(path.read_text())
    for _ in range(2):
        assert (await post(case["body"])).status == 200
        await drain()
    rows = await stream_rows(redis)
    assert len(rows) == len({r["id"] for r in rows}) == len(case["expect"]["events"])
    got = Counter((r["kind"], r["sender"] or None, r["channel"]) for r in rows)
    assert got == Counter((e["kind"], e["sender"], e["channel"]) for e in case["expect"]["events"])
    assert len(await touches_in_redis(redis)) == len(case["expect"]["attribution"])
