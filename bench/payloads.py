"""Pre-signed webhook requests, written to pool files the load generators replay.

Every request carries events with ids never used before in the run (message mids are unique,
referral items differ by timestamp), so the dedupe check never skips one. A pool file holds raw
HTTP/1.1 requests separated by NUL bytes, which neither JSON bodies nor headers can contain.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ingest.signature import sign

PAGE_ID = "106728097004746"
SEP = b"\0"
TEXT = "Hello! I saw your ad, is the spring offer still on for two people?"


@dataclass(frozen=True, slots=True)
class Pool:
    """A file of pre-signed requests and what they carry."""

    path: Path
    requests: int
    events: int
    kinds: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    @property
    def events_per_request(self) -> float:
        return self.events / self.requests if self.requests else 0.0


class Factory:
    """Builds bodies whose every event id is new to the run."""

    def __init__(self, secret: bytes, users: int = 100_000, run: str | None = None,
                 base_ms: int | None = None) -> None:
        """`run` and `base_ms` (part of every mid, first timestamp) fixed: the same bodies every
        time (bench.instructions); by default new ones."""
        self._secret = secret
        self._run = os.urandom(4).hex() if run is None else run
        self._seq = itertools.count()
        self._base_ms = int(time.time() * 1000) if base_ms is None else base_ms
        self._users = users

    def psid(self, user: int) -> str:
        return str(7_000_000_000_000_000 + user)

    def message(self, seq: int) -> str:
        sender = self.psid(seq * 7919 % self._users)
        mid = f"m_{self._run}{seq:012d}AG5Hz2Uq7tuwNEhXfYYKj8mJEM_QPpz5jdCK48PnKAjSdjfipqxq"
        return (
            f'{{"sender":{{"id":"{sender}"}},"recipient":{{"id":"{PAGE_ID}"}},'
            f'"timestamp":{self._base_ms + seq},"message":{{"mid":"{mid}","text":"{TEXT}"}}}}'
        )

    def referral(self, seq: int, user: int | None = None, ref: str = "spring-sale") -> str:
        sender = self.psid(seq * 7919 % self._users if user is None else user)
        return (
            f'{{"sender":{{"id":"{sender}"}},"recipient":{{"id":"{PAGE_ID}"}},'
            f'"timestamp":{self._base_ms + seq},"referral":{{"ref":"{ref}",'
            f'"source":"SHORTLINK","type":"OPEN_THREAD"}}}}'
        )

    def envelope(self, items: list[str]) -> bytes:
        return (
            f'{{"object":"page","entry":[{{"id":"{PAGE_ID}","time":{int(time.time() * 1000)},'
            f'"messaging":[{",".join(items)}]}}]}}'
        ).encode()

    def request(self, body: bytes) -> bytes:
        head = (
            "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Hub-Signature-256: {sign(self._secret, body)}\r\n\r\n"
        )
        return head.encode() + body

    def mixed(self, requests: int, per_request: int, referral_every: int = 5
              ) -> Iterator[list[str]]:
        """Bodies of `per_request` events; one event in `referral_every` is a referral."""
        for _ in range(requests):
            items = []
            for _ in range(per_request):
                seq = next(self._seq)
                is_ref = seq % referral_every == referral_every - 1
                items.append(self.referral(seq) if is_ref else self.message(seq))
            yield items

    def touches(self, users: int, touches: int, per_request: int = 50) -> Iterator[list[str]]:
        """Referral-only bodies: `touches` shortlink referrals for each of `users` new users."""
        first_user = next(self._seq) * 1000 + 10_000_000  # never a user of the mixed bodies
        items: list[str] = []
        for round_ in range(touches):
            for user in range(users):
                items.append(self.referral(next(self._seq), first_user + user, f"ref-{round_}"))
                if len(items) == per_request:
                    yield items
                    items = []
        if items:
            yield items

    def write(self, path: Path, bodies: Iterator[list[str]]) -> Pool:
        kinds: dict[str, int] = {}
        requests = events = size = 0
        with path.open("wb") as out:
            for items in bodies:
                raw = self.request(self.envelope(items))
                out.write(raw + SEP)
                requests += 1
                events += len(items)
                size += len(raw)
                for item in items:
                    kind = "referral" if '"referral":' in item else "message"
                    kinds[kind] = kinds.get(kind, 0) + 1
        return Pool(path, requests, events, kinds, size)


def read_pool(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [r for r in data.split(SEP) if r]
