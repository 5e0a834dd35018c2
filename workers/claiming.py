"""An arq Worker that claims several jobs in one round trip.

arq claims each job with four round trips, one job at a time. Our jobs are short (a few ms of
CPU for a few hundred events) and the Lua calls that write their outputs take the one Redis
thread for milliseconds, so every claim round trip waits behind them: workers spent their time
waiting to claim, and a second worker added little. This worker claims as many jobs as it has
free slots with one Lua call (claim.lua), with arq's own in-progress key and TTL, then runs them
with arq's own `run_job`: retries, timeouts, crash recovery and shutdown behave as in arq.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.worker import Worker

CLAIM_LUA = resources.files("workers").joinpath("claim.lua").read_text()

LOOK_AHEAD = 64
"""Queue entries looked at per claim, beyond the slots wanted: running jobs stay in the queue
(as in arq), so the head holds the jobs every worker is running."""


class ClaimingWorker(Worker):
    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None,
                         result_timeout_s: float | None, keep_result_forever: bool,
                         incr_score: int | None, keep_in_progress: float | None) -> None:
        """arq's end of a job, unless the job's own effects call already made it (one atomic
        call with the outputs: see workers/effects.lua)."""
        runtime = self.ctx.get("fbhook")
        if runtime is not None and job_id in runtime.finished:
            runtime.finished.discard(job_id)
            if result_data is None:
                return
        await super().finish_job(job_id, finish, result_data, result_timeout_s,
                                 keep_result_forever, incr_score, keep_in_progress)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim and start jobs while slots are free and jobs are ready (`job_ids`, what arq's
        poll read, only says whether to look)."""
        if not job_ids:
            return
        claim = self.pool.register_script(CLAIM_LUA)
        # Back to arq's poll loop within a second, so that its health check keeps being written.
        deadline = time.monotonic() + 1.0
        while self.allow_pick_jobs and time.monotonic() < deadline:
            free = self.max_jobs - self.job_counter
            if free <= 0:
                running = [t for t in self.tasks.values() if not t.done()]
                if running:  # wait for a running job to finish
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0)  # let its done-callback free the slot
                continue
            claimed: list[Any] = await claim(args=[
                self.queue_name, int(time.time() * 1000), free, in_progress_key_prefix,
                int(self.in_progress_timeout_s * 1000), free + LOOK_AHEAD,
            ])
            if not claimed:
                return
            for job_id_b, score in zip(claimed[::2], claimed[1::2], strict=True):
                await self.sem.acquire()
                self.job_counter += 1
                job_id = job_id_b.decode()
                task = self.loop.create_task(self.run_job(job_id, int(score)))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task
