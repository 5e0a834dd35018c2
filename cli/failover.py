"""`fbhook failover`: a planned Sentinel failover that loses no acknowledged write.

`SENTINEL FAILOVER` alone promotes a replica at once but leaves the old primary taking writes
until Sentinel reconfigures it, about 10 s later: writes clients make there in between are
thrown away. Measured with fbhook's clients (which leave a server the sentinels no longer name
within half a second) and ACK_REPLICAS=1, that still lost about a second of acknowledged events,
because the other replica confirmed writes on the old primary until it was moved too. This
command pauses writes on the primary first, so nothing is acknowledged there after the replicas
have caught up, and demotes it itself before writes resume (docs/failover.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cli.common import CommandFailed, add_redis_option, tool_settings
from shared.sentinel import Address, SentinelURL, ask_sentinels, is_sentinel_url, parse

DEFAULT_PAUSE_S = 10.0

T = TypeVar("T")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "failover",
        help="move the Redis primary to a replica without losing acknowledged events",
        description=(
            "A planned failover for a redis+sentinel:// REDIS_URL: pause writes on the "
            "primary (CLIENT PAUSE WRITE), wait until every replica holds everything, run "
            "SENTINEL FAILOVER, wait until a majority of the sentinels name the new primary, "
            "make the old primary its replica, resume writes. Webhooks get 503 for one to two "
            "seconds (Facebook sends them again); none acknowledged is lost."
        ),
    )
    p.add_argument("--pause", type=float, default=DEFAULT_PAUSE_S, metavar="SECONDS",
                   help="the longest writes stay paused; the failover is called off "
                   "(writes resume on the old primary) if it takes longer "
                   "(default: %(default)s)")
    add_redis_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = tool_settings(args)
    if not is_sentinel_url(settings.redis_url):
        raise CommandFailed("failover needs a redis+sentinel:// or rediss+sentinel:// URL")
    asyncio.run(planned_failover(settings.redis_url, args.pause, settings.redis_timeout_s))
    return 0


async def planned_failover(url: str, pause_s: float = DEFAULT_PAUSE_S, timeout_s: float = 1.5,
                           say: Callable[[str], None] = print) -> Address:
    """The procedure; returns the new primary's address. Raises CommandFailed (writes then
    resume on the old primary) when a step does not complete within the pause."""
    parsed = parse(url)
    sentinels = [_client(parsed, addr, timeout_s, sentinel=True) for addr in parsed.sentinels]
    old_addr = await ask_sentinels(sentinels, parsed.service)
    if old_addr is None:
        raise CommandFailed("no majority of the sentinels names a primary")
    old = _client(parsed, old_addr, timeout_s)
    started = time.monotonic()
    deadline = started + pause_s - 1.0  # leave a second to call it off before writes resume

    def step(what: str) -> None:
        say(f"{time.monotonic() - started:6.2f}s  {what}")

    try:
        await _command(old, "CLIENT", "PAUSE", int(pause_s * 1000), "WRITE")
        step(f"writes paused on the primary {old_addr[0]}:{old_addr[1]}")
        replicas = await _until(deadline, lambda: _caught_up(old, parsed, timeout_s),
                                "the replicas to catch up")
        step(f"{replicas} replica(s) hold every write")
        await _sentinel_failover(sentinels, parsed.service)
        step("SENTINEL FAILOVER accepted")

        async def moved() -> Address | None:
            found = await ask_sentinels(sentinels, parsed.service)
            return found if found not in (None, old_addr) else None

        new_addr = await _until(deadline, moved, "a majority of the sentinels to name a new "
                                "primary")
        step(f"the sentinels name {new_addr[0]}:{new_addr[1]}")
        await _command(old, "REPLICAOF", new_addr[0], str(new_addr[1]))
        step("the old primary is its replica")
    finally:
        try:
            await _command(old, "CLIENT", "UNPAUSE")
            step("writes resumed")
        finally:
            await asyncio.gather(old.aclose(), *(s.aclose() for s in sentinels))
    return new_addr


def _client(parsed: SentinelURL, address: Address, timeout_s: float, *,
            sentinel: bool = False) -> Redis:
    tls: dict[str, Any] = {"ssl": True, **parsed.tls_options} if parsed.tls else {}
    auth: dict[str, Any] = ({} if sentinel
                            else {"username": parsed.username, "password": parsed.password})
    return Redis(host=address[0], port=address[1], socket_timeout=timeout_s,
                 socket_connect_timeout=timeout_s, **auth, **tls)


async def _command(client: Redis, *args: str | int) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def _caught_up(primary: Redis, parsed: SentinelURL, timeout_s: float) -> int | None:
    """How many replicas the primary has, once each holds every write it took; else None.
    Asked of the replicas themselves: the primary learns their offsets only once a second."""
    info: dict[str, Any] = await primary.info("replication")
    offset = int(info["master_repl_offset"])
    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    if not replicas:
        raise CommandFailed("the primary has no replica to hand over to")
    for replica in replicas:
        client = _client(parsed, (str(replica["ip"]), int(replica["port"])), timeout_s)
        try:
            theirs: dict[str, Any] = await client.info("replication")
        finally:
            await client.aclose()
        if int(theirs.get("slave_repl_offset", -1)) < offset:
            return None
    return len(replicas)


async def _sentinel_failover(sentinels: list[Redis], service: str) -> None:
    """SENTINEL FAILOVER on the first sentinel that takes it."""
    errors = []
    for s in sentinels:
        try:
            await _command(s, "SENTINEL", "FAILOVER", service)
            return
        except (RedisError, OSError) as exc:
            errors.append(str(exc) or type(exc).__name__)
    raise CommandFailed(f"no sentinel started the failover: {'; '.join(errors)}")


async def _until(deadline: float, check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll `check` until it finds something; Redis errors meanwhile are tried again."""
    while True:
        with contextlib.suppress(RedisError, OSError):
            found = await check()
            if found is not None:
                return found
        if time.monotonic() > deadline:
            raise CommandFailed(f"gave up waiting for {what}; writes resume on the old primary "
                                "(check with SENTINEL GET-MASTER-ADDR-BY-NAME whether the "
                                "failover went on without this command)")
        await asyncio.sleep(0.05)
