"""Normalised events: one frozen Struct per kind, as written to the `fb:events:<kind>` streams."""

from __future__ import annotations

from typing import Any

import msgspec


class Referral(msgspec.Struct, frozen=True, omit_defaults=True):
    """A referral object from any of the four places Facebook puts one."""

    source: str | None = None
    type: str | None = None
    ref: str | None = None
    ad_id: str | None = None
    ads_context_data: dict[str, Any] | None = None
    referer_uri: str | None = None
    product_id: str | None = None


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Fields every event has. `sender` is the id as sent (`sender.id`, else the chat plugin's
    `sender.user_ref`); `user` is the key of the sender's attribution record, which tells the
    three identity spaces apart (shared/identity.py): the PSID as it is, `ig:<IGSID>` on an
    Instagram body, `ref:<user_ref>` for a chat plugin guest."""

    kind: str
    id: str
    channel: str
    object: str = ""
    page_id: str | None
    sender: str | None
    user: str | None = None
    recipient: str | None
    timestamp: int
    timestamp_from: str = "event"
    """`event`, or `received` when the event came without a usable timestamp (missing, 0, not a
    number): `timestamp` is then the time ingest received it."""


class Message(Event, frozen=True, kw_only=True):
    mid: str | None = None
    text: str | None = None
    quick_reply_payload: str | None = None
    reply_to_mid: str | None = None
    attachments: list[Any] = []
    referral: Referral | None = None
    app_id: str | None = None
    metadata: str | None = None
    is_unsupported: bool = False
    """Instagram: a message the API cannot show (`raw` on the stream entry has what was sent)."""


class MessageUnsend(Event, frozen=True, kw_only=True):
    """`message.is_deleted`: the user unsent the message `mid` (honour it: delete your copy)."""

    mid: str | None = None


class Postback(Event, frozen=True, kw_only=True):
    mid: str | None = None
    title: str | None = None
    payload: str | None = None
    referral: Referral | None = None


class ReferralEvent(Event, frozen=True, kw_only=True):
    referral: Referral


class Delivery(Event, frozen=True, kw_only=True):
    mids: list[str] = []
    watermark: int | None = None


class Read(Event, frozen=True, kw_only=True):
    watermark: int | None = None


class Reaction(Event, frozen=True, kw_only=True):
    mid: str | None = None
    reaction: str | None = None
    emoji: str | None = None
    action: str | None = None


class MessageEdit(Event, frozen=True, kw_only=True):
    mid: str | None = None
    text: str | None = None
    num_edit: int | None = None


class Optin(Event, frozen=True, kw_only=True):
    ref: str | None = None
    user_ref: str | None = None
    type: str | None = None
    payload: str | None = None
    title: str | None = None
    notification_messages_token: str | None = None
    notification_messages_status: str | None = None
    """`STOP_NOTIFICATIONS` or `RESUME_NOTIFICATIONS`: a STOP is an opt-out, not an opt-in."""
    token_expiry_timestamp: int | None = None
    user_token_status: str | None = None


class AccountLinking(Event, frozen=True, kw_only=True):
    status: str | None = None
    authorization_code: str | None = None


class PolicyEnforcement(Event, frozen=True, kw_only=True):
    action: str | None = None
    reason: str | None = None


class GamePlay(Event, frozen=True, kw_only=True):
    game_id: str | None = None
    player_id: str | None = None
    context_type: str | None = None
    context_id: str | None = None
    score: float | None = None
    payload: str | None = None


class ThreadControl(Event, frozen=True, kw_only=True):
    """pass_thread_control, take_thread_control and request_thread_control."""

    new_owner_app_id: str | None = None
    previous_owner_app_id: str | None = None
    requested_owner_app_id: str | None = None
    metadata: str | None = None


class AppRoles(Event, frozen=True, kw_only=True):
    roles: dict[str, list[str]] = {}


class ResponseFeedback(Event, frozen=True, kw_only=True):
    mid: str | None = None
    feedback: str | None = None


class Change(Event, frozen=True, kw_only=True):
    """A `changes[]` item that is not a Messenger event (`feed`, `inbox_labels`, Instagram
    `comments`, ...): its kind is its `field`; `value` is the change's value as sent."""

    field: str | None = None
    value: Any = None


class Unknown(Event, frozen=True, kw_only=True):
    """An item whose kind is not recognised, kept whole: `key` is the key that carried it."""

    key: str | None = None
    raw: Any = None


AnyEvent = (
    Message | Postback | ReferralEvent | Delivery | Read | Reaction | MessageEdit | Optin
    | AccountLinking | PolicyEnforcement | GamePlay | ThreadControl | AppRoles | ResponseFeedback
    | MessageUnsend | Change | Unknown
)
