"""The arq worker's settings, built from the project's Settings."""

from __future__ import annotations

from typing import Any, cast

from arq.connections import RedisSettings
from arq.worker import func

from shared.codec import job_deserializer, job_serializer
from shared.kinds import KINDS
from shared.settings import Settings
from workers.effects import Effects
from workers.jobs import Runtime, make_job

CRASH_TRIES = 1000
"""arq gives up on a job after this many starts; handler failures are dead-lettered long before
(`JOB_MAX_TRIES`), so only Redis outages and crashes use up the rest."""


def redis_settings(settings: Settings) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.redis_url)
    rs.conn_timeout = max(1, int(settings.redis_timeout_s + 0.999))
    rs.conn_retries = 60
    return rs


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `arq.worker.Worker`: one function per kind, msgpack, no results."""

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["fbhook"] = Runtime(settings=settings, effects=Effects(ctx["redis"], settings))

    return {
        "functions": [
            func(cast(Any, make_job(kind)), name=kind, max_tries=CRASH_TRIES) for kind in KINDS
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
        "health_check_interval": 10,
        "health_check_key": f"{settings.queue_name}:health-check",
        "job_completion_wait": settings.job_timeout_s,
    }
