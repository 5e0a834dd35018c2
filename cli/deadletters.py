"""`fbhook dead-letters list|replay|purge`: the events whose handler kept failing (`fb:dead`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict

from redis.asyncio import Redis

from cli.common import (
    add_redis_option,
    open_redis,
    positive_int,
    run_dead_letter_change,
    tool_settings,
)
from shared.settings import Settings
from workers import deadletters


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dead-letters",
        help="list, replay or purge events that kept failing",
        description=(
            "Events whose handler kept failing (JOB_MAX_TRIES times) are kept in the stream "
            "fb:dead with their raw payload and last error. List them, queue them again once "
            "the handler is fixed, or purge them."
        ),
    )
    cmds = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = cmds.add_parser(
        "list", help="show dead letters, oldest first",
        description="Show dead letters, oldest first: entry id, kind, event id, tries, "
        "when it failed and the error.",
    )
    listing.add_argument("--count", type=positive_int, default=100, metavar="N",
                         help="show at most N (default: %(default)s)")
    listing.add_argument("--json", action="store_true",
                         help="one JSON object per line, payload included")
    add_redis_option(listing)
    listing.set_defaults(run=run_list)

    for name, verb, what in (
        ("replay", "queue again", "queued as a new job and removed from fb:dead"),
        ("purge", "delete", "deleted for good"),
    ):
        cmd = cmds.add_parser(
            name, help=f"{verb} dead letters (given entry ids, or --all)",
            description=f"Dead letters are {what}. Name them by entry id (as `list` shows), "
            "or pass --all.",
        )
        cmd.add_argument("ids", nargs="*", metavar="ENTRY_ID")
        cmd.add_argument("--all", action="store_true", help="every dead letter")
        add_redis_option(cmd)
        cmd.set_defaults(run=run_change, change=name)


def run_list(args: argparse.Namespace) -> int:
    letters = asyncio.run(_list(args))
    if args.json:
        for letter in letters:
            print(json.dumps(asdict(letter), ensure_ascii=False))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    for letter in letters:
        failed = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.failed_at_ms / 1000))
        error = letter.error if len(letter.error) <= 100 else letter.error[:97] + "..."
        print(f"{letter.entry_id}  {letter.kind}  {letter.event_id}  tries={letter.tries}  "
              f"failed={failed}Z  {error}")
    return 0


async def _list(args: argparse.Namespace) -> list[deadletters.DeadLetter]:
    async with open_redis(tool_settings(args)) as redis:
        return await deadletters.list_dead(redis, count=args.count)


def run_change(args: argparse.Namespace) -> int:
    return run_dead_letter_change(args, name="dead", stream="fb:dead", replayed="queued again",
                                  replay=deadletters.replay, purge=_purge)


async def _purge(redis: Redis, settings: Settings, ids: list[str] | None) -> int:
    return await deadletters.purge(redis, ids)
