"""A one-line progress display on stderr, redrawn a few times a second at most."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def wanted(forced: bool, stream: TextIO | None = None) -> bool:
    """Show progress when asked to (`--progress`) or when the stream is a terminal."""
    return forced or (stream or sys.stderr).isatty()


class Progress:
    """Call `tick` as often as you like: the text is built and drawn only when it is due."""

    def __init__(
        self, enabled: bool, *, stream: TextIO | None = None, interval_s: float = 0.25
    ) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self._stream = stream or sys.stderr
        # On a terminal the line is redrawn in place; elsewhere (a log file) each update is a
        # line of its own, so they come less often.
        self._tty = self._stream.isatty()
        self._interval_s = interval_s if self._tty else max(interval_s, 2.0)
        self._next = self.started
        self._width = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self, count: int) -> float:
        return count / max(self.elapsed(), 1e-6)

    def tick(self, text: Callable[[], str]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval_s
            self._draw(text())

    def done(self, text: str | None = None) -> None:
        """Draw the final state (if any) and end the line."""
        if not self.enabled:
            return
        if text is not None:
            self._draw(text)
        if self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0

    def _draw(self, line: str) -> None:
        if not self._tty:
            self._stream.write(line + "\n")
            self._stream.flush()
            return
        pad = max(self._width - len(line), 0)
        self._stream.write("\r" + line + " " * pad)
        self._stream.flush()
        self._width = len(line)
