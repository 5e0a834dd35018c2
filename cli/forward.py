"""`fbhook forward`: deliveries to FORWARD_URL that failed for good (`fb:fwd:dead`: list, replay,
purge), and `demo-receiver`, a stand-in for a bot's webhook that checks and prints what it gets.

A replayed delivery goes back at the end of its forward list (`fb:fwd:<lane>`, the lane its
dead letter names), so it reaches the bot after the user's events already waiting there; the
list gets a forward job if no job owns it, in the same Lua call that removes the dead letter.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import msgspec
from aiohttp import web
from redis.asyncio import Redis

from cli.common import (
    CommandFailed,
    add_redis_option,
    open_redis,
    positive_int,
    run_dead_letter_change,
    tool_settings,
)
from shared import keys
from shared.codec import FORWARD_JOB, JOB_TTL_MS
from shared.lanes import with_queue_job
from shared.settings import MAX_FORWARD_AGE_S, Settings
from shared.signing import sign
from workers.effects import ForwardRecord

REPLAY_LUA = with_queue_job("""
-- Put one forward dead letter back at the end of its forward list and remove it from the dead
-- letters, atomically (replayed twice at once, it is queued once); queue a forward job for a
-- list that no job owns (queue_job: shared/queue_job.lua).
-- ARGV[1] dead-letter stream  ARGV[2] entry id     ARGV[3] forward list   ARGV[4] owner key
-- ARGV[5] arq job-key prefix  ARGV[6] queue        ARGV[7] new job id     ARGV[8] lane
-- ARGV[9] now (ms)            ARGV[10] job TTL (ms)  ARGV[11] job function ('forward')
-- ARGV[12] replayed-mark key prefix  ARGV[13] its TTL (ms)
-- The event's replayed mark (`fb:fwdreplay:<id>`, now) makes its age count from now: the
-- worker gives up on a delivery once it is older than FORWARD_MAX_AGE_SECONDS, and a replayed
-- one is that old already.
-- Returns 1 when replayed, 0 when the entry was not there.
local rows = redis.call('XRANGE', ARGV[1], ARGV[2], ARGV[2])
if #rows == 0 then
  return 0
end
local fields, payload, id = rows[1][2], nil, nil
for i = 1, #fields, 2 do
  if fields[i] == 'payload' then
    payload = fields[i + 1]
  elseif fields[i] == 'id' then
    id = fields[i + 1]
  end
end
redis.call('RPUSH', ARGV[3], payload)
if id then
  redis.call('SET', ARGV[12] .. id, ARGV[9], 'PX', ARGV[13])
end
if redis.call('EXISTS', ARGV[4]) == 0 then
  local now = tonumber(ARGV[9])
  queue_job(ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[11], tonumber(ARGV[8]), now, now, ARGV[10])
end
redis.call('XDEL', ARGV[1], ARGV[2])
return 1
""")

_decode_record = msgspec.json.Decoder(ForwardRecord).decode


@dataclass(frozen=True, slots=True)
class ForwardDead:
    """One delivery that failed for good, as `fb:fwd:dead` keeps it (workers/forward.lua)."""

    entry_id: str
    event_id: str
    kind: str
    status: int
    """The bot's last HTTP status; 0 when there was no answer (timeout, connection error)."""
    answer: str
    error: str
    tries: int
    failed_at_ms: int
    lane: int | None
    payload: str
    """The forward list item: the ForwardRecord JSON, a newline, the attribution JSON."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "forward",
        help="deliveries to FORWARD_URL that failed for good; a demo receiver",
        description="Forwarding to your bot (FORWARD_URL): manage the deliveries that failed "
        "for good (`dead`), or run a demo receiver that checks and prints what fbhook forwards.",
    )
    cmds = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_dead(cmds)
    demo = cmds.add_parser(
        "demo-receiver", help="a stand-in bot webhook: checks signatures, prints each event",
        description="Listen on 127.0.0.1:PORT/webhook as a bot would: check each request's "
        "X-Hub-Signature-256 with the forward secret (403 if wrong), print the event id, kind, "
        "referral flag, attribution and item, and answer 200. Point FORWARD_URL at it.",
    )
    demo.add_argument("--port", type=positive_int, default=9000,
                      help="port to listen on (default: %(default)s)")
    demo.add_argument("--secret", help="the forward secret (default: FORWARD_SECRET)")
    demo.set_defaults(run=run_demo)


def _add_dead(cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dead = cmds.add_parser(
        "dead", help="list, replay or purge deliveries that failed for good",
        description="Deliveries the bot refused (a 4xx other than 408 and 429), or that kept "
        "failing until older than FORWARD_MAX_AGE_SECONDS, are kept in the stream fb:fwd:dead "
        "with the event, the bot's last answer and the error. List them, send them again "
        "(at the end of their user's forward list), or purge them.",
    )
    actions = dead.add_subparsers(dest="dead_action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="show forward dead letters, oldest first",
        description="Show forward dead letters, oldest first: entry id, kind, event id, the "
        "bot's last status, tries, when it failed and the error.",
    )
    listing.add_argument("--count", type=positive_int, default=100, metavar="N",
                         help="show at most N (default: %(default)s)")
    listing.add_argument("--json", action="store_true",
                         help="one JSON object per line, answer and payload included")
    add_redis_option(listing)
    listing.set_defaults(run=run_list)
    for name, what in (
        ("replay", "put back at the end of their user's forward list (a worker with "
                   "FORWARD_URL sends them again) and removed from fb:fwd:dead"),
        ("purge", "deleted for good"),
    ):
        cmd = actions.add_parser(
            name, help=f"{name} forward dead letters (given entry ids, or --all)",
            description=f"Forward dead letters are {what}. Name them by entry id (as `list` "
            "shows), or pass --all.",
        )
        cmd.add_argument("ids", nargs="*", metavar="ENTRY_ID")
        cmd.add_argument("--all", action="store_true", help="every forward dead letter")
        add_redis_option(cmd)
        cmd.set_defaults(run=run_change, change=name)


# --------------------------------------------------------------------------- dead letters


async def list_dead(redis: Redis, count: int = 100) -> list[ForwardDead]:
    rows = await redis.xrange(keys.FORWARD_DEAD, count=count)
    return [_letter(entry_id, fields) for entry_id, fields in rows]


def _letter(entry_id: bytes, fields: dict[bytes, bytes]) -> ForwardDead:
    def get(name: str) -> str:
        return fields.get(name.encode(), b"").decode(errors="backslashreplace")

    payload = get("payload")
    try:
        kind = _decode_record(payload.rpartition("\n")[0]).kind
    except msgspec.DecodeError:
        kind = "?"
    lane = get("lane")
    return ForwardDead(
        entry_id=entry_id.decode(), event_id=get("id"), kind=kind,
        status=int(get("status") or 0), answer=get("answer"), error=get("error"),
        tries=int(get("tries") or 0), failed_at_ms=int(get("failed_at") or 0),
        lane=int(lane) if lane.isdigit() else None, payload=payload,
    )


async def replay(redis: Redis, settings: Settings, entry_ids: list[str] | None) -> int:
    """Send dead letters again (all, or the given entry ids): each at the end of its forward
    list, with a forward job for a list that has none. Returns how many were replayed."""
    letters = await list_dead(redis, count=1_000_000)
    if entry_ids is not None:
        wanted = set(entry_ids)
        letters = [letter for letter in letters if letter.entry_id in wanted]
    script = redis.register_script(REPLAY_LUA)
    replayed = 0
    for letter in letters:
        if letter.lane is None:
            print(f"fbhook: {letter.entry_id} names no lane: not replayed", file=sys.stderr)
            continue
        lane = letter.lane
        replayed += int(await script(args=[
            keys.FORWARD_DEAD, letter.entry_id, keys.forward_lane(lane), keys.forward_job(lane),
            keys.ARQ_JOB_PREFIX, settings.queue_name, f"fwd-replay-{os.urandom(6).hex()}-{lane}",
            lane, int(time.time() * 1000), JOB_TTL_MS, FORWARD_JOB,
            keys.FORWARD_REPLAYED_PREFIX, MAX_FORWARD_AGE_S * 1000,
        ]))
    return replayed


async def purge(redis: Redis, entry_ids: list[str] | None) -> int:
    if entry_ids is None:
        count = int(await redis.xlen(keys.FORWARD_DEAD))
        await redis.delete(keys.FORWARD_DEAD)
        return count
    return int(await redis.xdel(keys.FORWARD_DEAD, *entry_ids)) if entry_ids else 0


def run_list(args: argparse.Namespace) -> int:
    letters = asyncio.run(_list(args))
    if args.json:
        for letter in letters:
            print(json.dumps(asdict(letter), ensure_ascii=False))
        return 0
    if not letters:
        print("no forward dead letters")
        return 0
    for letter in letters:
        failed = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.failed_at_ms / 1000))
        status = f"HTTP {letter.status}" if letter.status else "no answer"
        error = letter.error if len(letter.error) <= 100 else letter.error[:97] + "..."
        print(f"{letter.entry_id}  {letter.kind}  {letter.event_id}  {status}  "
              f"tries={letter.tries}  failed={failed}Z  {error}")
    return 0


async def _list(args: argparse.Namespace) -> list[ForwardDead]:
    async with open_redis(tool_settings(args)) as redis:
        return await list_dead(redis, count=args.count)


def run_change(args: argparse.Namespace) -> int:
    return run_dead_letter_change(args, name="forward dead", stream="fb:fwd:dead",
                                  replayed="queued to be sent again", replay=replay,
                                  purge=_purge)


async def _purge(redis: Redis, settings: Settings, ids: list[str] | None) -> int:
    return await purge(redis, ids)


# --------------------------------------------------------------------------- demo receiver


def demo_app(secret: bytes) -> web.Application:
    """A bot's webhook, as small as one gets: check the signature, print the event, answer 200."""

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        if not hmac.compare_digest(request.headers.get("X-Hub-Signature-256", ""),
                                   sign(secret, body)):
            print("403: bad X-Hub-Signature-256 (is --secret the FORWARD_SECRET?)", flush=True)
            return web.Response(status=403, text="bad signature")
        h = request.headers
        print(f"{h.get('X-Fbhook-Event-Id')}  kind={h.get('X-Fbhook-Kind')}  "
              f"referral={h.get('X-Fbhook-Referral')}  attribution={h.get('X-Fbhook-Attribution')}"
              f"\n  {body.decode(errors='replace')}", flush=True)
        return web.Response(text="EVENT_RECEIVED")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/webhook", webhook)
    return app


def run_demo(args: argparse.Namespace) -> int:
    secret = args.secret.encode() if args.secret else Settings.for_tools().forward_secret
    if not secret:
        raise CommandFailed("demo-receiver: give --secret, or set FORWARD_SECRET")
    ready = (f"fbhook forward demo-receiver: listening on http://127.0.0.1:{args.port}/webhook; "
             f"run the workers with FORWARD_URL=http://127.0.0.1:{args.port}/webhook and the "
             "same FORWARD_SECRET")
    try:
        # run_app calls `print` once the port is bound: the line then means it is ready.
        web.run_app(demo_app(secret), host="127.0.0.1", port=args.port,
                    print=lambda _: print(ready, flush=True))
    except OSError as exc:
        raise CommandFailed(f"demo-receiver: cannot listen on port {args.port}: {exc}") from None
    return 0
