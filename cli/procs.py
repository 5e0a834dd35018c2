"""Child processes for `fbhook dev`: started out of the terminal's reach, stopped in order."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """Linux: the child gets SIGTERM if `fbhook dev` dies without stopping it (SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_options() -> dict[str, Any]:
    """Popen options for a child of `fbhook dev`: its own process group, so that Ctrl-C reaches
    only the parent, which then stops the children in order (ingest, workers, Redis)."""
    options: dict[str, Any] = {}
    if sys.platform != "win32":
        options["process_group"] = 0
    if sys.platform == "linux":
        options["preexec_fn"] = _die_with_parent
    return options


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]


@dataclass(slots=True)
class Children:
    """The processes `fbhook dev` runs, in start order."""

    items: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            argv, env=dict(env), stdin=subprocess.DEVNULL, **child_options()
        )
        child = Child(name, process)
        self.items.append(child)
        return child

    def exited(self) -> Child | None:
        """The first child that is no longer running, if any."""
        return next((c for c in self.items if c.process.poll() is not None), None)

    def stop(self, timeout_s: float = 20.0, hurry: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM each child in start order and wait for it; SIGKILL after `timeout_s`, or at
        once when `hurry()` turns true (a second Ctrl-C)."""
        for child in self.items:
            process = child.process
            if process.poll() is None:
                process.terminate()
            deadline = time.monotonic() + timeout_s
            while process.poll() is None:
                if hurry() or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    break
                time.sleep(0.05)
