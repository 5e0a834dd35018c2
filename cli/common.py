"""What every subcommand shares: the failure type, settings for Redis tools, a Redis client."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from cli import devstate
from shared.errors import FbhookError
from shared.redis import connect
from shared.settings import Settings, environ_with_defaults, redact_url


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
        help="Redis to use (default: REDIS_URL, else the one `fbhook dev` started in this "
        "directory, else redis://127.0.0.1:6379/0)",
    )


def tool_settings(args: argparse.Namespace) -> Settings:
    """Settings for a command that only works on Redis: the secrets may be unset. The Redis is
    --redis-url, else REDIS_URL, else the one a `fbhook dev` running in this directory started,
    else the default; stderr says which, and why."""
    url: str | None = getattr(args, "redis_url", None)
    if url is not None:
        source = "from --redis-url"
    elif not _redis_url_unset():
        source = "from REDIS_URL"
    elif (dev := devstate.read()) is not None:
        url = dev.redis_url
        source = f"started by fbhook dev, pid {dev.pid}, as {dev.path.name} here says"
    else:
        source = ("the default: no --redis-url, no REDIS_URL, and no fbhook dev running in "
                  "this directory")
    settings = Settings.for_tools(redis_url=url)
    print(f"fbhook: reading Redis {redact_url(settings.redis_url)} ({source})", file=sys.stderr)
    return settings


def _redis_url_unset() -> bool:
    # Settings cannot tell an unset REDIS_URL from one set to the default; this can.
    return "REDIS_URL" in environ_with_defaults({"REDIS_URL": "unset"})[1]


async def say_if_empty(redis: Redis) -> None:
    """One line on stderr when the Redis holds no key at all: an empty answer then means the
    wrong Redis more often than no traffic."""
    if await redis.dbsize() == 0:
        print("fbhook: this Redis holds no data at all (no webhook has reached it)",
              file=sys.stderr)


@asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect(settings)
    try:
        await say_if_empty(client)
        yield client
    finally:
        await client.aclose()


Change = Callable[[Redis, Settings, "list[str] | None"], Awaitable[int]]


def run_dead_letter_change(args: argparse.Namespace, *, name: str, stream: str, replayed: str,
                           replay: Change, purge: Change) -> int:
    """`replay` or `purge` (args.change) of the dead letters `args.ids`, or all with `--all`;
    exit 1 when some given ids were not in `stream`. Shared by `dead-letters` and `forward dead`."""
    if args.all == bool(args.ids):
        raise CommandFailed(f"{name} {args.change}: give entry ids or --all (not both)")
    settings = tool_settings(args)
    ids: list[str] | None = None if args.all else list(dict.fromkeys(args.ids))

    async def change() -> int:
        async with open_redis(settings) as redis:
            return await (replay if args.change == "replay" else purge)(redis, settings, ids)

    count = asyncio.run(change())
    done = replayed if args.change == "replay" else "purged"
    print(f"{count} {name} letter{'' if count == 1 else 's'} {done}")
    given = len(dict.fromkeys(args.ids))
    if count < given:
        print(f"{given - count} of the given ids were not {done} (not in {stream})")
        return 1
    return 0
