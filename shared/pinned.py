"""Clients that each hold one connection of a pool, so that a command goes out as it is made.

redis-py checks a connection out of its pool with a zero-timeout read (to make sure nothing is
left unread on it), and that read yields to the event loop: every task that is ready runs its
next step before the command is sent. A worker's jobs each decode a few hundred events before
their one Lua call, so the calls of all ready jobs went out together after all their decoding,
and Redis and the worker took turns instead of working at once: each sat idle half the time
(one worker drained 56,000 events/s; with its calls sent at once, 94,000). In the ingest, an
enqueue call waited for every request ready to be parsed (50-event POSTs: 144,000 events/s,
then 154,000 to 161,000). A client that holds its connection sends at once. It still
reconnects and retries as the pool's clients do, and a call cancelled half way closes the
connection (redis-py does), so no reply is left unread.
"""

from __future__ import annotations

from redis.asyncio import Redis


class Pinned:
    """A free list of single-connection clients over one pool: `take` one for a call, `give` it
    back after. Never more clients than calls that were in flight at once."""

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._free: list[Redis] = []
        self._made: list[Redis] = []

    def take(self) -> Redis:
        if self._free:
            return self._free.pop()
        client = Redis(connection_pool=self._pool, single_connection_client=True)
        self._made.append(client)
        return client

    def give(self, client: Redis) -> None:
        self._free.append(client)

    async def aclose(self) -> None:
        """Hand every connection back to the pool (which stays open)."""
        made, self._made, self._free = self._made, [], []
        for client in made:
            await client.aclose()
