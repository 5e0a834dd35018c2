"""A Redis error reply that persists ends in the dead letters, not in an endless retry loop."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from shared import keys
from shared.attribution import read_record
from shared.report import day_of
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post, drain_with, lose_one_reply, stream_rows
from workers import deadletters
from workers import lanes as jobs
from workers.effects import WRITTEN, Effects, LaneLost, Step


async def test_a_persistent_script_error_dead_letters_the_batch(
    post: Post, drain: Any, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def broken(self: Effects, events: list[Any], step: Any) -> Any:
        nonlocal calls
        calls += 1
        raise ResponseError("ERR user_script:1: Bad data format in input")

    monkeypatch.setattr(Effects, "write", broken)
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    assert (await post(p.body(p.text_message(mid="a"), p.text_message(mid="b")))).status == 200
    await drain()
    # JOB_MAX_TRIES (3 in the test settings) tries, the last burying the events the refused
    # call held; one more finds the lane empty and releases it.
    assert calls == 3 + 1
    dead = await deadletters.list_dead(redis)
    assert sorted(d.event_id for d in dead) == ["message:a", "message:b"]
    assert all("Bad data format" in d.error and d.tries == 3 for d in dead)

    monkeypatch.undo()
    assert await deadletters.replay(redis, settings) == 2
    await drain()
    assert len(await stream_rows(redis, "message")) == 2



async def test_a_run_that_lost_its_lane_buries_nothing(
    post: Post, drain: Any, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose step calls Redis refused try after try buries the lane's head events, but only
    while it owns the lane: taken over meanwhile (presumed dead), it buries nothing (the
    events stay at the head, for the run that has the lane), as a stale step writes nothing."""
    calls = 0

    async def refused_then_taken_over(self: Effects, events: list[Any], step: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:  # the last try (JOB_MAX_TRIES 3): another run has the lane now
            await redis.set(keys.lane_job(step.lane), "another-run")
        raise ResponseError("ERR user_script:1: Bad data format in input")

    monkeypatch.setattr(Effects, "write", refused_then_taken_over)
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    assert (await post(p.body(p.text_message(mid="a"), p.text_message(mid="b")))).status == 200
    await drain()
    assert calls == 3
    assert await deadletters.list_dead(redis) == []
    lanes = [k async for k in redis.scan_iter(keys.LANE_PREFIX + "[0-9]*")]
    assert len(lanes) == 1 and await redis.llen(lanes[0]) == 2
    assert await redis.get(keys.lane_job(int(lanes[0].decode().rpartition(":")[2]))) == \
        b"another-run"

@pytest.mark.parametrize("refusal", [
    # as redis-py raises them: a known code becomes the class and is cut off the message
    OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ReadOnlyError("You can't write against a read only replica."),
    ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or "
                  "SHUTDOWN NOSAVE."),
], ids=["OOM", "READONLY", "BUSY"])
async def test_a_passing_refusal_is_retried_without_counting_as_a_failure(
    refusal: ResponseError, post: Post, drain: Any, redis: Redis,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """(tests/test_packed_call_hostile.py makes a real Redis refuse, full and demoted.)"""
    original = Effects.write
    calls = 0

    async def full_then_fine(self: Effects, events: list[Any], step: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 4:  # more than JOB_MAX_TRIES
            raise refusal
        return await original(self, events, step)

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
    """A real script error in the middle of a step: the events before it stay written and leave
    the lane (a second try does not write them again), their report counts are kept, and the
    event it failed on stays at the head, its try counted, until the cause is gone."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    now_ms = int(time.time() * 1000)
    first = p.row("referral", "h:ref-ok", "messaging", "PAGE", now_ms,
                  p.shortlink_referral("spring", sender="ana", ts=now_ms))
    blocked = p.row("message", "message:blocked", "messaging", "PAGE", now_ms,
                    p.text_message(mid="blocked"))
    effects = Effects(redis, settings)
    await redis.set(keys.stream("message"), "not a stream")  # XADD now fails: WRONGTYPE
    outcome = await p.step(effects, redis, [first, blocked])
    assert (outcome.codes, outcome.status, outcome.tries) == ([2], "retry", 1)
    assert await redis.lrange("fb:lane:0", 0, -1) == [b"message:blocked"]
    assert await redis.hget(keys.LANE_TRIES, "message:blocked") == b"1"
    assert len(await stream_rows(redis, "referral")) == 1
    assert await redis.xlen(keys.REFERRALS_STREAM) == 1
    assert await redis.hgetall(keys.report_day(day, "n")) == {b"new": b"1", b"touches": b"1"}

    await redis.delete(keys.stream("message"))
    await redis.delete("fb:lane:0")
    outcome = await p.step(effects, redis, [blocked])  # the retry: the head event alone
    assert (outcome.codes, outcome.status) == ([WRITTEN], "ended")
    assert await redis.hlen(keys.LANE_TRIES) == 0
    assert len(await stream_rows(redis, "message")) == 1
    assert len(await stream_rows(redis, "referral")) == 1
    assert await redis.hgetall(keys.report_day(day, "n")) == {b"new": b"1", b"touches": b"1"}
    assert await redis.exists("fb:lane:0", "fb:lanejob:0") == 0
    await effects.aclose()


async def test_a_step_after_the_scripts_were_flushed_loads_its_script_and_writes_once(
    redis: Redis, settings: Settings
) -> None:
    """A Redis that lost its scripts (restarted, or a replica promoted) answers NOSCRIPT: the
    step's call (shared/packed_call.py) loads the script and sends the same call again."""
    now_ms = int(time.time() * 1000)
    rows = [p.row("message", f"message:n{n}", "messaging", "PAGE", now_ms,
                  p.text_message(mid=f"n{n}")) for n in range(2)]
    effects = Effects(redis, settings)
    await p.step(effects, redis, [])  # the script is loaded
    await redis.script_flush()
    outcome = await p.step(effects, redis, rows)
    assert (outcome.codes, outcome.status) == ([WRITTEN, WRITTEN], "ended")
    assert [r["id"] for r in await stream_rows(redis, "message")] == ["message:n0", "message:n1"]
    await effects.aclose()


async def test_a_run_that_no_longer_owns_its_lane_writes_nothing(
    redis: Redis, settings: Settings
) -> None:
    """A run presumed dead (its lease expired while it was frozen) whose job was claimed again,
    or whose lane was handed to another job, is fenced: its step writes nothing."""
    now_ms = int(time.time() * 1000)
    row = p.row("message", "message:late", "messaging", "PAGE", now_ms,
                p.text_message(mid="late"))
    effects = Effects(redis, settings)
    await p.step(effects, redis, [], job_try=2)  # the job was claimed a second time
    await redis.rpush("fb:lane:0", row.id)
    await redis.set("fb:lanejob:0", "test-job-0")
    with pytest.raises(LaneLost):
        await effects.write([row], Step(0, "test-job-0", 1))
    await redis.set("fb:lanejob:0", "another-job")
    with pytest.raises(LaneLost):
        await effects.write([row], Step(0, "test-job-0", 2))
    assert await stream_rows(redis) == []
    assert await redis.lrange("fb:lane:0", 0, -1) == [row.id.encode()]
    await redis.set("arq:retry:another-job", 1)  # the lane's owner, in its first run, writes
    assert (await effects.write([row], Step(0, "another-job", 1))).codes == [WRITTEN]
    assert [r["id"] for r in await stream_rows(redis)] == ["message:late"]
    await effects.aclose()


async def test_a_step_whose_reply_was_lost_is_not_run_twice(
    post: Post, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after Redis ran a step but before its reply was read: the worker's
    pool sends the call again (it retries connection errors). The second call must not write
    the events again, nor take the events after them off the lane unwritten (it once did
    both: m0, m1, m0, m1, and m2 and m3 gone)."""
    items = [p.text_message(mid=f"m{i}", sender="u1", ts=1_700_000_000_000 + i)
             for i in range(4)]
    assert (await post(p.body(*items))).status == 200
    dropped = lose_one_reply(monkeypatch, lambda reply: isinstance(reply, list)
                             and len(reply) == 4 and reply[1] == b"more")
    await drain_with(dataclasses.replace(settings, job_max_events=2))
    monkeypatch.undo()
    assert len(dropped) == 1
    assert [r["id"] for r in await stream_rows(redis, "message")] == [
        "message:m0", "message:m1", "message:m2", "message:m3"]
    assert await deadletters.list_dead(redis) == []
    assert await redis.exists(keys.lane(0), keys.lane_job(0)) == 0


@pytest.mark.parametrize("broken", ["record of another type", "unreadable record",
                                    "referrals not a stream"])
async def test_an_event_whose_write_fails_part_way_is_written_once_or_dead_lettered(
    broken: str, post: Post, drain: Any, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails after the event's stream entry (the user's record unreadable, the
    referrals stream of another type) undoes what it had written of that event: tried again and
    dead-lettered, the event is in the dead letters once and on no stream, the user's record
    and the report as before (once: three stream entries, and a touch count of 3)."""
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    if broken == "record of another type":
        await redis.rpush(keys.ATTR_PREFIX + "dup", "x")
    elif broken == "unreadable record":
        await redis.set(keys.ATTR_PREFIX + "dup", "garbage")
    else:
        await redis.set(keys.REFERRALS_STREAM, "not a stream")
    before = await redis.dump(keys.ATTR_PREFIX + "dup")
    item = p.shortlink_referral("spring", sender="dup", ts=int(time.time() * 1000))
    assert (await post(p.body(item))).status == 200
    await drain()
    assert await stream_rows(redis, "referral") == []
    assert len(await deadletters.list_dead(redis)) == 1
    assert await redis.dump(keys.ATTR_PREFIX + "dup") == before
    assert [k async for k in redis.scan_iter(keys.REPORT_PREFIX + "*")] == []


@pytest.mark.parametrize("part", ["n", "source", "new"])
async def test_a_report_key_of_another_type_costs_the_report_not_a_second_write(
    part: str, post: Post, drain: Any, redis: Redis, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The report's counters are written after the step's events: one of their keys of another
    type (another program's) failed the step's call after its events were written, and the
    retries wrote them again (a referral three times on its stream and on `fb:referrals`, three
    touches, then dead-lettered). Now the events are written once, the user has one touch, and
    the worker says the counters were not written."""
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    ts = int(time.time() * 1000)
    await redis.rpush(keys.report_day(day_of(ts), part), "another program's")
    item = p.shortlink_referral("spring", sender="once", ts=ts)
    caplog.set_level("WARNING", logger="fbhook.worker")
    assert (await post(p.body(item, p.text_message(mid="m-once", sender="other")))).status == 200
    await drain()
    assert [r["sender"] for r in await stream_rows(redis, "referral")] == ["once"]
    assert len(await stream_rows(redis, "message")) == 1
    assert await redis.xlen(keys.REFERRALS_STREAM) == 1
    assert await deadletters.list_dead(redis) == []
    view = read_record("once", await redis.get(keys.attribution("once")))
    assert view is not None and view.touches == 1
    warned = [r for r in caplog.records if "counters" in r.getMessage()]
    assert len(warned) == 1 and "WRONGTYPE" in warned[0].error  # type: ignore[attr-defined]
