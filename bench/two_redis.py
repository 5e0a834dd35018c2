"""`python -m bench.two_redis`: what one Redis spends per event, and two independent Redis
processes side by side (the "past one Redis" plan of docs/failover.md).

Part 1, Redis CPU per event, end to end. One Redis, a real `python -m ingest` and
`python -m workers`. The worker stopped, `--events` events (50 per signed POST, one in five a
referral) go through the ingest: Redis's CPU over that phase, per event, is the enqueue's cost.
Then the worker starts and drains them all: Redis's CPU per event is the workers' side (lane
jobs, effects). Without AOF, then with AOF `everysec` (the compose setting). The sum gives the
events per second one Redis core can take.

Part 2, two shards. A shard is a Redis with its own ingest and worker, sharing nothing with the
other; every user belongs to one shard (a hash of the sender id), as the plan routes them. The
same events go once through one shard and once split over two. Printed per Redis: the events it
took and its CPU per event (equal to one shard's when shards share nothing), and for the whole:
events per second and how busy the machine was. On a machine with fewer cores than processes
the machine, not Redis, bounds the second figure; the first is what carries over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis

from bench.payloads import Factory
from bench.procs import Proc, Procs, cpu_seconds, machine_busy_s, service_env, wait_http
from ingest.signature import sign
from shared import keys
from tests.redis_server import free_port, server_binary, wait_ready

PER_POST = 50
KINDS_SENT = ("message", "referral")
"""What `Factory.mixed` sends: the streams that count the drained events."""
CONCURRENCY = 16


@dataclass
class Shard:
    """One Redis and its services."""

    name: str
    redis: subprocess.Popen[bytes]
    port: int
    ingest: Proc
    ingest_port: int
    procs: Procs
    worker: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def redis_cpu_s(self) -> float:
        return cpu_seconds(self.redis.pid)

    def processed(self) -> int:
        """Stream entries so far (a SCAN here would cost Redis more than what is measured)."""
        with redis.Redis(port=self.port) as client:
            return sum(int(client.xlen(keys.stream(kind))) for kind in KINDS_SENT)


@contextlib.contextmanager
def shard(name: str, work: Path, secret: str, aof: bool) -> Iterator[Shard]:
    port = free_port()
    data = work / name
    data.mkdir()
    server = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes" if aof else "no", "--appendfsync", "everysec",
         "--maxmemory-policy", "noeviction", "--dir", str(data)],
        cwd=data, stdout=subprocess.DEVNULL)
    procs = Procs(data, service_env(secret, f"redis://127.0.0.1:{port}/0"))
    try:
        wait_ready(port)
        ingest_port = free_port()
        ingest = procs.python(f"{name}-ingest", "-m", "ingest",
                              env={"INGEST_PORT": str(ingest_port)})
        wait_http(ingest, ingest_port)
        yield Shard(name, server, port, ingest, ingest_port, procs)
    finally:
        procs.stop_all()
        server.terminate()
        server.wait(15)


def bodies(secret: bytes, events: int) -> list[tuple[str, bytes, str]]:
    """(sender of the first event, body, signature) for every POST, each body of one user's
    shard: items are grouped by the shard of their sender before they are cut into bodies."""
    factory = Factory(secret)
    items = [item for batch in factory.mixed(events // PER_POST, PER_POST) for item in batch]
    by_shard: dict[int, list[str]] = {0: [], 1: []}
    for item in items:
        by_shard[user_shard(json.loads(item)["sender"]["id"], 2)].append(item)
    out = []
    for group in by_shard.values():
        for i in range(0, len(group), PER_POST):
            body = factory.envelope(group[i:i + PER_POST])
            out.append((json.loads(group[i])["sender"]["id"], body, sign(secret, body)))
    return out


def user_shard(user: str, shards: int) -> int:
    """The shard a user's events go to: the same hash in the ingest, the workers' reads, the
    read API and the CLI (crc32: stable across processes and languages)."""
    return zlib.crc32(user.encode()) % shards


async def post_all(posts: list[tuple[str, bytes, str]], shards: list[Shard]) -> int:
    """POST every body to its user's shard, CONCURRENCY at a time; the events answered 200."""
    queue = list(reversed(posts))
    acked = 0

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal acked
        while queue:
            user, body, signature = queue.pop()
            target = shards[user_shard(user, len(shards))]
            async with session.post(
                f"http://127.0.0.1:{target.ingest_port}/webhook", data=body,
                headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature},
            ) as answer:
                await answer.read()
                if answer.status == 200:
                    acked += body.count(b'"sender"')

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as s:
        await asyncio.gather(*(sender(s) for _ in range(CONCURRENCY)))
    return acked


@dataclass
class Phases:
    events: int
    ingest_s: float
    drain_s: float
    redis_ingest_us: list[float]
    """Redis CPU per event of each shard while its events came in (us)"""
    redis_drain_us: list[float]
    per_shard: list[int]
    machine_busy: float
    """% of all cores busy over both phases"""


def run(shards: list[Shard], posts: list[tuple[str, bytes, str]]) -> Phases:
    """Ingest every post with the workers stopped, then start one worker per shard and drain."""
    cpu0 = [s.redis_cpu_s() for s in shards]
    busy0, t0 = machine_busy_s(), time.perf_counter()
    acked = asyncio.run(post_all(posts, shards))
    t1 = time.perf_counter()
    cpu1 = [s.redis_cpu_s() for s in shards]
    counts = [sum(body.count(b'"sender"') for user, body, _ in posts
                  if user_shard(user, len(shards)) == i) for i in range(len(shards))]
    assert acked == sum(counts), f"only {acked} of {sum(counts)} events were acknowledged"
    for s in shards:
        s.worker = s.procs.python(f"{s.name}-worker", "-m", "workers")
    while sum(s.processed() for s in shards) < acked:
        for s in shards:
            if s.worker is not None and not s.worker.alive():
                raise RuntimeError(f"{s.name}'s worker exited:\n{s.worker.tail()}")
        time.sleep(0.05)
    t2 = time.perf_counter()
    cpu2 = [s.redis_cpu_s() for s in shards]
    busy = machine_busy_s() - busy0
    for s in shards:
        if s.worker is not None:
            s.worker.stop()
    return Phases(
        events=acked, ingest_s=t1 - t0, drain_s=t2 - t1,
        redis_ingest_us=[1e6 * (b - a) / n for a, b, n in zip(cpu0, cpu1, counts, strict=True)],
        redis_drain_us=[1e6 * (b - a) / n for a, b, n in zip(cpu1, cpu2, counts, strict=True)],
        per_shard=counts, machine_busy=100 * busy / (t2 - t0) / (os.cpu_count() or 1),
    )


def part_one(work: Path, secret: str, events: int) -> None:
    print("Redis CPU per event, end to end (one Redis, ingest then drain; us of Redis CPU)\n")
    print("| Redis | enqueue | workers | total | events/s per Redis core |")
    print("|---|---:|---:|---:|---:|")
    for aof in (False, True):
        with shard("aof" if aof else "plain", work, secret, aof) as one:
            p = run([one], bodies(secret.encode(), events))
        total = p.redis_ingest_us[0] + p.redis_drain_us[0]
        label = "AOF everysec" if aof else "no persistence"
        print(f"| {label} | {p.redis_ingest_us[0]:.1f} | {p.redis_drain_us[0]:.1f} | "
              f"{total:.1f} | {1e6 / total:,.0f} |")


def part_two(work: Path, secret: str, events: int) -> None:
    print(f"\nOne shard against two (users split by crc32 of the sender; {os.cpu_count()} cores "
          "for everything)\n")
    print("| shards | events per shard | Redis CPU per event, each (us) | ingest events/s | "
          "drain events/s | machine busy |")
    print("|---|---|---|---:|---:|---:|")
    posts = bodies(secret.encode(), events)
    for count in (1, 2):
        with contextlib.ExitStack() as stack:
            shards = [stack.enter_context(shard(f"{count}-{i}", work, secret, True))
                      for i in range(count)]
            p = run(shards, posts)
        each = ", ".join(f"{a + b:.1f}" for a, b in zip(p.redis_ingest_us, p.redis_drain_us,
                                                        strict=True))
        print(f"| {count} | {', '.join(f'{n:,}' for n in p.per_shard)} | {each} | "
              f"{p.events / p.ingest_s:,.0f} | {p.events / p.drain_s:,.0f} | "
              f"{p.machine_busy:.0f}% |")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.two_redis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000,
                        help="events per measurement (default: %(default)s)")
    args = parser.parse_args()
    secret = os.urandom(16).hex()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fbhook-two-redis-") as tmp:
        part_one(Path(tmp), secret, args.events)
        part_two(Path(tmp), secret, args.events)
    print(f"\n({time.perf_counter() - started:.0f} s, python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
