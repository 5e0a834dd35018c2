"""The job codec: how ingest hands events to the workers, without pickle.

Ingest appends each event to its user's lane (a Redis list, see shared/lanes.py) as a
`QueuedEvent` encoded as JSON: the raw item exactly as Facebook sent it, plus where it came from.
A lane is drained by an arq job in arq's own layout `{t, f: "lane", a, k: {lane: n}, et}`,
encoded as MessagePack, which ingest writes itself (shared/enqueue.lua).
"""

from __future__ import annotations

from typing import Any

import msgspec


class QueuedEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One raw item on its way to a worker, and what a worker reads back."""

    id: str
    """The dedupe key: `<kind>:<mid>`, or `h:<hash of the item>` for events without a mid (or
    with a mid that is no string or was not read as sent: ingest/envelope.py dedupe_id)."""
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

    def raw_bytes(self) -> bytes:
        """The item exactly as Facebook sent it, as bytes."""
        return bytes(self.raw) if self.text is None else self.text.encode()


JOB_TTL_MS = 7 * 86_400_000
"""arq drops a job whose key has expired: queued jobs are kept a week, not arq's default day."""


encode_event = msgspec.json.Encoder().encode
decode_event = msgspec.json.Decoder(QueuedEvent).decode

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder()


def job_serializer(obj: dict[str, Any]) -> bytes:
    """arq's `job_serializer`: MessagePack, never pickle."""
    return _msgpack_encoder.encode(obj)


LANE_JOB = "lane"
"""The arq job function that drains a lane (workers/lanes.py): its only argument is the lane."""

FORWARD_JOB = "forward"
"""The arq job function that delivers a lane's forward list (workers/forward.py)."""

UNREADABLE_JOB = "fbhook_unreadable_job"
"""The job function a job is handed to when its payload cannot be read (corrupt bytes, pickle,
an unknown function): it dead-letters the payload whole (workers/jobs.py)."""


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq's `job_deserializer`: MessagePack only, never pickle. It never raises: arq would log
    and drop a job it cannot read, so an unreadable one is handed to UNREADABLE_JOB instead."""
    try:
        result = _msgpack_decoder.decode(data)
        lane = result["k"]["lane"]
        if result["f"] not in (LANE_JOB, FORWARD_JOB) or not isinstance(lane, int) or \
                isinstance(lane, bool):
            raise ValueError(f"not a job of fbhook: function {result['f']!r}")
    except Exception as exc:  # noqa: BLE001 - anything unreadable is kept, never dropped
        error = f"unreadable job: {type(exc).__name__}: {str(exc)[:200]}"
        return {"t": 1, "f": UNREADABLE_JOB, "a": [], "k": {"data": data, "error": error},
                "et": 0}
    return result  # type: ignore[no-any-return]


def lane_job(lane: int, enqueue_ms: int) -> bytes:
    """The arq job that drains lane `lane`, in the layout shared/enqueue.lua writes."""
    return job_serializer({"t": 1, "f": LANE_JOB, "a": [], "k": {"lane": lane}, "et": enqueue_ms})
