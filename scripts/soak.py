"""Soak: steady signed load, a worker SIGKILLed and Redis crashed on the way; then count.

    python scripts/soak.py --seconds 60

Starts its own Redis (AOF on, appendfsync always) on a free port, `python -m ingest` and two
`python -m workers`, and drives signed webhooks at a steady rate. A third of the way in it
SIGKILLs one worker while it holds a job (frozen with SIGSTOP until it does) and starts a
replacement; two thirds in it SIGKILLs Redis and starts it again from its AOF. When the load
ends it waits for the queue to drain and prints what was sent, acknowledged and processed, what
was lost and what took effect twice. It exits 1 if anything acknowledged was lost or took effect
twice. Never touches the Redis on port 6379.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from tests.processes import (  # noqa: E402
    QUEUE,
    Sent,
    Service,
    attribution_counts,
    in_progress,
    message_item,
    processed_ids,
    referral_item,
    send_load,
    services,
)
from tests.redis_server import redis_server  # noqa: E402

USERS = 200


def plan(seconds: float, rate: float, per_request: int) -> list[list[dict[str, object]]]:
    """Every request's items: messages, and one referral in five (a touch for one of USERS)."""
    requests = int(seconds * rate)
    batches = []
    for r in range(requests):
        batch: list[dict[str, object]] = []
        for k in range(per_request):
            n = r * per_request + k
            batch.append(referral_item("soak", n, USERS) if n % 5 == 0
                         else message_item("soak", n))
        batches.append(batch)
    return batches


def log(started: float, text: str) -> None:
    print(f"t={time.monotonic() - started:5.1f}s  {text}", flush=True)


async def wait_drained(redis: Redis, expected: set[str], limit_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if await redis.zcard(QUEUE) == 0 and await in_progress(redis) == 0:
            done = set(await processed_ids(redis))
            if expected <= done:
                break
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def claims(redis: Redis) -> set[bytes]:
    return {key async for key in redis.scan_iter("arq:in-progress:*")}


async def kill_mid_job(worker: Service, redis: Redis) -> int:
    """SIGKILL the worker while it holds a job: freeze it (SIGSTOP); claims that last 0.3 s are
    its own, since the live worker's jobs take milliseconds. None: let it run a moment, retry."""
    held: set[bytes] = set()
    for _ in range(40):
        worker.signal(signal.SIGSTOP)
        await asyncio.sleep(0.15)
        first = await claims(redis)
        await asyncio.sleep(0.15)
        held = first & await claims(redis)
        if held:
            break
        worker.signal(signal.SIGCONT)
        await asyncio.sleep(0.05)
    worker.signal(signal.SIGKILL)
    worker.wait(10)
    return len(held)


async def soak(seconds: float, rate: float, per_request: int, log_dir: Path) -> int:
    batches = plan(seconds, rate, per_request)
    # Small jobs (JOB_MAX_EVENTS=4): many of them, so that a worker is often mid-job.
    with redis_server(appendonly=True) as rp, services(rp.url, log_dir, JOB_MAX_EVENTS="4") as svc:
        redis = Redis.from_url(rp.url, socket_timeout=5)
        ingest = svc.ingest()
        doomed = svc.worker()
        svc.worker()
        print(f"soak: {seconds:.0f} s at {rate:.0f} requests/s x {per_request} events, 2 workers, "
              "Redis AOF appendfsync always, JOB_TIMEOUT_SECONDS=3, JOB_MAX_EVENTS=4", flush=True)
        started = time.monotonic()
        load = asyncio.create_task(send_load(ingest.url, batches, concurrency=16, rate=rate))

        await asyncio.sleep(seconds / 3)
        orphaned = await kill_mid_job(doomed, redis)
        replacement = svc.worker()
        log(started, f"SIGKILL worker pid {doomed.pid} in the middle of {orphaned} jobs; "
                     f"started worker pid {replacement.pid}")

        await asyncio.sleep(seconds / 3)
        rp.stop(sig_kill=True)
        down = time.monotonic()
        await asyncio.sleep(1.0)
        rp.start()
        log(started, f"SIGKILL Redis; restarted from its AOF after {time.monotonic() - down:.1f} s")

        sent: list[Sent] = await load
        log(started, "load finished; waiting for the queue to drain")
        acked = [s for s in sent if s.status == 200]
        acked_ids = {i for s in acked for i in s.ids}
        all_ids = {i for s in sent for i in s.ids}
        drain_s = await wait_drained(redis, acked_ids, limit_s=180)

        counts = await processed_ids(redis)
        processed = all_ids & set(counts)
        lost = acked_ids - set(counts)
        twice = {i: c for i, c in counts.items() if c > 1}
        want: Counter[str] = Counter()
        for s in sent:
            for event_id, user in s.touches.items():
                if event_id in counts:
                    want[user] += 1
        users = {u for s in sent for u in s.touches.values()}
        touches = await attribution_counts(redis, users)
        extra_touches = sum(max(0, touches[u] - want[u]) for u in users)
        missing_touches = sum(max(0, want[u] - touches[u]) for u in users)
        await redis.aclose()
        alive = all(s.alive() for s in svc.started if s is not doomed)

    statuses = Counter(s.status for s in sent)
    latencies = sorted(s.seconds for s in acked)
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0
    refused = ", ".join(f"{n} with {'no answer' if st == 0 else st}"
                        for st, n in sorted(statuses.items()) if st != 200) or "none"
    print(f"sent:               {len(sent)} requests, {len(all_ids)} events")
    print(f"acknowledged:       {len(acked)} requests (200), {len(acked_ids)} events; "
          f"refused: {refused}")
    print(f"processed:          {len(processed)} events ({len(acked_ids & processed)} of the "
          f"{len(acked_ids)} acknowledged; {len(processed - acked_ids)} from refused requests)")
    print(f"lost:               {len(lost)}")
    print(f"duplicate effects:  {len(twice)} events written twice, {extra_touches} extra touches"
          f" ({missing_touches} touches missing)")
    print(f"worst ack latency:  {max(latencies, default=0.0):.3f} s (p99 {p99:.3f} s)")
    print(f"drained:            {drain_s:.1f} s after the load ended; "
          f"services alive at the end: {'yes' if alive else 'NO'}")
    bad = len(lost) + len(twice) + extra_touches + missing_touches
    return 1 if bad or not alive else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send (60)")
    parser.add_argument("--rate", type=float, default=150.0, help="requests per second (150)")
    parser.add_argument("--events", type=int, default=4, help="events per request (4)")
    parser.add_argument("--logs", type=Path, help="keep the services' logs in this directory")
    args = parser.parse_args()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        return asyncio.run(soak(args.seconds, args.rate, args.events, args.logs))
    with tempfile.TemporaryDirectory(prefix="fbhook-soak-") as tmp:
        return asyncio.run(soak(args.seconds, args.rate, args.events, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
