"""Redis behind Sentinel: the URL, the replica acknowledgement, and failovers with real
processes (a primary, two replicas, three `redis-server --sentinel`), checked write by write.

The slow tests print what they measured (pytest -s): docs/failover.md quotes those figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError

from cli.failover import planned_failover
from shared import sentinel as sentinel_module
from shared.errors import ConfigError
from shared.redis import NotReplicated, connect, wait_replicas
from shared.sentinel import DEFAULT_PORT, FOLLOW_INTERVAL_S, SentinelURL, parse
from shared.settings import Settings, redact_url
from tests.ha import SERVICE, Answer, Endpoint, Node, Topology, outage, send_timed, topology
from tests.processes import message_item, processed_ids, services, wait_processed
from tests.redis_server import free_port, redis_server, server_binary

FOUND_WITHIN_S = 2.0
"""The issue's bound: after a failover, clients find the new primary within about 2 s, and
never write to a demoted primary longer than that after the sentinels name the new one."""


# --------------------------------------------------------------------------- the URL


def test_a_sentinel_url_names_its_sentinels_service_password_and_db() -> None:
    assert parse("redis+sentinel://:s3cr%40t@10.0.0.1:26379,10.0.0.2:26380/fbhook/2") == (
        SentinelURL(sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)), service="fbhook",
                    db=2, username=None, password="s3cr@t", tls=False))


def test_a_sentinel_url_takes_default_ports_ipv6_a_user_and_tls_options() -> None:
    url = "rediss+sentinel://app:pw@[::1],s2/main?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem"
    assert parse(url) == SentinelURL(
        sentinels=(("::1", DEFAULT_PORT), ("s2", DEFAULT_PORT)), service="main", db=0,
        username="app", password="pw", tls=True,
        tls_options={"ssl_cert_reqs": "none", "ssl_ca_certs": "/ca.pem"})


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+sentinel://h:26379", "the path must be /<service-name>"),
    ("redis+sentinel://h:26379/", "the path must be /<service-name>"),
    ("redis+sentinel://h:26379/svc/0/extra", "the path must be /<service-name>"),
    ("redis+sentinel://h:26379/svc/zero", "the database after the service name must be a number"),
    ("redis+sentinel://h:port/svc", "sentinel port must be a number from 1 to 65535"),
    ("redis+sentinel://h:70000/svc", "sentinel port must be a number from 1 to 65535"),
    ("redis+sentinel://h1,,h2/svc", "every sentinel needs a host"),
    ("redis+sentinel://h/svc?ssl_cert_reqs=none", "unknown option 'ssl_cert_reqs'"),
    ("rediss+sentinel://h/svc?timeout=3", "unknown option 'timeout'"),
])
def test_a_bad_sentinel_url_is_refused_naming_redis_url_and_the_reason(url: str,
                                                                      reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.for_tools({"REDIS_URL": url})
    assert str(caught.value).startswith("REDIS_URL is not a valid Sentinel URL: " + reason)


def test_a_sentinel_urls_password_never_shows_in_an_error_or_the_redacted_settings() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.for_tools({"REDIS_URL": "redis+sentinel://:hunter2@h:x/svc"})
    assert "hunter2" not in str(caught.value)
    settings = Settings.for_tools({"REDIS_URL": "redis+sentinel://:hunter2@h1:1,h2:2/svc"})
    assert settings.redacted()["redis_url"] == "redis+sentinel://:***@h1:1,h2:2/svc"
    assert redact_url(settings.redis_url) == "redis+sentinel://:***@h1:1,h2:2/svc"


def test_a_sentinel_password_is_an_option_of_the_url_and_never_shown() -> None:
    url = ("redis+sentinel://:data%40pw@h1/svc?sentinel_username=ops"
           "&sentinel_password=s3nt%2Bpw%26")
    parsed = parse(url)
    assert (parsed.password, parsed.sentinel_username, parsed.sentinel_password) == (
        "data@pw", "ops", "s3nt+pw&")
    assert "pw" not in repr(parsed)
    settings = Settings.for_tools({"REDIS_URL": url})
    assert settings.redacted()["redis_url"] == (
        "redis+sentinel://:***@h1/svc?sentinel_username=ops&sentinel_password=***")
    with pytest.raises(ConfigError) as caught:
        Settings.for_tools({"REDIS_URL": url.replace("h1", "h1:x")})
    assert "s3nt" not in str(caught.value)


@contextlib.contextmanager
def guarded_sentinel(tmp: Path, password: str) -> Iterator[str]:
    """A primary and one sentinel of it that requires `password`; yields the sentinel's
    `host:port`."""
    with redis_server() as primary:
        port = free_port()
        conf = tmp / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp}\nrequirepass {password}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1\n")
        process = subprocess.Popen([server_binary(), str(conf), "--sentinel"], cwd=tmp,
                                   stdout=subprocess.DEVNULL)
        try:
            with redis.Redis(port=port, password=password) as sentinel:
                deadline = time.monotonic() + 10
                while True:
                    with contextlib.suppress(redis.RedisError):
                        if sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                    SERVICE):
                            break
                    assert time.monotonic() < deadline, "the sentinel never answered"
                    time.sleep(0.05)
            yield f"127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


async def test_sentinels_that_require_a_password_are_asked_with_the_urls_one(
    tmp_path: Path,
) -> None:
    """Sentinels with `requirepass` of their own (hardened setups have one): the URL's
    `sentinel_password` reaches them; without it, or with a wrong one, the error says what the
    sentinel answered, and never the password."""
    with guarded_sentinel(tmp_path, "s3nt+pw") as sentinel:
        base = f"redis+sentinel://{sentinel}/{SERVICE}"
        client = connect(Settings.for_tools({"REDIS_URL": base + "?sentinel_password=s3nt%2Bpw"}))
        try:
            await client.set("reached", "yes")
            assert await client.get("reached") == b"yes"
        finally:
            await client.aclose()
        for query, answer in (("", "Authentication required"),
                              ("?sentinel_password=wrong-pw", "invalid username-password")):
            client = connect(Settings.for_tools({"REDIS_URL": base + query}))
            try:
                with pytest.raises(MasterNotFoundError) as caught:
                    await client.ping()
            finally:
                await client.aclose()
            message = str(caught.value)
            assert f"sentinel {sentinel} answered" in message, message
            assert answer in message, message
            assert "wrong-pw" not in message and "s3nt" not in message, message


def test_other_schemes_are_refused_with_every_accepted_one_named() -> None:
    with pytest.raises(ConfigError, match="must start with redis://, rediss://, unix://, "
                       "redis\\+sentinel:// or rediss\\+sentinel://, not 'sentinel'"):
        Settings.for_tools({"REDIS_URL": "sentinel://h:26379/svc"})


def test_ack_replicas_is_zero_unless_set_and_refuses_what_is_not_a_count() -> None:
    assert Settings.for_tools({}).ack_replicas == 0
    assert Settings.for_tools({"ACK_REPLICAS": "2"}).ack_replicas == 2
    with pytest.raises(ConfigError, match="ACK_REPLICAS must be between 0 and 16, got -1"):
        Settings.for_tools({"ACK_REPLICAS": "-1"})
    with pytest.raises(ConfigError, match="ACK_REPLICAS must be a whole number, got 'one'"):
        Settings.for_tools({"ACK_REPLICAS": "one"})


# --------------------------------------------------------------------------- WAIT


def test_check_config_fails_when_redis_lacks_the_replicas_ack_replicas_asks_for(
    redis_proc: Any,
) -> None:
    from tests.test_cli import fbhook_sync, full_env

    done = fbhook_sync("check-config", "--timeout", "0.3",
                       env=full_env(redis_proc.url, ACK_REPLICAS="1"))
    assert done.code == 1, done
    assert ("ACK_REPLICAS=1: NOT confirmed, every webhook would get 503: 0 of 1 replicas "
            "confirmed the events within 300 ms") in done.out


async def test_with_ack_replicas_and_no_replica_a_webhook_gets_503_and_its_retry_200_once_off(
    aiohttp_client: Any, settings: Settings, redis: Redis,
) -> None:
    """The test Redis has no replica: with ACK_REPLICAS=1 the events are queued but not
    confirmed, so Facebook is told 503; its retry, once ACK_REPLICAS is 0, finds them queued."""
    import json

    from ingest.app import create_app
    from ingest.signature import sign
    from tests import payloads as p
    from tests.conftest import SECRET

    body = json.dumps(p.body(p.text_message(mid="ack-1"))).encode()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)}
    answers = []
    for replicas in (1, 0):
        app = create_app(dataclasses.replace(settings, ack_replicas=replicas,
                                             redis_timeout_s=0.3))
        client = await aiohttp_client(app)
        answers.append((await client.post("/webhook", data=body, headers=headers)).status)
        await client.close()
    assert answers == [503, 200]
    assert await redis.zcard(settings.queue_name) == 1  # queued once, by the first try




@pytest.fixture
def replicated() -> Iterator[Topology]:
    """A primary and one replica, no sentinel."""
    with topology(replicas=1, sentinels=0, appendonly=False) as top:
        yield top


async def pinned(top: Topology) -> AsyncIterator[Redis]:
    settings = Settings.for_tools({"REDIS_URL": f"redis://127.0.0.1:{top.data[0].port}/0"})
    client = connect(settings)
    one = Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        yield one
    finally:
        await one.aclose()
        await client.aclose()


@pytest.mark.slow
async def test_wait_replicas_returns_once_a_replica_holds_the_writes_and_refuses_when_none_can(
    replicated: Topology,
) -> None:
    async for client in pinned(replicated):
        await client.rpush("held", 1)
        await wait_replicas(client, 1, 500)
        with replicated.data[1].client() as replica:
            assert replica.lrange("held", 0, -1) == [b"1"]
        os.kill(_pid(replicated.data[1]), signal.SIGSTOP)
        try:
            await client.rpush("held", 2)
            with pytest.raises(NotReplicated, match="0 of 1 replicas confirmed the events "
                               "within 200 ms"):
                await wait_replicas(client, 1, 200)
        finally:
            os.kill(_pid(replicated.data[1]), signal.SIGCONT)
        await wait_replicas(client, 1, 2000)  # the same connection, once the replica is back
        await client.rpush("held", 3)
        await client.connection.disconnect()  # type: ignore[union-attr]
        with pytest.raises(NotReplicated, match="the connection that queued the events is gone"):
            await wait_replicas(client, 1, 200)


@pytest.mark.slow
async def test_a_call_that_wrote_nothing_still_waits_for_the_writes_before_it(
    replicated: Topology,
) -> None:
    """A retried webhook whose events are all duplicates writes nothing; WAIT on its own would
    then confirm at once, though the first try's writes may not be on any replica."""
    async for client in pinned(replicated):
        async for other in pinned(replicated):
            await other.get("warm-up")  # connected before the replica stops
            os.kill(_pid(replicated.data[1]), signal.SIGSTOP)
            try:
                await client.rpush("first-try", 1)  # the first try's writes
                assert await other.get("first-try-is-a-list") is None  # the retry: no write
                with pytest.raises(NotReplicated, match="0 of 1 replicas"):
                    await wait_replicas(other, 1, 200)
            finally:
                os.kill(_pid(replicated.data[1]), signal.SIGCONT)
            await other.get("reconnect")
            await wait_replicas(other, 1, 2000)


@pytest.mark.slow
async def test_behind_one_address_a_client_leaves_a_primary_that_answers_readonly(
    replicated: Topology,
) -> None:
    """A managed Redis fails over behind one address: the old primary becomes a replica and
    answers READONLY on the connections still open to it. The write is sent again on a new
    connection, which the address now leads to the new primary."""
    old, new = replicated.data
    async with Endpoint(old.port) as address:
        client = connect(Settings.for_tools({"REDIS_URL": f"redis://127.0.0.1:{address.port}/0"}))
        try:
            await client.set("where", "old")
            with new.client() as c:
                c.execute_command("REPLICAOF", "NO", "ONE")
            with old.client() as c:
                c.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
            address.target = new.port
            await client.set("where", "new")
        finally:
            await client.aclose()
    with new.client() as c:
        assert c.get("where") == b"new"


def _pid(node: Node) -> int:
    assert node.process is not None
    return node.process.pid


# --------------------------------------------------------------------------- failovers


@pytest.fixture
def ha() -> Iterator[Topology]:
    """A primary, two replicas, three sentinels (quorum 2), AOF on."""
    with topology() as top:
        yield top


@dataclass
class Writes:
    """A client that appends 1, 2, 3, ... to a list as fast as it can, and what it saw."""

    acked: list[tuple[float, int, int]] = field(default_factory=list)
    """(when, value, port of the server that took it), for every write that succeeded"""
    refused: list[float] = field(default_factory=list)
    """when a write failed (the ingest would have answered 503)"""


async def write_forever(client: Redis, writes: Writes, stop: asyncio.Event,
                        ack_replicas: int) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        try:
            await client.rpush("writes", n)
            port = client.connection.port  # type: ignore[union-attr]
            await wait_replicas(client, ack_replicas, 1000)
            writes.acked.append((time.monotonic(), n, port))
        except Exception:  # noqa: BLE001 - any failure is a refused write
            writes.refused.append(time.monotonic())
            await asyncio.sleep(0.01)


@dataclass
class Outcome:
    lost: list[tuple[float, int, int]]
    named_at: float
    """when a majority of the sentinels first named the new primary"""
    first_on_new: float
    last_on_old: float
    refused_s: float
    """from the first refused write to the last one"""
    stall_s: float
    """the longest time without an acknowledged write"""


async def through_failover(top: Topology, ack_replicas: int, cause: str) -> Outcome:
    """Write through a failover: `kill` (SIGKILL the primary), `sentinel` (SENTINEL FAILOVER)
    or `procedure` (fbhook failover), then compare every acknowledged write with what the new
    primary holds (what the old one took and the new one lacks is thrown away when it
    resynchronises from the new one)."""
    settings = Settings.for_tools({"REDIS_URL": top.url, "REDIS_TIMEOUT_SECONDS": "1"})
    pool = connect(settings)
    client = Redis(connection_pool=pool.connection_pool, single_connection_client=True)
    writes, stop = Writes(), asyncio.Event()
    task = asyncio.create_task(write_forever(client, writes, stop, ack_replicas))
    try:
        await asyncio.sleep(1.0)
        old = top.primary()
        if cause == "kill":
            old.kill()
        elif cause == "sentinel":
            with top.sentinels[0].client() as s:
                s.execute_command("SENTINEL", "FAILOVER", SERVICE)
        else:
            await planned_failover(top.url, say=lambda line: print("failover:", line))
        await asyncio.to_thread(top.wait_for, lambda: top.primary() is not old, 30,
                                "the sentinels to name a new primary")
        named_at = time.monotonic()
        new = top.primary()
        await asyncio.sleep(1.0)  # writes go on at the new primary
    finally:
        stop.set()
        await task
        await client.aclose()
        await pool.aclose()
    with new.client() as c:
        held = {int(v) for v in c.lrange("writes", 0, -1)}
    on_new = [t for t, _, port in writes.acked if port == new.port]
    on_old = [t for t, _, port in writes.acked if port == old.port]
    refused = writes.refused or [named_at]
    return Outcome(
        lost=[w for w in writes.acked if w[1] not in held], named_at=named_at,
        first_on_new=min(on_new), last_on_old=max(on_old),
        refused_s=max(refused) - min(refused),
        stall_s=max(b[0] - a[0] for a, b in itertools.pairwise(writes.acked)),
    )


def report(what: str, out: Outcome) -> None:
    print(f"\n{what}: {len(out.lost)} acknowledged writes lost; first write on the new primary "
          f"{out.first_on_new - out.named_at:+.2f}s after the sentinels named it, last on the "
          f"old one {out.last_on_old - out.named_at:+.2f}s; writes refused for "
          f"{out.refused_s:.2f}s; longest time without an acknowledged write {out.stall_s:.2f}s")


@pytest.mark.slow
async def test_a_plain_sentinel_failover_loses_no_write_clients_stop_before_the_promotion(
    ha: Topology,
) -> None:
    """No procedure, no ACK_REPLICAS: the pool hears `+try-failover` before the promotion and
    holds its writes until the sentinels name the new primary, where they go on."""
    out = await through_failover(ha, 0, "sentinel")
    report("SENTINEL FAILOVER, ACK_REPLICAS=0", out)
    assert out.lost == []
    assert out.last_on_old < out.named_at
    assert out.first_on_new - out.named_at <= FOUND_WITHIN_S


@pytest.mark.slow
async def test_without_the_announcements_clients_still_leave_the_old_primary_within_two_s(
    ha: Topology, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should a client miss `+try-failover` (its sentinel connection down), the follower alone
    still moves it: what the old primary took after the promotion is lost (measured), none of
    it later than 2 s after the sentinels named the new primary."""

    async def deaf(*_: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(sentinel_module, "_listen", deaf)
    out = await through_failover(ha, 0, "sentinel")
    report("SENTINEL FAILOVER, ACK_REPLICAS=0, announcements not heard", out)
    assert out.first_on_new - out.named_at <= FOUND_WITHIN_S
    assert out.last_on_old - out.named_at <= FOLLOW_INTERVAL_S + 0.5
    assert [w for w in out.lost if w[0] > out.named_at + FOUND_WITHIN_S] == []


# --------------------------------------------------------------------------- the whole path

RATE = 100
"""Signed POSTs per second, 10 events each, while the primary goes away."""


@dataclass
class Delivery:
    sent: list[Answer]
    named_after_s: float
    """from the kill or the failover command to a majority of sentinels naming the new
    primary"""
    counts: Counter[str]
    """stream entries per event id, on the new primary once the workers are done"""

    @property
    def acked(self) -> set[str]:
        return {i for s in self.sent if s.status == 200 for i in s.ids}

    @property
    def refused_s(self) -> float:
        """From the first refused answer to the last."""
        return outage(self.sent)[0]

    @property
    def no_200_s(self) -> float:
        """The longest time between two answers 200."""
        return outage(self.sent)[1]


async def deliver_through(top: Topology, log_dir: Path, cause: str) -> Delivery:
    """A real ingest and worker on the Sentinel URL with ACK_REPLICAS=1, signed POSTs at RATE
    for 10 s; the primary is killed (`kill`) or moved by `fbhook failover` (`procedure`) 3 s in.
    Then every event acknowledged is looked for in the new primary's streams."""
    with services(top.url, log_dir, ACK_REPLICAS="1", JOB_MAX_EVENTS="20") as svc:
        ingest = svc.ingest()
        svc.worker()
        items = [message_item(cause, n) for n in range(10 * RATE * 10)]
        batches = [items[i:i + 10] for i in range(0, len(items), 10)]
        load = asyncio.create_task(send_timed(ingest.url, batches, RATE))
        await asyncio.sleep(3.0)
        old = top.primary()
        started = time.monotonic()
        if cause == "kill":
            old.kill()
        else:
            await planned_failover(top.url, say=lambda line: None)
        await asyncio.to_thread(top.wait_for, lambda: top.primary() is not old, 30,
                                "the sentinels to name a new primary")
        named_after_s = time.monotonic() - started
        sent = await load
        new = top.primary()
        async with Redis(port=new.port) as redis:
            delivered = Delivery(sent, named_after_s, Counter())
            await wait_processed(redis, delivered.acked, within_s=60)
            delivered.counts = await processed_ids(redis)
        assert all(s.alive() for s in svc.started), svc.logs()
    return delivered


def check_and_report(what: str, d: Delivery) -> None:
    statuses = Counter(s.status for s in d.sent)
    lost = d.acked - set(d.counts)
    twice = {i: n for i, n in d.counts.items() if n != 1}
    print(f"\n{what}: {len(d.acked)} events acknowledged, {len(lost)} lost, {len(twice)} written "
          f"twice; answers {dict(statuses)}, refused for {d.refused_s:.2f}s, none 200 for "
          f"{d.no_200_s:.2f}s; sentinels named the new primary {d.named_after_s:.2f}s after")
    assert set(statuses) <= {200, 503}, statuses
    assert lost == set(), f"{len(lost)} acknowledged events lost, e.g. {sorted(lost)[:3]}"
    assert twice == {}, f"events with more than one stream entry: {list(twice.items())[:5]}"


@pytest.mark.slow
async def test_primary_killed_under_load_loses_no_acknowledged_event_and_refuses_under_5_s(
    ha: Topology, tmp_path: Path,
) -> None:
    delivered = await deliver_through(ha, tmp_path, "kill")
    check_and_report("ingest + worker, primary SIGKILL, ACK_REPLICAS=1", delivered)
    assert 0 < delivered.refused_s <= 5.0
    assert delivered.no_200_s <= 5.0


@pytest.mark.slow
async def test_planned_failover_under_load_with_the_procedure_loses_no_acknowledged_event(
    ha: Topology, tmp_path: Path,
) -> None:
    delivered = await deliver_through(ha, tmp_path, "procedure")
    check_and_report("ingest + worker, fbhook failover, ACK_REPLICAS=1", delivered)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_every_cli_command_reads_redis_through_the_sentinels_and_failover_moves_it(
    ha: Topology,
) -> None:
    from tests.test_cli import fbhook_sync, full_env

    with ha.primary().client() as c:
        entry = c.xadd("fb:events:message", {"id": "m1", "event": "{}"}).decode()
    env = full_env(ha.url, ACK_REPLICAS="2")
    old = ha.primary()
    done = fbhook_sync("check-config", env=env)
    assert done.code == 0, done
    assert f"the sentinels name the primary 127.0.0.1:{old.port}" in done.out
    assert "ACK_REPLICAS=2: 2 replica(s) confirmed a write" in done.out
    for args, shows in [
        (["events", "list"], f"fb:events:message           1  {entry}"),
        (["events", "tail", "--from-start", "--count", "1", "message"], f'"entry_id": "{entry}"'),
        (["attribution", "export"], ""),
        (["dead-letters", "list"], "no dead letters"),
        (["report"], "referral touches: 0"),
    ]:
        done = fbhook_sync(*args, env=env)
        assert (done.code, shows in done.out) == (0, True), (args, str(done))
        assert f"reading Redis {ha.url} (from REDIS_URL)" in done.err

    done = fbhook_sync("failover", env=env)
    assert done.code == 0, done
    new = ha.primary()
    assert new is not old
    assert f"the sentinels name 127.0.0.1:{new.port}" in done.out
    assert ha.role(old) == "slave"
    done = fbhook_sync("events", "list", env=env)
    assert f"fb:events:message           1  {entry}" in done.out, done
