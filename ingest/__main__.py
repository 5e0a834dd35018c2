"""`python -m ingest`: serve the webhook endpoint."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from ingest.app import create_app
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

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        loop = asyncio.new_event_loop()
    web.run_app(
        create_app(settings), host=settings.ingest_host, port=settings.ingest_port,
        access_log=None, loop=loop, print=None, reuse_port=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
