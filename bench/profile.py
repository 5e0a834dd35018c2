"""`python -m bench.profile ingest1|ingest50|worker`: py-spy on one process under load.

Starts a throwaway Redis and `python -m ingest` (plus one `python -m workers` for `worker`),
drives the same pre-signed load as the benchmark, records the process with py-spy and prints
where its busy samples went: by function alone (self) and with callees (inclusive).
py-spy samples wall time: a process that is runnable but waiting for a core (on a loaded
2-core machine, often right after its send() woke Redis or the load generator) shows up in the
frame it was preempted in, typically the socket writes. Compare with the CPU share printed.
`worker` records one worker draining a pre-filled backlog. Needs py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis

from bench.load import start_closed
from bench.payloads import Factory
from bench.procs import REPO, Procs, service_env, wait_http, wait_idle
from shared import keys
from tests.redis_server import free_port, redis_server

RATE_HZ = 200


def summarize(raw: Path, top: int = 25) -> str:
    """Self and inclusive shares of py-spy's collapsed stacks (`frame;frame;leaf count`)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    lines = [f"{total} busy samples at {RATE_HZ} Hz", "", "self %  function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in own.most_common(top)]
    lines += ["", "incl % function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return subprocess.Popen([spy, "record", "-r", str(RATE_HZ), "-d", str(int(seconds)), "-f",
                             "raw", "-o", str(out), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stored(redis: Redis, names: list[str]) -> int:
    lengths: list[int] = [redis.xlen(n) for n in names]  # type: ignore[misc]
    return sum(lengths)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("what", choices=["ingest1", "ingest50", "worker"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "profile")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(8).hex()
    raw = args.out / f"{args.what}.txt"
    with redis_server() as server, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        procs = Procs(Path(tmp), {**service_env(secret, server.url), "INGEST_PORT": str(port)})
        factory = Factory(secret.encode())
        try:
            ingest = procs.python("ingest", "-m", "ingest")
            wait_http(ingest, port)
            if args.what == "worker":
                per_request, requests = 50, 8000
                worker = procs.python("worker", "-m", "workers")
                wait_idle([worker])
                worker.pause()
                pool = factory.write(Path(tmp) / "pool", factory.mixed(requests, per_request))
                start_closed(port, pool, 32, 300).wait()
                spy = record(worker.pid, args.seconds, raw)
                time.sleep(0.5)
                started = time.perf_counter()
                cpu0 = worker.cpu_s()
                worker.resume()
                redis = Redis.from_url(server.url)
                names = [keys.stream(k) for k in pool.kinds]
                while stored(redis, names) < pool.events:
                    time.sleep(0.01)
                took = time.perf_counter() - started
                cpu = worker.cpu_s() - cpu0
                print(f"drained {pool.events:,} events in {took:.2f} s "
                      f"({pool.events / took:,.0f} events/s, py-spy attached); worker CPU "
                      f"{100 * cpu / took:.0f}% of one core, "
                      f"{1e6 * cpu / pool.events:.1f} us/event")
            else:
                per_request, conns = (1, 64) if args.what == "ingest1" else (50, 32)
                rate = 15_000 if per_request == 1 else 2_000
                pool = factory.write(Path(tmp) / "pool",
                                     factory.mixed(int(rate * (args.seconds + 2)), per_request))
                run = start_closed(port, pool, conns, args.seconds + 1)
                run.wait_ready()
                cpu0, t0 = ingest.cpu_s(), time.perf_counter()
                spy = record(ingest.pid, args.seconds, raw)
                res = run.wait()
                cpu = (ingest.cpu_s() - cpu0) / (time.perf_counter() - t0)
                print(f"{res.rps:,.0f} req/s, {res.rps * per_request:,.0f} events/s, "
                      f"p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms (py-spy attached); "
                      f"ingest CPU {100 * cpu:.0f}% of one core, {1e6 * cpu / res.rps:.1f} us/req")
            spy.wait(args.seconds + 30)
        finally:
            procs.stop_all()
    print(summarize(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
