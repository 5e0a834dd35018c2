"""A Redis error reply that persists ends in the dead letters, not in an endless retry loop."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.codec import DecodedEvent
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post, stream_rows
from workers import deadletters, jobs
from workers.effects import SKIPPED, WRITTEN, Effects
from workers.normalize import normalize


async def test_a_persistent_script_error_dead_letters_the_batch(
    post: Post, drain: Any, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def broken(self: Effects, events: list[Any], end: Any = None) -> list[int]:
        nonlocal calls
        calls += 1
        raise ResponseError("ERR user_script:1: Bad data format in input")

    monkeypatch.setattr(Effects, "write", broken)
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    assert (await post(p.body(p.text_message(mid="a"), p.text_message(mid="b")))).status == 200
    await drain()
    assert calls == 3  # JOB_MAX_TRIES in the test settings
    dead = await deadletters.list_dead(redis)
    assert sorted(d.event_id for d in dead) == ["message:a", "message:b"]
    assert all("Bad data format" in d.error and d.tries == 3 for d in dead)

    monkeypatch.undo()
    assert await deadletters.replay(redis, settings) == 2
    await drain()
    assert len(await stream_rows(redis, "message")) == 2


async def test_out_of_memory_is_retried_without_counting_as_a_failure(
    post: Post, drain: Any, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Effects.write
    calls = 0

    async def full_then_fine(self: Effects, events: list[Any], end: Any = None) -> list[int]:
        nonlocal calls
        calls += 1
        if calls <= 4:  # more than JOB_MAX_TRIES
            raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        return await original(self, events, end)

    monkeypatch.setattr(Effects, "write", full_then_fine)
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    assert (await post(p.body(p.text_message(mid="oom")))).status == 200
    await drain()
    assert calls == 5
    assert await deadletters.list_dead(redis) == []
    assert len(await stream_rows(redis, "message")) == 1



async def test_a_write_failing_part_way_keeps_what_was_written_exactly_once(
    redis: Redis, settings: Settings
) -> None:
    """A real script error in the middle of a batch: the events before it stay written and
    marked (a second try does not write them again), their report counts are kept, and the
    events after it are written once the cause is gone."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    now_ms = int(time.time() * 1000)
    first = normalize("referral", DecodedEvent(
        "h:ref-ok", "messaging", "PAGE", now_ms,
        p.shortlink_referral("spring", sender="ana", ts=now_ms)))
    blocked = normalize("message", DecodedEvent(
        "message:blocked", "messaging", "PAGE", now_ms, p.text_message(mid="blocked")))
    effects = Effects(redis, settings)
    await redis.set(keys.stream("message"), "not a stream")  # XADD now fails: WRONGTYPE
    for _ in range(2):
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await effects.write([first, blocked])
    assert len(await stream_rows(redis, "referral")) == 1
    assert await redis.xlen(keys.REFERRALS_STREAM) == 1
    assert await redis.hgetall(keys.report_day(day)) == {
        b"new|source|SHORTLINK": b"1", b"new|ref|spring": b"1"}

    await redis.delete(keys.stream("message"))
    assert await effects.write([first, blocked]) == [SKIPPED, WRITTEN]
    assert len(await stream_rows(redis, "message")) == 1
    assert len(await stream_rows(redis, "referral")) == 1
    assert (await redis.hgetall(keys.report_day(day)))[b"new|source|SHORTLINK"] == b"1"
    await effects.aclose()
