"""`python -m bench.failover`: what each way of losing the Redis primary costs, measured.

Each row starts a fresh Sentinel topology of real processes (a primary, two replicas, three
sentinels noticing a silent primary after 1 s), a real ingest and worker on its
`redis+sentinel://` URL, and sends signed POSTs (10 events each, RATE a second) for SECONDS (8 s).
Three seconds in, the primary goes away:

- `kill`: SIGKILL, a machine losing power;
- `freeze`: SIGSTOP for 4 s, then SIGCONT: a primary cut off from everyone (a partition of its
  machine, a long pause) that comes back still believing it is the primary;
- `sentinel`: `SENTINEL FAILOVER`, a planned failover done the usual way;
- `procedure`: `fbhook failover` (pause writes, wait for the replicas, SENTINEL FAILOVER,
  demote, resume).

Then, once the worker is done and the old primary (if alive) is a replica again, every event
answered 200 is looked for in the new primary's streams. Printed per row: the events
acknowledged, those lost, those written twice, the POSTs refused (503) and from the first
refusal to the last, the longest time without any 200, and when a majority of the sentinels
named the new primary. The load keeps at most 8 POSTs waiting, as a sender that waits for
answers does: while requests hang, fewer are sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from cli.failover import planned_failover
from tests.ha import Node, Topology, outage, send_timed, topology
from tests.processes import QUEUE, message_item, processed_ids, processed_total, services

RATE = 100
SECONDS = 8
FREEZE_S = 4.0
ROWS = [("kill", 0), ("kill", 1), ("freeze", 1), ("sentinel", 0), ("sentinel", 1),
        ("sentinel", 2), ("procedure", 1)]


@dataclass
class Row:
    cause: str
    ack_replicas: int
    acked: int
    lost: int
    twice: int
    refused: int
    refused_s: float
    no_200_s: float
    named_after_s: float


async def measure(top: Topology, log_dir: Path, cause: str, ack_replicas: int) -> Row:
    with services(top.url, log_dir, ACK_REPLICAS=str(ack_replicas),
                  JOB_MAX_EVENTS="20") as svc:
        ingest = svc.ingest()
        svc.worker()
        items = [message_item(f"{cause}{ack_replicas}", n) for n in range(10 * RATE * SECONDS)]
        batches = [items[i:i + 10] for i in range(0, len(items), 10)]
        load = asyncio.create_task(send_timed(ingest.url, batches, RATE))
        await asyncio.sleep(3.0)
        old = top.primary()
        started = time.monotonic()
        await away(top, old, cause)
        await asyncio.to_thread(top.wait_for, lambda: top.primary() is not old, 30,
                                "the sentinels to name a new primary")
        named_after_s = time.monotonic() - started
        if cause == "freeze":
            await asyncio.sleep(max(0.0, FREEZE_S - named_after_s))
            assert old.process is not None
            os.kill(old.process.pid, signal.SIGCONT)
        sent = await load
        if old.alive():
            await asyncio.to_thread(top.wait_for, lambda: top.role(old) == "slave", 60,
                                    "the old primary to become a replica")
        async with Redis(port=top.primary().port) as redis:
            await settled(redis)
            counts = await processed_ids(redis)
    acked = {i for s in sent if s.status == 200 for i in s.ids}
    refused_s, no_200_s = outage(sent)
    return Row(cause, ack_replicas, len(acked), len(acked - set(counts)),
               sum(1 for n in counts.values() if n > 1), sum(s.status != 200 for s in sent),
               refused_s, no_200_s, named_after_s)


async def away(top: Topology, node: Node, cause: str) -> None:
    if cause == "kill":
        node.kill()
    elif cause == "freeze":
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGSTOP)
    elif cause == "sentinel":
        with top.sentinels[0].client() as s:
            s.execute_command("SENTINEL", "FAILOVER", "fbhook")
    else:
        await planned_failover(top.url, say=lambda line: None)


async def settled(redis: Redis, within_s: float = 60.0) -> None:
    """Until the queue is empty and the streams stopped growing for a second."""
    deadline = time.monotonic() + within_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        total = await processed_total(redis)
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since > 1.0 and await redis.zcard(QUEUE) == 0:
            return
        await asyncio.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted({c for c, _ in ROWS}), action="append",
                        help="run only these causes (repeatable)")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"signed POSTs of 10 events, {RATE}/s for {SECONDS} s; the primary goes away 3 s in\n")
    print("| primary | ACK_REPLICAS | events acknowledged | lost | written twice | POSTs refused "
          "| refused from first to last | longest without a 200 | sentinels named the new "
          "primary after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cause, replicas in ROWS:
        if args.only and cause not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="fbhook-failover-") as tmp, topology() as top:
            row = asyncio.run(measure(top, Path(tmp), cause, replicas))
        print(f"| {row.cause} | {row.ack_replicas} | {row.acked:,} | {row.lost:,} | "
              f"{row.twice} | {row.refused} | {row.refused_s:.2f} s | {row.no_200_s:.2f} s | "
              f"{row.named_after_s:.2f} s |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
