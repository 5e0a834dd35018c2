"""Reading a webhook body in bounded time and memory, whoever sends it.

aiohttp's `request.read()` waits as long as the client likes and holds up to `client_max_size`
bytes per request, so a few hundred uploads stalled just before their last byte held hundreds of
megabytes for as long as their senders wished. Here a body must arrive within
BODY_TIMEOUT_SECONDS of its headers, and a body larger than the buffer aiohttp fills for every
connection anyway needs one of MAX_BODIES_BUFFERING slots to be read at all. A compressed body
(`Content-Encoding: gzip` or `deflate`) is inflated here, once it has all arrived, to at most
MAX_BODY_BYTES: aiohttp's own inflating (turned off in ingest/app.py) inflated each chunk as it
came, so a stalled upload of a kilobyte held a megabyte, outside the slots.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from shared.errors import BodyRefused
from shared.settings import Settings

FREE_BYTES = 65_536
"""Bodies announced at up to this size are read without a slot: aiohttp holds this much of any
connection's body before a handler reads it (see READ_BUFSIZE), so such a body costs no more than
a connection does. Facebook's webhooks are a few kilobytes."""

READ_BUFSIZE = FREE_BYTES // 2
"""aiohttp's `read_bufsize` for the ingest: it stops reading a connection once it holds twice
this much of a body nobody reads yet, plus the one read that crossed the mark (up to 256 KiB).
Its default of 256 KiB let each stalled upload waiting for a slot hold about 700 KB; `read()`
raises the limit to MAX_BODY_BYTES for the body it reads, so reading is not slowed."""

SLOT_WAIT_S = 0.5
"""How long a large body waits for a free slot before 503. A slot is freed as soon as the body
that holds it is read, in milliseconds when the sender is honest; waiting longer would only let
stalled uploads hold more connections."""


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""How zlib reads each Content-Encoding the ingest takes (deflate as HTTP means it: zlib)."""


class BodyReader:
    """Reads request bodies under the limits of one ingest process."""

    def __init__(self, settings: Settings) -> None:
        self.timeout_s = settings.body_timeout_s
        self._max_bytes = settings.max_body_bytes
        self._slots = asyncio.Semaphore(settings.max_bodies_buffering)

    def check_size(self, request: web.Request) -> None:
        """Refuse a body announced larger than MAX_BODY_BYTES before reading any of it."""
        declared = request.content_length
        if declared is not None and declared > self._max_bytes:
            raise BodyRefused(413, "too_large", f"body over {self._max_bytes} bytes")

    async def read(self, request: web.Request) -> bytes:
        """The whole body, inflated when it came compressed; raises BodyRefused when it is too
        large, the slots are taken, it did not arrive in time, the client went away before
        sending it all, or it does not inflate."""
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        if encoding in ("", "identity"):
            return await self._received(request)
        wbits = _WBITS.get(encoding)
        if wbits is None:
            raise BodyRefused(415, "content_encoding",
                              "Content-Encoding must be gzip, deflate or identity")
        return self._inflated(await self._received(request), wbits)

    def _inflated(self, body: bytes, wbits: int) -> bytes:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, self._max_bytes + 1)
        except zlib.error:
            raise BodyRefused(400, "bad_encoding", "body does not inflate as its "
                              "Content-Encoding says") from None
        if len(out) > self._max_bytes or inflater.unconsumed_tail:
            raise BodyRefused(413, "too_large", f"body over {self._max_bytes} bytes inflated")
        if not inflater.eof:
            raise BodyRefused(400, "bad_encoding", "compressed body ended before it was complete")
        return out

    async def _received(self, request: web.Request) -> bytes:
        self.check_size(request)
        if request.content.is_eof():  # it all came with the headers: nothing to wait for
            return await self._read(request, None)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        declared = request.content_length
        if declared is not None and declared <= FREE_BYTES:
            return await self._read(request, deadline)
        try:
            async with asyncio.timeout(min(SLOT_WAIT_S, self.timeout_s)):
                await self._slots.acquire()
        except TimeoutError:
            raise BodyRefused(503, "busy", "too many uploads in progress, retry later") from None
        try:
            return await self._read(request, deadline)
        finally:
            self._slots.release()

    async def _read(self, request: web.Request, deadline: float | None) -> bytes:
        try:
            if deadline is None:  # a timer costs 10 us, more than the rest of this module
                return await request.read()
            async with asyncio.timeout_at(deadline):
                return await request.read()
        except TimeoutError:
            raise BodyRefused(
                408, "body_timeout", f"body not received within {self.timeout_s:g} s",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise BodyRefused(413, "too_large", f"body over {self._max_bytes} bytes") from None
        except (ConnectionError, HttpProcessingError):
            raise BodyRefused(400, "incomplete_body", "body ended before it was complete") from None
