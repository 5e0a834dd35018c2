"""Your bot's handlers, imported by every worker. Add one decorated function per kind.

Every event already lands in its stream `fb:events:<kind>` and referral touches are stored
without any code here; handlers are for what your bot does on top. Put the imports a handler
needs at the top, with these (`from typing import Any`, `from shared.events import Event,
Unknown`), and the function at the end; the README's "Adding a job function" shows the whole
file. For example:

    @on("message_request")
    async def message_request(ctx: dict[str, Any], event: Event) -> None:
        assert isinstance(event, Unknown)  # a kind ingest does not know: raw item kept
        log.info("message request from %s", event.sender)

Each worker logs the handlers it registered when it starts.
"""

from __future__ import annotations

import logging

from workers.registry import on

log = logging.getLogger("fbhook.handlers")

__all__ = ["on"]
