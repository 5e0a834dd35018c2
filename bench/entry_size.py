"""`python -m bench.entry_size`: what one stream entry weighs in Redis, with and without `raw`.

Posts the benchmark's events (a text message, an ad referral) through a real ingest app and
worker into a throwaway Redis, then reads MEMORY USAGE of each stream over its entry count. The
"without raw" row rewrites the same entries with every field but `raw`, `object` and `user`
(the entry as it was before stream entries carried the item whole), so the two are measured on
the same Redis, in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from redis.asyncio import Redis

from bench.payloads import Factory
from ingest.app import create_app
from ingest.signature import sign
from shared.settings import Settings
from tests.redis_server import redis_server
from workers.leased_worker import LeasedWorker as Worker
from workers.settings import worker_settings

EVENTS = 2000
NEW_FIELDS = (b"raw", b"object", b"user")


async def measure(url: str) -> list[tuple[str, int, float, float]]:
    from aiohttp.test_utils import TestClient, TestServer

    secret = os.urandom(8).hex()
    settings = Settings.from_env({"FB_APP_SECRET": secret, "FB_VERIFY_TOKEN": "bench-verify",
                                  "API_TOKEN": "bench-api-token", "REDIS_URL": url})
    factory = Factory(secret.encode())
    redis = Redis.from_url(url)
    async with TestClient(TestServer(create_app(settings))) as client:
        for seq in range(EVENTS):
            for item in (factory.message(seq), factory.referral(seq)):
                body = f'{{"object":"page","entry":[{{"id":"1","messaging":[{item}]}}]}}'.encode()
                answer = await client.post("/webhook", data=body, headers={
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": sign(secret.encode(), body)})
                assert answer.status == 200
    worker = Worker(**worker_settings(settings), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()
    rows = []
    for kind in ("message", "referral"):
        stream = f"fb:events:{kind}"
        count = int(await redis.xlen(stream))
        with_raw = int(await redis.memory_usage(stream, samples=0) or 0)
        raw_bytes = 0
        for _, fields in await redis.xrange(stream):
            raw_bytes += len(fields[b"raw"])
            slim = {k: v for k, v in fields.items() if k not in NEW_FIELDS}
            await redis.xadd(stream + ":slim", slim)  # type: ignore[arg-type]
        without = int(await redis.memory_usage(stream + ":slim", samples=0) or 0)
        rows.append((kind, count, with_raw / count, without / count, raw_bytes / count))
    await redis.aclose()
    return rows  # type: ignore[return-value]


def main() -> int:
    with redis_server() as server:
        rows: list[Any] = asyncio.run(measure(server.url))
    print(f"{'stream':<10} {'entries':>8} {'bytes/entry':>12} {'without raw':>12} "
          f"{'ratio':>6} {'raw text':>9}")
    for kind, count, with_raw, without, raw_bytes in rows:
        print(f"{kind:<10} {count:>8} {with_raw:>12.0f} {without:>12.0f} "
              f"{with_raw / without:>6.2f} {raw_bytes:>9.0f}")
    print(json.dumps({"events_per_kind": EVENTS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
