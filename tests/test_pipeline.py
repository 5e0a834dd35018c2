"""Batches, standby, duplicates and ordering, end to end through ingest, Redis and a worker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.attribution import load
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import Post, stream_rows


async def _view(redis: Redis, user: str = p.PSID) -> Any:
    view = await load(redis, user)
    assert view is not None
    return view


async def test_batched_body_with_several_entries_and_items(
    post: Post, drain: Any, redis: Redis
) -> None:
    body = {
        "object": "page",
        "entry": [
            {
                "id": "P1",
                "time": 1,
                "messaging": [
                    p.text_message(mid="m1"),
                    p.text_message(mid="m2"),
                    p.shortlink_referral(sender="u2"),
                ],
            },
            {
                "id": "P2",
                "time": 2,
                "messaging": [p.read_event()],
                "standby": [p.text_message(mid="m3", sender="u3")],
            },
        ],
    }
    assert (await post(body)).status == 200
    await drain()
    rows = await stream_rows(redis)
    assert sorted((r["kind"], r["page_id"], r["channel"]) for r in rows) == [
        ("message", "P1", "messaging"),
        ("message", "P1", "messaging"),
        ("message", "P2", "standby"),
        ("read", "P2", "messaging"),
        ("referral", "P1", "messaging"),
    ]


async def test_standby_items_keep_their_kind_and_are_marked(
    post: Post, drain: Any, redis: Redis
) -> None:
    body = p.body(p.text_message(), p.shortlink_referral(), channel="standby")
    assert (await post(body)).status == 200
    await drain()
    rows = await stream_rows(redis)
    assert {(r["kind"], r["channel"]) for r in rows} == {
        ("message", "standby"),
        ("referral", "standby"),
    }
    assert json.loads(rows[0]["event"])["channel"] == "standby"


async def test_same_mid_in_two_requests_gives_one_entry(
    post: Post, drain: Any, redis: Redis
) -> None:
    assert (await post(p.body(p.text_message(mid="dup")))).status == 200
    assert (await post(p.body(p.text_message(mid="dup"), time=999))).status == 200
    await drain()
    assert len(await stream_rows(redis, "message")) == 1


async def test_mid_less_event_redelivered_gives_one_entry_and_one_touch(
    post: Post, drain: Any, redis: Redis
) -> None:
    """A retry carries a new entry.time; the item itself is the same, so its key is too."""
    await post(p.body(p.shortlink_referral(), p.read_event(), time=1000))
    await drain()
    await post(p.body(p.shortlink_referral(), p.read_event(), time=2000))
    await drain()
    assert len(await stream_rows(redis)) == 2
    assert (await _view(redis)).touches == 1


async def test_different_mid_less_events_are_not_merged(
    post: Post, drain: Any, redis: Redis
) -> None:
    await post(
        p.body(
            p.read_event(watermark=1),
            p.read_event(watermark=2),
            p.read_event(watermark=2, sender="other"),
        )
    )
    await drain()
    assert len(await stream_rows(redis, "read")) == 3


@pytest.mark.parametrize("separate_drains", [False, True])
async def test_out_of_order_referrals_first_and_last_by_timestamp(
    post: Post, drain: Any, redis: Redis, separate_drains: bool
) -> None:
    later = p.ad_referral(ts=2_000_000_000_000)
    earlier = p.shortlink_referral(ref="early", ts=1_000_000_000)  # seconds: 2001-09-09
    await post(p.body(later))
    if separate_drains:
        await drain()
    await post(p.body(earlier))
    await drain()
    view = await _view(redis)
    assert view.touches == 2
    assert (view.first["source"], view.first["ref"], view.first["timestamp"]) == (
        "SHORTLINK",
        "early",
        1_000_000_000_000,
    )
    assert view.last["source"] == "ADS"
    assert [t["source"] for t in view.history] == ["ADS", "SHORTLINK"]
    assert view.vars["_fbRefAdId"] == "6045246247433"


async def test_history_is_capped_and_first_touch_survives(
    post: Post, drain: Any, redis: Redis, settings: Settings
) -> None:
    cap = settings.history_cap
    stamps = [1_600_000_000_000 + i * 1000 for i in range(cap + 5)]
    order = stamps[3:] + stamps[:3]  # the earliest arrive last, after the history is full
    for ts in order:
        await post(p.body(p.shortlink_referral(ref=f"r{ts}", ts=ts)))
    await drain()
    view = await _view(redis)
    assert view.touches == cap + 5
    assert len(view.history) == cap
    assert view.first["timestamp"] == stamps[0]
    assert view.last["timestamp"] == stamps[-1]
    assert [t["timestamp"] for t in view.history] == sorted(stamps, reverse=True)[:cap]


async def test_every_stream_entry_has_the_documented_fields(
    post: Post, drain: Any, redis: Redis
) -> None:
    await post(p.body(p.text_message()))
    await drain()
    (row,) = await stream_rows(redis, "message")
    assert set(row) >= {"id", "kind", "channel", "page_id", "sender", "timestamp", "event"}
    assert row["timestamp"].isdigit()


async def test_streams_are_capped(post: Post, redis: Redis, settings: Settings) -> None:
    from dataclasses import replace

    from shared import keys
    from workers.leased_worker import LeasedWorker as Worker
    from workers.settings import worker_settings

    capped = replace(settings, stream_maxlen=100)
    for batch in range(6):
        await post(p.body(*[p.text_message(mid=f"c{batch}-{i}") for i in range(50)]))
    worker = Worker(**worker_settings(capped), burst=True, handle_signals=False)
    await worker.main()
    await worker.close()
    # MAXLEN ~ trims whole radix-tree nodes (100 entries each), so the length stays near the cap.
    assert 100 <= await redis.xlen(keys.stream("message")) <= 200


async def test_duplicates_are_not_queued_and_each_users_events_share_one_lane(
    post: Post, drain: Any, redis: Redis, settings: Settings
) -> None:
    """Redis drops the duplicates of a batch; the new events go to their user's lane, in order,
    and one job owns each lane that got events."""
    from shared.lanes import lane_of

    await post(p.body(p.text_message(mid="m1"), p.text_message(mid="m2"), p.read_event()))
    await drain()
    mixed = p.body(
        p.text_message(mid="m1"), p.text_message(mid="m3"), p.read_event(),
        p.text_message(mid="m2"), p.text_message(mid="m4"), p.text_message(mid="m3"),
    )
    assert (await post(mixed)).status == 200
    lane = lane_of("page", p.PAGE, p.PSID, "", settings.lanes)
    queued = [json.loads(b)["id"] for b in await redis.lrange(f"fb:lane:{lane}", 0, -1)]
    assert queued == ["message:m3", "message:m4"]
    owner = await redis.get(f"fb:lanejob:{lane}")
    assert owner is not None and await redis.zscore("fb:queue", owner) is not None
    assert await redis.zcard("fb:queue") == 1
    await drain()
    ids = [r["id"] for r in await stream_rows(redis, "message")]
    assert ids == ["message:m1", "message:m2", "message:m3", "message:m4"]


async def test_a_lane_that_refuses_its_events_leaves_them_unmarked_for_facebooks_retry(
    post: Post, drain: Any, redis: Redis, settings: Settings
) -> None:
    """A lane key of another type (another program writing the same database) refuses the
    events: the POST gets 503 and those events are not marked seen, so Facebook's retry queues
    them once the key is gone (it was dropped as a duplicate: lost). Another user's events in
    the same POST, in a lane that took them, stay queued once: the retry finds them seen."""
    from shared.lanes import lane_of

    lane = lane_of("page", p.PAGE, p.PSID, "", settings.lanes)
    other = next(f"77{n}" for n in range(1000)
                 if lane_of("page", p.PAGE, f"77{n}", "", settings.lanes) != lane)
    assert (await post(p.body(p.text_message(mid="earlier")))).status == 200
    await drain()
    await redis.set(f"fb:lane:{lane}", "another program's")
    body = p.body(p.text_message(mid="theirs", sender=other), p.text_message(mid="refused"),
                  p.text_message(mid="earlier"))  # a duplicate in the refused lane
    assert (await post(body)).status == 503
    assert await redis.exists("fb:seen:message:refused") == 0
    assert await redis.exists("fb:seen:message:earlier") == 1  # an earlier POST's mark stays
    await redis.delete(f"fb:lane:{lane}")
    assert (await post(body)).status == 200
    await drain()
    ids = sorted(r["id"] for r in await stream_rows(redis, "message"))
    assert ids == ["message:earlier", "message:refused", "message:theirs"]


async def test_a_lane_job_ends_in_the_call_that_empties_its_lane(
    post: Post, drain: Any, redis: Redis
) -> None:
    """arq runs the lane's job with its own claim and end; the effects call that writes the last
    events of the lane also deletes its owner, so nothing of the lane is left."""
    assert (await post(p.body(p.text_message(mid="end-1"), p.shortlink_referral()))).status == 200
    assert await redis.zcard("fb:queue") == 1  # one user: one lane, one job
    await drain()
    assert await redis.zcard("fb:queue") == 0
    assert [k async for k in redis.scan_iter("arq:*")] == []
    assert [k async for k in redis.scan_iter("fb:lane*")] == []
    assert len(await stream_rows(redis, "message")) == 1
    assert len(await stream_rows(redis, "referral")) == 1


async def test_an_effects_call_is_sent_before_other_ready_tasks_run(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's pool checks a connection out with a read that yields to the event loop, so a
    command went out only after every ready task's next step: a worker's jobs all decoded first
    and Redis waited. The effects call holds its connection and sends at once."""
    import asyncio

    from redis.asyncio.connection import Connection

    from workers.effects import Effects, Step

    order: list[str] = []
    send = Connection.send_packed_command

    async def recorded(self: Connection, command: Any, check_health: bool = True) -> None:
        order.append("sent")
        await send(self, command, check_health)

    def event(n: int) -> Any:
        return p.row("message",
            f"message:at-once-{n}", "messaging", "PAGE", 1, p.text_message(mid=f"at-once-{n}"))

    async def other() -> None:
        order.append("other task")

    effects = Effects(redis, settings)
    await p.write(effects, redis, [event(0)])  # the first call connects
    job = await redis.get("fb:lanejob:0")
    assert job is None  # the lane emptied: its owner went with it
    await redis.rpush("fb:lane:0", "message:at-once-1")
    await redis.set("fb:lanejob:0", "test-job-0")
    monkeypatch.setattr(Connection, "send_packed_command", recorded)
    write = asyncio.create_task(effects.write([event(1)], Step(0, "test-job-0", 1)))
    await asyncio.gather(write, asyncio.create_task(other()))
    assert order[:2] == ["sent", "other task"]
    assert len(await stream_rows(redis, "message")) == 2
    await effects.aclose()
