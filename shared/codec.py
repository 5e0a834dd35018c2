"""The job codec: how ingest hands events to the workers through arq, without pickle.

Ingest writes arq jobs itself (one Lua call per batch, see ingest/enqueue.lua) in arq's own
layout `{t, f, a, k: {events: [...]}, et}`, encoded as MessagePack. Each element of `events` is a
`QueuedEvent` encoded as JSON: the raw item exactly as Facebook sent it, plus where it came from.
"""

from __future__ import annotations

from typing import Any

import msgspec


class QueuedEvent(msgspec.Struct, frozen=True):
    """One raw item on its way to a worker."""

    id: str
    """The dedupe key: `<kind>:<mid>`, or `h:<hash of the item>` for events without a mid."""
    channel: str
    """`messaging` or `standby`."""
    page_id: str | None
    received_ms: int
    raw: msgspec.Raw
    """The item's JSON bytes as received."""


class DecodedEvent(msgspec.Struct, frozen=True):
    """A QueuedEvent read back by a worker, its item decoded to plain Python values."""

    id: str
    channel: str
    page_id: str | None
    received_ms: int
    raw: Any


JOB_TTL_MS = 7 * 86_400_000
"""arq drops a job whose key has expired: queued jobs are kept a week, not arq's default day."""


encode_event = msgspec.json.Encoder().encode
decode_event = msgspec.json.Decoder(DecodedEvent).decode

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder()


def job_serializer(obj: dict[str, Any]) -> bytes:
    """arq's `job_serializer`: MessagePack, never pickle."""
    return _msgpack_encoder.encode(obj)


class Events(list[str]):
    """A job's events. arq logs every job's arguments with repr() before it starts; the full
    repr of hundreds of events cost a worker 5% of its time, this one costs nothing."""

    def __repr__(self) -> str:
        return f"<{len(self)} events>"


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq's `job_deserializer`: MessagePack only; anything else fails to decode."""
    result: dict[str, Any] = _msgpack_decoder.decode(data)
    kwargs = result.get("k")
    if isinstance(kwargs, dict) and isinstance(kwargs.get("events"), list):
        kwargs["events"] = Events(kwargs["events"])
    return result


def arq_job(kind: str, events: list[str], enqueue_ms: int) -> bytes:
    """An arq job for the job function `kind`, in the layout ingest/enqueue.lua writes."""
    return job_serializer({"t": 0, "f": kind, "a": [], "k": {"events": events}, "et": enqueue_ms})
