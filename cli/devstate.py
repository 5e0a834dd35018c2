"""Where a running `fbhook dev` says which Redis it started, so that the other commands, run
from the same directory without REDIS_URL, read that Redis instead of 127.0.0.1:6379."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = ".fbhook-dev.json"
"""In the directory `fbhook dev` runs in; removed when it stops."""


@dataclass(frozen=True, slots=True)
class DevState:
    redis_url: str
    pid: int
    path: Path


@contextlib.contextmanager
def announced(redis_url: str, directory: Path | None = None) -> Iterator[Path]:
    """Write the state file for as long as the block runs, then remove it (unless another
    `fbhook dev` in the same directory has written its own since)."""
    path = (directory or Path.cwd()) / STATE_FILE
    pid = os.getpid()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"redis_url": redis_url, "pid": pid}, out)
        out.write("\n")
    try:
        yield path
    finally:
        found = read(path.parent, check_alive=False)
        if found is not None and found.pid == pid:
            path.unlink(missing_ok=True)


def read(directory: Path | None = None, *, check_alive: bool = True) -> DevState | None:
    """The state of the `fbhook dev` running in `directory` (default: here), or None when there
    is none: no file, a file that does not parse, or (`check_alive`) its process is gone."""
    path = (directory or Path.cwd()) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        state = DevState(str(data["redis_url"]), int(data["pid"]), path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if check_alive and not _alive(state.pid):
        return None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True
