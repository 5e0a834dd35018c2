"""`python -m bench.instructions`: instructions per event, counted by callgrind, for A/B runs.

Timings on a shared machine swing by half from one run to the next; instruction counts do not
(the same code counts the same within about 1%, whatever else runs). This counts, for the bench's
mixed events (one in five a referral):

- **Python, per event**: the ingest's `parse` of 50-event bodies, and the worker's decode and row
  (`workers/lanes.py` `_decode`, `Effects.row`). Each phase runs in its own `python` under
  callgrind once and three times over the same events; the difference, per event, is the phase.
- **Redis, per event**: the ingest's enqueue calls (`ingest/queue.py` Enqueuer) and the lane jobs
  that drain them (`workers/lanes.py` lane_job, its real steps), in a `redis-server` run under
  callgrind and read with `callgrind_control` between the two.

With `--whole`, the processes as the benchmark runs them instead: `python -m bench.drain`'s
backlog (the ingest fed by wrk, then one worker draining it) with one process at a time under
callgrind: Redis (read between the prefill and the drain), then the ingest and the worker, each
over backlogs of 5,000 and 15,000 events, the difference per event. That counts arq, HTTP and
the event loop too, and it runs on any checkout that has `bench.run` (copy this file in): the
figures in docs/performance.md against the code before Lossless come from it. About 8 minutes.

Needs valgrind (`apt-get install valgrind`). `--redis-server` picks the binary (a build with
symbols lets `callgrind_annotate` name Redis's functions). For an A/B, copy this file into the
other checkout and run it there too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.payloads import Factory
from bench.procs import REPO
from tests.redis_server import free_port

NOW_MS = 1_764_600_000_000
PHASES = ("parse", "decode", "row")


def bodies(count: int) -> list[bytes]:
    """`count` 50-event bodies of the bench's mix, the same in every run."""
    factory = Factory(b"secret", run="abcd1234", base_ms=NOW_MS)
    return [factory.envelope(items) for items in factory.mixed(count, 50)]


def run_phase(phase: str, reps: int) -> None:
    """The body of one callgrind run: set up, then `phase` `reps` times over 500 events."""
    from ingest.envelope import parse
    from workers.effects import Effects
    from workers.lanes import _decode

    texts = bodies(10)
    blobs = [r.blob for body in texts for r in parse(body, NOW_MS)]
    decoded = [_decode(blob) for blob in blobs]
    for _ in range(reps):
        if phase == "parse":
            for body in texts:
                parse(body, NOW_MS)
        elif phase == "decode":
            for blob in blobs:
                _decode(blob)
        else:
            for event, queued in decoded:
                Effects.row(event, queued)


def python_phase(phase: str) -> float:
    """Instructions per event of `phase` (500 events)."""
    counts = []
    for reps in (1, 3):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             "-m", "bench.instructions", "--phase", phase, "--reps", str(reps)],
            cwd=REPO, capture_output=True, text=True, check=True)
        counts.append(int(re.search(r"Collected : (\d+)", out.stderr).group(1)))  # type: ignore[union-attr]
    return (counts[1] - counts[0]) / 2 / 500


class CountedRedis:
    """A redis-server under callgrind; `take()` is the instructions since the last take."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.port = free_port()
        self.out = tmp / "redis.callgrind"
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}", binary,
             "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def take(self) -> int:
        subprocess.run(["callgrind_control", "-d", str(self.proc.pid)], capture_output=True,
                       check=True)
        time.sleep(0.5)
        dump = max(glob.glob(f"{self.out}.*"), key=os.path.getmtime)
        text = Path(dump).read_text(errors="replace")
        subprocess.run(["callgrind_control", "-z", str(self.proc.pid)], capture_output=True,
                       check=True)
        return int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))  # type: ignore[union-attr]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


async def redis_phases(binary: str, count: int) -> tuple[int, float, float]:
    """Events, and Redis instructions per event of their enqueue and of their drain."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    from ingest.envelope import parse
    from ingest.queue import Enqueuer
    from shared import keys
    from shared.settings import Settings
    from workers.effects import Effects
    from workers.lanes import Runtime, lane_job

    with tempfile.TemporaryDirectory(prefix="fbhook-instructions-") as tmp:
        server = CountedRedis(binary, Path(tmp))
        url = f"redis://127.0.0.1:{server.port}/0"
        redis = Redis.from_url(url)
        try:
            for _ in range(300):
                try:
                    await redis.ping()
                    break
                except (OSError, RedisError):
                    await asyncio.sleep(0.2)
            settings = Settings.for_tools({"REDIS_URL": url, "STREAM_MAXLEN": "100000000"})
            routed = [r for body in bodies(count) for r in parse(body, NOW_MS)]
            enqueuer, effects = Enqueuer(redis, settings), Effects(redis, settings)
            runtime = Runtime(settings, effects)
            server.take()
            for start in range(0, len(routed), 400):  # as concurrent POSTs share calls
                await asyncio.gather(*(enqueuer.put(routed[i:i + 50])
                                       for i in range(start, min(start + 400, len(routed)), 50)))
            enqueued = server.take()
            for lane in range(settings.lanes):
                while (job := await redis.get(keys.lane_job(lane))) is not None:
                    job_id = job.decode()
                    await redis.set(f"arq:retry:{job_id}", 1)  # as arq's claim does
                    await lane_job({"fbhook": runtime, "redis": redis, "job_id": job_id,
                                    "job_try": 1}, lane=lane)
            drained = server.take()
            written = sum([await redis.xlen(keys.stream(k)) for k in ("message", "referral")])
            if written != len(routed):
                raise RuntimeError(f"{written} entries written for {len(routed)} events")
            await enqueuer.aclose()
            await effects.aclose()
        finally:
            await redis.aclose()
            server.stop()
    return len(routed), enqueued / len(routed), drained / len(routed)


def whole_process(role: str, events: int, binary: str) -> tuple[int, int]:
    """One backlog drain of `events` (the benchmark's, one worker) with `role` (`redis`, `ingest`
    or `worker`) under callgrind: Redis's instructions over the prefill and over the drain; for
    the ingest or the worker, its whole run's, twice (the caller takes differences)."""
    import dataclasses

    import bench.procs as procs
    import bench.run as run
    from bench.plan import QUICK
    from bench.procs import service_env, wait_http
    from tests.redis_server import redis_server

    with tempfile.TemporaryDirectory(prefix="fbhook-instructions-") as tmp:
        out = Path(tmp) / "callgrind"
        python, wait_idle = procs.Procs.python, run.wait_idle

        def counted(self: procs.Procs, name: str, *args: str,
                    env: dict[str, str] | None = None) -> procs.Proc:
            if not name.startswith(role):
                return python(self, name, *args, env=env)
            log = self.log_dir / f"{name}.log"
            with log.open("ab") as sink:
                popen = subprocess.Popen(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                     sys.executable, *args], cwd=procs.REPO, stdout=sink,
                    stderr=subprocess.STDOUT, env={**os.environ, **self.env, **(env or {})})
            proc = procs.Proc(name, popen, log)
            self.started.append(proc)
            return proc

        procs.Procs.python = counted  # type: ignore[method-assign]
        if role == "worker":  # a worker under callgrind never looks idle to wait_idle
            run.wait_idle = lambda *_, **__: time.sleep(45)
        counts: list[int] = []
        server = CountedRedis(binary, Path(tmp)) if role == "redis" else None
        try:
            with contextlib.ExitStack() as stack:
                if server is None:
                    real = stack.enter_context(redis_server())
                    url, pid = real.url, real.process.pid
                else:
                    url, pid = f"redis://127.0.0.1:{server.port}/0", server.proc.pid
                    _wait_redis(url)
                secret = os.urandom(16).hex()
                bench = run.Bench(dataclasses.replace(QUICK, events=events), url, pid,
                                  Path(tmp), secret.encode(), service_env(secret, url))
                port = free_port()
                bench.ports["project"] = port
                bench.servers["project"] = bench.procs.python(
                    "ingest", "-m", "ingest", env={"INGEST_PORT": str(port)})
                try:
                    wait_http(bench.servers["project"], port, timeout=120)
                    if server is None:
                        bench.project_drain(1)
                    else:
                        with _read_around_the_drain(run.Bench, server, counts):
                            bench.project_drain(1)
                        counts.append(server.take())
                finally:
                    bench.procs.stop_all()
            if server is None:
                time.sleep(2)
                text = out.read_text(errors="replace")
                total = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
                counts = [total, total]
        finally:
            procs.Procs.python = python  # type: ignore[method-assign]
            run.wait_idle = wait_idle
            if server is not None:
                server.stop()
    return counts[0], counts[1]


@contextlib.contextmanager
def _read_around_the_drain(bench: Any, server: CountedRedis, counts: list[int]) -> Iterator[None]:
    """Zero Redis's count when the run starts afresh (`flush`), read it when the drain's meter
    starts (after the prefill): the enqueue's share."""
    flush, meter = bench.flush, bench.meter

    def flushed(self: Any) -> None:
        flush(self)
        server.take()

    def metered(self: Any, procs: Any) -> Any:
        counts.append(server.take())
        return meter(self, procs)

    bench.flush, bench.meter = flushed, metered
    try:
        yield
    finally:
        bench.flush, bench.meter = flush, meter


def _wait_redis(url: str) -> None:
    from redis import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url)
    for _ in range(300):
        try:
            client.ping()
            return
        except (OSError, RedisError):
            time.sleep(0.2)
    raise RuntimeError("redis-server under callgrind did not answer")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--bodies", type=int, default=512,
                        help="50-event bodies for the Redis count (512: 200 events a lane)")
    parser.add_argument("--whole", action="store_true",
                        help="whole processes through the benchmark's drain (see above)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(args.phase, args.reps)
        return 0
    print("| instructions per event | count |\n|---|---:|")
    if args.whole:
        small, large = 5_000, 15_000
        enqueued, drained = whole_process("redis", large, args.redis_server)
        print(f"| Redis: enqueue (the prefill) | {enqueued / large:,.0f} |", flush=True)
        print(f"| Redis: drain | {drained / large:,.0f} |", flush=True)
        for role in ("ingest", "worker"):
            low = whole_process(role, small, args.redis_server)[0]
            high = whole_process(role, large, args.redis_server)[0]
            print(f"| {role} process | {(high - low) / (large - small):,.0f} |", flush=True)
        return 0
    for phase in PHASES:
        print(f"| Python: {phase} | {python_phase(phase):,.0f} |", flush=True)
    events, enqueued, drained = asyncio.run(redis_phases(args.redis_server, args.bodies))
    print(f"| Redis: enqueue ({events:,} events) | {enqueued:,.0f} |")
    print(f"| Redis: drain | {drained:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
