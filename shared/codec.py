"""The job codec: how ingest hands events to the workers through arq, without pickle.

Ingest writes arq jobs itself (one Lua call per batch, see ingest/enqueue.lua) in arq's own
layout `{t, f, a, k: {events: [...]}, et}`, encoded as MessagePack. Each element of `events` is a
`QueuedEvent` encoded as JSON: the raw item exactly as Facebook sent it, plus where it came from.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.kinds import JOBS


class QueuedEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One raw item on its way to a worker, and what a worker reads back."""

    id: str
    """The dedupe key: `<kind>:<mid>`, or `h:<hash of the item>` for events without a mid."""
    kind: str
    channel: str
    """`messaging`, `standby`, `changes` (a change that is not a Messenger event), or `entry`
    (an `entry[]` element that is not an object, kept whole)."""
    object: str
    """The envelope's `object` as sent (`page`, `instagram`, ...), empty when absent."""
    page_id: str | None
    received_ms: int
    raw: msgspec.Raw
    """The item's JSON text as received (for a change, the whole `{field, value}` object)."""
    text: str | None = None
    """Only when the item holds a lone surrogate escape: the text as received. `raw` then
    holds it with each lone surrogate replaced by U+FFFD, so that it decodes (shared/jsontext)."""

    def raw_text(self) -> str:
        """The item exactly as Facebook sent it."""
        return self.text if self.text is not None else bytes(self.raw).decode()


JOB_TTL_MS = 7 * 86_400_000
"""arq drops a job whose key has expired: queued jobs are kept a week, not arq's default day."""


encode_event = msgspec.json.Encoder().encode
decode_event = msgspec.json.Decoder(QueuedEvent).decode

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


UNREADABLE_JOB = "fbhook_unreadable_job"
"""The job function a job is handed to when its payload cannot be read (corrupt bytes, pickle,
an unknown function): it dead-letters the payload whole (workers/jobs.py)."""


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq's `job_deserializer`: MessagePack only, never pickle. It never raises: arq would log
    and drop a job it cannot read, so an unreadable one is handed to UNREADABLE_JOB instead."""
    try:
        result = _msgpack_decoder.decode(data)
        kwargs = result["k"]
        events = kwargs["events"]
        if result["f"] not in JOBS or not isinstance(events, list) or \
                not all(isinstance(e, str) for e in events):
            raise ValueError(f"not a job of fbhook: function {result['f']!r}")
        kwargs["events"] = Events(events)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is kept, never dropped
        error = f"unreadable job: {type(exc).__name__}: {str(exc)[:200]}"
        return {"t": 1, "f": UNREADABLE_JOB, "a": [], "k": {"data": data, "error": error},
                "et": 0}
    return result  # type: ignore[no-any-return]


def arq_job(kind: str, events: list[str], enqueue_ms: int) -> bytes:
    """An arq job for the job function `kind`, in the layout ingest/enqueue.lua writes."""
    return job_serializer({"t": 0, "f": kind, "a": [], "k": {"events": events}, "et": enqueue_ms})
