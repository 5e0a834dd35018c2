"""An arq Worker that claims and starts several jobs in one round trip.

arq claims each job with four round trips, one job at a time, starts it with a fifth (read the
job, count the try) and ends it with a sixth. Our jobs are short (a few ms of CPU for a few
hundred events) and the Lua calls that write their outputs hold the one Redis thread for
milliseconds; Redis answers a round of clients only when the round is done, so each of those
round trips waits behind every Lua call queued, and a worker spent its time waiting. This worker
claims as many jobs as it has free slots with one Lua call (claim.lua), with arq's own
in-progress key and TTL, which also starts them as arq would; the job's end is written by its
effects call (workers/effects.lua). Everything in between is arq's own `run_job`: retries,
timeouts, crash recovery and shutdown behave as in arq.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from importlib import resources
from types import TracebackType
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.worker import Worker

from shared.pinned import Pinned

CLAIM_LUA = resources.files("workers").joinpath("claim.lua").read_text()

PAGE = 128
"""Queue entries a claim reads at a time: running jobs stay in the queue (as in arq), so the
head holds the jobs every worker is running, and a claim reads on past them."""

MOST = 10_000
"""Queue entries a claim looks at, at most: beyond them, jobs wait for the next poll."""


RETRY_KEY_TTL_S = 88_400
"""What arq's run_job gives a job's try counter."""

_STARTED: contextvars.ContextVar[tuple[bytes | None, int] | None] = contextvars.ContextVar(
    "fbhook_started", default=None)
"""In a job's task: its body and try, read by the claim that started it."""


class _Started:
    """Stands in for the transaction that arq's run_job opens first (GET the job, INCR and EXPIRE
    its try counter): the claim already did exactly that, so its answers are handed back."""

    def __init__(self, body: bytes | None, job_try: int) -> None:
        self._replies: list[Any] = [body, job_try, True]

    async def __aenter__(self) -> _Started:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def get(self, name: str) -> None:
        pass

    def incr(self, name: str) -> None:
        pass

    def expire(self, name: str, seconds: int) -> None:
        pass

    async def execute(self) -> list[Any]:
        return self._replies


class ClaimingWorker(Worker):
    def _pipeline(self, *args: Any, **kwargs: Any) -> Any:
        """The pool's pipeline(), except for a job's first one when its claim started it."""
        started = _STARTED.get()
        if started is not None:
            _STARTED.set(None)
            return _Started(*started)
        return self._pool_pipeline(*args, **kwargs)

    async def _run_started(self, job_id: str, score: int, body: bytes | None,
                           job_try: int) -> None:
        _STARTED.set((body, job_try))  # this task's own context
        await self.run_job(job_id, score)

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

    async def close(self) -> None:
        claims: Pinned | None = getattr(self, "_claims", None)
        if claims is not None and self._pool is not None:
            await claims.aclose()
        await super().close()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim and start jobs while slots are free and jobs are ready (`job_ids`, what arq's
        poll read, only says whether to look)."""
        if not job_ids:
            return
        if not hasattr(self, "_pool_pipeline"):
            if self.allow_abort_jobs:  # arq's start then also reads the abort set: not fused
                raise ValueError("ClaimingWorker does not support allow_abort_jobs")
            self._pool_pipeline = self.pool.pipeline
            self.pool.pipeline = self._pipeline  # type: ignore[method-assign]
            self._claim = self.pool.register_script(CLAIM_LUA)
            self._claims = Pinned(self.pool)  # a claim is sent at once
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
            client = self._claims.take()
            try:
                claimed: list[Any] = await self._claim(client=client, args=[
                    self.queue_name, int(time.time() * 1000), free, in_progress_key_prefix,
                    int(self.in_progress_timeout_s * 1000), PAGE, job_key_prefix,
                    retry_key_prefix, RETRY_KEY_TTL_S, MOST,
                ])
            finally:
                self._claims.give(client)
            if not claimed:
                return
            for n in range(0, len(claimed), 4):
                job_id_b, score, body, job_try = claimed[n:n + 4]
                await self.sem.acquire()
                self.job_counter += 1
                job_id = job_id_b.decode()
                task = self.loop.create_task(
                    self._run_started(job_id, int(score), body, int(job_try)))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task
