"""Forwarding to the bot's own webhook (FORWARD_URL): a real aiohttp receiver on a free port.

The receiver (tests/receiver.py) checks each request's signature with the forward secret, as a
bot's existing handler would, and records what it got; workers run in this process against the
test Redis. Real processes killed mid-delivery and a bot down for a while: test_forward_faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from shared.errors import ConfigError
from shared.lanes import lane_of
from shared.settings import Settings
from shared.signing import sign
from tests import payloads as p
from tests.conftest import SECRET, Post, RunWorkers, lose_one_reply, stream_rows, wait_for
from tests.receiver import FORWARD_SECRET, Receiver, Reply, serving
from tests.redis_server import RedisProcess, free_port
from workers.forward import (
    BACKOFF_CAP_S,
    BATCH,
    RETRY_AFTER_CAP_S,
    Attempt,
    backoff_s,
    retry_after,
)
from workers.metrics import FORWARD_LAG

ROOT = Path(__file__).resolve().parents[1]
StartWorkers = Callable[..., Awaitable[None]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serving(Receiver()) as rec:
        yield rec


@pytest.fixture
def forwarding(settings: Settings, receiver: Receiver) -> Settings:
    return dataclasses.replace(settings, forward_url=receiver.url, forward_secret=FORWARD_SECRET)


@pytest.fixture
def workers(forwarding: Settings, run_workers: RunWorkers) -> StartWorkers:
    """start(count=1, **changes): `count` workers in this process, with the forwarding settings
    changed by `changes` (forward_kinds=..., forward_timeout_s=...)."""

    async def start(count: int = 1, **changes: Any) -> None:
        await run_workers(dataclasses.replace(forwarding, **changes), count)

    return start


async def forward_backlog(redis: Redis) -> int:
    """Events waiting in every forward list."""
    total = 0
    async for key in redis.scan_iter("fb:fwd:[0-9]*"):
        total += await redis.llen(key)  # type: ignore[misc]
    return total


async def drained(redis: Redis) -> bool:
    """Whether every forward list is empty (all delivered or dead-lettered)."""
    return await forward_backlog(redis) == 0


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- what the bot gets


async def test_every_event_reaches_the_bot_in_facebooks_envelope_signed_with_the_forward_secret(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    await workers(1)
    item = ('{"sender":{"id":"u1"},"recipient":{"id":"1122334455"},"timestamp":1700000000000,'
            '"message":{"mid":"m-fwd","text":"caf\\u00e9  \\ud83d"}}')
    body = ('{"object":"page","entry":[{"id":"1122334455","time":1,"messaging":['
            + item + "]}]}").encode()
    assert (await post(None, raw=body)).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 1)

    [got] = receiver.delivered()
    assert receiver.bad_signatures == 0
    sent = json.loads(got.body)
    assert sent["object"] == "page" and sent["entry"][0]["id"] == "1122334455"
    assert item.encode() in got.body, "the item exactly as Facebook sent it"
    assert got.headers["X-Fbhook-Event-Id"] == "message:m-fwd"
    assert got.headers["X-Fbhook-Kind"] == "message"
    assert got.headers["X-Fbhook-Referral"] == "0"
    assert json.loads(got.headers["X-Fbhook-Attribution"]) == {
        "_fbRefSource": None, "_fbRefParam": None, "_fbRefAdId": None}
    # The streams are written as ever, and the forward list is empty once delivered.
    assert await redis.xlen("fb:events:message") == 1
    assert await forward_backlog(redis) == 0


async def test_a_bot_that_checks_another_secret_refuses_every_delivery_and_they_are_dead_lettered(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.secret = SECRET  # the bot still checks with the App Secret, not FORWARD_SECRET
    await workers(1)
    for n in range(2):
        assert (await post(p.body(p.text_message(mid=f"sig-{n}", sender="sig")))).status == 200
    await wait_for(lambda: redis.xlen("fb:fwd:dead"), 10)
    await wait_for(lambda: receiver.bad_signatures == 2)
    await wait_for(lambda: drained(redis))
    dead = [fields for _, fields in await redis.xrange("fb:fwd:dead")]
    assert [(d[b"id"], d[b"status"], d[b"tries"]) for d in dead] == [
        (b"message:sig-0", b"403", b"1"), (b"message:sig-1", b"403", b"1")]
    assert receiver.got == []


async def test_standby_changes_and_instagram_reach_the_bot_in_facebooks_envelope_for_each(
    post: Post, receiver: Receiver, workers: StartWorkers
) -> None:
    await workers(1)
    standby = p.text_message(mid="sb-1", sender="sb")
    feed = {"field": "feed", "value": {"item": "comment", "verb": "add", "from": {"id": "fan"}}}
    insta = {"sender": {"id": "ig-user"}, "recipient": {"id": "ig-acct"}, "timestamp": 1,
             "message": {"mid": "ig-1", "text": "hi"}}
    bodies = [
        p.body(standby, channel="standby"),
        p.body(feed, channel="changes"),
        {"object": "instagram", "entry": [{"id": "ig-acct", "time": 5, "messaging": [insta]}]},
    ]
    for body in bodies:
        assert (await post(body)).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 3)

    got = {g.headers["X-Fbhook-Kind"]: g for g in receiver.delivered()}
    assert set(got) == {"message", "feed"}
    by_object = {json.loads(g.body)["object"]: json.loads(g.body) for g in receiver.delivered()}
    sent_standby, sent_feed = (json.loads(g.body) for g in receiver.delivered()[:2])
    for sent, channel, item in ((sent_standby, "standby", standby), (sent_feed, "changes", feed)):
        [entry] = sent["entry"]
        assert sent["object"] == "page"
        assert entry == {"id": p.PAGE, "time": entry["time"], channel: [item]}
        assert isinstance(entry["time"], int)
    [ig_entry] = by_object["instagram"]["entry"]
    assert ig_entry["id"] == "ig-acct" and ig_entry["messaging"] == [insta]


async def test_forward_kinds_limits_the_kinds_the_bot_gets_and_every_stream_is_still_written(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    await workers(1, forward_kinds=frozenset({"message", "postback"}))
    items = [p.shortlink_referral("k", sender="kinds"), p.text_message(mid="k-m", sender="kinds"),
             p.postback_with_referral(user_ref=None, sender="kinds"), p.read_event(sender="kinds")]
    assert (await post(p.body(*items))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 2)
    await wait_for(lambda: drained(redis))
    assert [g.headers["X-Fbhook-Kind"] for g in receiver.delivered()] == ["message", "postback"]
    assert sorted(r["kind"] for r in await stream_rows(redis)) == [
        "message", "postback", "read", "referral"]
    # The message came after the referral: its attribution and referral flag say so.
    message = receiver.delivered()[0]
    assert message.headers["X-Fbhook-Referral"] == "0"
    assert json.loads(message.headers["X-Fbhook-Attribution"])["_fbRefParam"] == "k"


async def test_the_bot_gets_the_users_attribution_and_the_referral_moment(
    post: Post, receiver: Receiver, workers: StartWorkers
) -> None:
    await workers(1)
    assert (await post(p.body(p.shortlink_referral("spring", sender="ana")))).status == 200
    assert (await post(p.body(p.text_message(mid="after", sender="ana")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 2)
    first, second = receiver.delivered()
    assert first.headers["X-Fbhook-Referral"] == "1"
    assert second.headers["X-Fbhook-Referral"] == "0"
    for got in (first, second):
        assert json.loads(got.headers["X-Fbhook-Attribution"]) == {
            "_fbRefSource": "SHORTLINK", "_fbRefParam": "spring", "_fbRefAdId": None}


async def test_an_event_id_that_is_no_header_value_is_sent_percent_encoded(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    await workers(1)
    mid = "odd\r\nX-Injected: 1 %é"
    assert (await post(p.body(p.text_message(mid=mid, sender="odd")))).status == 200
    assert (await post(p.body(p.text_message(mid="plain", sender="odd")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 2)
    ids = [g.headers["X-Fbhook-Event-Id"] for g in receiver.delivered()]
    assert ids == ["message:odd%0D%0AX-Injected:%201%20%25%C3%A9", "message:plain"]
    assert "X-Injected" not in receiver.delivered()[0].headers
    assert json.loads(receiver.delivered()[0].body)["entry"][0]["messaging"][0][
        "message"]["mid"] == mid
    assert await redis.xlen("fb:fwd:dead") == 0


# --------------------------------------------------------------------------- order and many users


async def test_200_users_get_each_of_their_events_once_and_in_order_through_two_workers(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    users, per_user = 200, 5
    flaky = {f"message:u{u}-{r}" for u in range(0, users, 23) for r in (1, 3)}

    def policy(event_id: str, seen: int) -> Reply:  # some first tries fail: 503, then 200
        return Reply(503 if event_id in flaky and seen == 0 else 200, delay_s=0.001)

    receiver.policy = policy
    await workers(2)
    items = [p.text_message(mid=f"u{u}-{r}", sender=f"user-{u}")
             for r in range(per_user) for u in range(users)]
    for start in range(0, len(items), 40):  # in order: each user's events as the ingest took them
        assert (await post(p.body(*items[start:start + 40]))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == users * per_user, 60)

    assert receiver.bad_signatures == 0
    assert sorted(receiver.delivered_ids()) == sorted(
        f"message:u{u}-{r}" for u in range(users) for r in range(per_user))
    assert {i: c for i, c in receiver.counts().items() if c != 1} == {i: 2 for i in flaky}
    in_order = {f"user-{u}": [f"message:u{u}-{r}" for r in range(per_user)]
                for u in range(users)}
    assert receiver.first_by_sender() == in_order
    delivered_by_user: dict[str, list[str]] = {}
    for g in receiver.delivered():
        delivered_by_user.setdefault(g.sender(), []).append(g.event_id)
    assert delivered_by_user == in_order
    assert await forward_backlog(redis) == 0
    assert await redis.hlen("fb:fwd:tries") == 0  # type: ignore[misc]


async def test_a_user_whose_delivery_is_retried_holds_up_only_its_own_forward_lane(
    post: Post, forwarding: Settings, receiver: Receiver, workers: StartWorkers
) -> None:
    bot_fixed = False

    def policy(event_id: str, seen: int) -> Reply:
        if event_id == "message:slow-0" and not bot_fixed:
            return Reply(503, {"Retry-After": "1"})
        return Reply()

    def lane(user: str) -> int:
        return lane_of("page", p.PAGE, user, "", forwarding.lanes)

    receiver.policy = policy
    await workers(1)
    assert (await post(p.body(p.text_message(mid="slow-0", sender="slow")))).status == 200
    await wait_for(lambda: len(receiver.got) == 1)
    others = [p.text_message(mid=f"o-{n}", sender=f"other-{n}") for n in range(60)]
    assert (await post(p.body(*others, p.text_message(mid="slow-1", sender="slow")))).status == 200
    elsewhere = {f"message:o-{n}" for n in range(60) if lane(f"other-{n}") != lane("slow")}
    await wait_for(lambda: set(receiver.delivered_ids()) == elsewhere)
    await asyncio.sleep(0.3)
    assert set(receiver.delivered_ids()) == elsewhere  # the slow lane's users still wait

    bot_fixed = True
    await wait_for(lambda: len(receiver.delivered()) == 62, 30)
    assert [g.event_id for g in receiver.delivered() if g.sender() == "slow"] == [
        "message:slow-0", "message:slow-1"]
    assert sum(1 for g in receiver.got if g.event_id == "message:slow-0") >= 2


# --------------------------------------------------------------------------- failures and retries


async def test_a_failing_bot_is_retried_honouring_retry_after_and_gets_each_users_events_in_order(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.replies = [Reply(503), Reply(429, {"Retry-After": "1"}), Reply(200)]
    await workers(2)
    for n in range(5):
        assert (await post(p.body(p.text_message(mid=f"o-{n}", sender="bob")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 5)
    assert receiver.delivered_ids() == [f"message:o-{n}" for n in range(5)]
    assert [g.status for g in receiver.got[:2]] == [503, 429]
    assert await redis.xlen("fb:fwd:dead") == 0


async def test_a_bot_that_answers_429_fails_and_times_out_gets_the_event_when_it_comes_back(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.replies = [Reply(429, {"Retry-After": "2"}), Reply(500), Reply(200, delay_s=2.0),
                        Reply(200)]
    retries = sample("fbhook_forward_failures_total", next="retry")
    await workers(1, forward_timeout_s=0.5)
    assert (await post(p.body(p.text_message(mid="back", sender="dan")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 1, 30)
    await wait_for(lambda: drained(redis))

    assert [g.status for g in receiver.got] == [429, 500, 0, 200]  # 0: the sender had gone
    assert {g.event_id for g in receiver.got} == {"message:back"}  # one id across the retries
    # Retry-After is honoured: a first retry's own backoff is at most 1 s.
    assert receiver.got[1].at - receiver.got[0].at >= 2.0
    assert sample("fbhook_forward_failures_total", next="retry") - retries == 3
    assert await redis.hlen("fb:fwd:tries") == 0  # type: ignore[misc]
    assert await redis.xlen("fb:fwd:dead") == 0


async def test_a_4xx_is_dead_lettered_at_once_with_the_answer_and_the_lane(
    post: Post, redis: Redis, forwarding: Settings, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.replies = [Reply(400), Reply(200)]
    await workers(1)
    assert (await post(p.body(p.text_message(mid="refused", sender="cy")))).status == 200
    assert (await post(p.body(p.text_message(mid="next", sender="cy")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 1)
    [(_, dead)] = await redis.xrange("fb:fwd:dead")
    assert dead[b"id"] == b"message:refused" and dead[b"status"] == b"400"
    assert dead[b"tries"] == b"1" and dead[b"error"] == b"HTTP 400"
    assert b"EVENT_RECEIVED" in dead[b"answer"]
    assert int(dead[b"lane"]) == lane_of("page", p.PAGE, "cy", "", forwarding.lanes)
    record, _, attribution = dead[b"payload"].partition(b"\n")
    assert json.loads(record)["id"] == "message:refused"
    assert json.loads(attribution)["_fbRefSource"] is None
    assert receiver.delivered_ids() == ["message:next"]


async def test_a_run_hands_its_list_on_within_the_job_timeout_so_nothing_is_sent_twice(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.replies = [Reply(delay_s=0.25)]  # 12 events: 3 s of POSTs for one list
    await workers(1, job_timeout_s=2, forward_timeout_s=0.9)
    items = [p.text_message(mid=f"jt-{n}", sender="jt") for n in range(12)]
    assert (await post(p.body(*items))).status == 200
    await wait_for(lambda: len(receiver.delivered()) >= 12, 30)
    await wait_for(lambda: drained(redis))
    assert receiver.delivered_ids() == [f"message:jt-{n}" for n in range(12)]


async def test_a_bot_that_hangs_holds_no_job_slot_the_lanes_need(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.hold_after = 0  # every POST hangs until the gate opens
    await workers(1, worker_max_jobs=8, forward_concurrency=4, forward_timeout_s=20)
    fill = [p.text_message(mid=f"fill-{u}", sender=f"fill-{u}") for u in range(100)]
    assert (await post(p.body(*fill))).status == 200
    await wait_for(lambda: receiver.in_flight == 4)
    attempts = sample("fbhook_forward_attempt_seconds_count")
    await asyncio.sleep(0.5)  # the other forward jobs come round meanwhile, and find no run slot

    probes = [p.text_message(mid=f"probe-{u}", sender=f"probe-{u}") for u in range(5)]
    assert (await post(p.body(*probes))).status == 200

    async def probes_written() -> bool:
        ids = {r["id"] for r in await stream_rows(redis, "message")}
        return {f"message:probe-{u}" for u in range(5)} <= ids

    await wait_for(probes_written, 30)
    # Written while every POST still hung: no forward job kept the lanes from a job slot.
    assert sample("fbhook_forward_attempt_seconds_count") == attempts
    assert receiver.in_flight == 4
    receiver.gate.set()
    await wait_for(lambda: len(set(receiver.delivered_ids())) == 105, 60)
    assert receiver.most_in_flight == 4


async def test_forward_concurrency_bounds_the_posts_a_worker_has_in_flight(
    post: Post, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.replies = [Reply(delay_s=0.2)]
    await workers(1, forward_concurrency=2)
    items = [p.text_message(mid=f"cc-{u}-{r}", sender=f"cc-{u}") for r in range(2)
             for u in range(12)]
    assert (await post(p.body(*items))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 24)
    assert receiver.most_in_flight == 2


# --------------------------------------------------------------------------- metrics and logs


async def test_deliveries_and_failures_are_counted_and_the_lag_is_set(
    post: Post, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.replies = [Reply(502), Reply(200)]
    before = {
        "ok": sample("fbhook_forward_deliveries_total", outcome="delivered", status="2xx"),
        "failed": sample("fbhook_forward_deliveries_total", outcome="failed", status="5xx"),
        "retry": sample("fbhook_forward_failures_total", next="retry"),
        "attempts": sample("fbhook_forward_attempt_seconds_count"),
    }
    await workers(1)
    for n in range(3):
        assert (await post(p.body(p.text_message(mid=f"mx-{n}", sender="mx")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 3)
    await asyncio.sleep(0.1)  # the worker counts after the answer came
    assert sample("fbhook_forward_deliveries_total", outcome="delivered", status="2xx") - \
        before["ok"] == 3
    assert sample("fbhook_forward_deliveries_total", outcome="failed", status="5xx") - \
        before["failed"] == 1
    assert sample("fbhook_forward_failures_total", next="retry") - before["retry"] == 1
    assert sample("fbhook_forward_attempt_seconds_count") - before["attempts"] == 4
    assert sample("fbhook_forward_lag_seconds") > 0


async def test_the_lag_keeps_growing_while_the_bot_fails(
    post: Post, receiver: Receiver, workers: StartWorkers
) -> None:
    receiver.replies = [Reply(503)]
    FORWARD_LAG.set(0)
    await workers(1)
    assert (await post(p.body(p.text_message(mid="lag", sender="lag")))).status == 200
    await wait_for(lambda: len(receiver.got) == 2)
    await asyncio.sleep(0.1)
    # The second try came after a backoff of at least 0.5 s: the event was that old then.
    assert sample("fbhook_forward_lag_seconds") >= 0.5


async def test_each_failed_attempt_logs_one_line_naming_the_event_and_never_the_secret(
    post: Post, receiver: Receiver, workers: StartWorkers, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.replies = [Reply(503), Reply(404), Reply(200)]
    caplog.set_level(logging.WARNING, logger="fbhook.forward")
    await workers(1)
    assert (await post(p.body(p.text_message(mid="lg-0", sender="lg")))).status == 200
    assert (await post(p.body(p.text_message(mid="lg-1", sender="lg")))).status == 200
    await wait_for(lambda: len(receiver.got) == 3)
    await asyncio.sleep(0.1)
    lines = [r for r in caplog.records if r.name == "fbhook.forward"]
    assert [(r.event_id, r.status, r.next.split(" ")[0]) for r in lines] == [  # type: ignore[attr-defined]
        ("message:lg-0", 503, "retry"), ("message:lg-0", 404, "dead")]
    for record in lines:
        assert FORWARD_SECRET.decode() not in json.dumps(record.__dict__, default=str)


# --------------------------------------------------------------------------- replay with the CLI


async def fbhook(*args: str, redis_url: str) -> tuple[int, str, str]:
    """`python -m cli ...` without blocking this loop (the workers run on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, "--redis-url", redis_url, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_forward_dead_letters_are_listed_replayed_at_the_end_of_their_lane_and_purged(
    post: Post, redis: Redis, forwarding: Settings, receiver: Receiver, workers: StartWorkers,
    redis_proc: RedisProcess,
) -> None:
    receiver.policy = lambda event_id, seen: Reply(
        400 if event_id.startswith("message:refused") and seen == 0 else 200)
    receiver.hold_after = 1  # the bot hangs on the user's next event until the gate opens
    url = redis_proc.url
    lane = lane_of("page", p.PAGE, "cy", "", forwarding.lanes)
    await workers(1, forward_timeout_s=25)
    assert (await post(p.body(p.text_message(mid="refused", sender="cy")))).status == 200
    await wait_for(lambda: redis.xlen("fb:fwd:dead"))
    assert (await post(p.body(p.text_message(mid="held", sender="cy")))).status == 200
    await wait_for(lambda: receiver.held() == 1)

    code, out, _ = await fbhook("forward", "dead", "list", redis_url=url)
    assert code == 0 and len(out.splitlines()) == 1
    assert "message  message:refused  HTTP 400  tries=1" in out
    code, out, _ = await fbhook("forward", "dead", "list", "--json", redis_url=url)
    [letter] = [json.loads(line) for line in out.splitlines()]
    assert (letter["event_id"], letter["status"], letter["lane"]) == ("message:refused", 400, lane)

    owner = await redis.get(f"fb:fwdjob:{lane}")
    code, out, err = await fbhook("forward", "dead", "replay", redis_url=url)
    assert code == 1 and "--all" in err
    code, out, _ = await fbhook("forward", "dead", "replay", letter["entry_id"], redis_url=url)
    assert code == 0 and "1 forward dead letter queued to be sent again" in out
    # At the end of the lane, behind the user's event being delivered; the lane keeps its job.
    waiting = [json.loads(i.partition(b"\n")[0])["id"]
               for i in await redis.lrange(f"fb:fwd:{lane}", 0, -1)]  # type: ignore[misc]
    assert waiting == ["message:held", "message:refused"]
    assert await redis.get(f"fb:fwdjob:{lane}") == owner and owner is not None
    assert await redis.xlen("fb:fwd:dead") == 0
    receiver.gate.set()
    await wait_for(lambda: len(receiver.delivered()) == 2)
    assert receiver.delivered_ids() == ["message:held", "message:refused"]
    code, out, _ = await fbhook("forward", "dead", "replay", letter["entry_id"], redis_url=url)
    assert code == 1 and "0 forward dead letters" in out  # replayed once only

    # A lane with no job gets one.
    assert (await post(p.body(p.text_message(mid="refused-2", sender="cy")))).status == 200
    await wait_for(lambda: redis.xlen("fb:fwd:dead"))
    await wait_for(lambda: drained(redis))
    assert await redis.exists(f"fb:fwdjob:{lane}") == 0
    code, out, _ = await fbhook("forward", "dead", "replay", "--all", redis_url=url)
    assert code == 0 and "1 forward dead letter queued" in out
    await wait_for(lambda: len(receiver.delivered()) == 3)
    assert receiver.delivered_ids()[-1] == "message:refused-2"

    assert (await post(p.body(p.text_message(mid="refused-3", sender="cy")))).status == 200
    await wait_for(lambda: redis.xlen("fb:fwd:dead"))
    code, out, _ = await fbhook("forward", "dead", "purge", "--all", redis_url=url)
    assert code == 0 and "1 forward dead letter purged" in out
    code, out, _ = await fbhook("forward", "dead", "list", redis_url=url)
    assert out.strip() == "no forward dead letters"


async def test_a_delivery_older_than_the_max_age_gives_up_and_a_replay_counts_age_afresh(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers, redis_proc: RedisProcess,
) -> None:
    failing = {"until": 1_000_000}  # the bot answers 503 to the first `until` tries of an event
    receiver.policy = lambda event_id, seen: Reply(503 if seen < failing["until"] else 200)
    await workers(1, forward_max_age_s=2)
    sent = time.time()
    assert (await post(p.body(p.text_message(mid="aged", sender="ag")))).status == 200
    await wait_for(lambda: redis.xlen("fb:fwd:dead"), seconds=15)
    [(entry_id, fields)] = await redis.xrange("fb:fwd:dead")
    assert fields[b"id"] == b"message:aged" and fields[b"status"] == b"503"
    assert fields[b"error"].endswith(b"(gave up: older than FORWARD_MAX_AGE_SECONDS)")
    tries = int(fields[b"tries"])
    assert tries == len(receiver.got) >= 2  # retried while it was young enough
    assert receiver.delivered() == []

    # Replayed once it is older than the max age, the event is tried as a new one: one more
    # 503 is retried (it would have been dead-lettered again at once), then it is delivered.
    await asyncio.sleep(max(0.0, sent + 2.5 - time.time()))
    failing["until"] = tries + 1
    code, out, _ = await fbhook("forward", "dead", "replay", entry_id.decode(),
                                redis_url=redis_proc.url)
    assert code == 0 and "1 forward dead letter queued" in out
    mark = await redis.get("fb:fwdreplay:message:aged")
    assert mark is not None and int(mark) >= int(sent * 1000) + 2500
    assert 29 * 86400 * 1000 < await redis.pttl("fb:fwdreplay:message:aged") <= 30 * 86400 * 1000
    await wait_for(lambda: len(receiver.delivered()) == 1, seconds=15)
    assert receiver.delivered_ids() == ["message:aged"]
    assert len(receiver.got) == tries + 2
    assert await redis.xlen("fb:fwd:dead") == 0


@pytest.mark.parametrize("ref", ["\U0001F600" * 700, "r" * 8200], ids=["emoji", "ascii"])
async def test_a_ref_too_long_for_a_header_costs_no_delivery(
    ref: str, post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers
) -> None:
    """A signed m.me ref of thousands of characters made `X-Fbhook-Attribution` longer than the
    8 KB a bot's server takes: it answered 400, final, and the referral and every later event of
    the user went to the dead letters. Such a value is now sent as null and named in
    `X-Fbhook-Attribution-Cut`; every event is delivered."""
    await workers(1)
    assert (await post(p.body(p.shortlink_referral(ref, sender="lr")))).status == 200
    assert (await post(p.body(p.text_message(mid="lr-later", sender="lr")))).status == 200
    await wait_for(lambda: len(receiver.delivered()) == 2)
    assert await redis.xlen("fb:fwd:dead") == 0
    for got in receiver.delivered():
        attribution = json.loads(got.headers["X-Fbhook-Attribution"])
        assert attribution == {"_fbRefSource": "SHORTLINK", "_fbRefParam": None,
                               "_fbRefAdId": None}
        assert got.headers["X-Fbhook-Attribution-Cut"] == "_fbRefParam"
        assert len(got.headers["X-Fbhook-Attribution"]) <= 4096


def test_an_error_names_the_bots_url_without_its_credentials() -> None:
    """aiohttp quotes the URL it failed on, and that text went to the worker's log and the dead
    letter: a bot's key in the query string (or a user and password) with it."""
    from workers.forward import redacted

    text = ("ClientConnectorError: Cannot connect to host 127.0.0.1:9 ssl:default "
            "[url='http://bot:PASS@127.0.0.1:9/hook/x?key=KEY&b=2#frag'] (also "
            "https://h.example/p?token=TOKEN)")
    out = redacted(text)
    assert "PASS" not in out and "KEY" not in out and "TOKEN" not in out
    assert "http://127.0.0.1:9/hook/x" in out and "https://h.example/p" in out


async def test_the_demo_receiver_prints_what_the_workers_forward_and_refuses_a_bad_signature(
    post: Post, workers: StartWorkers
) -> None:
    port = free_port()
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "forward", "demo-receiver", "--port", str(port),
        "--secret", FORWARD_SECRET.decode(), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    assert demo.stdout is not None
    try:
        first = await asyncio.wait_for(demo.stdout.readline(), 30)
        assert f"listening on http://127.0.0.1:{port}/webhook" in first.decode()
        bad = {"X-Hub-Signature-256": sign(b"not-the-secret", b"{}")}
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/webhook", data=b"{}", headers=bad) as answer:
            assert answer.status == 403
        assert b"403" in await asyncio.wait_for(demo.stdout.readline(), 10)
        await workers(1, forward_url=f"http://127.0.0.1:{port}/webhook")
        assert (await post(p.body(p.shortlink_referral("demo", sender="demo")))).status == 200
        printed = (await asyncio.wait_for(demo.stdout.readline(), 20)).decode()
        assert printed.startswith("h:") and "kind=referral  referral=1" in printed
        assert '"_fbRefParam": "demo"' in printed
        body = json.loads(await asyncio.wait_for(demo.stdout.readline(), 10))
        assert body["entry"][0]["messaging"][0]["referral"]["ref"] == "demo"
    finally:
        demo.terminate()
        await demo.wait()


# --------------------------------------------------------------------------- units


def test_forward_settings_need_a_secret_and_a_timeout_under_half_the_job_timeout() -> None:
    base = {"FB_APP_SECRET": "s" * 12, "FB_VERIFY_TOKEN": "verify-token", "API_TOKEN": "a" * 12,
            "FORWARD_URL": "http://127.0.0.1:9000/webhook", "JOB_TIMEOUT_SECONDS": "60"}
    with pytest.raises(ConfigError, match="FORWARD_SECRET is required"):
        Settings.from_env(base)
    with_secret = {**base, "FORWARD_SECRET": "bot-forward-secret"}
    with pytest.raises(ConfigError, match="FORWARD_TIMEOUT_SECONDS must be less than half"):
        Settings.from_env({**with_secret, "FORWARD_TIMEOUT_SECONDS": "30"})
    with pytest.raises(ConfigError, match="FORWARD_CONCURRENCY must be less than WORKER_MAX_JOBS"):
        Settings.from_env({**with_secret, "FORWARD_CONCURRENCY": "8", "WORKER_MAX_JOBS": "8"})
    settings = Settings.from_env({**with_secret, "FORWARD_TIMEOUT_SECONDS": "29.5",
                                  "FORWARD_KINDS": "message, postback,"})
    assert (settings.forward_timeout_s, settings.forward_kinds) == (
        29.5, frozenset({"message", "postback"}))
    assert settings.redacted()["forward_secret"] == "<set>"


def test_retry_after_reads_seconds_and_http_dates_and_is_capped() -> None:
    assert retry_after({"Retry-After": "120"}) == 120.0
    assert retry_after({"Retry-After": "-5"}) == 0.0
    assert retry_after({"Retry-After": str(10 * 86400)}) == RETRY_AFTER_CAP_S
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = retry_after({"Retry-After": when})
    assert seconds is not None and 28 <= seconds <= 30


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    for tries in range(1, 15):
        full = min(BACKOFF_CAP_S, 2 ** (tries - 1))
        for _ in range(50):
            assert full / 2 <= backoff_s(tries) <= full


def test_timeouts_connection_errors_408_429_and_5xx_are_retried_other_answers_are_not() -> None:
    retried = {s for s in (0, 200, 301, 400, 401, 403, 404, 408, 410, 422, 429, 500, 502, 503)
               if Attempt(s, "", "").retryable}
    assert retried == {0, 408, 429, 500, 502, 503}
    assert [s for s in (200, 204, 299, 300, 199) if Attempt(s, "", "").delivered] == [200, 204, 299]


async def test_a_forward_step_whose_reply_was_lost_is_not_run_twice(
    post: Post, redis: Redis, receiver: Receiver, workers: StartWorkers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection drops after Redis ran a forward step (events delivered, taken off the
    list) but before its reply was read, and the pool sends the call again: the events after
    them must not be taken off unsent."""
    count = BATCH + 20
    items = [p.text_message(mid=f"lost-{i}", sender="lost-user", ts=1_700_000_000_000 + i)
             for i in range(count)]
    assert (await post(p.body(*items))).status == 200
    dropped = lose_one_reply(monkeypatch, lambda reply: isinstance(reply, list)
                             and len(reply) == 2 and reply[0] == b"more")
    await workers(1)
    await wait_for(lambda: len(receiver.delivered()) >= count)
    await asyncio.sleep(0.3)  # a repeat would show now
    assert len(dropped) == 1
    assert receiver.delivered_ids() == [f"message:lost-{i}" for i in range(count)]
    assert await forward_backlog(redis) == 0
