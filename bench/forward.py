"""`python -m bench.forward`: forwarding to a bot (FORWARD_URL) against the same work without it,
in one run of about a minute.

It starts its own Redis, the ingest, a bot's webhook that checks each signature and answers 200
at once (`python -m bench.forward receiver`, its own process), and one worker (`python -m
workers`) per case, forwarding off or on:

- backlog: `--events` events (50 per POST, one in five a referral) queued while the worker is
  paused, then drained: events/s written to the streams, and with forwarding events/s delivered
  to the bot (the time to the last one), and the worker's CPU per event;
- acks: webhooks at `--rate` POST/s (1 event each, open loop, bench.loadgen paced) with the
  worker live, its events forwarded as they come or not, `--pairs` runs of each in turns: the
  ack latency at the ingest, best run of each. Forwarding happens after the ack, in the
  workers: it should add nothing.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.load import start_closed, start_paced
from bench.plan import QUICK
from bench.procs import REPO, Proc, service_env, wait_http, wait_idle
from bench.run import E2E_TIMEOUT_S, Bench
from shared import keys
from shared.signing import sign
from tests.redis_server import free_port, redis_server

FORWARD_SECRET = "bench-forward-secret"
PER_POST = 50
Point = dict[str, Any]


# --------------------------------------------------------------------------- the bot


def receiver_app(secret: bytes) -> web.Application:
    """A bot's webhook that does nothing but check the signature and count: POST /webhook, and
    GET /count for the benchmark ({"delivered", "distinct", "bad", "last"})."""
    state: dict[str, Any] = {"delivered": 0, "bad": 0, "ids": set(), "last": 0.0}

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        if not hmac.compare_digest(request.headers.get("X-Hub-Signature-256", ""),
                                   sign(secret, body)):
            state["bad"] += 1
            return web.Response(status=403)
        state["delivered"] += 1
        state["ids"].add(request.headers.get("X-Fbhook-Event-Id"))
        state["last"] = time.time()
        return web.Response(text="EVENT_RECEIVED")

    async def count(_: web.Request) -> web.Response:
        return web.json_response({"delivered": state["delivered"], "bad": state["bad"],
                                  "distinct": len(state["ids"]), "last": state["last"]})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/webhook", webhook)
    app.router.add_get("/count", count)
    app.router.add_get("/healthz", healthz)
    return app


# --------------------------------------------------------------------------- the measurement


class ForwardBench:
    def __init__(self, bench: Bench, events: int, rate: float, seconds: float,
                 pairs: int) -> None:
        self.bench, self.events, self.rate, self.seconds = bench, events, rate, seconds
        self.pairs = pairs
        self.bot_port, self.ingest_port = free_port(), free_port()
        self.forwarding = {"FORWARD_URL": f"http://127.0.0.1:{self.bot_port}/webhook",
                           "FORWARD_SECRET": FORWARD_SECRET}

    def run(self) -> dict[str, Any]:
        bench = self.bench
        bot = bench.procs.python("bot", "-m", "bench.forward", "receiver", str(self.bot_port))
        ingest = bench.procs.python("ingest", "-m", "ingest",
                                    env={"INGEST_PORT": str(self.ingest_port)})
        wait_http(bot, self.bot_port)
        wait_http(ingest, self.ingest_port)
        out: dict[str, Any] = {"events": self.events, "rate": self.rate, "seconds": self.seconds}
        bench.log(f"backlog of {self.events:,} events, one worker")
        out["backlog_off"] = self.backlog(forward=False)
        out["backlog_on"] = self.backlog(forward=True)
        bench.log(f"webhook acks at {self.rate:,.0f} POST/s, one worker live")
        runs: dict[bool, list[Point]] = {False: [], True: []}
        for forward in (False, True) * self.pairs:
            runs[forward].append(self.acks(forward))
        out["acks_off"] = min(runs[False], key=lambda p: p["p99_ms"])
        out["acks_on"] = min(runs[True], key=lambda p: p["p99_ms"])
        out["acks_runs"] = {"off": runs[False], "on": runs[True]}
        return out

    def worker(self, forward: bool) -> Proc:
        worker = self.bench.procs.python("worker-fwd" if forward else "worker",
                                         "-m", "workers", env=self.forwarding if forward else {})
        wait_idle([worker])
        return worker

    def bot_count(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.bot_port}/count"
        with urllib.request.urlopen(url, timeout=5) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def backlog(self, forward: bool) -> Point:
        bench = self.bench
        bench.flush()
        start = self.bot_count()["delivered"]
        worker = self.worker(forward)
        worker.pause()
        pool = bench.pool(bench.factory.mixed(self.events // PER_POST, PER_POST))
        names = [keys.stream(kind) for kind in pool.kinds]
        res = start_closed(self.ingest_port, pool, 32, E2E_TIMEOUT_S).wait()
        meter = bench.meter([worker])
        meter.start()
        t0 = time.perf_counter()
        worker.resume()
        written = bench.until(lambda: bench.xlen(names) >= pool.events) - t0
        delivered = 0.0
        if forward:
            delivered = bench.until(
                lambda: self.bot_count()["distinct"] >= pool.events) - t0
        meter.stop()
        bench.stop(worker)
        pool.path.unlink()
        count = self.bot_count()
        point: Point = {
            "events": pool.events, "acked_requests": res.acked, "failed": res.failed,
            "written_s": round(written, 3), "written_per_s": round(pool.events / written, 1),
            "worker_cpu_us_per_event": round(1e6 * meter.used[worker.name] / pool.events, 1),
        }
        if forward:
            point.update(delivered_s=round(delivered, 3),
                         delivered_per_s=round(pool.events / delivered, 1),
                         deliveries=count["delivered"] - start, bad_signatures=count["bad"])
        delivery = f", delivered {point['delivered_per_s']:,.0f} events/s" if forward else ""
        bench.log(f"  forwarding {'on ' if forward else 'off'}: written "
                  f"{point['written_per_s']:,.0f} events/s{delivery}, worker "
                  f"{point['worker_cpu_us_per_event']} us CPU/event")
        return point

    def acks(self, forward: bool) -> Point:
        bench = self.bench
        bench.flush()
        before = self.bot_count()["delivered"]
        worker = self.worker(forward)
        pool = bench.pool(bench.factory.mixed(int(self.rate * self.seconds) + 1, 1))
        run = start_paced(self.ingest_port, pool, self.rate, self.seconds)
        run.wait_ready()
        res = run.wait()
        if forward:  # every acked event reaches the bot
            bench.until(lambda: self.bot_count()["delivered"] - before >= res.acked, timeout=60)
        bench.stop(worker)
        pool.path.unlink()
        point: Point = {"acked": res.acked, "failed": res.failed, "p50_ms": round(res.p50_ms, 3),
                        "p99_ms": round(res.p99_ms, 3), "max_ms": round(res.max_ms, 3)}
        if forward:
            point["delivered"] = self.bot_count()["delivered"] - before
        bench.log(f"  forwarding {'on ' if forward else 'off'}: acks p50 {res.p50_ms:.2f} p99 "
                  f"{res.p99_ms:.2f} max {res.max_ms:.2f} ms ({res.acked:,} acked)")
        return point


def table(r: dict[str, Any]) -> str:
    off, on = r["backlog_off"], r["backlog_on"]
    a_off, a_on = r["acks_off"], r["acks_on"]
    lines = [
        "| Case (one worker) | forwarding off | forwarding on | on / off |",
        "|---|---:|---:|---:|",
        f"| Backlog of {off['events']:,} events: written to the streams, events/s | "
        f"{off['written_per_s']:,.0f} | {on['written_per_s']:,.0f} | "
        f"{on['written_per_s'] / off['written_per_s']:.2f} |",
        f"| Same backlog: delivered to the bot, events/s | | {on['delivered_per_s']:,.0f} | |",
        f"| Worker CPU per event, us | {off['worker_cpu_us_per_event']:.0f} | "
        f"{on['worker_cpu_us_per_event']:.0f} | "
        f"{on['worker_cpu_us_per_event'] / off['worker_cpu_us_per_event']:.2f} |",
    ]
    for q in ("p50", "p99"):
        key = f"{q}_ms"
        runs = {m: ", ".join(f"{p[key]:.2f}" for p in r["acks_runs"][m]) for m in ("off", "on")}
        lines.append(
            f"| Webhook acks at {r['rate']:,.0f} POST/s, {q} ms (each run) | {a_off[key]:.2f} "
            f"({runs['off']}) | {a_on[key]:.2f} ({runs['on']}) | {a_on[key] / a_off[key]:.2f} |")
    lines += [
        "",
        f"Backlog: {on['deliveries']:,} POSTs for {on['events']:,} events, "
        f"{on['bad_signatures']} refused. Acks: {r['seconds']:.0f} s a run, 1 event per POST, "
        "runs off and on in turns; the run with the lower p99 of each is the figure, every run "
        "in brackets, in order. Every acked event of the runs with forwarding reached the bot.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["receiver"]:
        web.run_app(receiver_app(FORWARD_SECRET.encode()), host="127.0.0.1", port=int(argv[1]),
                    print=None)
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="backlog size")
    parser.add_argument("--rate", type=float, default=500.0, help="POST/s for the ack runs")
    parser.add_argument("--seconds", type=float, default=5.0, help="per ack run")
    parser.add_argument("--pairs", type=int, default=3,
                        help="ack runs without and with forwarding, in turns (default: 3 each)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results",
                        help="where forward.json goes")
    args = parser.parse_args(argv)
    secret = os.urandom(16).hex()
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="fbhook-forward-") as tmp:
        env = service_env(secret, server.url)
        bench = Bench(QUICK, server.url, server.process.pid, Path(tmp), secret.encode(), env)
        try:
            result = ForwardBench(bench, args.events, args.rate, args.seconds,
                                  args.pairs).run()
        finally:
            bench.procs.stop_all()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forward.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"results: {args.out / 'forward.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
