"""`python -m bench.handler_worker`: `python -m workers` with a handler on every message and
referral that stands in for a bot's own work per event (build a reply, hash it: about 25 us of
CPU on the benchmark machine). With it, the workers rather than Redis are what a backlog drain
waits for, which is when a second worker process pays off (see the drain rows of the table).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from shared.events import Event
from workers import on
from workers.__main__ import main

ROUNDS = 50


@on("message")
@on("referral")
async def reply(ctx: dict[str, Any], event: Event) -> None:
    body = json.dumps({"recipient": {"id": event.sender}, "messaging_type": "RESPONSE",
                       "message": {"text": f"Thanks for your message {event.id}!"}}).encode()
    for _ in range(ROUNDS):
        body = hashlib.sha256(body).hexdigest().encode()


if __name__ == "__main__":
    sys.exit(main())
