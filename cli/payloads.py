"""Realistic Messenger webhook payloads: one builder per way a user arrives, plus the envelope.

The shapes follow Meta's reference pages (../shared/seeds): m.me link and ad referrals, the Get
Started postback with its referral, the chat plugin (sender `user_ref`), a Facebook Shops product
message (`message.referral.product.id`) and a plain text message. `fbhook simulate` sends them;
tests and benchmarks can build bodies with them too. `scenario_events` also says which referral
touch each event must leave in `fb:attr:<user>`, so a caller can check the pipeline's result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ingest.signature import sign
from shared.identity import PSID, USER_REF, user_key

PAGE_ID = "1122334455"
"""The Page every simulated event is addressed to, unless told otherwise."""

PSID_BASE = 7_100_000_000_000_000
"""Simulated users get page-scoped ids `PSID_BASE + n`: 16 digits, like real PSIDs."""

SCENARIOS: tuple[str, ...] = ("shortlink", "ad", "get-started", "chat-plugin", "shop", "text")
"""The ways a simulated user arrives, in the order `fbhook simulate` hands them out."""

_REFS = ("summer_sale", "newsletter-2024", "qr_store_42", "bio_link", "partner=acme")
_ADS = (
    ("6045246247433", "Chunky peanut butter, 20% off", "spring_promo"),
    ("6045246247434", "Free delivery this week", "free_delivery"),
    ("6045246247435", "New: almond butter", "almond_launch"),
)
_PRODUCTS = ("8512345678901234", "8512345678905678", "8512345678909012")
_SITES = ("https://shop.example.com/help", "https://www.example.com/pricing")
_TEXTS = ("hello!", "Is this still available?", "What are your opening hours?", "thanks 🙂")


def item(
    sender: dict[str, str], event: dict[str, Any], *, page_id: str = PAGE_ID, timestamp: int
) -> dict[str, Any]:
    """One `messaging[]` item: sender, recipient (the Page), timestamp (ms) and the event."""
    return {"sender": sender, "recipient": {"id": page_id}, "timestamp": timestamp, **event}


def shortlink_referral(
    psid: str, *, ref: str, timestamp: int, page_id: str = PAGE_ID
) -> dict[str, Any]:
    """An m.me link (`m.me/<page>?ref=<ref>`) opened by a user who already has a thread."""
    referral = {"ref": ref, "source": "SHORTLINK", "type": "OPEN_THREAD"}
    return item({"id": psid}, {"referral": referral}, page_id=page_id, timestamp=timestamp)


def ad_referral(
    psid: str,
    *,
    ad_id: str,
    ad_title: str,
    timestamp: int,
    ref: str | None = None,
    photo_url: str | None = None,
    video_url: str | None = None,
    post_id: str | None = None,
    product_id: str | None = None,
    page_id: str = PAGE_ID,
) -> dict[str, Any]:
    """A click-to-Messenger ad, with the ad's `ads_context_data`."""
    context: dict[str, Any] = {"ad_title": ad_title}
    for key, value in (
        ("photo_url", photo_url), ("video_url", video_url), ("post_id", post_id),
        ("product_id", product_id),
    ):
        if value is not None:
            context[key] = value
    referral: dict[str, Any] = {
        "ad_id": ad_id, "source": "ADS", "type": "OPEN_THREAD", "ads_context_data": context,
    }
    if ref is not None:
        referral["ref"] = ref
    return item({"id": psid}, {"referral": referral}, page_id=page_id, timestamp=timestamp)


def get_started(
    psid: str,
    *,
    mid: str,
    timestamp: int,
    ref: str | None = None,
    source: str = "SHORTLINK",
    payload: str = "GET_STARTED",
    page_id: str = PAGE_ID,
) -> dict[str, Any]:
    """The Get Started button of a new thread; the referral says how the user got there."""
    referral: dict[str, Any] = {"source": source, "type": "OPEN_THREAD"}
    if ref is not None:
        referral["ref"] = ref
    postback = {"mid": mid, "title": "Get Started", "payload": payload, "referral": referral}
    return item({"id": psid}, {"postback": postback}, page_id=page_id, timestamp=timestamp)


def chat_plugin_referral(
    user_ref: str, *, referer_uri: str, timestamp: int, ref: str | None = None,
    page_id: str = PAGE_ID,
) -> dict[str, Any]:
    """The website chat plugin: the sender is a `user_ref` (a guest), not a PSID."""
    referral: dict[str, Any] = {
        "source": "CUSTOMER_CHAT_PLUGIN", "type": "OPEN_THREAD", "referer_uri": referer_uri,
    }
    if ref is not None:
        referral["ref"] = ref
    return item(
        {"user_ref": user_ref}, {"referral": referral}, page_id=page_id, timestamp=timestamp
    )


def shops_message(
    psid: str, *, product_id: str, mid: str, text: str, timestamp: int, page_id: str = PAGE_ID
) -> dict[str, Any]:
    """A message sent from a Facebook Shops product detail page."""
    message = {"mid": mid, "text": text, "referral": {"product": {"id": product_id}}}
    return item({"id": psid}, {"message": message}, page_id=page_id, timestamp=timestamp)


def text_message(
    psid: str, *, mid: str, text: str, timestamp: int, page_id: str = PAGE_ID
) -> dict[str, Any]:
    """A plain text message: no referral, so no attribution touch."""
    message = {"mid": mid, "text": text}
    return item({"id": psid}, {"message": message}, page_id=page_id, timestamp=timestamp)


def envelope(
    items: Sequence[dict[str, Any]], *, page_id: str = PAGE_ID, time_ms: int | None = None
) -> dict[str, Any]:
    """A webhook body: one Page entry holding the items."""
    entry_time = time_ms if time_ms is not None else max(i["timestamp"] for i in items)
    return {"object": "page", "entry": [{"id": page_id, "time": entry_time,
                                         "messaging": list(items)}]}


def signed(body: dict[str, Any], secret: bytes) -> tuple[bytes, dict[str, str]]:
    """The body's bytes and the headers Facebook would send with them."""
    data = json.dumps(body, ensure_ascii=False).encode()
    return data, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(secret, data)}


@dataclass(frozen=True, slots=True)
class ExpectedTouch:
    """The referral touch an event must leave in the user's attribution record."""

    via: str
    source: str | None = None
    ref: str | None = None
    ad_id: str | None = None
    product_id: str | None = None
    referer_uri: str | None = None


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One simulated event: who sends it, the item, and the touch it must leave (if any)."""

    scenario: str
    user: str
    """The sender's id: the PSID, or the chat plugin's `user_ref`."""
    item: dict[str, Any]
    touch: ExpectedTouch | None
    space: str = PSID
    """The identity space of `user` (shared/identity.py): `psid`, or `user_ref`."""

    @property
    def key(self) -> str:
        """The user's attribution key (`fb:attr:<key>`, the `user` of the read API's answer)."""
        return user_key(self.space, self.user)


def scenario_event(
    scenario: str, n: int, *, timestamp: int, run: str, page_id: str = PAGE_ID
) -> SimEvent:
    """The event of simulated user number `n` arriving through `scenario`.

    Users are numbered: the same `n` is the same user in every run, so a second run makes them
    returning users. `run` goes into message ids, so a second run is not taken for a duplicate.
    """
    psid = str(PSID_BASE + n)
    mid = f"m_sim-{run}-{n}"
    if scenario == "shortlink":
        ref = _REFS[n % len(_REFS)]
        return SimEvent(scenario, psid, shortlink_referral(
            psid, ref=ref, timestamp=timestamp, page_id=page_id,
        ), ExpectedTouch("referral", "SHORTLINK", ref=ref))
    if scenario == "ad":
        ad_id, title, ref = _ADS[n % len(_ADS)]
        return SimEvent(scenario, psid, ad_referral(
            psid, ad_id=ad_id, ad_title=title, ref=ref, timestamp=timestamp, page_id=page_id,
            photo_url=f"https://scontent.example.com/ads/{ad_id}.jpg",
            post_id=f"{page_id}_{ad_id[-6:]}",
        ), ExpectedTouch("referral", "ADS", ref=ref, ad_id=ad_id))
    if scenario == "get-started":
        ref = _REFS[n % len(_REFS)]
        return SimEvent(scenario, psid, get_started(
            psid, mid=mid, ref=ref, timestamp=timestamp, page_id=page_id,
        ), ExpectedTouch("postback", "SHORTLINK", ref=ref))
    if scenario == "chat-plugin":
        user_ref = f"cp-guest-{PSID_BASE + n:x}"
        site = _SITES[n % len(_SITES)]
        return SimEvent(scenario, user_ref, chat_plugin_referral(
            user_ref, referer_uri=site, ref="website_chat", timestamp=timestamp, page_id=page_id,
        ), ExpectedTouch("referral", "CUSTOMER_CHAT_PLUGIN", ref="website_chat",
                         referer_uri=site), USER_REF)
    if scenario == "shop":
        product = _PRODUCTS[n % len(_PRODUCTS)]
        return SimEvent(scenario, psid, shops_message(
            psid, product_id=product, mid=mid, text="Is this still available?",
            timestamp=timestamp, page_id=page_id,
        ), ExpectedTouch("message", product_id=product))
    if scenario == "text":
        text = _TEXTS[n % len(_TEXTS)]
        return SimEvent(scenario, psid, text_message(
            psid, mid=mid, text=text, timestamp=timestamp, page_id=page_id,
        ), None)
    raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


def scenario_events(
    users: int,
    *,
    scenarios: Sequence[str] = SCENARIOS,
    first_user: int = 0,
    start_ms: int,
    run: str,
    page_id: str = PAGE_ID,
) -> Iterator[SimEvent]:
    """One event per user, the scenarios handed out in turn; timestamps rise by 1 ms per event.

    A generator, so that a million users cost no more memory than one.
    """
    for i in range(users):
        n = first_user + i
        yield scenario_event(
            scenarios[i % len(scenarios)], n, timestamp=start_ms + i, run=run, page_id=page_id
        )
