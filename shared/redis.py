"""One way to open Redis, with timeouts short enough that an outage answers fast."""

from __future__ import annotations

from redis.asyncio import Redis

from shared.settings import Settings


def connect(settings: Settings) -> Redis:
    """An asyncio client for `REDIS_URL` (redis://, rediss:// for TLS, password in the URL)."""
    client: Redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return client

