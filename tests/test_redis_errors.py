"""A Redis error reply that persists ends in the dead letters, not in an endless retry loop."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post, stream_rows
from workers import deadletters, jobs
from workers.effects import Effects


async def test_a_persistent_script_error_dead_letters_the_batch(
    post: Post, drain: Any, redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def broken(self: Effects, events: list[Any]) -> list[int]:
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

    async def full_then_fine(self: Effects, events: list[Any]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls <= 4:  # more than JOB_MAX_TRIES
            raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        return await original(self, events)

    monkeypatch.setattr(Effects, "write", full_then_fine)
    monkeypatch.setattr(jobs, "backoff_s", lambda job_try: 0.0)
    assert (await post(p.body(p.text_message(mid="oom")))).status == 200
    await drain()
    assert calls == 5
    assert await deadletters.list_dead(redis) == []
    assert len(await stream_rows(redis, "message")) == 1

