"""A Sentinel topology of real processes on free ports: one primary, replicas, sentinels.

Each process runs in its own directory under one temporary directory; a sentinel's
configuration file is its own (Sentinel rewrites it). `Topology.url` is the `redis+sentinel://`
URL the services are given.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from tests.redis_server import free_port, server_binary, wait_ready

SERVICE = "fbhook"
DOWN_AFTER_MS = 2000
"""Sentinel calls a primary down after this long without an answer (the default is 30 s; the
compose `ha` profile's 3 s). With 1 s, a loaded 2-core machine now and then saw a second,
spurious failover: a sentinel that had not yet heard from the just-promoted primary within 1 s
of the switch called it down too, and the 503s lasted 11-14 s instead of about 1."""


@dataclass
class Node:
    """One `redis-server` (data node or sentinel) process."""

    name: str
    port: int
    dir: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        log = (self.dir / "log.txt").open("ab")
        try:
            self.process = subprocess.Popen(self.args, cwd=self.dir, stdout=log,
                                            stderr=subprocess.STDOUT)
        finally:
            log.close()
        wait_ready(self.port)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: what a machine that loses power does."""
        if self.process is not None and self.alive():
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s)

    def log(self, lines: int = 40) -> str:
        try:
            text = (self.dir / "log.txt").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Topology:
    root: Path
    data: list[Node] = field(default_factory=list)
    """data[0] is the first primary; the others start as its replicas"""
    sentinels: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def node_at(self, port: int) -> Node:
        return next(n for n in self.data if n.port == port)

    def primary_by_sentinels(self) -> tuple[str, int] | None:
        """The address a majority of the live sentinels give, else None."""
        votes: dict[tuple[str, int], int] = {}
        for s in self.sentinels:
            if not s.alive():
                continue
            with contextlib.suppress(redis.RedisError), s.client(0.5) as c:
                addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                if addr:
                    key = (addr[0].decode(), int(addr[1]))
                    votes[key] = votes.get(key, 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=None)
        if best is None or best[1] <= len(self.sentinels) // 2:
            return None
        return best[0]

    def primary(self) -> Node:
        if not self.sentinels:
            return self.data[0]
        addr = self.primary_by_sentinels()
        if addr is None:
            raise AssertionError("no majority of the sentinels names a primary")
        return self.node_at(addr[1])

    def role(self, node: Node) -> str:
        with node.client(0.5) as c:
            return str(c.execute_command("ROLE")[0].decode())

    def wait_for(self, check: object, within_s: float, what: str) -> float:
        """Poll `check()` (a callable) until true; return the seconds it took."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(redis.RedisError, AssertionError, OSError):
                if check():  # type: ignore[operator]
                    return time.monotonic() - started
            if time.monotonic() - started > within_s:
                raise AssertionError(f"timed out after {within_s}s waiting for {what}\n"
                                     + self.logs())
            time.sleep(0.02)

    def wait_synced(self, within_s: float = 20.0) -> None:
        """Until every live replica of the current primary confirms its writes, and every
        sentinel knows every replica and the other sentinels."""
        primary = self.primary()
        live = [n for n in self.data if n.alive() and n is not primary]

        def synced() -> bool:
            # A replica reported "online" after a full sync receives the stream only after its
            # first ACK (up to a second later): only WAIT shows that it takes writes.
            with primary.client() as c:
                c.publish("fbhook-ha-synced", "")  # replicated: WAIT covers it
                acked = int(c.execute_command("WAIT", len(live), 200))
            return acked == len(live) and self._sentinels_see(len(live))

        self.wait_for(synced, within_s, "the replicas to be in sync")

    def _sentinels_see(self, replicas: int) -> bool:
        live = [s for s in self.sentinels if s.alive()]
        for s in live:
            with s.client(0.5) as c:
                master = c.execute_command("SENTINEL", "MASTER", SERVICE)
                fields = dict(zip(master[::2], master[1::2], strict=True))
                if int(fields[b"num-slaves"]) < replicas:
                    return False
                if int(fields[b"num-other-sentinels"]) != len(self.sentinels) - 1:
                    return False
        return True

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} :{n.port} ---\n{n.log(15)}"
                         for n in [*self.data, *self.sentinels])

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.stop()


def _data_node(root: Path, name: str, primary_port: int | None, appendonly: bool) -> Node:
    port = free_port()
    where = root / name
    where.mkdir()
    args = [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--dir", str(where),
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    if primary_port is not None:
        args += ["--replicaof", "127.0.0.1", str(primary_port)]
    return Node(name, port, where, args)


def _sentinel(root: Path, name: str, primary_port: int, quorum: int) -> Node:
    port = free_port()
    where = root / name
    where.mkdir()
    conf = where / "sentinel.conf"
    conf.write_text("\n".join([
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {where}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}",
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {SERVICE} 10000",
        f"sentinel parallel-syncs {SERVICE} 2",
        "",
    ]))
    return Node(name, port, where, [server_binary(), str(conf), "--sentinel"])


@contextlib.contextmanager
def topology(replicas: int = 2, sentinels: int = 3, appendonly: bool = True
             ) -> Iterator[Topology]:
    """A primary, `replicas` replicas and `sentinels` sentinels (quorum: a majority), running
    and in sync; everything stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix="fbhook-ha-") as tmp:
        root = Path(tmp)
        top = Topology(root)
        try:
            primary = _data_node(root, "redis-0", None, appendonly).start()
            top.data.append(primary)
            for i in range(replicas):
                top.data.append(_data_node(root, f"redis-{i + 1}", primary.port,
                                           appendonly).start())
            for i in range(sentinels):
                top.sentinels.append(_sentinel(root, f"sentinel-{i}", primary.port,
                                               sentinels // 2 + 1).start())
            top.wait_synced()
            yield top
        finally:
            top.stop()


# --------------------------------------------------------------------------- timed load


@dataclass
class Answer:
    """One signed POST: the event ids it carried, its status (0: no answer) and when it was
    sent and answered (time.monotonic)."""

    ids: list[str]
    status: int
    sent_at: float
    answered_at: float


async def send_timed(url: str, batches: list[list[dict[str, Any]]], rate: float,
                     concurrency: int = 8) -> list[Answer]:
    """POST every batch at `rate` a second (later when `concurrency` answers are pending)."""
    from tests.processes import body_of, dedupe_ids, post_signed

    answers: list[Answer] = []
    pending = list(reversed(range(len(batches))))
    started = time.monotonic()

    async def sender(session: aiohttp.ClientSession) -> None:
        while pending:
            n = pending.pop()
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            sent_at = time.monotonic()
            status, _ = await post_signed(session, url, body_of(batches[n]))
            answers.append(Answer(dedupe_ids(batches[n]), status, sent_at, time.monotonic()))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(sender(s) for _ in range(concurrency)))
    return answers


def outage(answers: list[Answer]) -> tuple[float, float]:
    """(seconds from the first refused answer to the last, longest time between two
    consecutive 200 answers): how long webhooks were refused, and how long none succeeded."""
    refused = sorted(a.answered_at for a in answers if a.status != 200)
    ok = sorted(a.answered_at for a in answers if a.status == 200)
    gaps = [b - a for a, b in itertools.pairwise(ok)]
    return (refused[-1] - refused[0] if refused else 0.0), max(gaps, default=0.0)


# --------------------------------------------------------------------------- one address


class Endpoint:
    """One address in front of a Redis, as a managed service gives: a TCP proxy whose target
    port can be changed (the provider pointing its address at the new primary). Connections
    already open stay with the server they were opened to."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Endpoint:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sink.close()
