"""One way to open Redis, with timeouts short enough that an outage answers fast."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.settings import Settings


def connect(settings: Settings) -> Redis:
    """An asyncio client for `REDIS_URL` (redis://, rediss:// for TLS, password in the URL).

    A command that finds its pooled connection closed (Redis restarted since it was last used)
    is sent once more on a new connection, instead of failing the first request after every
    restart. Only connection errors are retried, never timeouts (an outage still answers within
    about REDIS_TIMEOUT_SECONDS), and what the ingest sends twice is harmless: reads, the
    readiness probe, and the enqueue call, whose dedupe check drops events already queued.
    """
    client: Redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )
    return client
