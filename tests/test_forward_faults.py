"""Forwarding under faults, with real processes: `python -m ingest` and `python -m workers` as
subprocesses (tests/processes.py) on their own Redis, and the bot's webhook (tests/receiver.py)
served by this test. A worker SIGKILLed mid-delivery loses nothing; a bot that is down only
builds a backlog, delivered in each user's order when it is back.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.processes import (
    Services,
    attribution_counts,
    body_of,
    dedupe_ids,
    post_signed,
    processed_ids,
    services,
)
from tests.receiver import FORWARD_SECRET, Receiver, serving
from tests.redis_server import RedisProcess, free_port

FORWARDING = {
    "FORWARD_SECRET": FORWARD_SECRET.decode(),
    "FORWARD_TIMEOUT_SECONDS": "20",
    "JOB_TIMEOUT_SECONDS": "60",  # the default (tests/processes.py makes it 3)
}


@pytest.fixture
def svc(own_redis: RedisProcess, tmp_path: Path) -> Iterator[Services]:
    with services(own_redis.url, tmp_path, **FORWARDING) as running:
        yield running


def user_items(users: int, per_user: int, tag: str) -> list[dict[str, Any]]:
    """Round r of every user, then round r + 1: a referral first (round 0), then messages."""
    items: list[dict[str, Any]] = []
    for r in range(per_user):
        for u in range(users):
            item: dict[str, Any] = {
                "sender": {"id": f"{tag}-u{u}"}, "recipient": {"id": "page-1"},
                "timestamp": 1_700_000_000_000 + r * 1000 + u,
            }
            if r == 0:
                item["referral"] = {"source": "SHORTLINK", "type": "OPEN_THREAD",
                                    "ref": f"ref-{u}"}
            else:
                item["message"] = {"mid": f"m-{tag}-{u}-{r}", "text": f"hello {r}"}
            items.append(item)
    return items


async def send_in_order(url: str, items: list[dict[str, Any]], size: int) -> list[str]:
    """POST the items in bodies of `size`, one after the other (so the ingest accepts each
    user's events in this order); every body must get 200. Returns the event ids in order."""
    ids: list[str] = []
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            status, _ = await post_signed(session, url, body_of(chunk))
            assert status == 200
            ids += dedupe_ids(chunk)
    return ids


def order_by_sender(items: list[dict[str, Any]], ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item, event_id in zip(items, ids, strict=True):
        out.setdefault(item["sender"]["id"], []).append(event_id)
    return out


async def forward_backlog(redis: Redis) -> int:
    total = 0
    async for key in redis.scan_iter("fb:fwd:[0-9]*"):
        total += await redis.llen(key)  # type: ignore[misc]
    return total


async def wait_written(redis: Redis, ids: set[str], within_s: float) -> None:
    """Wait until every event has its stream entry (the queue also holds forward jobs, so
    tests/processes.py `wait_processed`, which waits for it to empty, does not fit)."""

    async def written() -> bool:
        return ids <= set(await processed_ids(redis))

    await wait_until(written, within_s, "every event written to its stream")


async def wait_until(predicate: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_a_worker_sigkilled_mid_delivery_loses_nothing_and_repeats_only_what_it_had_sent(
    svc: Services, rclient: Redis
) -> None:
    receiver = Receiver(hold_after=150)  # from the 151st request on, the bot hangs
    async with serving(receiver):
        env = {"FORWARD_URL": receiver.url}
        ingest = svc.ingest(**env)
        first = svc.worker(**env)
        items = user_items(60, 8, "kill")
        ids = await send_in_order(ingest.url, items, 30)
        await wait_written(rclient, set(ids), 60)

        async def holding() -> bool:
            return receiver.held() > 0

        await wait_until(holding, 30, "the bot to hold a request")
        held = receiver.held()
        first.signal(signal.SIGKILL)
        first.wait(5)
        # Requests the killed worker had sent are still to be read by the receiver (this loop
        # was blocked in wait): let it read them before counting what it saw.
        await asyncio.sleep(0.5)
        seen_before = len(receiver.got)
        backlog = await forward_backlog(rclient)  # nothing writes it until the next worker
        receiver.gate.set()
        svc.worker(**env)

        async def drained() -> bool:
            return set(receiver.counts()) == set(ids) and await forward_backlog(rclient) == 0

        await wait_until(drained, 60, f"every event delivered\n{svc.logs()}")
        await asyncio.sleep(0.5)  # a repeat beyond the count would show now

    assert held > 0 and backlog > 0
    counts = receiver.counts()
    # The new worker sent each event still in a list once: those the killed one had sent but
    # not yet taken off (the bot saw them twice; X-Fbhook-Event-Id says so) and the rest.
    assert len(receiver.got) == seen_before + backlog
    repeats = {i: c for i, c in counts.items() if c > 1}
    assert set(repeats.values()) == {2}
    assert len(repeats) == seen_before - (len(ids) - backlog) >= held
    assert receiver.first_by_sender() == order_by_sender(items, ids)
    assert receiver.bad_signatures == 0
    assert await rclient.xlen("fb:fwd:dead") == 0
    assert set((await processed_ids(rclient)).values()) == {1}  # the streams: once each


@pytest.mark.slow
async def test_a_bot_down_for_a_while_gets_the_backlog_in_order_and_nothing_else_waits(
    svc: Services, rclient: Redis
) -> None:
    receiver = Receiver(port=free_port())  # not listening yet: connection refused
    env = {"FORWARD_URL": receiver.url}
    ingest = svc.ingest(**env)
    svc.worker(**env)
    users, per_user = 30, 4
    items = user_items(users, per_user, "down")
    ids = await send_in_order(ingest.url, items, 20)

    # While the bot is down: the streams, the attribution and fb:referrals are written.
    await wait_written(rclient, set(ids), 60)
    senders = {f"down-u{u}" for u in range(users)}
    assert await attribution_counts(rclient, senders) == {s: 1 for s in senders}
    assert await rclient.xlen("fb:referrals") == users

    async def retrying() -> bool:
        return await rclient.hlen("fb:fwd:tries") > 0  # type: ignore[misc,no-any-return]

    await wait_until(retrying, 20, "failed deliveries to be retried")
    assert await forward_backlog(rclient) == len(ids)
    await asyncio.sleep(2)  # down a little longer: the backoffs grow

    async with serving(receiver):
        async def delivered() -> bool:
            return len(receiver.delivered()) >= len(ids) and await forward_backlog(rclient) == 0

        await wait_until(delivered, 60, f"the backlog delivered\n{svc.logs()}")
        await asyncio.sleep(0.5)

    assert sorted(receiver.delivered_ids()) == sorted(ids)
    assert len(receiver.got) == len(ids)
    assert receiver.first_by_sender() == order_by_sender(items, ids)
    for got in receiver.got:
        user = got.sender()
        vars_ = json.loads(got.headers["X-Fbhook-Attribution"])
        assert vars_["_fbRefParam"] == f"ref-{user.removeprefix('down-u')}"
        assert got.headers["X-Fbhook-Referral"] == ("1" if "referral" in got.item() else "0")
    assert await rclient.hlen("fb:fwd:tries") == 0  # type: ignore[misc]
    assert await rclient.xlen("fb:fwd:dead") == 0
