"""Runs a load generator as a child process: wrk when installed, else bench.loadgen.

Both print `READY`, `DONE` and `RESULT {json}` lines (see bench/wrk.lua). On `DONE` wrk is
stopped with SIGINT, so a run in `once` mode lasts as long as its pool takes to be answered.
The generator's own CPU time comes from wait4(), the kernel's account of the finished child.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.payloads import Pool
from bench.procs import REPO

WRK_LUA = Path(__file__).with_name("wrk.lua")
_wrk = {"path": shutil.which("wrk")}


def disable_wrk() -> None:
    """Use the Python generator even where wrk is installed (`python -m bench --no-wrk`)."""
    _wrk["path"] = None


@dataclass
class LoadResult:
    """What one run of a generator measured, from the generator's side."""

    generator: str
    connections: int
    duration_s: float
    sent: int
    acked: int
    failed: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu_s: float
    socket_errors: int = 0
    ready_at: float = 0.0
    """perf_counter() when the generator had loaded its pool and began sending."""
    raw: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.acked / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.duration_s if self.duration_s else 0.0


def generator_name() -> str:
    if _wrk["path"]:
        return "wrk"
    why = "--no-wrk" if shutil.which("wrk") else "wrk not installed"
    return f"python bench.loadgen ({why}; it may itself be the bottleneck)"


class Running:
    """A generator in flight; `poll()` returns its result once it has exited."""

    def __init__(self, cmd: list[str], label: str, connections: int, signal_on_done: bool) -> None:
        self._label = label
        self._connections = connections
        self._lines: list[str] = []
        self._result: dict[str, float] | None = None
        self.ready_at = 0.0
        self.done_at = 0.0
        self._ready = threading.Event()
        self._proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        self._signal_on_done = signal_on_done
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._final: LoadResult | None = None

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("READY"):
                self.ready_at = time.perf_counter()
                self._ready.set()
            elif line.startswith("DONE"):
                self.done_at = time.perf_counter()
                if self._signal_on_done:
                    self._proc.send_signal(signal.SIGINT)
            elif line.startswith("RESULT "):
                self._result = json.loads(line[7:])
            else:
                self._lines.append(line.rstrip())

    def wait_ready(self, timeout: float = 120.0) -> float:
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self._label} never became ready: {self._lines[-5:]}")
        return self.ready_at

    def poll(self) -> LoadResult | None:
        if self._final is not None:
            return self._final
        pid, _, usage = os.wait4(self._proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        self._proc.returncode = 0
        self._reader.join(10)
        if self._result is None:
            raise RuntimeError(f"{self._label} gave no result:\n" + "\n".join(self._lines[-20:]))
        r = self._result
        cpu = usage.ru_utime + usage.ru_stime
        self._final = LoadResult(
            generator=self._label, connections=self._connections,
            duration_s=r["duration_us"] / 1e6, sent=int(r["sent"]), acked=int(r["acked"]),
            failed=int(r["failed"]), p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000,
            p99_ms=r["p99_us"] / 1000, max_ms=r["max_us"] / 1000, cpu_s=cpu,
            socket_errors=int(r["socket_errors"]), ready_at=self.ready_at, raw=r,
        )
        return self._final

    def wait(self, tick: Callable[[], None] | None = None, interval: float = 0.01) -> LoadResult:
        while True:
            result = self.poll()
            if result is not None:
                return result
            if tick is not None:
                tick()
            time.sleep(interval)


def start_closed(port: int, pool: Pool, connections: int, duration_s: float,
                 mode: str = "once") -> Running:
    """Closed loop: `connections` connections, each sends its next request once answered."""
    seconds = max(1, math.ceil(duration_s))
    wrk = _wrk["path"]
    if wrk:
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
               "-s", str(WRK_LUA), f"http://127.0.0.1:{port}/webhook", str(pool.path), mode]
        return Running(cmd, "wrk", connections, signal_on_done=True)
    cmd = [sys.executable, "-m", "bench.loadgen", "closed", str(port), str(pool.path),
           "--connections", str(connections), "--duration", str(seconds), "--mode", mode]
    return Running(cmd, "python", connections, signal_on_done=False)


def start_paced(port: int, pool: Pool, rate: float, duration_s: float) -> Running:
    """Open loop at a fixed rate (bench.loadgen paced): latency counts from each due time."""
    cmd = [sys.executable, "-m", "bench.loadgen", "paced", str(port), str(pool.path),
           "--rate", str(rate), "--duration", str(duration_s)]
    return Running(cmd, "paced", 64, signal_on_done=False)
