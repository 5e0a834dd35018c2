"""The arq worker's settings, built from the project's Settings."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

from arq.worker import func

from shared import keys
from shared.codec import (
    FORWARD_JOB,
    LANE_JOB,
    UNREADABLE_JOB,
    job_deserializer,
    job_serializer,
)
from shared.settings import Settings
from workers import metrics
from workers.effects import Effects
from workers.forward import Forwarder, forward_job
from workers.lanes import Runtime, lane_job, unreadable_job
from workers.redis_pool import arq_pool
from workers.repair import repair_forever

CRASH_TRIES = 1000
"""arq gives up on a job after this many starts; handler failures are dead-lettered long before
(`JOB_MAX_TRIES`), so only Redis outages and crashes use up the rest."""


HEALTH_CHECK_INTERVAL_S = 10
"""arq rewrites the worker's health-check key this often; the key lives one second longer."""


def health_check_key(settings: Settings) -> str:
    """This worker's health-check key: one per host, so each container is checked on its own."""
    return keys.health_check(settings.queue_name, socket.gethostname())


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `LeasedWorker` (arq's Worker): the lane job function, msgpack, no
    results, a claim as long as the lease."""

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["fbhook"] = Runtime(settings=settings, effects=Effects(ctx["redis"], settings))
        ctx["fbhook_gauges"] = asyncio.create_task(
            metrics.refresh_forever(ctx["redis"], settings.queue_name))
        ctx["fbhook_repair"] = asyncio.create_task(repair_forever(ctx["redis"], settings))
        if settings.forward_url:
            ctx["fbhook_forwarder"] = Forwarder.start(settings)

    async def shutdown(ctx: dict[str, Any]) -> None:
        await metrics.stop(ctx.pop("fbhook_gauges", None))
        await metrics.stop(ctx.pop("fbhook_repair", None))
        runtime: Runtime | None = ctx.get("fbhook")
        if runtime is not None:
            await runtime.effects.aclose()
        forwarder: Forwarder | None = ctx.pop("fbhook_forwarder", None)
        if forwarder is not None:
            await forwarder.aclose()

    return {
        "functions": [
            func(cast(Any, lane_job), name=LANE_JOB, max_tries=CRASH_TRIES),
            func(cast(Any, forward_job), name=FORWARD_JOB, max_tries=CRASH_TRIES),
            func(cast(Any, unreadable_job), name=UNREADABLE_JOB, max_tries=CRASH_TRIES),
        ],
        "redis_pool": arq_pool(settings),  # any REDIS_URL, Sentinel included
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
