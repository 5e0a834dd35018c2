"""Metrics, log lines, the silence watchdog and the worker's health check."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from ingest import metrics as ingest_metrics
from ingest.app import CLOCK, STATE, create_app
from ingest.metrics import WebhookClock
from ingest.observe import watchdog
from shared.lanes import lane_of
from shared.logs import JsonFormatter, TextFormatter
from shared.settings import Settings
from tests.conftest import API_TOKEN, SECRET, VERIFY_TOKEN, Post
from tests.redis_server import free_port
from workers import metrics as worker_metrics
from workers.__main__ import check, serve_metrics
from workers.settings import health_check_key

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(snapshot: Samples, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: TestClient[Any, Any]) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return samples(await resp.text())


def message(user: str, mid: str, ts: int = 1_700_000_000_000) -> dict[str, Any]:
    return {"sender": {"id": user}, "recipient": {"id": "PAGE1"}, "timestamp": ts,
            "message": {"mid": mid, "text": "hi"}}


def referral(user: str, source: str | None, ts: int = 1_700_000_000_000) -> dict[str, Any]:
    ref = {"type": "OPEN_THREAD", "ref": "r"} | ({"source": source} if source else {})
    return {"sender": {"id": user}, "recipient": {"id": "PAGE1"}, "timestamp": ts,
            "referral": ref}


def envelope(*items: dict[str, Any], standby: bool = False) -> dict[str, Any]:
    channel = "standby" if standby else "messaging"
    return {"object": "page", "entry": [{"id": "PAGE1", "time": 1, channel: list(items)}]}


# --- metrics: ingest ---------------------------------------------------------------------

async def test_metrics_count_requests_events_duplicates_and_rejections(
    client: TestClient[Any, Any], post: Post,
) -> None:
    before = await scrape(client)
    body = envelope(message("u1", "m.metrics.1"), message("u1", "m.metrics.2"))
    assert (await post(body)).status == 200
    assert (await post(body)).status == 200  # a retry: both events are duplicates
    assert (await post(envelope(message("u2", "m.metrics.3"), standby=True))).status == 200
    assert (await post(body, secret=b"wrong")).status == 403
    assert (await post(None, raw=b"not json")).status == 400
    assert (await post(body, headers={"Content-Type": "text/plain"})).status == 415
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fbhook_webhook_requests_total", status="200") == 3
    assert delta("fbhook_webhook_requests_total", status="403") == 1
    assert delta("fbhook_webhook_requests_total", status="400") == 1
    assert delta("fbhook_webhook_requests_total", status="415") == 1
    assert delta("fbhook_webhook_rejections_total", reason="bad_signature") == 1
    assert delta("fbhook_webhook_rejections_total", reason="bad_request") == 1
    assert delta("fbhook_webhook_rejections_total", reason="content_type") == 1
    assert delta("fbhook_events_received_total", kind="message", channel="messaging") == 4
    assert delta("fbhook_events_received_total", kind="message", channel="standby") == 1
    assert delta("fbhook_duplicates_dropped_total") == 2
    assert delta("fbhook_enqueue_duration_seconds_count") == 3
    assert delta("fbhook_enqueue_batch_requests_sum") == 3
    assert 0 <= value(after, "fbhook_seconds_since_last_webhook") < 5
    assert abs(value(after, "fbhook_last_webhook_timestamp_seconds") - time.time()) < 5
    assert ("process_cpu_seconds_total", ()) in after or ("python_info", ()) in after or any(
        name.startswith("python_") for name, _ in after)


async def test_queue_unavailable_is_counted_as_503(
    client: TestClient[Any, Any], post: Post, settings: Settings,
) -> None:
    before = await scrape(client)
    state = client.app[STATE]
    state.enqueuer._clients._free.append(_Broken())  # type: ignore[attr-defined] # the next call's client
    assert (await post(envelope(message("u3", "m.broken")))).status == 503
    after = await scrape(client)
    assert value(after, "fbhook_webhook_requests_total", status="503") \
        - value(before, "fbhook_webhook_requests_total", status="503") == 1
    assert value(after, "fbhook_webhook_rejections_total", reason="queue_unavailable") \
        - value(before, "fbhook_webhook_rejections_total", reason="queue_unavailable") == 1
    assert value(after, "fbhook_enqueue_failures_total") \
        - value(before, "fbhook_enqueue_failures_total") == 1


class _Broken:
    """A Redis client whose every script call fails, as an outage would."""

    async def evalsha(self, *args: Any) -> Any:
        raise ConnectionError("redis is down")

    async def script_load(self, *args: Any) -> Any:
        raise ConnectionError("redis is down")


# --- metrics: worker ---------------------------------------------------------------------

def registry() -> Samples:
    return samples(generate_latest(REGISTRY).decode())


async def test_worker_metrics_count_jobs_events_and_touches_by_source(
    post: Post, drain: Any, settings: Settings,
) -> None:
    before = registry()
    assert (await post(envelope(
        referral("w1", "ADS"), referral("w2", "SHORTLINK"), referral("w3", "SOMETHING_NEW"),
        referral("w4", None), message("w1", "m.worker.1"),
    ))).status == 200
    await drain()
    assert (await post(envelope(referral("w1", "ADS", ts=1_700_000_100_000)))).status == 200
    await drain()
    after = registry()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # One lane job per lane the users' events went to, then one for w1's second referral.
    lanes = {lane_of("page", "PAGE1", u, "", settings.lanes) for u in ("w1", "w2", "w3", "w4")}
    assert delta("fbhook_events_processed_total", kind="referral") == 5
    assert delta("fbhook_events_processed_total", kind="message") == 1
    assert delta("fbhook_jobs_total", outcome="ok") == len(lanes) + 1
    assert delta("fbhook_job_duration_seconds_count") == len(lanes) + 1
    assert delta("fbhook_attribution_touches_total", source="ADS", user="new") == 1
    assert delta("fbhook_attribution_touches_total", source="ADS", user="returning") == 1
    assert delta("fbhook_attribution_touches_total", source="SHORTLINK", user="new") == 1
    assert delta("fbhook_attribution_touches_total", source="other", user="new") == 1
    assert delta("fbhook_attribution_touches_total", source="none", user="new") == 1
    assert not any(dict(labels).get("source") == "SOMETHING_NEW" for _, labels in after)


async def test_worker_gauges_read_queue_depth_age_and_dead_letters(
    redis: Redis, settings: Settings,
) -> None:
    now_ms = time.time() * 1000
    await redis.zadd(settings.queue_name, {"a": now_ms - 30_000, "b": now_ms})
    await redis.xadd("fb:dead", {"id": "x"})
    await worker_metrics.refresh(redis, settings.queue_name)
    after = registry()
    assert value(after, "fbhook_queue_depth") == 2
    assert 29 < value(after, "fbhook_queue_oldest_job_age_seconds") < 60
    assert value(after, "fbhook_dead_letters_stored") == 1
    await redis.delete(settings.queue_name)
    await worker_metrics.refresh(redis, settings.queue_name)
    after = registry()
    assert value(after, "fbhook_queue_depth") == 0
    assert value(after, "fbhook_queue_oldest_job_age_seconds") == 0


async def test_dead_letters_are_counted(post: Post, drain: Any, settings: Settings,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import registry as handlers

    async def failing(ctx: dict[str, Any], event: Any) -> None:
        raise RuntimeError("token=abc handler broke")

    monkeypatch.setattr("workers.lanes.backoff_s", lambda job_try: 0.0)
    handlers.on("read")(failing)
    try:
        before = registry()
        read = {"sender": {"id": "d1"}, "recipient": {"id": "PAGE1"}, "timestamp": 1,
                "read": {"watermark": 5}}
        assert (await post(envelope(read))).status == 200
        await drain()
        after = registry()
    finally:
        handlers.remove("read", failing)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fbhook_dead_letters_total", kind="read") == 1
    assert delta("fbhook_jobs_total", outcome="retry") == settings.job_max_tries - 1
    assert delta("fbhook_jobs_total", outcome="dead_letter") == 1


def test_worker_serves_metrics_on_its_port(settings: Settings) -> None:
    assert serve_metrics(settings) is None  # WORKER_METRICS_PORT=0: off
    port = free_port()
    server = serve_metrics(Settings.from_env({
        "FB_APP_SECRET": SECRET.decode(), "FB_VERIFY_TOKEN": VERIFY_TOKEN,
        "API_TOKEN": API_TOKEN, "WORKER_METRICS_PORT": str(port),
    }))
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "fbhook_queue_depth" in text
    assert "fbhook_job_duration_seconds" in text


# --- logs ---------------------------------------------------------------------------------

def records(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


async def test_one_log_line_per_webhook_request_with_its_fields(
    client: TestClient[Any, Any], post: Post, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fbhook.ingest")
    assert (await post(envelope(message("psid-9", "m.log.1")))).status == 200
    lines = records(caplog, "fbhook.ingest")
    assert len(lines) == 1
    line = lines[0]
    assert line.levelno == logging.DEBUG
    fields = line.__dict__
    assert (fields["status"], fields["outcome"], fields["events"]) == (200, "accepted", 1)
    assert (fields["kind"], fields["page"], fields["user"]) == ("message", "PAGE1", "psid-9")
    assert fields["ms"] >= 0 and fields["queue_ms"] >= 0 and fields["bytes"] > 0

    caplog.clear()
    two = envelope(message("a", "m.log.2"), referral("b", "ADS"))
    assert (await post(two)).status == 200
    (line,) = records(caplog, "fbhook.ingest")
    assert line.__dict__["kinds"] == ["message", "referral"]
    assert line.__dict__["users"] == ["a", "b"]
    assert line.__dict__["pages"] == ["PAGE1"]


async def test_refused_requests_log_at_info_without_secrets(
    client: TestClient[Any, Any], post: Post, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fbhook.ingest")
    body = envelope(message("u", "m.log.3"))
    assert (await post(body)).status == 200  # acknowledged: debug, not shown at info
    assert records(caplog, "fbhook.ingest") == []
    bad = "sha256=" + "ab" * 32
    assert (await post(body, secret=None, headers={"X-Hub-Signature-256": bad})).status == 403
    (line,) = records(caplog, "fbhook.ingest")
    assert line.levelno == logging.INFO
    assert (line.__dict__["status"], line.__dict__["outcome"]) == (403, "bad_signature")
    text = JsonFormatter().format(line)
    assert json.loads(text)["outcome"] == "bad_signature"
    for secret in (bad, "ab" * 32, SECRET.decode(), API_TOKEN, VERIFY_TOKEN):
        assert secret not in text
    caplog.clear()
    assert (await client.get("/report", params={"token": API_TOKEN})).status == 200
    assert (await client.get("/webhook", params={
        "hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "c"})).status \
        == 200
    for record in caplog.records:
        formatted = JsonFormatter().format(record)
        assert API_TOKEN not in formatted and VERIFY_TOKEN not in formatted


async def test_one_log_line_per_job(
    post: Post, drain: Any, caplog: pytest.LogCaptureFixture, settings: Settings,
) -> None:
    assert (await post(envelope(referral("j1", "ADS")))).status == 200
    caplog.set_level(logging.DEBUG, logger="fbhook.worker")
    await drain()
    jobs = [r for r in records(caplog, "fbhook.worker")
            if r.getMessage().startswith("lane job ")]
    assert len(jobs) == 1
    fields = jobs[0].__dict__
    assert fields["outcome"] == "ok" and fields["try"] == 1
    assert fields["lane"] == lane_of("page", "PAGE1", "j1", "", settings.lanes)
    assert (fields["steps"], fields["written"], fields["failed"]) == (1, 1, 0)
    assert fields["ms"] >= 0
    assert json.loads(JsonFormatter().format(jobs[0]))["outcome"] == "ok"


def test_text_logs_on_a_terminal_keep_the_fields() -> None:
    record = logging.makeLogRecord({
        "name": "fbhook.ingest", "levelno": logging.DEBUG, "levelname": "DEBUG",
        "msg": "webhook %d %s", "args": (200, "accepted"), "status": 200, "kind": "message",
    })
    line = TextFormatter().format(record)
    assert line.endswith("DEBUG fbhook.ingest: webhook 200 accepted status=200 kind=message")


# --- watchdog -----------------------------------------------------------------------------

@pytest.fixture
def watchdog_settings(settings: Settings) -> Iterator[Settings]:
    from dataclasses import replace

    yield replace(settings, watchdog_s=1)


async def test_watchdog_warns_after_silence_and_notices_webhooks_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fbhook.ingest")
    clock = WebhookClock()
    clock.last = time.time() - 5  # silent for 5 s already
    before = ingest_metrics.WATCHDOG_WARNINGS._value.get()
    task = asyncio.create_task(watchdog(clock, 1))
    try:
        await asyncio.sleep(0.3)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].__dict__["seconds_since_last_webhook"] >= 5
        assert "no webhook for 5 s" in warnings[0].getMessage()
        assert ingest_metrics.WATCHDOG_WARNINGS._value.get() == before + 1
        clock.last = time.time()
        await asyncio.sleep(0.3)
        assert any(r.getMessage() == "webhooks arrive again" for r in caplog.records)
    finally:
        task.cancel()


async def test_watchdog_runs_in_the_app_and_the_gauge_follows_webhooks(
    aiohttp_client: Any, watchdog_settings: Settings, redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fbhook.ingest")
    client = await aiohttp_client(create_app(watchdog_settings))
    await asyncio.sleep(1.3)
    assert any("no webhook for" in r.getMessage() for r in caplog.records)
    assert value(await scrape(client), "fbhook_seconds_since_last_webhook") >= 1
    body = json.dumps(envelope(message("wd", "m.wd"))).encode()
    from ingest.signature import sign

    resp = await client.post("/webhook", data=body, headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)})
    assert resp.status == 200
    assert value(await scrape(client), "fbhook_seconds_since_last_webhook") < 1


async def test_watchdog_is_off_at_zero(
    aiohttp_client: Any, settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    from dataclasses import replace

    caplog.set_level(logging.WARNING, logger="fbhook.ingest")
    app = create_app(replace(settings, watchdog_s=0))
    app[CLOCK].last = 1.0  # silent since 1970
    await aiohttp_client(app)
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.name == "fbhook.ingest"]


# --- worker health check ------------------------------------------------------------------

async def test_check_reports_this_hosts_worker(redis: Redis, settings: Settings,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert await check(settings) == 1
    assert "unhealthy" in capsys.readouterr().err
    await redis.set(health_check_key(settings), b"j_complete=0", px=11_000)
    assert await check(settings) == 0
    assert "healthy" in capsys.readouterr().out


async def test_a_running_worker_writes_its_health_check_key(
    redis: Redis, settings: Settings,
) -> None:
    from workers.leased_worker import LeasedWorker as Worker
    from workers.settings import worker_settings

    worker = Worker(**worker_settings(settings), handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:
        for _ in range(100):
            if await redis.exists(health_check_key(settings)):
                break
            await asyncio.sleep(0.05)
        assert await check(settings) == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()
    assert await check(settings) == 1  # a worker that stops removes its key
