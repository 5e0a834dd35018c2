"""Referral touches from normalised events: the four places Facebook puts a referral."""

from __future__ import annotations

from typing import Final

from msgspec.structs import astuple

from shared import events as ev
from shared.attribution import Touch, tie_break

TRUSTED_AHEAD_MS: Final = 86_400_000
"""An event timestamp more than this far ahead of the time ingest received it is not trusted."""


def touch_of(event: ev.Event, received_ms: int) -> Touch | None:
    """The touch an event carries, or None. Partial referrals (only `source`) still count.

    A timestamp that is missing or 0 (normalisation already put the received time in its place)
    or more than a day ahead of the received time is not the user's: the received time stands
    in, and the touch says so, so that no odd timestamp decides a user's first or last touch.
    """
    if event.user is None or getattr(event, "referral", None) is None:
        return None  # most events: no referral, nothing to match
    match event:
        case ev.ReferralEvent(referral=ref):
            via = "referral"
        case ev.Postback(referral=ev.Referral() as ref):
            via = "postback"
        case ev.Message(kind="message", referral=ev.Referral() as ref):
            via = "message"
        case _:
            return None
    timestamp, source = event.timestamp, event.timestamp_from
    if timestamp > received_ms + TRUSTED_AHEAD_MS:
        timestamp, source = received_ms, "received"
    # By position (checked below): a Struct's keyword arguments cost per argument.
    return Touch(timestamp, via, *astuple(ref), event.page_id,  # type: ignore[call-arg]
                 tie_break(event.id), source, event.object)


if Touch.__struct_fields__ != ("timestamp", "via", *ev.Referral.__struct_fields__, "page_id",
                               "tie", "timestamp_from", "object"):
    raise ImportError("shared/attribution.py Touch no longer lists its fields in the order "
                      "touch_of passes them")
