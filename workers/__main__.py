"""`python -m workers`: run one worker; start as many as you like against one Redis."""

from __future__ import annotations

import asyncio
import sys

from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.settings import Settings


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        import uvloop

        asyncio.set_event_loop(uvloop.new_event_loop())
    except ImportError:  # pragma: no cover
        asyncio.set_event_loop(asyncio.new_event_loop())
    from arq.worker import Worker

    import workers.handlers  # noqa: F401 - registers the project's own handlers
    from workers.settings import worker_settings

    Worker(**worker_settings(settings)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
