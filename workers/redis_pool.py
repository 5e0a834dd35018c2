"""The worker's Redis: an arq pool for any REDIS_URL, Sentinel included, handed to arq's Worker
as `redis_pool=`.

arq builds its own pool from `RedisSettings`, and its Sentinel mode drops the socket timeouts,
`retry` and `retry_on_error` (arq #235, #506): a worker then hangs through a failover instead
of retrying. Built here with shared.redis.pool_for, the worker's pool follows the primary like
the ingest's and keeps the outage policy below for plain and Sentinel URLs alike.
"""

from __future__ import annotations

import math

from arq.connections import ArqRedis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.codec import job_deserializer, job_serializer
from shared.redis import pool_for
from shared.settings import Settings

OUTAGE_RETRIES = 40
"""A Redis command that fails to connect or loses its connection is tried again this many times,
with a backoff growing to 1 s (about 40 s in all): a Redis restart or a failover pauses the
worker. Without it arq's poll loop raises and the worker process exits."""


def arq_pool(settings: Settings, *, read_timeout_s: float | None = None) -> ArqRedis:
    """A new pool for one arq Worker (the Worker closes it when it stops). Replies have no time
    limit unless `read_timeout_s` is given, as with arq's own pool: a slow script is waited for,
    not cut off and sent again; a connection to a demoted primary is closed by the Sentinel
    pool itself."""
    pool = pool_for(
        settings,
        socket_timeout=read_timeout_s,
        socket_connect_timeout=max(1, math.ceil(settings.redis_timeout_s)),
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), OUTAGE_RETRIES),
        # OSError too: a refused connection is an OSError until redis-py wraps it.
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
    )
    client = ArqRedis(pool, job_serializer=job_serializer, job_deserializer=job_deserializer,
                      default_queue_name=settings.queue_name)
    client.auto_close_connection_pool = True
    return client
