"""The aiohttp application: webhook endpoints, health checks and the attribution read API."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import msgspec
from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ingest import metrics
from ingest.body import READ_BUFSIZE, BodyReader
from ingest.envelope import parse
from ingest.metrics import WebhookClock
from ingest.observe import Outcome, request_fields, server_log, watchdog
from ingest.queue import Enqueuer
from ingest.report_page import CSP, render
from ingest.signature import SignatureVerifier, well_formed
from shared import keys
from shared.attribution import load as load_attribution
from shared.errors import BadRequest, BodyRefused, QueueUnavailable
from shared.identity import PSID, SPACES
from shared.redis import connect
from shared.report import DEFAULT_LIMIT, ReportRangeError, build_report, encode_report, parse_range
from shared.settings import Settings

log = logging.getLogger("fbhook.ingest")

EVENT_RECEIVED = "EVENT_RECEIVED"
_JSON_TYPES = frozenset({"application/json", "text/json"})


@dataclass(slots=True)
class State:
    settings: Settings
    verifier: SignatureVerifier
    bodies: BodyReader
    redis: Redis
    enqueuer: Enqueuer
    verify_token: bytes
    api_token: bytes
    clock: WebhookClock


SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", State)
CLOCK = web.AppKey("clock", WebhookClock)


def redis_deadline(state: State) -> asyncio.Timeout:
    """The longest a request waits on Redis. redis-py sets up new connections one at a time under
    a pool lock, so with Redis frozen each request would also wait for the ones before it."""
    return asyncio.timeout(state.settings.redis_timeout_s + 0.4)


def _text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n")


_JSON_HEADERS: Mapping[str, str] = {
    "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
}


def _json(data: object, status: int = 200, *, body: bytes | None = None,
          headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer of the read API or a health check (`data`, or `body` already encoded):
    never stored by a cache, never sniffed as something else by a browser."""
    return web.Response(
        body=body if body is not None else msgspec.json.encode(data), status=status,
        content_type="application/json", headers={**_JSON_HEADERS, **(headers or {})},
    )


def _utf8(text: str) -> bytes:
    """A header or query value as bytes for a constant-time comparison. aiohttp hands bytes that
    are not UTF-8 over as surrogates, which a plain `.encode()` refuses (a 500)."""
    return text.encode("utf-8", "surrogatepass")


async def handshake(request: web.Request) -> web.Response:
    """Facebook's subscription check: echo `hub.challenge` when mode and token match."""
    state = request.app[STATE]
    query = request.query
    token = _utf8(query.get("hub.verify_token", ""))
    token_ok = hmac.compare_digest(token, state.verify_token)
    if query.get("hub.mode") == "subscribe" and token_ok and "hub.challenge" in query:
        return web.Response(body=_utf8(query["hub.challenge"]), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})
    return _text(403, "verification failed")


async def receive(request: web.Request) -> web.Response:
    """Verify, decode, queue every event in one round trip, then acknowledge.

    Counts the request in a few prebuilt metric children and logs one line: at debug level when
    it was acknowledged, at info when refused, at warning when the queue was unavailable."""
    state = request.app[STATE]
    started = time.perf_counter()
    outcome = await _receive(request, state)
    status = outcome.response.status
    metrics.count_request(status)
    if outcome.reason is None:
        metrics.count_events(outcome.events)
    else:
        metrics.REJECTED[outcome.reason].inc()
    level = (logging.DEBUG if status < 300 else
             logging.WARNING if outcome.reason == "queue_unavailable" else logging.INFO)
    if log.isEnabledFor(level):
        fields = request_fields(outcome, time.perf_counter() - started)
        log.log(level, "webhook %d %s", status, fields["outcome"], extra=fields)
    if outcome.reason == "body_timeout":
        await _answer_and_close(request, outcome.response)
    return outcome.response


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """Send the answer now and close the connection: aiohttp would otherwise linger to read the
    rest of a body whose sender already had BODY_TIMEOUT_SECONDS to send it."""
    response.force_close()
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()


def _refused_on_headers(request: web.Request, state: State) -> Outcome | None:
    """The answer to a webhook its headers alone refuse (before a byte of the body is read)."""
    content_type = request.content_type
    if request.headers.get("Content-Type") and content_type not in _JSON_TYPES:
        return Outcome(_text(415, "content type must be application/json"), "content_type")
    try:
        state.bodies.check_size(request)
    except BodyRefused as exc:
        return Outcome(_text(exc.status, str(exc)), exc.reason)
    if not well_formed(request.headers.get("X-Hub-Signature-256")):
        return Outcome(_text(403, "invalid or missing X-Hub-Signature-256"), "bad_signature")
    return None


async def _receive(request: web.Request, state: State) -> Outcome:
    refused = _refused_on_headers(request, state)
    if refused is not None:
        return refused
    signature = request.headers.get("X-Hub-Signature-256")
    try:
        body = await state.bodies.read(request)
    except BodyRefused as exc:
        return Outcome(_text(exc.status, str(exc)), exc.reason)
    if not state.verifier.verify(signature, body):
        return Outcome(_text(403, "invalid or missing X-Hub-Signature-256"), "bad_signature",
                       size=len(body))
    state.clock.last = time.time()
    try:
        events = parse(body, int(state.clock.last * 1000))
    except BadRequest as exc:
        return Outcome(_text(400, str(exc)), "bad_request", size=len(body))
    queue_s = 0.0
    if events:
        queued = time.perf_counter()
        try:
            await state.enqueuer.put(events)
        except QueueUnavailable as exc:
            return Outcome(_text(503, "queue unavailable, retry later"), "queue_unavailable",
                           events, len(body), time.perf_counter() - queued, str(exc))
        queue_s = time.perf_counter() - queued
    return Outcome(web.Response(text=EVENT_RECEIVED), None, events, len(body), queue_s)


async def metrics_endpoint(_: web.Request) -> web.Response:
    """Prometheus metrics of this process only (each ingest process has its own)."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(_: web.Request) -> web.Response:
    return _json({"status": "ok"})


READY_PROBE_MS = 10_000
"""How long the readiness probe's key lives: it only has to be written."""


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis takes a write: a PING also answers when Redis is out of memory, a
    read-only replica, or short of the replicas `min-replicas-to-write` asks for, and every
    webhook would then get 503."""
    state = request.app[STATE]
    try:
        async with redis_deadline(state):
            await state.redis.set(keys.READY_PROBE, b"1", px=READY_PROBE_MS)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        answer = {"status": "unavailable", "redis": type(exc).__name__}
        if isinstance(exc, ResponseError):  # Redis's own words: out of memory, read-only...
            answer["error"] = str(exc)[:200]
        return _json(answer, status=503)
    return _json({"status": "ready"})


def bearer_ok(request: web.Request, expected: bytes) -> bool:
    """Constant-time check of `Authorization: Bearer <token>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(_utf8(token.strip()), expected)


_UNAUTHORIZED = {"error": "missing or invalid bearer token"}


async def attribution(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not bearer_ok(request, state.api_token):
        return _json(_UNAUTHORIZED, status=401, headers={"WWW-Authenticate": "Bearer"})
    user, space = request.match_info["user_id"], request.query.get("space", PSID)
    if space not in SPACES:
        return _json({"error": f"space must be one of {', '.join(SPACES)}"}, status=400)
    try:
        async with redis_deadline(state):
            view = await load_attribution(state.redis, user, space)
    except Exception:  # noqa: BLE001
        return _json({"error": "redis unavailable"}, status=503)
    if view is None:
        return _json({"error": "no attribution for this user"}, status=404)
    return _json(None, body=msgspec.json.encode(view))


def report_token_ok(request: web.Request, expected: bytes) -> tuple[bool, str | None]:
    """The bearer header, or for a browser `?token=` (both in constant time); the second value is
    the query token when that is what matched, for the page's links."""
    if bearer_ok(request, expected):
        return True, None
    token = request.query.get("token")
    if token is not None and hmac.compare_digest(_utf8(token), expected):
        return True, token
    return False, None


_PAGE_HEADERS = {
    "Content-Security-Policy": CSP, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


async def report(request: web.Request) -> web.Response:
    """The attribution report for `from`..`to` (default: the last 30 days): an HTML page, or JSON
    at `/report.json` and with `?format=json`."""
    state = request.app[STATE]
    query = request.query
    as_json = request.path.endswith(".json") or query.get("format") == "json"
    ok, query_token = report_token_ok(request, state.api_token)
    if not ok:
        if as_json:
            return _json(_UNAUTHORIZED, status=401, headers={"WWW-Authenticate": "Bearer"})
        return web.Response(status=401, headers={"WWW-Authenticate": "Bearer", **_PAGE_HEADERS},
                            text="Unauthorized: open /report?token=<API_TOKEN> or send "
                                 "Authorization: Bearer <API_TOKEN>.\n")
    try:
        first, last = parse_range(query.get("from"), query.get("to"))
        given = query.get("limit", str(DEFAULT_LIMIT))
        if not (given.isascii() and given.isdigit()):  # int() takes "1_0", " 1 ", other digits
            raise ValueError
        digits = given.lstrip("0") or "0"  # a long run of digits is never read into an int
        limit = int(digits) if len(digits) <= 6 else 10_001
        if not 0 <= limit <= 10_000:
            raise ValueError
    except ReportRangeError as exc:
        return _json({"error": str(exc)}, status=400)
    except ValueError:
        return _json({"error": "limit must be a whole number, 0 to 10000"}, status=400)
    try:
        async with redis_deadline(state):
            result = await build_report(state.redis, first, last, limit)
    except Exception:  # noqa: BLE001
        return _json({"error": "redis unavailable"}, status=503)
    if as_json:
        return _json(None, body=encode_report(result))
    given_limit = limit if "limit" in query else None
    return web.Response(text=render(result, query_token, given_limit), content_type="text/html",
                        headers=_PAGE_HEADERS)


async def _expect(request: web.Request) -> None:
    """`Expect: 100-continue` answered as aiohttp does; any other value gets 417 without being
    quoted back. aiohttp's own handler quotes it, and fails (500) on bytes that are not UTF-8."""
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="Expect must be 100-continue")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer itself has not started


async def _expect_webhook(request: web.Request) -> None:
    """`_expect` for POST /webhook: no 100 Continue for a webhook its headers already refuse
    (too large, not JSON, no well-formed signature): its answer comes instead, and the client
    never sends the body."""
    if request.headers.get("Expect", "").lower() == "100-continue" and \
            _refused_on_headers(request, request.app[STATE]) is not None:
        return
    await _expect(request)


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """The 405 or 404 aiohttp would answer, from a route that has `_expect` (aiohttp answers
    these from routes of its own that keep its Expect handler)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = connect(settings)
    app[STATE] = State(
        settings=settings,
        verifier=SignatureVerifier(settings.fb_app_secrets),
        bodies=BodyReader(settings),
        redis=redis,
        enqueuer=Enqueuer(redis, settings),
        verify_token=settings.fb_verify_token.encode(),
        api_token=settings.api_token.encode(),
        clock=app[CLOCK],
    )
    yield
    await app[STATE].enqueuer.aclose()
    await redis.aclose()


async def _watchdog_ctx(app: web.Application) -> AsyncIterator[None]:
    """Warn when no webhook arrived for WATCHDOG_SECONDS (0: off)."""
    clock, limit = app[CLOCK], app[SETTINGS].watchdog_s
    clock.bind()
    task = asyncio.create_task(watchdog(clock, limit)) if limit > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serve /metrics on INGEST_METRICS_PORT, away from the public port (0: off)."""
    settings = app[SETTINGS]
    if not settings.ingest_metrics_port:
        yield
        return
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", metrics_endpoint, expect_handler=_expect)
    runner = web.AppRunner(metrics_app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, settings.ingest_host, settings.ingest_metrics_port).start()
    log.info("metrics on port %d", settings.ingest_metrics_port)
    yield
    await runner.cleanup()


def create_app(settings: Settings) -> web.Application:
    """Build the ingest application; Redis is opened on start-up and closed on clean-up.

    aiohttp reads what is left of a body the handler did not read (a 413, a 503) for at most
    `lingering_time` before it closes the connection: BODY_TIMEOUT_SECONDS too, not its 10 s."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        handler_args={"lingering_time": settings.body_timeout_s, "read_bufsize": READ_BUFSIZE,
                      "logger": server_log,
                      "auto_decompress": False},  # ingest/body.py inflates, within its bounds
    )
    app[SETTINGS] = settings
    app[CLOCK] = WebhookClock()
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_watchdog_ctx)
    app.cleanup_ctx.append(_metrics_port_ctx)
    router = app.router
    router.add_get("/webhook", handshake, expect_handler=_expect)
    router.add_post("/webhook", receive, expect_handler=_expect_webhook)
    router.add_get("/healthz", healthz, expect_handler=_expect)
    router.add_get("/readyz", readyz, expect_handler=_expect)
    router.add_get("/attribution/{user_id}", attribution, expect_handler=_expect)
    if not settings.ingest_metrics_port:  # else only on its own port
        router.add_get("/metrics", metrics_endpoint, expect_handler=_expect)
    router.add_get("/report", report, expect_handler=_expect)
    router.add_get("/report.json", report, expect_handler=_expect)
    router.add_route("*", "/{path:.*}", _unrouted, expect_handler=_expect)  # the rest, last
    return app
