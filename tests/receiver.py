"""A bot's own webhook for the forwarding tests: a real aiohttp server on a free port.

It checks each request's `X-Hub-Signature-256` with its secret as a bot's existing handler
does, records what it got, and answers as the test tells it: in turn from `replies`, or by
`policy` (event id, how many times that id came) when a test needs it per event.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.redis_server import free_port

FORWARD_SECRET = b"bot-forward-secret"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """Wait this long before answering (a slow bot: longer than FORWARD_TIMEOUT_SECONDS is a
    timeout)."""


@dataclass
class Got:
    """One request the bot received (with a good signature)."""

    event_id: str
    body: bytes
    headers: dict[str, str]
    at: float
    """time.monotonic() when it arrived"""
    status: int | None = None
    """What the bot answered; None while it waits, 0 when the sender had gone by then."""

    def item(self) -> dict[str, Any]:
        """The one item of the envelope (messaging, standby or changes)."""
        [entry] = json.loads(self.body)["entry"]
        [item] = next(entry[k] for k in ("messaging", "standby", "changes") if k in entry)
        return item  # type: ignore[no-any-return]

    def sender(self) -> str:
        return str(self.item()["sender"]["id"])

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Receiver:
    secret: bytes = FORWARD_SECRET
    port: int = field(default_factory=free_port)
    replies: list[Reply] = field(default_factory=list)
    """Used in turn; the last one stays. Empty: 200 at once."""
    policy: Callable[[str, int], Reply] | None = None
    """Instead of `replies`: the reply to an event id that came `n` times before."""
    got: list[Got] = field(default_factory=list)
    bad_signatures: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """Requests wait for it while `hold_after` requests or more have come."""
    hold_after: int | None = None
    in_flight: int = 0
    most_in_flight: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook"

    def _reply(self, event_id: str) -> Reply:
        if self.policy is not None:
            return self.policy(event_id, sum(1 for g in self.got if g.event_id == event_id))
        if len(self.replies) > 1:
            return self.replies.pop(0)
        return self.replies[0] if self.replies else Reply()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Hub-Signature-256", ""), expected):
            self.bad_signatures += 1
            return web.Response(status=403, text="bad signature")
        got = Got(request.headers.get("X-Fbhook-Event-Id", ""), body, dict(request.headers),
                  time.monotonic())
        reply = self._reply(got.event_id)  # before recording: `policy` sees earlier tries
        self.got.append(got)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold_after is not None and len(self.got) > self.hold_after:
                await self.gate.wait()
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
        finally:
            self.in_flight -= 1
        gone = request.transport is None or request.transport.is_closing()
        got.status = 0 if gone else reply.status
        return web.Response(status=reply.status, headers=reply.headers, text="EVENT_RECEIVED")

    def delivered(self) -> list[Got]:
        return [g for g in self.got if g.delivered]

    def delivered_ids(self) -> list[str]:
        return [g.event_id for g in self.delivered()]

    def held(self) -> int:
        return sum(1 for g in self.got if g.status is None)

    def counts(self) -> Counter[str]:
        """How many times each event id came, whatever the answer (what a bot would see)."""
        return Counter(g.event_id for g in self.got)

    def first_by_sender(self) -> dict[str, list[str]]:
        """Each sender's event ids in the order they first came (repeats dropped, as a bot
        dropping X-Fbhook-Event-Id repeats would)."""
        seen: set[str] = set()
        out: dict[str, list[str]] = {}
        for g in self.got:
            if g.event_id not in seen:
                seen.add(g.event_id)
                out.setdefault(g.sender(), []).append(g.event_id)
        return out


@asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    """The receiver listening on 127.0.0.1:`receiver.port` until the block ends."""
    app = web.Application()
    app.router.add_post("/webhook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    try:
        yield receiver
    finally:
        receiver.gate.set()
        await runner.cleanup()
