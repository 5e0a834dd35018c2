"""Redis over TLS with a password, through `REDIS_URL` alone: ingest and a worker both use it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ingest.app import create_app
from ingest.signature import sign
from shared.settings import Settings
from tests import payloads as p
from tests.conftest import SECRET
from tests.redis_server import free_port, server_binary
from workers.leased_worker import LeasedWorker as Worker
from workers.settings import worker_settings

PASSWORD = "tls-test-password"


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[int, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    with tempfile.TemporaryDirectory(prefix="fbhook-tls-") as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        port = free_port()
        proc = subprocess.Popen(
            [server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
             "--requirepass", PASSWORD, "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                yield port, cert  # still running: it started
            else:
                pytest.skip("this redis-server was built without TLS")
        finally:
            proc.terminate()
            proc.wait(10)


async def test_ingest_and_worker_use_rediss_with_a_password(
    tls_redis: tuple[int, Path], settings: Settings, aiohttp_client: Any
) -> None:
    port, cert = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    tls = replace(settings, redis_url=url)
    client = await aiohttp_client(create_app(tls))
    assert (await client.get("/readyz")).status == 200

    import json

    data = json.dumps(p.body(p.shortlink_referral())).encode()
    response = await client.post("/webhook", data=data, headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, data)})
    assert response.status == 200

    worker = Worker(**worker_settings(tls), burst=True, handle_signals=False)
    await worker.main()
    await worker.close()

    redis = Redis.from_url(url)
    try:
        assert await redis.xlen("fb:events:referral") == 1
    finally:
        await redis.aclose()

    wrong = replace(settings, redis_url=url.replace(PASSWORD, "wrong"))
    refused = await aiohttp_client(create_app(wrong))
    assert (await refused.get("/readyz")).status == 503
