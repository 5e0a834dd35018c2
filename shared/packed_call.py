"""Script calls with many arguments, packed here instead of by redis-py's asyncio `pack_command`.

Each event's normalised JSON and raw item go to effects.lua as two arguments of their own: Lua
copies every string it is given, and one copied out of a MessagePack argument costs Redis again
(an event's 800 bytes inside the packed rows cost Redis 1 to 1.9 us more an event than as
arguments of their own, by EVALSHA's time in INFO commandstats; one worker's drain gained
about 8%, two workers' too, in turns against the packed rows). redis-py's asyncio
`pack_command` spends 0.4 to 0.7 us an argument (a `join` of its growing buffer per argument):
200 more arguments a step would hand that cost to the worker, and the ingest's enqueue call
(shared/enqueue.lua: one argument per event) paid it per event (0.43 us; `bulk`: 0.16). So
those arguments are packed as RESP bulk strings where they are made (`bulk`), and `call` sends
the whole command on the client's own connection with the connection's public
`send_packed_command`/`read_response`, doing what redis-py does around them for a script: load
it on NOSCRIPT, and on a connection error close the connection and send once more (as
shared/redis.py `connect` retries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from msgspec import Raw
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def bulk(*texts: bytes) -> bytes:
    """`texts` as RESP bulk strings, ready to follow a command's other arguments."""
    return b"".join([b"$%d\r\n%b\r\n" % (len(text), text) for text in texts])


def bulk_pair(first: bytes, second: bytes | Raw) -> bytes:
    """`bulk(first, second)` in one formatting (a third of the time: the hot path's); `second`
    may be any buffer (a msgspec.Raw, read in place)."""
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(first), first, len(second), second)


def _command(sha: bytes, args: Sequence[bytes | str | int], packed: list[bytes],
             packed_count: int) -> list[bytes]:
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$1\r\n0\r\n" % (
        3 + len(args) + packed_count, sha)
    return [head, bulk(*(a if isinstance(a, bytes) else str(a).encode() for a in args)),
            *packed]


def command(*args: bytes) -> bytes:
    """A command of plain arguments, packed."""
    return b"*%d\r\n%b" % (len(args), bulk(*args))


async def _reply(conn: AbstractConnection) -> Any:
    """The next reply on `conn`; an error reply is returned, not raised (it was read whole),
    unless the connection raised it as a connection error too (shared/redis.py ReadOnlyError:
    it closed itself)."""
    try:
        return await conn.read_response()
    except ResponseError as exc:
        if isinstance(exc, RedisConnectionError):
            raise
        return exc


async def call(client: Redis, sha: str, script: str, args: Sequence[bytes | str | int],
               packed: list[bytes], packed_count: int, then: bytes = b"") -> Any:
    """EVALSHA `sha` (the script `script`) with no keys, `args` and then the `packed_count`
    bulk strings already packed in `packed`, on `client`, a single-connection client that no
    other call uses meanwhile (shared/pinned.py). Returns the reply; raises as redis-py
    would. With `then` (a command packed by `command`), that command goes out right behind the
    script, in the same write, and the reply is the pair of both replies (the script's error
    is raised once both are read)."""
    if client.connection is None:
        await client.initialize()
    conn = client.connection
    assert isinstance(conn, AbstractConnection)
    request = _command(sha.encode(), args, packed, packed_count)
    if then:
        request.append(then)
    loaded = retried = False
    while True:
        try:
            await conn.send_packed_command(request, check_health=False)
            reply = await _reply(conn)
            after = await _reply(conn) if then else None
            if isinstance(reply, ResponseError):
                raise reply
            if isinstance(after, ResponseError):
                raise after
            return (reply, after) if then else reply
        except NoScriptError:
            if loaded:
                raise
            await client.script_load(script)
            loaded = True
        except RedisConnectionError:
            await conn.disconnect(nowait=True)
            if retried:
                raise
            retried = True
        except ResponseError:
            raise  # an error reply, read whole: the connection is ready for the next call
        except BaseException:
            # A timeout or a cancellation: the reply may still come, and must not be read as
            # the next command's.
            await conn.disconnect(nowait=True)
            raise
