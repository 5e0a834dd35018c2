"""Referral touches from normalised events: the four places Facebook puts a referral."""

from __future__ import annotations

from shared import events as ev
from shared.attribution import Touch


def touch_of(event: ev.Event) -> Touch | None:
    """The touch an event carries, or None. Partial referrals (only `source`) still count."""
    if event.sender is None:
        return None
    match event:
        case ev.ReferralEvent(referral=ref):
            via = "referral"
        case ev.Postback(referral=ev.Referral() as ref):
            via = "postback"
        case ev.Message(kind="message", referral=ev.Referral() as ref):
            via = "message"
        case _:
            return None
    return Touch(
        timestamp=event.timestamp,
        via=via,
        source=ref.source,
        type=ref.type,
        ref=ref.ref,
        ad_id=ref.ad_id,
        ads_context_data=ref.ads_context_data,
        referer_uri=ref.referer_uri,
        product_id=ref.product_id,
        page_id=event.page_id,
    )
