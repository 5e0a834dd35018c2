"""Processes the benchmark starts and watches: CPU time, peak RSS, readiness, clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status, e.g. VmHWM (peak RSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields)
    return (user + nice + system + irq + softirq + steal) / TICK


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    peak_rss_kb: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def sample_peak(self) -> int:
        self.peak_rss_kb = max(self.peak_rss_kb, status_kb(self.pid, "VmHWM"))
        return self.peak_rss_kb

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if not self.alive():
            return
        self.sample_peak()
        self.resume()
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Procs:
    """Starts Python modules of this repository as children; stops whatever is left on exit."""

    log_dir: Path
    env: Mapping[str, str]
    started: list[Proc] = field(default_factory=list)

    def python(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        out = log.open("ab")
        popen = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **(env or {})},
        )
        out.close()
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            with contextlib.suppress(OSError):
                proc.stop()


def wait_http(proc: Proc, port: int, timeout: float = 30.0) -> None:
    """Until GET /healthz answers 200; fail with the process's log if it died."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
            if answer.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer on port {port}:\n{proc.tail()}")


def wait_idle(procs: list[Proc], timeout: float = 30.0, window: float = 0.3) -> None:
    """Until every process has finished starting: alive and using under 15% CPU over `window`."""
    deadline = time.monotonic() + timeout
    time.sleep(0.2)
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        before = [p.cpu_s() for p in procs]
        time.sleep(window)
        used = [p.cpu_s() - b for p, b in zip(procs, before, strict=True)]
        if max(used) < 0.15 * window:
            return
    raise RuntimeError(f"{', '.join(p.name for p in procs)} did not settle:\n{procs[0].tail()}")


class CpuMeter:
    """CPU seconds each named process used between `start()` and `stop()`."""

    def __init__(self, procs: Mapping[str, int]) -> None:
        self._pids = dict(procs)
        self._before: dict[str, float] = {}
        self._t0 = 0.0
        self.used: dict[str, float] = {}
        self.wall_s = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._before = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        self._before["machine"] = machine_busy_s()

    def stop(self) -> dict[str, float]:
        self.wall_s = time.perf_counter() - self._t0
        now = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        now["machine"] = machine_busy_s()
        self.used = {name: now[name] - self._before[name] for name in now}
        return self.used

    def percent(self, generator_s: float = 0.0) -> dict[str, float]:
        """Per process, % of one core over the wall time; `machine` is every core's busy time
        and `other` what neither our processes nor the load generator account for."""
        if not self.wall_s:
            return {}
        out = {n: 100 * s / self.wall_s for n, s in self.used.items()}
        ours = sum(v for n, v in out.items() if n != "machine")
        out["other"] = max(0.0, out["machine"] - ours - 100 * generator_s / self.wall_s)
        return out


def service_env(secret: str, redis_url: str) -> dict[str, str]:
    """The environment the benchmark gives the ingest and the workers: only what they need,
    every other setting at its default (streams uncapped, so that none is trimmed while it is
    counted)."""
    return {
        "FB_APP_SECRET": secret, "FB_VERIFY_TOKEN": "bench-verify-token",
        "API_TOKEN": "bench-api-token", "REDIS_URL": redis_url, "INGEST_HOST": "127.0.0.1",
        "LOG_LEVEL": "warning", "STREAM_MAXLEN": "1000000000",
    }
