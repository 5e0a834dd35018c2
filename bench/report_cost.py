"""`python -m bench.report_cost`: what GET /report costs with 200,000 distinct refs in its range,
and what building reports does to webhook acks meanwhile.

It starts its own Redis and ingest (as `python -m bench` does; `python -m bench` runs the same
measurement after its others), posts `--refs` new users, each arriving through its own m.me ref,
spread over the last 30 days, and brings one user in five back the next day, all through the
ingest and one worker (`python -m workers`), as Facebook's webhooks would. Then it loads the
ingest at a fixed rate (open loop, bench.loadgen paced, 1 event per POST) in turns: alone; while
a client asks for reports back to back (JSON and page in turn): the default one (30 days, 50
rows), the one with the most rows (30 days, 500 rows) and the one with the longest range (401
days); and alone again. Ack latency during reports is compared with the runs alone. Redis's slow
log counts the calls that held Redis over 1 ms (every webhook waits behind such a call), and INFO
commandstats gives the Redis time of the report's commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.load import start_closed, start_paced
from bench.payloads import PAGE_ID
from bench.plan import QUICK
from bench.procs import REPO, Proc, service_env, wait_http
from bench.run import E2E_TIMEOUT_S, Bench
from shared import keys
from shared.report import MAX_DAYS, MAX_LIMIT
from tests.redis_server import free_port, redis_server

DAYS = 30
RETURN_EVERY = 5
RATE = 1000.0
"""Webhook POSTs per second during each run: light for the ingest, so that what moves the
latency is the report."""
PER_POST = 50
LOADS = (("default", ""), ("most_rows", "?limit={most}"), ("longest", "?from={first}"))
"""The reports asked for back to back, one kind per run: name, query."""
REPORT_COMMANDS = ("hmget", "zrevrange", "zcard", "zmscore", "pfmerge", "pfcount", "pexpire")
Point = dict[str, Any]


def _items(refs: int, today: dt.date) -> Iterator[str]:
    """Referral items: user n arrives on day n % DAYS through ref n; one user in RETURN_EVERY
    comes back the next day (when that day is not in the future)."""
    base = int(dt.datetime(today.year, today.month, today.day, tzinfo=dt.UTC).timestamp()) * 1000
    for n in range(refs):
        back = n % DAYS
        ts = base - back * 86_400_000 + n // 10
        yield _referral(n, ts)
        if n % RETURN_EVERY == 0 and back > 0:
            yield _referral(n, ts + 86_400_000)


def _referral(n: int, ts: int) -> str:
    return json.dumps({
        "sender": {"id": str(8_000_000_000_000_000 + n)}, "recipient": {"id": PAGE_ID},
        "timestamp": ts, "referral": {"source": "SHORTLINK", "type": "OPEN_THREAD",
                                      "ref": f"campaign-{n:06}"}})


def _bodies(refs: int) -> Iterator[list[str]]:
    items = _items(refs, dt.datetime.now(dt.UTC).date())
    while batch := list(itertools.islice(items, PER_POST)):
        yield batch


class Reporter(threading.Thread):
    """Asks for reports back to back on one keep-alive connection until stopped."""

    def __init__(self, port: int, token: str, paths: list[str]) -> None:
        super().__init__(daemon=True)
        self._port, self._token, self._paths = port, token, paths
        self.durations: list[float] = []
        self.statuses: dict[int, int] = {}
        self.sizes: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        n = 0
        while not self._done.is_set():
            path = self._paths[n % len(self._paths)]
            n += 1
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"Bearer {self._token}"})
            answer = conn.getresponse()
            body = answer.read()
            self.durations.append(time.perf_counter() - t0)
            self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
            self.sizes.append(len(body))
        conn.close()

    def stop(self) -> None:
        self._done.set()
        self.join(60)


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class ReportCost:
    """The measurement, on a Bench's Redis and process list."""

    def __init__(self, bench: Bench, refs: int, seconds: float) -> None:
        self.bench = bench
        self.refs = refs
        self.seconds = seconds
        self.env = dict(bench.procs.env)
        self.port = free_port()
        self.ingest: Proc | None = None

    def run(self) -> dict[str, Any]:
        bench = self.bench
        bench.flush()
        self.ingest = bench.procs.python("ingest-report", "-m", "ingest",
                                         env={"INGEST_PORT": str(self.port)})
        try:
            wait_http(self.ingest, self.port)
            return self._measure(self._seed())
        finally:
            bench.stop(self.ingest)

    def _seed(self) -> int:
        """Post the touches and let one worker store them; how many there are."""
        bench = self.bench
        bench.log(f"report cost: posting {self.refs:,} refs over {DAYS} days")
        t0 = time.perf_counter()
        pool = bench.pool(_bodies(self.refs))
        workers = bench.workers(1)
        run = start_closed(self.port, pool, 32, E2E_TIMEOUT_S)
        bench.until(lambda: bench.xlen([keys.stream("referral")]) >= pool.events, run)
        run.wait()
        bench.stop(*workers)
        pool.path.unlink()
        bench.log(f"  {pool.events:,} touches stored in {time.perf_counter() - t0:.1f} s")
        return pool.events

    def _measure(self, touches: int) -> dict[str, Any]:
        today = dt.datetime.now(dt.UTC).date()
        first = (today - dt.timedelta(days=MAX_DAYS - 1)).isoformat()
        check = self._get_json("/report.json")
        out: dict[str, Any] = {
            "refs": self.refs, "touches": touches, "days": DAYS, "rate": RATE,
            "seconds": self.seconds,
            "check": {"new": check["totals"]["new"], "users": check["totals"]["users"],
                      "returning": check["totals"]["returning"],
                      "rows": len(check["ref"]), "omitted_ref": check["omitted"]["ref"]},
            "longest_limit": self._get_json(f"/report.json?from={first}")["limit"],
        }
        out["alone"] = self._run(None)
        for name, query in LOADS:
            query = query.format(first=first, most=MAX_LIMIT)
            out[name] = self._run([f"/report.json{query}", f"/report{query}"])
        out["alone_again"] = self._run(None)
        return out

    def _get_json(self, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", path, headers={"Authorization": f"Bearer {self.env['API_TOKEN']}"})
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        if answer.status != 200:
            raise RuntimeError(f"GET {path}: {answer.status} {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def _run(self, paths: list[str] | None) -> Point:
        """One paced run, with reports asked for back to back when `paths` is given."""
        bench = self.bench
        redis = bench.redis
        pool = bench.pool(bench.factory.mixed(int(RATE * self.seconds) + 1, 1))
        run = start_paced(self.port, pool, RATE, self.seconds)
        run.wait_ready()
        redis.config_set("slowlog-log-slower-than", 1000)
        redis.slowlog_reset()
        redis.config_resetstat()
        reporter = None
        if paths is not None:
            reporter = Reporter(self.port, self.env["API_TOKEN"], paths)
            reporter.start()
        res = run.wait()
        if reporter is not None:
            reporter.stop()
        slow: list[dict[str, Any]] = redis.slowlog_get(128)  # type: ignore[assignment]
        stats: dict[str, Any] = redis.info("commandstats")  # type: ignore[assignment]
        pool.path.unlink()
        point: Point = {
            "acked": res.acked, "not_acked": res.failed, "p50_ms": round(res.p50_ms, 3),
            "p99_ms": round(res.p99_ms, 3), "max_ms": round(res.max_ms, 3),
            "redis_calls_over_1ms": len(slow),
            "slowest_redis_call": (
                max(slow, key=lambda e: int(e["duration"]))["command"].decode(errors="replace")[:60]
                + f" ({max(int(e['duration']) for e in slow) / 1000:.1f} ms)" if slow else ""),
        }
        if reporter is not None:
            reports = len(reporter.durations)
            usec = sum(int(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in REPORT_COMMANDS)
            calls = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                        for c in REPORT_COMMANDS)
            point.update(
                reports=reports, failed=sum(v for k, v in reporter.statuses.items() if k != 200),
                report_p50_ms=round(_ms(reporter.durations, 0.5), 1),
                report_max_ms=round(_ms(reporter.durations, 1.0), 1),
                report_bytes=max(reporter.sizes, default=0),
                redis_ms_per_report=round(usec / 1000 / max(1, reports), 2),
                redis_commands_per_report=round(calls / max(1, reports)),
            )
        label = "alone" if paths is None else f"reports {paths[0]}"
        bench.log(f"  {label}: acks p50 {res.p50_ms:.2f} p99 {res.p99_ms:.2f} max "
                  f"{res.max_ms:.2f} ms" + (f"; {point['reports']} reports, p50 "
                                            f"{point['report_p50_ms']} ms" if paths else ""))
        return point


def table(r: dict[str, Any]) -> str:
    """The measurement as a markdown table: latencies during reports against the runs alone."""
    alone = [r["alone"], r["alone_again"]]
    base50 = min(p["p50_ms"] for p in alone)
    base99 = min(p["p99_ms"] for p in alone)
    c = r["check"]
    lines = [
        f"{r['refs']:,} distinct refs (one new user each, over {r['days']} days; one user in "
        f"{RETURN_EVERY} back the next day: {r['touches']:,} touches); webhooks at "
        f"{r['rate']:,.0f} POST/s, {r['seconds']:.0f} s a run. The default report counted "
        f"{c['new']:,} new users, {c['returning']:,} returning and {c['users']:,} users (the "
        f"last two estimates), and left out at least {c['omitted_ref']:,} refs.",
        "",
        "| Run | reports (failed) | report p50 / max | Redis per report: time, commands | ack p50 "
        "/ p99 / max | vs alone: p50, p99 | Redis calls over 1 ms |",
        "|---|---:|---|---|---|---|---|",
    ]
    runs = [("Webhooks alone", r["alone"]),
            ("Default report: 30 days, 50 rows", r["default"]),
            (f"Most rows: 30 days, {MAX_LIMIT} rows", r["most_rows"]),
            (f"Longest range: {MAX_DAYS} days ({r['longest_limit']} rows)", r["longest"]),
            ("Webhooks alone, again", r["alone_again"])]
    for label, p in runs:
        during = "reports" in p
        slow = f"{p['redis_calls_over_1ms']}" + (
            f" (longest: {p['slowest_redis_call']})" if p["redis_calls_over_1ms"] else "")
        lines.append(
            f"| {label} | "
            + (f"{p['reports']} ({p['failed']})" if during else "") + " | "
            + (f"{p['report_p50_ms']:.0f} / {p['report_max_ms']:.0f} ms" if during else "")
            + " | " + (f"{p['redis_ms_per_report']:.1f} ms, {p['redis_commands_per_report']:,}"
                       if during else "")
            + f" | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} / {p['max_ms']:.2f} ms | "
            f"{p['p50_ms'] / base50:.2f}x, {p['p99_ms'] / base99:.2f}x | {slow} |")
    lines += ["", "Reports are asked for back to back on one connection, JSON and page in turn; "
              "\"vs alone\" divides by the better of the two runs without reports."]
    return "\n".join(lines) + "\n"


def measure(bench: Bench, refs: int = 200_000, seconds: float = 6.0) -> dict[str, Any]:
    """For `python -m bench`: the measurement on its Redis, with an ingest of its own."""
    return ReportCost(bench, refs, seconds).run()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=6.0, help="per run (5 runs)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results",
                        help="where report_cost.json goes")
    args = parser.parse_args()
    secret = os.urandom(16).hex()
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="fbhook-report-") as tmp:
        env = service_env(secret, server.url)
        bench = Bench(QUICK, server.url, server.process.pid, Path(tmp), secret.encode(), env)
        try:
            result = measure(bench, args.refs, args.seconds)
        finally:
            bench.procs.stop_all()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"results: {args.out / 'report_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
