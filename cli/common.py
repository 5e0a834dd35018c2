"""What every subcommand shares: the failure type, settings for Redis tools, a Redis client."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from shared.errors import FbhookError
from shared.redis import connect
from shared.settings import Settings


class CommandFailed(FbhookError):
    """A subcommand could not do its job; the message says why (exit status 1)."""


def positive_int(raw: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_redis_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", metavar="URL",
        help="Redis to use (default: REDIS_URL, else redis://127.0.0.1:6379/0)",
    )


def tool_settings(args: argparse.Namespace) -> Settings:
    """Settings for a command that only works on Redis: the secrets may be unset."""
    url: str | None = getattr(args, "redis_url", None)
    return Settings.for_tools(redis_url=url)


@asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect(settings)
    try:
        yield client
    finally:
        await client.aclose()
