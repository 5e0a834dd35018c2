"""Failures inside job functions: retries with backoff, dead letters, replay, unknown kinds.

Handlers are registered with `workers.registry.on(kind)` and removed after each test. The in-process
`drain` fixture runs a real arq worker in burst mode against the test Redis; `Retry` defers a job
by `workers.lanes.backoff_s(try)` seconds, patched to 0 here so that retries run at once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

import workers.lanes
from shared.events import Event, Unknown
from shared.settings import Settings
from tests.conftest import Post, stream_rows
from workers.deadletters import list_dead, purge, replay
from workers.leased_worker import LeasedWorker as Worker
from workers.settings import worker_settings

Handler = Callable[[dict[str, Any], Event], Awaitable[None]]


@pytest.fixture
def tries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """No waiting between tries (a lane asks for its backoffs by try number when a run starts)."""
    asked: list[int] = []

    def no_wait(job_try: int) -> float:
        asked.append(job_try)
        return 0.0

    monkeypatch.setattr(workers.lanes, "backoff_s", no_wait)
    return asked


def message(mid: str, sender: str = "u1", ts: int = 1_700_000_000_000) -> dict[str, Any]:
    return {"sender": {"id": sender}, "recipient": {"id": "p1"}, "timestamp": ts,
            "message": {"mid": mid, "text": f"text of {mid}"}}


def envelope(*items: dict[str, Any]) -> dict[str, Any]:
    return {"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": list(items)}]}


def test_backoff_grows_and_is_capped() -> None:
    waits = [workers.lanes.backoff_s(n) for n in range(1, 12)]
    assert waits == sorted(waits)
    assert waits[0] < waits[1] < waits[2]
    assert max(waits) == 60


async def test_transient_handler_errors_are_retried_then_processed_once(
    post: Post, drain: Any, redis: Redis, tries: list[int], handlers: Any
) -> None:
    calls: list[str] = []

    async def flaky(ctx: dict[str, Any], event: Event) -> None:
        calls.append(event.id)
        if len(calls) <= 2:
            raise ConnectionResetError("downstream hiccup")

    handlers("message", flaky)
    assert (await post(envelope(message("m-flaky")))).status == 200
    await drain()

    assert calls == ["message:m-flaky"] * 3  # failed, failed, succeeded (JOB_MAX_TRIES is 3)
    assert await redis.hlen("fb:lane:tries") == 0, "tries are forgotten once it succeeds"
    rows = await stream_rows(redis, "message")
    assert [r["id"] for r in rows] == ["message:m-flaky"]
    assert await list_dead(redis) == []
    assert await redis.get("fb:seen:message:m-flaky") == b"q"  # still a duplicate if resent


async def test_retry_runs_only_the_failed_events_handlers_again(
    post: Post, drain: Any, redis: Redis, tries: list[int], handlers: Any
) -> None:
    calls: list[str] = []

    async def fails_once_for_b(ctx: dict[str, Any], event: Event) -> None:
        calls.append(event.id)
        if event.id == "message:b" and calls.count("message:b") == 1:
            raise RuntimeError("b is not ready yet")

    handlers("message", fails_once_for_b)
    assert (await post(envelope(message("a"), message("b"), message("c")))).status == 200
    await drain()

    assert sorted(calls) == ["message:a", "message:b", "message:b", "message:c"]
    assert sorted(r["id"] for r in await stream_rows(redis, "message")) == [
        "message:a", "message:b", "message:c"]


async def test_an_event_that_keeps_failing_is_dead_lettered_with_payload_error_and_tries(
    post: Post, drain: Any, redis: Redis, settings: Settings, tries: list[int], handlers: Any
) -> None:
    async def broken(ctx: dict[str, Any], event: Event) -> None:
        if event.id == "message:bad":
            raise ValueError("cannot handle this one")

    handlers("message", broken)
    bad = message("bad", sender="u9")
    assert (await post(envelope(message("good"), bad))).status == 200
    await drain()

    assert [r["id"] for r in await stream_rows(redis, "message")] == ["message:good"]
    dead = await list_dead(redis)
    assert len(dead) == 1
    letter = dead[0]
    assert (letter.event_id, letter.kind) == ("message:bad", "message")
    assert letter.error == "ValueError: cannot handle this one"
    assert letter.tries == settings.job_max_tries == 3
    assert letter.failed_at_ms > 0
    payload = json.loads(letter.payload)
    assert payload["id"] == "message:bad"
    assert payload["raw"] == bad, "the raw item as Facebook sent it"
    assert await redis.get("fb:seen:message:bad") == b"x"
    # A redelivery of a dead event is a duplicate, not a second failure.
    assert (await post(envelope(bad))).status == 200
    await drain()
    assert len(await list_dead(redis)) == 1


async def test_replay_queues_dead_events_again_and_they_get_processed(
    post: Post, drain: Any, redis: Redis, settings: Settings, tries: list[int], handlers: Any
) -> None:
    healthy = {"value": False}

    async def down_until_fixed(ctx: dict[str, Any], event: Event) -> None:
        if not healthy["value"]:
            raise RuntimeError("service down")

    handlers("message", down_until_fixed)
    assert (await post(envelope(message("r1"), message("r2")))).status == 200
    await drain()
    dead = await list_dead(redis)
    assert sorted(d.event_id for d in dead) == ["message:r1", "message:r2"]
    assert await stream_rows(redis, "message") == []

    healthy["value"] = True
    assert await replay(redis, settings, [dead[0].entry_id]) == 1
    assert [d.event_id for d in await list_dead(redis)] == [dead[1].event_id]
    await drain()
    assert [r["id"] for r in await stream_rows(redis, "message")] == [dead[0].event_id]

    assert await replay(redis, settings) == 1
    await drain()
    assert sorted(r["id"] for r in await stream_rows(redis, "message")) == [
        "message:r1", "message:r2"]
    assert await list_dead(redis) == []
    assert await redis.get("fb:seen:message:r2") == b"q", "queued again, no longer dead"
    # Replaying again finds nothing and writes nothing twice.
    assert await replay(redis, settings) == 0
    await drain()
    assert len(await stream_rows(redis, "message")) == 2


async def test_purge_removes_dead_letters(
    post: Post, drain: Any, redis: Redis, tries: list[int], handlers: Any
) -> None:
    async def broken(ctx: dict[str, Any], event: Event) -> None:
        raise RuntimeError("no")

    handlers("message", broken)
    assert (await post(envelope(message("p1"), message("p2"), message("p3")))).status == 200
    await drain()
    dead = await list_dead(redis)
    assert len(dead) == 3
    assert await purge(redis, [dead[0].entry_id]) == 1
    assert len(await list_dead(redis)) == 2
    assert await purge(redis) == 2
    assert await list_dead(redis) == []


async def test_an_unknown_kind_is_routed_not_failed(
    post: Post, drain: Any, redis: Redis, tries: list[int]
) -> None:
    item = {"sender": {"id": "u5"}, "recipient": {"id": "p1"}, "timestamp": 1_700_000_000_000,
            "message_request": {"action": "accept"}}
    assert (await post(envelope(item))).status == 200
    await drain()
    rows = await stream_rows(redis, "unknown")
    assert len(rows) == 1
    event = json.loads(rows[0]["event"])
    assert event["key"] == "message_request"
    assert event["raw"] == item
    assert await redis.hlen("fb:lane:tries") == 0 and await list_dead(redis) == []


async def test_an_unknown_kind_with_a_handler_becomes_its_own_kind(
    post: Post, drain: Any, redis: Redis, tries: list[int], handlers: Any
) -> None:
    seen: list[Event] = []

    async def accept(ctx: dict[str, Any], event: Event) -> None:
        seen.append(event)

    handlers("message_request", accept)
    item = {"sender": {"id": "u6"}, "recipient": {"id": "p1"}, "timestamp": 1_700_000_000_000,
            "message_request": {"action": "accept"}}
    assert (await post(envelope(item))).status == 200
    await drain()
    assert len(seen) == 1
    assert isinstance(seen[0], Unknown) and seen[0].kind == "message_request"
    assert seen[0].raw == item
    assert len(await stream_rows(redis, "message_request")) == 1
    assert await stream_rows(redis, "unknown") == []


async def test_a_handler_slower_than_the_job_timeout_is_retried_then_dead_lettered(
    post: Post, redis: Redis, settings: Settings, tries: list[int], handlers: Any
) -> None:
    """arq fails a job that overruns its timeout and deletes it: the events must not vanish."""
    import asyncio

    async def slow(ctx: dict[str, Any], event: Event) -> None:
        if event.id == "message:slow":
            await asyncio.sleep(5)

    handlers("message", slow)
    assert (await post(envelope(message("slow"), message("quick")))).status == 200
    quick_timeout = dataclasses.replace(settings, job_timeout_s=1)
    worker = Worker(**worker_settings(quick_timeout), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()

    assert [r["id"] for r in await stream_rows(redis, "message")] == ["message:quick"]
    dead = await list_dead(redis)
    assert [(d.event_id, d.tries) for d in dead] == [("message:slow", 3)]
    assert "TimeoutError" in dead[0].error
