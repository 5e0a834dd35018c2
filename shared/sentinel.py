"""Redis behind Sentinel: the `redis+sentinel://` URL, and a connection pool that follows the
primary from one failover to the next.

redis-py asks Sentinel where the primary is only when it opens a connection. After a failover,
its open connections go on writing to the demoted primary, without an error, until Sentinel
reconfigures that server (10 s after a planned `SENTINEL FAILOVER` here), and the
resynchronisation then throws those writes away: 173,430 acknowledged events in one measured
failover. `FollowingPool` asks every sentinel where the primary is every `FOLLOW_INTERVAL_S`
and closes each connection, idle or busy, that is open to another address: the command it was
running fails with a connection error and is retried on a new connection to the new primary.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any
from urllib.parse import parse_qsl, unquote

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.exceptions import AuthenticationError, RedisError, ResponseError

log = logging.getLogger("fbhook.redis")

SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
DEFAULT_PORT = 26379
TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"})
AUTH_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
"""For sentinels that require a password of their own (`requirepass` in sentinel.conf)."""

FOLLOW_INTERVAL_S = 0.5
"""How often a pool asks the sentinels where the primary is. Sentinels name the new primary
about a second after a promotion; a client then leaves the old one within this much more."""

HOLD_S = 5.0
"""The longest a pool holds its connections once a failover started (`+try-failover`) and no
majority of the sentinels names a new primary: then it goes back to the old one. Sentinels name
the new primary about a second after the start."""

EVENTS = ("+try-failover", "+failover-end", "+switch-master")

Address = tuple[str, int]


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SCHEMES)


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<service>[/db]`, or
    `rediss+sentinel://` for TLS to the sentinels and the data nodes alike. The password is the
    data nodes'; the sentinels are asked with `?sentinel_password=` (and `sentinel_username=`)
    when given, else without one."""

    sentinels: tuple[Address, ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def parse(url: str) -> SentinelURL:
    """Read a Sentinel URL; ValueError says what is wrong with it (never echoing a password)."""
    if not is_sentinel_url(url):
        raise ValueError(f"a Sentinel URL starts with {' or '.join(SCHEMES)}")
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_address(part) for part in hosts.split(","))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("the path must be /<service-name> or /<service-name>/<db>, the name "
                         "the sentinels monitor the primary under")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"the database after the service name must be a number, "
                             f"not {parts[1]!r}")
        db = int(parts[1])
    options = dict(parse_qsl(query, keep_blank_values=True))
    tls = scheme == "rediss+sentinel"
    allowed = AUTH_OPTIONS | (TLS_OPTIONS if tls else set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r}: a {scheme}:// URL takes only "
                         f"{', '.join(sorted(allowed))}")
    auth = {name: options.pop(name) or None for name in sorted(AUTH_OPTIONS & set(options))}
    return SentinelURL(sentinels, unquote(parts[0]), db, username, password, tls, options,
                       **auth)


def _address(part: str) -> Address:
    host, port = part, ""
    if part.startswith("["):  # [::1]:26379
        host, _, tail = part[1:].partition("]")
        port = tail.removeprefix(":")
    elif part.count(":") == 1:
        host, _, port = part.partition(":")
    if not host:
        raise ValueError("every sentinel needs a host (host:port, comma-separated)")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"sentinel port must be a number from 1 to 65535, not {port!r}")
    return host, int(port)


def following_pool(url: str, **connection_kwargs: Any) -> FollowingPool:
    """A pool of connections to the primary the sentinels of `url` name. The socket timeouts
    among `connection_kwargs` apply to the sentinels too; the retry options only to the data
    connections (each tick asks every sentinel anyway)."""
    parsed = parse(url)
    tls: dict[str, Any] = {"ssl": True, **parsed.tls_options} if parsed.tls else {}
    to_sentinels = {k: v for k, v in connection_kwargs.items()
                    if k in {"socket_timeout", "socket_connect_timeout"}}
    auth = {"username": parsed.sentinel_username, "password": parsed.sentinel_password}
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels), sentinel_kwargs={**to_sentinels, **tls, **auth})
    return FollowingPool(
        parsed.service, manager, db=parsed.db, username=parsed.username,
        password=parsed.password, **tls, **connection_kwargs,
    )


class FollowingPool(SentinelConnectionPool):
    """A Sentinel pool whose connections never stay on a server the sentinels no longer name,
    and that stops writing as soon as a failover starts.

    Two kinds of background task start with the first connection the pool hands out and stop
    when it is closed. The follower asks the sentinels every FOLLOW_INTERVAL_S; a primary is
    believed only when a majority of the sentinels of the URL name it (a sentinel cut off from
    the others may still name the old one). A listener per sentinel hears `+try-failover`, which
    the sentinel leading a failover announces about 0.2 s before it promotes a replica: the
    pool then holds (closes every connection and lets new ones wait) until a majority names
    another primary, the failover is called off, or HOLD_S pass. Writes then never land on the
    old primary after the promotion, even during a plain `SENTINEL FAILOVER`.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._tasks: list[asyncio.Task[None]] = []
        self._held_from: Address | None = None
        self._hold_until = 0.0
        self._released = asyncio.Event()
        self._wake = asyncio.Event()
        self.switches = 0
        """How many times the primary changed under this pool (for tests and logs)."""

    def get_available_connection(self) -> Connection:
        if not self._tasks or any(t.done() for t in self._tasks):
            self._start_tasks()
        connection: Connection = super().get_available_connection()  # type: ignore[no-untyped-call]
        return connection

    def _start_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        loop, ref = asyncio.get_running_loop(), weakref.ref(self)
        self._tasks = [loop.create_task(_follow(ref), name=f"follow-{self.service_name}")]
        self._tasks += [loop.create_task(_listen(ref, s), name=f"listen-{self.service_name}")
                        for s in self.sentinel_manager.sentinels]

    @property
    def holding(self) -> bool:
        return time.monotonic() < self._hold_until

    async def get_master_address(self) -> Address:
        """Where a new connection goes: the primary a majority of the sentinels name, once no
        failover is under way (waited for as long as a connection may take to open)."""
        if self.holding:
            wait = self.connection_kwargs.get("socket_connect_timeout") or HOLD_S
            try:
                await asyncio.wait_for(self._released.wait(), min(wait, HOLD_S))
            except TimeoutError:
                raise MasterNotFoundError(f"a failover of {self.service_name!r} is under way"
                                          ) from None
        errors: list[str] = []
        address = await ask_sentinels(self.sentinel_manager.sentinels, self.service_name, errors)
        if address is None:
            raise MasterNotFoundError(
                f"no majority of the {len(self.sentinel_manager.sentinels)} sentinels names a "
                f"primary for {self.service_name!r}" + "".join(f"; {e}" for e in errors[:3]))
        if self.holding and address == self._held_from:
            raise MasterNotFoundError(f"a failover of {self.service_name!r} is under way")
        await self.follow(address)
        return address

    async def follow(self, address: Address) -> None:
        """Take `address` as the primary: close every connection open to another server."""
        if self.master_address is not None and address != self.master_address:
            self.switches += 1
            log.warning("Redis primary for %s is now %s:%d (was %s:%d)", self.service_name,
                        *address, *self.master_address)
        self.master_address = address
        if address != self._held_from:
            self.resume()
        await self._close(lambda c: _address_of(c) != address)

    async def hold(self) -> None:
        """A failover started: no connection until the sentinels name the new primary."""
        if not self.holding:
            log.warning("Redis failover of %s under way: writes wait", self.service_name)
            self._held_from = self.master_address
            self._released.clear()
        self._hold_until = time.monotonic() + HOLD_S
        self._wake.set()
        await self._close(lambda c: True)

    def resume(self) -> None:
        """The failover is over (or called off): connections may open again."""
        self._hold_until = 0.0
        self._held_from = None
        self._released.set()

    async def on_event(self, channel: str, data: str) -> None:
        """A sentinel's announcement about some primary; those about ours matter."""
        words = data.split()
        if channel == "+switch-master" and words[:1] == [self.service_name]:
            self._wake.set()  # ask the majority now
        elif words[:2] == ["master", self.service_name]:
            if channel == "+try-failover":
                await self.hold()
            else:  # +failover-end, -failover-abort-*
                self.resume()

    async def _close(self, which: Callable[[AbstractConnection], bool]) -> None:
        chosen = [c for c in chain(self._available_connections, self._in_use_connections)
                  if c.is_connected and which(c)]
        await asyncio.gather(*(c.disconnect(nowait=True) for c in chosen), return_exceptions=True)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Closing the pool (every connection) also stops its tasks and the sentinel clients;
        closing only the idle connections does not."""
        if inuse_connections:
            await self._stop_tasks()
        await super().disconnect(inuse_connections)

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in self.sentinel_manager.sentinels),
                             return_exceptions=True)


def _address_of(connection: object) -> Address | None:
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return (host, port) if isinstance(host, str) and isinstance(port, int) else None


async def _follow(ref: weakref.ref[FollowingPool]) -> None:
    """The follower's loop; it holds its pool only weakly, so a pool nobody closes still goes.
    While a failover is under way it asks ten times as often."""
    while (pool := ref()) is not None:
        address = await ask_sentinels(pool.sentinel_manager.sentinels, pool.service_name)
        if address is not None and not (pool.holding and address == pool._held_from):
            await pool.follow(address)
        elif pool._hold_until and not pool.holding:
            pool.resume()  # HOLD_S passed without a new primary: back to the old one
        wake, interval = pool._wake, FOLLOW_INTERVAL_S / (10 if pool.holding else 1)
        del pool
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)


async def _listen(ref: weakref.ref[FollowingPool], sentinel: Redis) -> None:
    """Hand one sentinel's failover announcements to the pool; resubscribe after an error."""
    while ref() is not None:
        try:
            async with sentinel.pubsub() as subscription:
                await subscription.subscribe(*EVENTS)
                await subscription.psubscribe("-failover-abort-*")
                while (pool := ref()) is not None:
                    del pool
                    message = await subscription.get_message(ignore_subscribe_messages=True,
                                                             timeout=1.0)
                    if message is not None and (pool := ref()) is not None:
                        await pool.on_event(_text(message["channel"]), _text(message["data"]))
                        del pool
        except (RedisError, OSError):
            await asyncio.sleep(1.0)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def ask_sentinels(sentinels: Sequence[Redis], service: str,
                        errors: list[str] | None = None) -> Address | None:
    """The primary a majority of `sentinels` name for `service`, as soon as that many agree;
    None when no address gets a majority (sentinels down, cut off, or in disagreement). What a
    sentinel refused with (a password it wants, a name it does not monitor) goes to `errors`."""
    need = len(sentinels) // 2 + 1
    votes: collections.Counter[Address] = collections.Counter()
    tasks = [asyncio.ensure_future(_ask(s, service, errors)) for s in sentinels]
    try:
        for answer in asyncio.as_completed(tasks):
            address = await answer
            if address is not None:
                votes[address] += 1
                if votes[address] >= need:
                    return address
        return None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _ask(sentinel: Redis, service: str, errors: list[str] | None) -> Address | None:
    try:
        reply = await sentinel.execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL GET-MASTER-ADDR-BY-NAME", service)
    except (ResponseError, AuthenticationError) as exc:  # an answer; it never holds a password
        if errors is not None:
            where = sentinel.connection_pool.connection_kwargs
            errors.append(f"sentinel {where.get('host')}:{where.get('port')} answered "
                          f"{str(exc)[:200]}")
        return None
    except (RedisError, OSError):
        return None
    if not reply:
        return None
    host, port = reply
    return (host.decode() if isinstance(host, bytes) else str(host)), int(port)
