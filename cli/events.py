"""`fbhook events tail|list`: watch the per-kind event streams `fb:events:<kind>`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from typing import Any

from redis.asyncio import Redis

from cli.common import add_redis_option, positive_int, say_if_empty, tool_settings
from shared import keys
from shared.kinds import KINDS
from shared.redis import connect
from shared.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "events",
        help="watch the per-kind event streams",
        description="Read the Redis Streams fb:events:<kind> that the workers write.",
    )
    cmds = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    tail = cmds.add_parser(
        "tail",
        help="print new entries of one or more kinds as they arrive",
        description=(
            "Follow fb:events:<KIND> (several kinds at once if you like) with XREAD BLOCK and "
            "print each entry as one JSON line: the stream, the entry id, the entry's fields "
            f"and the event decoded. Built-in kinds: {', '.join(KINDS)}; a kind with its own "
            "handler (e.g. message_request) has a stream too. Stops after --count entries, "
            "else on Ctrl-C."
        ),
    )
    tail.add_argument("kinds", nargs="+", metavar="KIND")
    tail.add_argument("--from-start", action="store_true",
                      help="print the entries already in the stream first (default: only new)")
    tail.add_argument("--count", type=positive_int, metavar="N", help="stop after N entries")
    tail.add_argument("--block", type=positive_int, default=5000, metavar="MS",
                      help="longest wait per XREAD call (default: %(default)s)")
    add_redis_option(tail)
    tail.set_defaults(run=run_tail)

    listing = cmds.add_parser(
        "list", help="every event stream and its length",
        description="List every fb:events:* stream with its length and its latest entry id.",
    )
    add_redis_option(listing)
    listing.set_defaults(run=run_list)


def run_tail(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail(tool_settings(args), args.kinds, from_start=args.from_start,
                         count=args.count, block_ms=args.block))
    return 0


async def tail(settings: Settings, kinds: list[str], *, from_start: bool = False,
               count: int | None = None, block_ms: int = 5000) -> int:
    """Print entries of the kinds' streams as JSON lines; return how many were printed."""
    # A blocking read must outlast its BLOCK time: this client's socket timeout allows for it.
    redis = connect(settings, read_timeout_s=settings.redis_timeout_s + block_ms / 1000)
    printed = 0
    try:
        await say_if_empty(redis)
        last = {keys.stream(k): "0-0" if from_start else await _latest_id(redis, keys.stream(k))
                for k in kinds}
        while count is None or printed < count:
            want = None if count is None else count - printed
            reply: list[Any] = await redis.xread(last, count=want, block=block_ms)  # type: ignore[arg-type]
            for name, entries in reply or []:
                stream = name.decode()
                for entry_id, fields in entries:
                    last[stream] = entry_id.decode()
                    print(json.dumps(entry_json(stream, last[stream], fields),
                                     ensure_ascii=False), flush=True)
                    printed += 1
    finally:
        await redis.aclose()
    return printed


async def _latest_id(redis: Redis, stream: str) -> str:
    """The stream's newest entry id: reading after it gives every entry added from now on
    (unlike `$`, which would skip entries that arrive between two XREAD calls)."""
    newest: list[Any] = await redis.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


def entry_json(stream: str, entry_id: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {"stream": stream, "entry_id": entry_id}
    for key, value in fields.items():
        name, text = key.decode(), value.decode(errors="replace")
        if name == "event":
            out[name] = json.loads(text)
        elif name == "timestamp" and text.isdigit():
            out[name] = int(text)
        else:
            out[name] = text
    return out


def run_list(args: argparse.Namespace) -> int:
    rows = asyncio.run(_list(tool_settings(args)))
    if not rows:
        print("no event streams yet")
        return 0
    width = max(len(name) for name, _, _ in rows)
    for name, length, last_id in rows:
        print(f"{name:<{width}}  {length:>10}  {last_id}")
    return 0


async def _list(settings: Settings) -> list[tuple[str, int, str]]:
    redis = connect(settings)
    try:
        await say_if_empty(redis)
        names = sorted([k.decode() async for k in redis.scan_iter(
            match=keys.STREAM_PREFIX + "*", count=1000, _type="stream")])
        rows = []
        for name in names:
            info = await redis.xinfo_stream(name)
            last = info.get("last-generated-id", b"")
            rows.append((name, int(info["length"]),
                         last.decode() if isinstance(last, bytes) else str(last)))
        return rows
    finally:
        await redis.aclose()
