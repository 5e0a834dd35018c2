"""A small HTTP/1.1 load generator on raw asyncio sockets, run in its own process.

    python -m bench.loadgen paced  PORT POOL --rate R --duration S
    python -m bench.loadgen closed PORT POOL --connections C --duration S [--mode once|wrap]

`paced` is open-loop: request i is due at start + i/R whatever happened before it, and its
latency runs from that due time (so a stall is not hidden by sending later, as a closed loop
would). `closed` mimics wrk (C connections, each sends when its previous answer is in) and is the
fallback when wrk is not installed. Both speak the line protocol of bench/wrk.lua: `READY n`,
`DONE` (closed, once), and one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from bench.payloads import read_pool

now = time.perf_counter
FILLER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Conn(asyncio.Protocol):
    """One keep-alive connection; calls `on_answer(conn, status, body)` per response."""

    def __init__(self, on_answer: Callable[[Conn, int, bytes], None]) -> None:
        self._on_answer = on_answer
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.due = 0.0
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def send(self, raw: bytes, due: float) -> None:
        self.due = due
        assert self.transport is not None
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            total = end + 4 + content_length(head)
            if len(buf) < total:
                return
            status = int(head[9:12])
            body = bytes(buf[end + 4:total])
            del buf[:total]
            self._on_answer(self, status, body)


def content_length(head: bytes) -> int:
    at = head.find(b"content-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at)
    return int(head[at + 15:end if end >= 0 else len(head)])


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "max_us": 0.0, "mean_us": 0.0}
    ordered = sorted(samples)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e6

    return {"p50_us": at(50), "p90_us": at(90), "p99_us": at(99), "max_us": ordered[-1] * 1e6,
            "mean_us": sum(ordered) / len(ordered) * 1e6}


class Run:
    """Counters and latencies shared by both modes."""

    def __init__(self, reqs: list[bytes]) -> None:
        self.reqs = reqs
        self.sent = self.acked = self.failed = self.fillers = 0
        self.latencies: list[float] = []
        self.finished = asyncio.get_running_loop().create_future()

    def count(self, status: int, body: bytes, latency: float) -> bool:
        """Record one answer; False for a filler."""
        if body == b"EVENT_RECEIVED":
            self.acked += 1
        elif status == 200:
            self.fillers += 1
            return False
        else:
            self.failed += 1
        self.latencies.append(latency)
        return True

    def result(self, duration_s: float) -> dict[str, float | int]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "duration_us": int(duration_s * 1e6), "responses": self.acked + self.failed,
            "sent": self.sent, "acked": self.acked, "failed": self.failed,
            "fillers": self.fillers, "socket_errors": 0, "timeouts": 0,
            "cpu_s": usage.ru_utime + usage.ru_stime, **percentiles(self.latencies),
        }


async def _open(port: int, count: int, on_answer: Callable[[Conn, int, bytes], None]
                ) -> list[Conn]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(count):
        transport, proto = await loop.create_connection(lambda: Conn(on_answer), "127.0.0.1",
                                                        port)
        proto.transport = transport
        conns.append(proto)
    return conns


async def paced(port: int, reqs: list[bytes], rate: float, duration: float
                ) -> dict[str, float | int]:
    run = Run(reqs)
    total = min(len(reqs), int(rate * duration))
    idle: deque[Conn] = deque()
    backlog: deque[tuple[bytes, float]] = deque()

    def on_answer(conn: Conn, status: int, body: bytes) -> None:
        run.count(status, body, now() - conn.due)
        if backlog:
            conn.send(*backlog.popleft())
        else:
            idle.append(conn)
        if run.acked + run.failed >= total and not run.finished.done():
            run.finished.set_result(None)

    idle.extend(await _open(port, 64, on_answer))
    print(f"READY {len(reqs)}", flush=True)
    start = now() + 0.01
    for i in range(total):
        due = start + i / rate
        wait = due - now()
        if wait > 0:
            await asyncio.sleep(wait)
        run.sent += 1
        if idle:
            idle.popleft().send(reqs[i], due)
        else:
            backlog.append((reqs[i], due))
    await asyncio.wait_for(run.finished, 30)
    return run.result(now() - start)


async def closed(port: int, reqs: list[bytes], connections: int, duration: float, mode: str
                 ) -> dict[str, float | int]:
    run = Run(reqs)
    state = {"next": 0}

    def next_request() -> bytes:
        i = state["next"]
        if i < len(reqs):
            state["next"] = i + 1
            run.sent += 1
            return reqs[i]
        if mode == "wrap":
            state["next"] = 1
            run.sent += 1
            return reqs[0]
        return FILLER

    def on_answer(conn: Conn, status: int, body: bytes) -> None:
        run.count(status, body, now() - conn.due)
        if mode == "once" and run.acked + run.failed >= len(reqs):
            if not run.finished.done():
                print("DONE", flush=True)
                run.finished.set_result(None)
            return
        conn.send(next_request(), now())

    conns = await _open(port, connections, on_answer)
    print(f"READY {len(reqs)}", flush=True)
    start = now()
    for conn in conns:
        conn.send(next_request(), now())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(run.finished), duration)
    return run.result(now() - start)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("kind", choices=["paced", "closed"])
    parser.add_argument("port", type=int)
    parser.add_argument("pool", type=Path)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--mode", choices=["once", "wrap"], default="once")
    args = parser.parse_args()
    import uvloop

    reqs = read_pool(args.pool)
    started = time.perf_counter()
    if args.kind == "paced":
        result = uvloop.run(paced(args.port, reqs, args.rate, args.duration))
    else:
        result = uvloop.run(closed(args.port, reqs, args.connections, args.duration, args.mode))
    result["wall_s"] = time.perf_counter() - started
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
