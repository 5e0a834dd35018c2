"""Logging: one JSON object per line when not on a terminal, plain text on one."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from shared.settings import Settings

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...extra}`; fields passed with `extra=` are kept."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <msg> key=value ...`: the same extra fields, for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extra = " ".join(
            f"{key}={value}" for key, value in record.__dict__.items()
            if key not in _RESERVED and not key.startswith("_")
        )
        return f"{line} {extra}" if extra else line


_ARQ_ROUTINE = frozenset({
    "%6.2fs → %s(%s)%s",  # a job starts
    "%6.2fs ← %s ● %s",  # a job ends well
    "recording health: %s",  # every HEALTH_CHECK_INTERVAL_S
})
"""arq's info lines for healthy work, by format string (its retries, failures and start-up
lines keep their level)."""


class ArqRoutineAtDebug(logging.Filter):
    """Demote arq's per-job and health lines to debug: healthy traffic logs at debug only,
    and workers/jobs.py already writes one line per job."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.msg not in _ARQ_ROUTINE:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def setup_logging(settings: Settings) -> None:
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    arq = logging.getLogger("arq.worker")
    if not any(isinstance(f, ArqRoutineAtDebug) for f in arq.filters):
        arq.addFilter(ArqRoutineAtDebug())
