"""Lanes: how each user's events are kept in order through any number of workers.

Every event goes to one of `LANES` lanes, a Redis list (`fb:lane:<n>`): all the events of one
user (one `object`, page and sender) to the same lane, in the order ingest accepted them. One
arq job at a time owns a lane and drains it head first (workers/lanes.py), so a user's events
reach their handlers and outputs in order, while other lanes, and so other users, run in
parallel on every worker. Events without a sender are spread over the lanes by their id.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final, NamedTuple, Protocol

import msgspec

from shared import keys
from shared.codec import JOB_TTL_MS
from shared.settings import Settings


def lane_of(envelope_object: str, page: str | None, user: str | None, event_id: str,
            lanes: int) -> int:
    """The lane of an event: by its user when it has one, else by its id."""
    key = event_id if user is None else f"{envelope_object}\0{page or ''}\0{user}"
    return zlib.crc32(key.encode()) % lanes


QUEUE_JOB_LUA: Final = resources.files("shared").joinpath("queue_job.lua").read_text()


def with_queue_job(script: str) -> str:
    """A Lua script that queues lane jobs, with `queue_job` (shared/queue_job.lua) before it."""
    return QUEUE_JOB_LUA + script


ENQUEUE_LUA: Final = with_queue_job(
    resources.files("shared").joinpath("enqueue.lua").read_text())
"""Appends events to their lanes with the dedupe check, and queues a job for an idle lane."""

_pack = msgspec.msgpack.Encoder().encode


class Queueable(Protocol):
    """What the enqueue script needs of one event (ingest's `Routed` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def object(self) -> str: ...
    @property
    def page(self) -> str | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def blob(self) -> bytes: ...


class Queued(NamedTuple):
    """One event to queue again (a dead letter replayed)."""

    id: str
    object: str
    page: str | None
    user: str | None
    blob: bytes


def enqueue_parts(settings: Settings, job_prefix: str, now_ms: int,
                  events: Sequence[Queueable], check: bool = True
                  ) -> tuple[list[Any], list[bytes]]:
    """The enqueue script's arguments (shared/enqueue.lua), in two parts: the first ten, and
    the events' bytes in the order it reads them. The events are grouped by lane, each lane's
    in the order given. `job_prefix` makes the ids of the jobs it may create unique."""
    lanes: dict[int, tuple[list[str], list[bytes]]] = {}
    for event in events:
        n = lane_of(event.object, event.page, event.user, event.id, settings.lanes)
        lane = lanes.get(n)
        if lane is None:  # not setdefault: that would build two lists per event
            lane = lanes[n] = ([], [])
        lane[0].append(keys.SEEN_PREFIX + event.id)
        lane[1].append(event.blob)
    return [
        settings.dedupe_ttl_s, keys.LANE_PREFIX, keys.LANE_JOB_PREFIX,
        keys.ARQ_JOB_PREFIX, settings.queue_name, job_prefix, now_ms, JOB_TTL_MS,
        "1" if check else "0", _pack([[n, ids] for n, (ids, _) in lanes.items()]),
    ], [blob for _, blobs in lanes.values() for blob in blobs]


def enqueue_args(settings: Settings, job_prefix: str, now_ms: int,
                 events: Sequence[Queueable], check: bool = True) -> list[Any]:
    """`enqueue_parts` as one list, for a script call through redis-py."""
    head, blobs = enqueue_parts(settings, job_prefix, now_ms, events, check)
    return [*head, *blobs]
