"""`python -m bench.drain`: only the backlog-drain measurement, one and two workers in turns
(with `--live`, live load too).

For tuning and A/B runs of the worker (`--env WORKER_MAX_JOBS=16`, another commit): it starts
its own Redis and ingest as `python -m bench` does, prefills the same mixed backlog, resumes one
or two workers and times the drain, `--rounds` times each, and prints every run (events/s, CPU
shares, CPU us per event; for live load, when the generator had sent its last event and how many
were written by then; for a drain, how fast the ingest filled its backlog and its CPU per event)
and the ratio of the best two-worker run to the best one-worker run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from bench.plan import QUICK
from bench.procs import service_env, wait_http
from bench.run import Bench
from tests.redis_server import free_port, redis_server


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the ingest and the workers (repeatable)")
    parser.add_argument("--handler", action="store_true",
                        help="workers run a CPU-bound handler per event (bench.handler_worker)")
    parser.add_argument("--live", action="store_true",
                        help="also live load: the same events posted while the workers run")
    parser.add_argument("--ordered", action="store_true",
                        help="also the ordered case: 10,000 users, mixed kinds, two workers, "
                             "and every user's order checked")
    args = parser.parse_args()
    plan = dataclasses.replace(QUICK, events=args.events)
    secret = os.urandom(16).hex()
    extra = dict(item.split("=", 1) for item in args.env)
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="fbhook-drain-") as tmp:
        env = {**service_env(secret, server.url), **extra}
        bench = Bench(plan, server.url, server.process.pid, Path(tmp), secret.encode(), env)
        port = free_port()
        bench.ports["project"] = port
        bench.servers["project"] = bench.procs.python("ingest", "-m", "ingest",
                                                      env={"INGEST_PORT": str(port)})
        best, live = {1: 0.0, 2: 0.0}, {1: 0.0, 2: 0.0}
        try:
            wait_http(bench.servers["project"], port)
            for _ in range(args.rounds):
                for count in (1, 2) if args.live else ():
                    point = bench.project_live(count)
                    live[count] = max(live[count], float(point["events_per_s"]))
                    print(f"live, {count} worker(s): {point['events_per_s']:>9,.0f} events/s  "
                          f"CPU % {point['cpu_pct']}  CPU us/event {point['cpu_us_per_event']}  "
                          f"sent in {point['sent_s']} s, {point['written_when_sent']:,} "
                          f"written by then  outputs ok: {point['outputs_ok']}", flush=True)
                for count in (1, 2):
                    point = bench.project_drain(
                        count, "bench.handler_worker" if args.handler else "workers")
                    best[count] = max(best[count], float(point["events_per_s"]))
                    print(f"{count} worker(s): {point['events_per_s']:>9,.0f} events/s  "
                          f"CPU % {point['cpu_pct']}  CPU us/event "
                          f"{point['cpu_us_per_event']}  outputs ok: {point['outputs_ok']}  "
                          f"(the backlog's ingest: {point['prefill_events_per_s']:,.0f} events/s, "
                          f"CPU us/event {point['prefill_cpu_us_per_event']})", flush=True)
                if args.ordered:
                    point = bench.project_ordered(2)
                    print(f"ordered, 2 workers, {point['users']:,} users: "
                          f"{point['events_per_s']:>9,.0f} events/s  per-user order violations "
                          f"{point['order_violations']}  outputs ok: {point['outputs_ok']}",
                          flush=True)
        finally:
            bench.procs.stop_all()
    print(f"best: 1 worker {best[1]:,.0f}, 2 workers {best[2]:,.0f} events/s: "
          f"{best[2] / best[1]:.2f}x")
    if args.live:
        print(f"best live: 1 worker {live[1]:,.0f}, 2 workers {live[2]:,.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
