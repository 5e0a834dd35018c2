"""HTTP/1.1 over a raw socket, for requests a client library would refuse to send (bytes that are
not UTF-8 in a header, a duplicated Content-Type, a broken request line) and for reading what
the server answers to them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes


def request(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
            body: bytes = b"") -> bytes:
    """A request with the Host, Content-Length and Connection headers filled in."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body or method == b"POST":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def exchange(port: int, data: bytes, *, head: bool = False, within_s: float = 5.0) -> Answer:
    """Send `data`, read one answer (informational 1xx answers skipped). `head`: the answer has
    no body whatever its Content-Length says."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within_s):
            while True:
                status, headers = _head(await reader.readuntil(b"\r\n\r\n"))
                if status >= 200:
                    break
            length = 0 if head else int(headers.get("content-length", "0"))
            body = await reader.readexactly(length)
        return Answer(status, headers, body)
    finally:
        writer.close()


def _head(raw: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers
