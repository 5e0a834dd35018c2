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
    from workers.claiming import ClaimingWorker as Worker
    from workers.settings import worker_settings

    capped = replace(settings, stream_maxlen=100)
    for batch in range(6):
        await post(p.body(*[p.text_message(mid=f"c{batch}-{i}") for i in range(50)]))
    worker = Worker(**worker_settings(capped), burst=True, handle_signals=False)
    await worker.main()
    await worker.close()
    # MAXLEN ~ trims whole radix-tree nodes (100 entries each), so the length stays near the cap.
    assert 100 <= await redis.xlen(keys.stream("message")) <= 200


async def test_a_job_holding_duplicates_keeps_only_the_new_events(
    post: Post, drain: Any, redis: Redis
) -> None:
    """Ingest prebuilds each job; Redis drops the duplicates from it (or the whole job)."""
    import msgspec

    await post(p.body(p.text_message(mid="m1"), p.text_message(mid="m2"), p.read_event()))
    await drain()
    mixed = p.body(
        p.text_message(mid="m1"), p.text_message(mid="m3"), p.read_event(),
        p.text_message(mid="m2"), p.text_message(mid="m4"), p.text_message(mid="m3"),
    )
    assert (await post(mixed)).status == 200
    jobs = [msgspec.msgpack.decode(await redis.get(k)) async for k in redis.scan_iter("arq:job:*")]
    assert [(j["f"], [json.loads(e)["id"] for e in j["k"]["events"]]) for j in jobs] == [
        ("message", ["message:m3", "message:m4"])
    ], "the read job was all duplicates and is not written"
    await drain()
    ids = sorted(r["id"] for r in await stream_rows(redis, "message"))
    assert ids == ["message:m1", "message:m2", "message:m3", "message:m4"]


async def test_a_job_starts_in_its_claim_and_ends_in_the_call_that_writes_its_outputs(
    post: Post, drain: Any, redis: Redis
) -> None:
    """The claim reads the job and counts its try as arq's start transaction would, and the
    effects call deletes the arq job and its queue entry atomically with the outputs: neither
    of arq's per-job transactions is sent."""
    assert (await post(p.body(p.text_message(mid="end-1"), p.shortlink_referral()))).status == 200
    jobs = await redis.zcard("fb:queue")
    assert jobs == 2  # one job per kind
    await redis.config_resetstat()
    await drain()
    assert await redis.zcard("fb:queue") == 0
    assert [k async for k in redis.scan_iter("arq:*")] == []
    stats = await redis.info("commandstats")
    assert "cmdstat_exec" not in stats and "cmdstat_multi" not in stats
    assert stats["cmdstat_evalsha"]["calls"] >= jobs + 1  # a claim, then one call per job
    assert len(await stream_rows(redis, "message")) == 1
    assert len(await stream_rows(redis, "referral")) == 1


async def test_a_claim_reads_past_the_jobs_other_workers_are_running(redis: Redis) -> None:
    """With many workers, the head of the queue holds every running job; a claim pages on
    past them to the ready ones, and starts each (its body read, its try counted)."""
    from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

    from workers import claiming

    for n in range(300):
        await redis.zadd("q-many", {f"j{n}": n})
        await redis.set(job_key_prefix + f"j{n}", f"body{n}")
    for n in range(250):  # running elsewhere
        await redis.set(in_progress_key_prefix + f"j{n}", "1")
    claim = redis.register_script(claiming.CLAIM_LUA)
    claimed = await claim(args=[
        "q-many", 10_000, 3, in_progress_key_prefix, 60_000, claiming.PAGE, job_key_prefix,
        retry_key_prefix, claiming.RETRY_KEY_TTL_S, claiming.MOST])
    assert claimed == [b"j250", b"250", b"body250", 1, b"j251", b"251", b"body251", 1,
                       b"j252", b"252", b"body252", 1]
    assert await redis.exists(in_progress_key_prefix + "j252") == 1
    assert await redis.get(retry_key_prefix + "j250") == b"1"
    assert 0 < await redis.ttl(retry_key_prefix + "j250") <= claiming.RETRY_KEY_TTL_S


async def test_an_effects_call_is_sent_before_other_ready_tasks_run(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's pool checks a connection out with a read that yields to the event loop, so a
    command went out only after every ready task's next step: a worker's jobs all decoded first
    and Redis waited. The effects call holds its connection and sends at once."""
    import asyncio

    from redis.asyncio.connection import Connection

    from workers.effects import Effects

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
    await effects.write([event(0)])  # the first call connects
    monkeypatch.setattr(Connection, "send_packed_command", recorded)
    write = asyncio.create_task(effects.write([event(1)]))
    await asyncio.gather(write, asyncio.create_task(other()))
    assert order[:2] == ["sent", "other task"]
    assert len(await stream_rows(redis, "message")) == 2
    await effects.aclose()
