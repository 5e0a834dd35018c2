"""A kind the project does not know is handled by one decorated function, with no ingest edit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.events import Event, Postback, Unknown
from tests import payloads as p
from tests.conftest import Post, stream_rows
from workers import on, registry

seen: list[Event] = []


async def _message_request(ctx: dict[str, Any], event: Event) -> None:
    seen.append(event)


async def _postback(ctx: dict[str, Any], event: Event) -> None:
    seen.append(event)


@pytest.fixture
def handlers() -> Iterator[None]:
    seen.clear()
    on("message_request")(_message_request)
    on("postback")(_postback)
    yield
    registry.remove("message_request", _message_request)
    registry.remove("postback", _postback)


async def test_new_kind_reaches_its_handler_and_its_own_stream(
    handlers: None, post: Post, drain: Any, redis: Redis
) -> None:
    body = p.body(p.item({"message_request": "accept"}), p.item({"foo": {"bar": 1}}))
    assert (await post(body)).status == 200
    await drain()
    assert [type(e) for e in seen] == [Unknown]
    (event,) = seen
    assert event.kind == "message_request"
    assert isinstance(event, Unknown) and event.raw["message_request"] == "accept"
    assert [r["kind"] for r in await stream_rows(redis, "message_request")] == ["message_request"]
    # A key nobody registered stays `unknown`, kept whole.
    assert [r["kind"] for r in await stream_rows(redis, "unknown")] == ["unknown"]


async def test_without_the_handler_the_new_kind_is_unknown(
    post: Post, drain: Any, redis: Redis
) -> None:
    assert (await post(p.body(p.item({"message_request": "accept"})))).status == 200
    await drain()
    assert await stream_rows(redis, "message_request") == []
    assert len(await stream_rows(redis, "unknown")) == 1


async def test_a_builtin_kind_handler_gets_the_typed_event(
    handlers: None, post: Post, drain: Any, redis: Redis
) -> None:
    assert (await post(p.body(p.postback_with_referral()))).status == 200
    await drain()
    (event,) = seen
    assert isinstance(event, Postback)
    assert event.payload == "USER-DEFINED-PAYLOAD"
    assert event.referral is not None and event.referral.ref == "get-started"
