"""A Redis error reply that persists ends in the dead letters, not in an endless retry loop."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post, stream_rows
from workers import deadletters, jobs
from workers.effects import SKIPPED, WRITTEN, Effects, JobEnd


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
    # JOB_MAX_TRIES (3 in the test settings) tries, each a call for the batch, then one call
    # per event so that an event Redis refuses fails alone.
    assert calls == 3 * (1 + 2)
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
    first = p.row("referral",
        "h:ref-ok", "messaging", "PAGE", now_ms,
        p.shortlink_referral("spring", sender="ana", ts=now_ms))
    blocked = p.row("message",
        "message:blocked", "messaging", "PAGE", now_ms, p.text_message(mid="blocked"))
    effects = Effects(redis, settings)
    await redis.set(keys.stream("message"), "not a stream")  # XADD now fails: WRONGTYPE
    for _ in range(2):
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await effects.write([first, blocked])
    assert len(await stream_rows(redis, "referral")) == 1
    assert await redis.xlen(keys.REFERRALS_STREAM) == 1
    assert await redis.hgetall(keys.report_day(day, "n")) == {b"new": b"1", b"touches": b"1"}
    assert await redis.zrange(keys.report_day(day, "ref:new"), 0, -1) == [b"spring"]

    await redis.delete(keys.stream("message"))
    assert await effects.write([first, blocked]) == [SKIPPED, WRITTEN]
    assert len(await stream_rows(redis, "message")) == 1
    assert len(await stream_rows(redis, "referral")) == 1
    assert await redis.hgetall(keys.report_day(day, "n")) == {b"new": b"1", b"touches": b"1"}
    await effects.aclose()


async def _claimed_job(redis: Redis, job_id: str, claims: int) -> None:
    """An arq job as the claim leaves it: queued, in progress, its try counter at `claims`."""
    from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

    await redis.zadd("fb:queue", {job_id: 1})
    await redis.set(job_key_prefix + job_id, b"body")
    await redis.set(in_progress_key_prefix + job_id, b"1")
    await redis.set(retry_key_prefix + job_id, claims)


async def test_a_first_run_that_fails_part_way_marks_what_it_wrote_for_the_next(
    redis: Redis, settings: Settings
) -> None:
    """A job's first run writes no done marks (nothing ran before it, nothing runs after it);
    when a write fails part way it runs again, so the events written before the failure are
    marked then, and the second run skips them."""
    now_ms = int(time.time() * 1000)
    first = p.row("referral",
        "h:first-run", "messaging", "PAGE", now_ms,
        p.shortlink_referral("spring", sender="bea", ts=now_ms))
    blocked = p.row("message",
        "message:blocked-1", "messaging", "PAGE", now_ms, p.text_message(mid="blocked-1"))
    await redis.set(keys.seen(first.id), "q", ex=600)
    await redis.set(keys.seen(blocked.id), "q", ex=600)
    await _claimed_job(redis, "j-part", claims=1)
    effects = Effects(redis, settings)
    await redis.set(keys.stream("message"), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await effects.write([first, blocked], JobEnd("j-part", "fb:queue", 1))
    assert await redis.get(keys.seen(first.id)) == b"d"
    assert await redis.get(keys.seen(blocked.id)) == b"q"
    assert await redis.zcard("fb:queue") == 1, "the job is not ended"

    await redis.delete(keys.stream("message"))
    await _claimed_job(redis, "j-part", claims=2)
    assert await effects.write([first, blocked], JobEnd("j-part", "fb:queue", 2)) == [
        SKIPPED, WRITTEN]
    assert len(await stream_rows(redis, "referral")) == 1
    assert len(await stream_rows(redis, "message")) == 1
    assert await redis.get(keys.seen(blocked.id)) == b"d"
    assert await redis.zcard("fb:queue") == 0
    await effects.aclose()


async def test_a_first_run_reads_marks_when_another_worker_has_claimed_the_job(
    redis: Redis, settings: Settings
) -> None:
    """Try 1 skips the marks only while the job's try counter says no other worker claimed it
    (a worker frozen past its claim's TTL, say): otherwise it reads them like any run again."""
    now_ms = int(time.time() * 1000)
    done, new = (p.row("message",
        f"message:{mid}", "messaging", "PAGE", now_ms, p.text_message(mid=mid))
        for mid in ("done-elsewhere", "not-yet"))
    await redis.set(keys.seen(done.id), "d", ex=600)
    await redis.set(keys.seen(new.id), "q", ex=600)
    effects = Effects(redis, settings)

    await _claimed_job(redis, "j-fresh", claims=1)
    assert await effects.write([new], JobEnd("j-fresh", "fb:queue", 1)) == [WRITTEN]
    assert await redis.get(keys.seen(new.id)) == b"q", "a lone first run writes no mark"

    await _claimed_job(redis, "j-twice", claims=2)
    assert await effects.write([done], JobEnd("j-twice", "fb:queue", 1)) == [SKIPPED]
    assert len(await stream_rows(redis, "message")) == 1
    await effects.aclose()
