"""docker-compose.yml is valid, and the commands its services run work as plain processes.

There is no Docker engine on the test machines, so the file is checked against the Compose
specification's JSON schema, and each service's command is started here with the same
environment the file gives it (REDIS_URL pointing at the test Redis instead of `redis`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.signature import sign
from shared.attribution import touch_count
from tests.redis_server import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_file_matches_the_compose_specification() -> None:
    tool = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_service_is_durable_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["image"].startswith("redis:")
    assert "healthcheck" in redis


def test_app_services_wait_for_redis_and_have_health_checks() -> None:
    for name in ("ingest", "worker"):
        service = SERVICES[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"][0] == "CMD"
    assert SERVICES["ingest"]["ports"] == ["${INGEST_PORT:-8080}:8080"]


def test_worker_can_be_scaled() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_image_runs_as_a_non_root_user() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}


def test_env_example_sets_every_required_variable() -> None:
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in ("FB_APP_SECRET", "FB_VERIFY_TOKEN", "API_TOKEN"):
        assert example.get(name), name


def _service_env(service: str, redis_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FB_", "API_", "REDIS_"))}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    for key, value in SERVICES[service]["environment"].items():
        if not str(value).startswith("${"):
            env[key] = str(value)
    env.update(
        REDIS_URL=redis_url,
        INGEST_PORT=str(port),
        WORKER_METRICS_PORT="0",
        WORKER_POLL_DELAY_SECONDS="0.01",
        LOG_LEVEL="warning",
    )
    return env


def _here(command: list[str]) -> list[str]:
    """A service's command with `python` meaning this interpreter (the image's is on PATH)."""
    return [sys.executable if part == "python" else part for part in command]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except OSError:
        return 0


@pytest.mark.slow
def test_service_commands_run_the_system_as_plain_processes(redis_proc: RedisProcess) -> None:
    import redis

    client = redis.Redis.from_url(redis_proc.url)
    client.flushall()
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("ingest", "worker"):
            procs.append(
                subprocess.Popen(
                    _here(SERVICES[name]["command"]),
                    cwd=ROOT,
                    env=_service_env(name, redis_proc.url, port),
                )
            )
        deadline = time.monotonic() + 20
        while _get(f"http://127.0.0.1:{port}/readyz") != 200:
            assert time.monotonic() < deadline, "ingest never became ready"
            time.sleep(0.1)

        secret = _service_env("ingest", redis_proc.url, port)["FB_APP_SECRET"].split(",")[0]
        body = json.dumps(
            {
                "object": "page",
                "entry": [
                    {
                        "id": "1",
                        "messaging": [
                            {
                                "sender": {"id": "42"},
                                "recipient": {"id": "1"},
                                "timestamp": 1700000000000,
                                "referral": {
                                    "ref": "compose",
                                    "source": "SHORTLINK",
                                    "type": "OPEN_THREAD",
                                },
                            }
                        ],
                    }
                ],
            }
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/webhook",
            data=body.encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-Hub-Signature-256": sign(secret.encode(), body.encode()),
            },
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.read() == b"EVENT_RECEIVED"

        deadline = time.monotonic() + 20
        while client.xlen("fb:events:referral") < 1:
            assert time.monotonic() < deadline, "the worker never processed the event"
            time.sleep(0.1)
        assert touch_count(client.get("fb:attr:42")) == 1  # type: ignore[arg-type]

        # The services' own health checks, as compose would run them (port adjusted).
        ingest_check: list[str] = _here(
            [
                part.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
                for part in SERVICES["ingest"]["healthcheck"]["test"][1:]
            ]
        )
        env = _service_env("worker", redis_proc.url, port)
        assert subprocess.run(ingest_check, cwd=ROOT, env=env, check=False).returncode == 0
        worker_check: list[Any] = _here(SERVICES["worker"]["healthcheck"]["test"][1:])
        time.sleep(0.5)
        assert (
            subprocess.run(worker_check, cwd=ROOT, env=env, check=False, timeout=30).returncode == 0
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(30) == 0, "a service did not stop cleanly on SIGTERM"
        client.close()
