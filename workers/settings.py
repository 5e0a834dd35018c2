"""The arq worker's settings, built from the project's Settings."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast
from urllib.parse import parse_qs, urlparse

from arq.connections import RedisSettings
from arq.worker import func
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.codec import LANE_JOB, UNREADABLE_JOB, job_deserializer, job_serializer
from shared.settings import Settings
from workers import metrics
from workers.effects import Effects
from workers.lanes import Runtime, lane_job, unreadable_job
from workers.repair import repair_forever

CRASH_TRIES = 1000
"""arq gives up on a job after this many starts; handler failures are dead-lettered long before
(`JOB_MAX_TRIES`), so only Redis outages and crashes use up the rest."""


HEALTH_CHECK_INTERVAL_S = 10
"""arq rewrites the worker's health-check key this often; the key lives one second longer."""


def health_check_key(settings: Settings) -> str:
    """This worker's health-check key: one per host, so each container is checked on its own."""
    return keys.health_check(settings.queue_name, socket.gethostname())


OUTAGE_RETRIES = 40
"""A Redis command that fails to connect or loses its connection is tried again this many times,
with a backoff growing to 1 s (about 40 s in all): a Redis restart pauses the worker. Without it
arq's poll loop raises and the worker process exits."""


TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


def redis_settings(settings: Settings) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.redis_url)
    # arq reads only the host, port, password and db of the URL; the TLS options that redis-py
    # takes from a rediss:// URL (the ingest's client) are carried over here.
    query = parse_qs(urlparse(settings.redis_url).query)
    for option in TLS_OPTIONS:
        if option in query:
            setattr(rs, option, query[option][-1])
    rs.conn_timeout = max(1, int(settings.redis_timeout_s + 0.999))
    rs.conn_retries = 60
    # OSError too: a refused connection is an OSError until redis-py wraps it.
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    rs.retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), OUTAGE_RETRIES)
    return rs


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `LeasedWorker` (arq's Worker): the lane job function, msgpack, no
    results, a claim as long as the lease."""

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["fbhook"] = Runtime(settings=settings, effects=Effects(ctx["redis"], settings))
        ctx["fbhook_gauges"] = asyncio.create_task(
            metrics.refresh_forever(ctx["redis"], settings.queue_name))
        ctx["fbhook_repair"] = asyncio.create_task(repair_forever(ctx["redis"], settings))

    async def shutdown(ctx: dict[str, Any]) -> None:
        await metrics.stop(ctx.pop("fbhook_gauges", None))
        await metrics.stop(ctx.pop("fbhook_repair", None))
        runtime: Runtime | None = ctx.get("fbhook")
        if runtime is not None:
            await runtime.effects.aclose()

    return {
        "functions": [
            func(cast(Any, lane_job), name=LANE_JOB, max_tries=CRASH_TRIES),
            func(cast(Any, unreadable_job), name=UNREADABLE_JOB, max_tries=CRASH_TRIES),
        ],
        "redis_settings": redis_settings(settings),
        "queue_name": settings.queue_name,
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
        "keep_result": 0,
        "max_jobs": settings.worker_max_jobs,
        "poll_delay": settings.worker_poll_delay_s,
        "job_timeout": settings.job_timeout_s,
        "max_tries": CRASH_TRIES,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "health_check_key": health_check_key(settings),
        "job_completion_wait": settings.job_timeout_s,
        "lease_s": settings.worker_lease_s,
    }
