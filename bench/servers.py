"""The two reference servers, each run in its own process by the benchmark.

    python -m bench.servers ceiling PORT
    python -m bench.servers peer-ingest PORT REDIS_URL
    python -m bench.servers peer-worker REDIS_URL

`ceiling` is the most any aiohttp webhook can do here: read the body, answer 200. `peer-*` is what
a user would write with the same libraries: verify the signature, `json.loads`, one
`ArqRedis.enqueue_job` per event (msgpack, never pickle), and a stock arq worker with a trivial
job function tuned as arq's documentation allows. Both servers use ingest's server settings:
uvloop, no access log, reuse_port, the same body limit. The app secret is read from FB_APP_SECRET.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import uvloop
from aiohttp import web
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from shared.settings import Settings

MAX_BODY: int = Settings.__dataclass_fields__["max_body_bytes"].default  # type: ignore[assignment]
ACK = "EVENT_RECEIVED"
PEER_QUEUE = "arq:queue"
PEER_POLL_DELAY_S = 0.01
PEER_MAX_JOBS = 100

ARQ = web.AppKey("arq", ArqRedis)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def ceiling_app() -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=ACK)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/webhook", receive)
    app.router.add_get("/healthz", healthz)
    return app


def peer_app(redis_url: str, secret: bytes) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-Hub-Signature-256", "")):
            return web.Response(status=403, text="bad signature")
        payload = json.loads(body)
        redis = request.app[ARQ]
        for entry in payload.get("entry", []):
            for item in entry.get("messaging", []):
                mid = item.get("message", {}).get("mid")
                await redis.enqueue_job("handle", item, _job_id=mid)
        return web.Response(text=ACK)

    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[ARQ] = await create_pool(
            RedisSettings.from_dsn(redis_url),
            job_serializer=msgspec.msgpack.encode, job_deserializer=msgspec.msgpack.decode,
        )
        yield
        await app[ARQ].aclose()

    app = web.Application(client_max_size=MAX_BODY)
    app.cleanup_ctx.append(pool)
    app.router.add_post("/webhook", receive)
    app.router.add_get("/healthz", healthz)
    return app


async def handle(ctx: dict[str, Any], item: dict[str, Any]) -> None:
    """The trivial job: the event arrived, nothing else to do."""


def run_peer_worker(redis_url: str) -> None:
    asyncio.set_event_loop(uvloop.new_event_loop())
    Worker(
        functions=[func(handle, name="handle")],
        redis_settings=RedisSettings.from_dsn(redis_url),
        job_serializer=msgspec.msgpack.encode,
        job_deserializer=msgspec.msgpack.decode,
        keep_result=0,
        max_jobs=PEER_MAX_JOBS,
        poll_delay=PEER_POLL_DELAY_S,
        queue_name=PEER_QUEUE,
    ).run()


def serve(app: web.Application, port: int) -> None:
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, loop=uvloop.new_event_loop(),
                print=None, reuse_port=True)


def main(argv: list[str]) -> int:
    match argv:
        case ["ceiling", port]:
            serve(ceiling_app(), int(port))
        case ["peer-ingest", port, redis_url]:
            serve(peer_app(redis_url, os.environ["FB_APP_SECRET"].encode()), int(port))
        case ["peer-worker", redis_url]:
            run_peer_worker(redis_url)
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
