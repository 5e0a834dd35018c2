"""`fbhook attribution get|export`: read the per-user referral records `fb:attr:<user>`."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

import msgspec
from redis.asyncio import Redis

from cli.common import (
    CommandFailed,
    add_redis_option,
    open_redis,
    positive_int,
    tool_settings,
)
from cli.progress import Progress, wanted
from shared import keys
from shared.attribution import POSITIONS, AttributionView, load, read_record
from shared.identity import PSID, SPACES

TOUCH_COLUMNS = POSITIONS
"""Every field of a touch (shared/attribution.py Touch, the one definition)."""
CSV_COLUMNS = (
    "user", "touches",
    *(f"first_{c}" for c in TOUCH_COLUMNS),
    *(f"last_{c}" for c in TOUCH_COLUMNS),
)
"""One row per user: the first and the last touch side by side (the history is in jsonl)."""

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a cell as a formula (OWASP, CSV injection)."""

_encode = msgspec.json.Encoder().encode


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "attribution",
        help="read per-user referral attribution",
        description="Read the referral attribution records the workers keep per user.",
    )
    cmds = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = cmds.add_parser(
        "get",
        help="one user's record, as JSON",
        description=(
            "Print one user's attribution record as JSON: touch count, first and last touch, "
            "the history (latest first) and the _fbRef* variables. USER is a PSID; with "
            "--space, an Instagram-scoped id or a chat plugin's user_ref (the same string in "
            "two spaces is two users). Exit status 1 when the user has no record."
        ),
    )
    get.add_argument("user", metavar="USER")
    get.add_argument("--space", choices=SPACES, default=PSID,
                     help="the identity space USER is in: a Page-scoped id (psid, the default), "
                          "an Instagram-scoped id (igsid) or a chat plugin's user_ref")
    add_redis_option(get)
    get.set_defaults(run=run_get)

    export = cmds.add_parser(
        "export",
        help="every user's record, as CSV or JSON lines",
        description=(
            "Write every user's attribution record, streaming: SCAN over fb:attr:* and one "
            "pipelined read per batch, so memory stays flat however many users there are. "
            "jsonl gives the full record per line (as `attribution get`); csv gives one row per "
            "user with the first and last touch; a text cell that starts with =, +, -, @, a tab "
            "or a carriage return gets a leading ' so that a spreadsheet shows it instead of "
            "running it (anyone can put a formula in an m.me ref). A user may appear twice if "
            "Redis resizes its key space during the export (a property of SCAN)."
        ),
    )
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="output format (default: jsonl)")
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    export.add_argument("--batch", type=positive_int, default=1000, metavar="N",
                        help="keys per SCAN call and per pipeline (default: %(default)s)")
    export.add_argument("--progress", action="store_true",
                        help="show progress on stderr even when it is not a terminal")
    add_redis_option(export)
    export.set_defaults(run=run_export)


def run_get(args: argparse.Namespace) -> int:
    view = asyncio.run(_get(args))
    if view is None:
        raise CommandFailed(f"no attribution for user {args.user!r}")
    sys.stdout.write(msgspec.json.format(_encode(view), indent=2).decode() + "\n")
    return 0


async def _get(args: argparse.Namespace) -> AttributionView | None:
    async with open_redis(tool_settings(args)) as redis:
        return await load(redis, args.user, args.space)


async def scan_records(redis: Redis, batch: int = 1000) -> AsyncIterator[list[AttributionView]]:
    """Every attribution record, a batch at a time: one SCAN and one pipeline per batch."""
    cursor: int = 0
    while True:
        cursor, found = await redis.scan(
            cursor, match=keys.ATTR_PREFIX + "*", count=batch, _type="string"
        )
        if found:
            rows: list[Any] = await redis.mget(found)
            views = []
            for key, raw in zip(found, rows, strict=True):
                user = key.decode(errors="replace").removeprefix(keys.ATTR_PREFIX)
                view = read_record(user, raw)
                if view is not None:  # deleted between SCAN and MGET
                    views.append(view)
            yield views
        if cursor == 0:
            return


def run_export(args: argparse.Namespace) -> int:
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as out:
            count = asyncio.run(_export(args, out))
    else:
        count = asyncio.run(_export(args, sys.stdout))
    if args.output:
        print(f"exported {count} users to {args.output}", file=sys.stderr)
    return 0


async def _export(args: argparse.Namespace, out: TextIO) -> int:
    progress = Progress(wanted(args.progress))
    # CRLF as RFC 4180 has it: the writer quotes a cell holding any character of its line
    # terminator, so a bare carriage return in a ref cannot end a row early.
    writer = csv.writer(out, lineterminator="\r\n") if args.format == "csv" else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    count = 0

    def status() -> str:
        return f"exported {count} users ({progress.rate(count):.0f}/s)"

    async with open_redis(tool_settings(args)) as redis:
        async for views in scan_records(redis, args.batch):
            for view in views:
                if writer is not None:
                    writer.writerow(csv_row(view))
                else:
                    out.write(_encode(view).decode() + "\n")
            count += len(views)
            progress.tick(status)
    out.flush()
    progress.done(f"exported {count} users in {progress.elapsed():.1f} s")
    return count


def csv_row(view: AttributionView) -> list[Any]:
    row: list[Any] = [cell(view.user), view.touches]
    for touch in (view.first, view.last):
        for column in TOUCH_COLUMNS:
            value = touch.get(column)
            if isinstance(value, dict):
                value = json.dumps(value, ensure_ascii=False, sort_keys=True)
            row.append("" if value is None else cell(value))
    return row


def cell(value: Any) -> Any:
    """A value a spreadsheet shows rather than runs: text that would start a formula gets a
    leading single quote, as OWASP advises against CSV injection."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
