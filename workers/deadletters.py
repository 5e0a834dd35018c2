"""The dead-letter store: events whose handler kept failing, with their payload and error.

Kept in the stream `fb:dead` so they survive, can be listed in order, replayed and purged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis

from shared import keys
from shared.codec import decode_event
from shared.identity import sender_of
from shared.jsontext import loads
from shared.lanes import ENQUEUE_LUA, Queued, enqueue_args
from shared.settings import Settings


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    event_id: str
    kind: str
    error: str
    tries: int
    failed_at_ms: int
    payload: str


async def bury(redis: Redis, kind: str, event_id: str, payload: str | bytes, error: str,
               tries: int, ttl_s: int) -> None:
    """Record one dead event and mark it so: its seen key says 'x', not 'd' (done)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.DEAD_LETTERS, {
            "id": event_id, "kind": kind, "error": error[:2000], "tries": tries,
            "failed_at": int(time.time() * 1000), "payload": payload,
        })
        pipe.set(keys.seen(event_id), "x", ex=ttl_s)
        await pipe.execute()


async def list_dead(redis: Redis, count: int = 100, start: str = "-") -> list[DeadLetter]:
    rows = await redis.xrange(keys.DEAD_LETTERS, min=start, count=count)
    return [_letter(entry_id, fields) for entry_id, fields in rows]


async def replay(redis: Redis, settings: Settings, entry_ids: list[str] | None = None) -> int:
    """Queue dead events again (all, or the given entry ids), each at the end of its user's lane
    (shared/enqueue.lua, with no dedupe check), and remove them from the store; their seen keys
    say 'q' (queued) again. A dead whole job (kind `job`: bytes that were never events) stays."""
    letters = await list_dead(redis, count=1_000_000)
    if entry_ids is not None:
        wanted = set(entry_ids)
        letters = [letter for letter in letters if letter.entry_id in wanted]
    script = redis.register_script(ENQUEUE_LUA)
    replayed = 0
    for letter in letters:
        event = _queued(letter)
        if event is None:
            continue
        args = enqueue_args(settings, f"replay-{os.urandom(6).hex()}-", int(time.time() * 1000),
                            [event], check=False)
        await script(args=args)
        await redis.xdel(keys.DEAD_LETTERS, letter.entry_id)
        replayed += 1
    return replayed


def _queued(letter: DeadLetter) -> Queued | None:
    """A dead letter as an event to queue in its user's lane; None if its payload is no event."""
    try:
        queued = decode_event(letter.payload)
        found = sender_of(queued.object, queued.channel, loads(queued.raw))
    except (msgspec.DecodeError, ValueError):
        return None
    user = None if found is None else found[1]
    return Queued(letter.event_id, queued.object, queued.page_id, user, letter.payload.encode())


async def purge(redis: Redis, entry_ids: list[str] | None = None) -> int:
    if entry_ids is None:
        count = int(await redis.xlen(keys.DEAD_LETTERS))
        await redis.delete(keys.DEAD_LETTERS)
        return count
    return int(await redis.xdel(keys.DEAD_LETTERS, *entry_ids)) if entry_ids else 0


def _letter(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
    def get(name: str) -> str:
        return fields.get(name.encode(), b"").decode()

    return DeadLetter(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        event_id=get("id"), kind=get("kind"), error=get("error"),
        tries=int(get("tries") or 0), failed_at_ms=int(get("failed_at") or 0),
        payload=fields.get(b"payload", b"").decode(errors="backslashreplace"),
    )
