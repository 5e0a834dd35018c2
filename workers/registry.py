"""Per-kind handlers: what your bot does with an event, one decorated function per kind.

    from workers import on

    @on("message_request")            # a kind the project does not know: no edit in ingest/
    async def accept(ctx, event):     # event: shared.events.Event (Unknown, with `raw`, here)
        ...

Handlers run at least once per event (a crash between the handler and the built-in outputs
runs it again); a handler that raises is retried with backoff, then dead-lettered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from shared.events import Event

Handler = Callable[[dict[str, Any], Event], Awaitable[None]]
H = TypeVar("H", bound=Handler)

_handlers: dict[str, list[Handler]] = {}


def on(kind: str) -> Callable[[H], H]:
    """Register `fn` for events of `kind` (a built-in kind or the key of a new one)."""
    kind = kind.replace("-", "_")

    def register(fn: H) -> H:
        _handlers.setdefault(kind, []).append(fn)
        return fn

    return register


def handlers_for(kind: str) -> list[Handler]:
    return _handlers.get(kind, [])


def has_handlers(kind: str) -> bool:
    return kind in _handlers


def registered() -> dict[str, list[Handler]]:
    """Every kind with handlers, and its handlers in the order they run."""
    return {kind: list(fns) for kind, fns in _handlers.items()}


def remove(kind: str, fn: Handler) -> None:
    """Unregister a handler (tests use it to leave the registry as they found it)."""
    handlers = _handlers.get(kind, [])
    if fn in handlers:
        handlers.remove(fn)
    if not handlers:
        _handlers.pop(kind, None)
