"""One way to open Redis, with timeouts short enough that an outage answers fast, for a plain
URL and a Sentinel one alike; and the replica acknowledgement the ingest waits for."""

from __future__ import annotations

from typing import Any

from redis import exceptions
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from shared import sentinel
from shared.errors import QueueUnavailable
from shared.settings import Settings

ACK_CHANNEL = "fb:ack"
"""`wait_replicas` publishes an empty message here (nobody listens): see why there."""


class ReadOnlyError(RedisConnectionError, exceptions.ReadOnlyError):
    """READONLY from a server that became a replica, raised as a connection error as well, so
    that redis-py sends the command again on a new connection (with the server's own words,
    which /readyz shows)."""


class NotReplicated(QueueUnavailable):
    """Fewer replicas than ACK_REPLICAS confirmed the events in time: they may be lost in a
    failover, so the request must not be acknowledged."""


def pool_for(settings: Settings, *, socket_timeout: float | None,
             socket_connect_timeout: float, retry: Retry,
             retry_on_error: list[type[Exception]]) -> ConnectionPool:
    """The connection pool for REDIS_URL: `redis://`, `rediss://`, `unix://`, or a
    `redis+sentinel://` / `rediss+sentinel://` URL, whose pool follows the primary through
    failovers (shared.sentinel). The same timeouts and retries apply in every case."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "health_check_interval": 30,
        "retry": retry,
        "retry_on_error": retry_on_error,
    }
    if sentinel.is_sentinel_url(settings.redis_url):
        return sentinel.following_pool(settings.redis_url, **options)
    pool = ConnectionPool.from_url(settings.redis_url, **options)
    pool.connection_class = _leaving_replicas(pool.connection_class)
    return pool


class _LeavesReplicas(AbstractConnection):
    """A connection that closes itself when its server answers READONLY, as a primary demoted
    to a replica does: behind a managed Redis's one address (which the provider points at the
    new primary), the command's retry then opens a connection to wherever that address leads
    now, instead of failing on the old server until it drops its clients. (Sentinel
    connections do the same: redis-py's SentinelManagedConnection.)"""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except exceptions.ReadOnlyError as exc:
            await self.disconnect(nowait=True)
            raise ReadOnlyError(*exc.args) from None


_LEAVING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _leaving_replicas(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` (plain, TLS or Unix socket, as the URL says) with `_LeavesReplicas`."""
    if base not in _LEAVING:
        _LEAVING[base] = type(base.__name__, (_LeavesReplicas, base), {})
    return _LEAVING[base]


def connect(settings: Settings, *, read_timeout_s: float | None = None) -> Redis:
    """An asyncio client for `REDIS_URL` (password in the URL).

    A command that finds its pooled connection closed (Redis restarted since it was last used,
    or the primary moved) is sent once more on a new connection, instead of failing the first
    request after every restart. Only connection errors are retried, never timeouts (an outage
    still answers within about REDIS_TIMEOUT_SECONDS), and what the ingest sends twice is
    harmless: reads, the readiness probe, and the enqueue call, whose dedupe check drops events
    already queued. `read_timeout_s` replaces REDIS_TIMEOUT_SECONDS for replies only (a tool
    that blocks on XREAD needs longer)."""
    pool = pool_for(
        settings,
        socket_timeout=settings.redis_timeout_s if read_timeout_s is None else read_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )
    return Redis.from_pool(pool)


async def wait_replicas(client: Redis, replicas: int, timeout_ms: int) -> None:
    """Return once `replicas` replicas hold every write `client`'s server took so far, else
    raise NotReplicated (or, closing the connection, the Redis error).

    `client` must be the single-connection client that made the writes, and the commands go out
    on that connection as it is, never retried and never reconnected: on another connection, or
    another server after a failover, WAIT would confirm other writes. WAIT counts only the
    writes of its own connection, so a PUBLISH goes first: replicated like a write, it makes
    this connection's last write the server's newest, and WAIT then covers every write before
    it too. That includes events an earlier call queued and this one found duplicate (a retried
    webhook whose first try was refused for lack of replicas, or an enqueue call redis-py sent
    again after a dropped connection), which would otherwise be confirmed without a wait."""
    if replicas <= 0:
        return
    conn = client.connection
    if conn is None or not conn.is_connected:
        raise NotReplicated("the connection that queued the events is gone")
    timeout_ms = max(1, timeout_ms)  # WAIT 0 would wait forever
    try:
        await conn.send_packed_command(
            conn.pack_commands([("PUBLISH", ACK_CHANNEL, ""), ("WAIT", replicas, timeout_ms)]),
            check_health=False)
        await conn.read_response(timeout=timeout_ms / 1000 + 1.0)
        acked = int(await conn.read_response(timeout=timeout_ms / 1000 + 1.0))
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    if acked < replicas:
        raise NotReplicated(f"{acked} of {replicas} replicas confirmed the events within "
                            f"{timeout_ms} ms")
