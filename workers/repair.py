"""The safety net behind lane ownership: every few seconds, a job for each lane that has events
but no live job (workers/repair.lua says when that happens)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from importlib import resources

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.codec import FORWARD_JOB, JOB_TTL_MS, LANE_JOB
from shared.lanes import with_queue_job
from shared.settings import Settings

REPAIR_LUA = with_queue_job(resources.files("workers").joinpath("repair.lua").read_text())
REPAIR_SECONDS = 5.0

log = logging.getLogger("fbhook.worker")


async def repair(redis: Redis, settings: Settings) -> list[int]:
    """Queue a job for every lane (and forward list) left with events and no job; return the
    lanes that got one."""
    script = redis.register_script(REPAIR_LUA)
    kinds = [(keys.LANE_PREFIX, keys.LANE_JOB_PREFIX, LANE_JOB)]
    if settings.forward_url:
        kinds.append((keys.FORWARD_PREFIX, keys.FORWARD_JOB_PREFIX, FORWARD_JOB))
    repaired: list[int] = []
    for lists, owners, function in kinds:
        lanes = await script(args=[
            lists, owners, keys.ARQ_JOB_PREFIX, settings.queue_name, settings.lanes,
            f"repair-{os.urandom(4).hex()}-", int(time.time() * 1000), JOB_TTL_MS, function,
        ])
        repaired += [int(n) for n in lanes]
    return repaired


async def repair_forever(redis: Redis, settings: Settings,
                         every_s: float = REPAIR_SECONDS) -> None:
    """A worker's background task: `repair` until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            repaired = await repair(redis, settings)
        except (RedisError, OSError) as exc:
            log.debug("lanes not checked: %s", type(exc).__name__)
            continue
        if repaired:
            log.warning("lanes with events but no job got one", extra={"lanes": repaired})
