"""Per-user order through any number of workers: lanes (shared/lanes.py, workers/lanes.py).

Two real arq workers (LeasedWorker, several jobs each) run in this process against the test
Redis while hundreds of users send their events, each user one request after the other as
Facebook does; every user's events must reach its handlers, its stream entries (across kinds)
and `fb:referrals` in the order sent. Then: a failing user holds up only its own lane, and a
claim lasts the lease, not the job timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

import workers.lanes
from shared.events import Event
from shared.lanes import lane_of
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post, RunWorkers, wait_for
from workers import registry
from workers.leased_worker import LeasedWorker
from workers.settings import worker_settings

USERS = 240
MESSAGES = 6


def entry_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms), int(seq)


@pytest.fixture
def two_workers(settings: Settings, run_workers: RunWorkers) -> Callable[[], Awaitable[None]]:
    """Start two workers (8 jobs each) in this process; they run until the test ends."""

    async def start() -> None:
        await run_workers(dataclasses.replace(settings, worker_max_jobs=8), 2)

    return start


def user_events(user: int) -> list[dict[str, Any]]:
    """A referral, a postback, then a run of messages: the order a user makes them."""
    sender = f"u{user}"
    ts = 1_700_000_000_000 + user * 1000
    out = [p.shortlink_referral(f"ref-{user}", sender=sender, ts=ts),
           p.item({"postback": {"mid": f"pb-{user}", "title": "Start", "payload": "GO"}},
                  sender=sender, ts=ts + 1)]
    out += [p.text_message(mid=f"m-{user}-{n}", sender=sender, ts=ts + 2 + n)
            for n in range(MESSAGES)]
    return out


def event_id(item: dict[str, Any]) -> str:
    if "message" in item:
        return f"message:{item['message']['mid']}"
    if "postback" in item:
        return f"postback:{item['postback']['mid']}"
    return "referral"


async def test_each_users_events_come_out_in_the_order_sent_through_two_workers(
    post: Post, redis: Redis, settings: Settings, two_workers: Any
) -> None:
    seen: dict[str, list[str]] = defaultdict(list)

    async def record(ctx: dict[str, Any], event: Event) -> None:
        await asyncio.sleep(0)  # let other jobs interleave
        seen[event.sender or ""].append(event.kind)

    for kind in ("referral", "postback", "message"):
        registry.on(kind)(record)
    try:
        await two_workers()

        async def send(user: int) -> None:
            for item in user_events(user):  # one request after the other, as Facebook does
                assert (await post(p.body(item))).status == 200

        await asyncio.gather(*(send(u) for u in range(USERS)))
        total = USERS * (MESSAGES + 2)

        async def all_written() -> bool:
            lengths = [await redis.xlen(f"fb:events:{k}") for k in ("referral", "postback",
                                                                     "message")]
            return sum(lengths) == total

        await wait_for(all_written)
    finally:
        for kind in ("referral", "postback", "message"):
            registry.remove(kind, record)

    want = ["referral", "postback"] + ["message"] * MESSAGES
    assert all(seen[f"u{u}"] == want for u in range(USERS)), "handlers ran out of order"

    by_user: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for kind in ("referral", "postback", "message"):
        for entry_id, fields in await redis.xrange(f"fb:events:{kind}"):
            event = "referral" if kind == "referral" else fields[b"id"].decode()
            by_user[fields[b"sender"].decode()][event] = entry_order(entry_id)
    for u in range(USERS):
        ids = by_user[f"u{u}"]
        sent = [ids[event_id(item)] for item in user_events(u)]
        assert len(ids) == MESSAGES + 2
        # Entry ids of two streams compare by their milliseconds (each stream numbers its own
        # entries within one): across kinds they never go back, in the order sent; within the
        # messages stream they strictly rise.
        assert [ms for ms, _ in sent] == sorted(ms for ms, _ in sent), f"u{u} out of order"
        assert sent[2:] == sorted(sent[2:]) and len(set(sent[2:])) == MESSAGES

    referrals = [f[b"user"].decode() for _, f in await redis.xrange("fb:referrals")]
    assert sorted(referrals) == sorted(f"u{u}" for u in range(USERS))
    assert await redis.zcard(settings.queue_name) == 0
    assert [k async for k in redis.scan_iter("fb:lane*")] == []


async def test_a_failing_user_holds_up_only_its_own_lane(
    post: Post, redis: Redis, settings: Settings, two_workers: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One user's first message fails twice (backoff 1 s); the events of users in other lanes
    are written meanwhile, and that user's later messages follow the retried one, in order."""
    monkeypatch.setattr(workers.lanes, "backoff_s", lambda tries: 1.0)
    failures = 0

    async def flaky(ctx: dict[str, Any], event: Event) -> None:
        nonlocal failures
        if event.id == "message:slow-0" and failures < 2:
            failures += 1
            raise ConnectionError("the bot's backend is down")

    registry.on("message")(flaky)
    try:
        await two_workers()
        slow = [p.text_message(mid=f"slow-{n}", sender="slow", ts=1_700_000_000_000 + n)
                for n in range(3)]
        for item in slow:
            assert (await post(p.body(item))).status == 200
        lane = lane_of("page", p.PAGE, "slow", "", settings.lanes)
        others = [u for u in range(60) if lane_of("page", p.PAGE, f"o{u}", "", settings.lanes)
                  != lane]
        for u in others:
            assert (await post(p.body(p.text_message(mid=f"o-{u}", sender=f"o{u}")))).status \
                == 200

        async def done() -> bool:
            return await redis.xlen("fb:events:message") == 3 + len(others)

        await wait_for(done)
    finally:
        registry.remove("message", flaky)

    assert failures == 2
    entries = await redis.xrange("fb:events:message")
    order = [f[b"id"].decode() for _, f in entries]
    assert [i for i in order if i.startswith("message:slow")] == [
        "message:slow-0", "message:slow-1", "message:slow-2"]
    first_slow = order.index("message:slow-0")
    assert set(order[:first_slow]) == {f"message:o-{u}" for u in others}, \
        "every other lane's events were written while the failing one waited"


async def test_a_claim_lasts_the_lease_not_the_job_timeout(
    post: Post, redis: Redis, settings: Settings
) -> None:
    """arq claims a job for `in_progress_timeout_s`; LeasedWorker sets it to the lease, so a
    worker killed right after a claim holds the lane no longer than that (fails if arq stops
    reading the attribute)."""
    assert settings.job_timeout_s == 60 and settings.worker_lease_s == 5
    assert (await post(p.body(p.text_message(mid="claimed")))).status == 200
    worker = LeasedWorker(**worker_settings(settings), burst=True, handle_signals=False)
    [job_id] = await redis.zrange(settings.queue_name, 0, -1)
    await worker.start_jobs([job_id])  # arq's own claim; its job task is created, not run
    for task in worker.tasks.values():
        task.cancel()
    ttl = await redis.pttl(in_progress_key_prefix + job_id.decode())
    assert 0 < ttl <= 5000, "arq's claim lasts the lease (with arq's default it is 70 s)"
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    worker.tasks.clear()
    await worker.close()
