"""docker-compose.yml is valid, and the commands its services run work as plain processes.

There is no Docker engine on the test machines, so the file is checked against the Compose
specification's JSON schema, the environment each container would get is computed as Compose
does (`.env` through `env_file`, then `environment` interpolated from `.env` on top), with the
values `.env.example` gives and with them changed, and each service's command is started here
with that environment (REDIS_URL pointing at the test Redis instead of `redis`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.signature import sign
from shared.attribution import touch_count
from shared.sentinel import parse
from shared.settings import _SPEC, Settings
from tests.redis_server import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


class ComposeError(Exception):
    """What `docker compose` would stop with (a `${VAR:?message}` whose VAR is unset)."""


def read_dotenv(text: str) -> dict[str, str]:
    """A .env file as Compose reads it: KEY=VALUE lines, `#` comments (also after an unquoted
    value), quotes around a value removed."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if value[:1] in {"'", '"'} and value.endswith(value[0]) and len(value) > 1:
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        out[key.strip()] = value
    return out


_REFERENCE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, ${VAR+alt}, and $$ for a dollar sign."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match["named"]:
            return variables.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        assert braced is not None, f"Compose would reject {match.group(0)!r}"
        found = variables.get(braced["name"])
        op = braced["op"] or ""
        unset = found is None or (op.startswith(":") and found == "")
        if op.endswith("-"):
            return braced["arg"] if unset else str(found)
        if op.endswith("?"):
            if unset:
                raise ComposeError(braced["arg"])
            return str(found)
        if op.endswith("+"):
            return "" if unset else braced["arg"]
        return found or ""

    return _REFERENCE.sub(substitute, value)


def container_env(service: str, dotenv: dict[str, str]) -> dict[str, str]:
    """The variables a service's container gets when `.env` holds `dotenv` (and the shell sets
    none): its env_file first, `environment` over it, interpolated from `.env`."""
    spec = SERVICES[service]
    env: dict[str, str] = {}
    for entry in spec.get("env_file", []):
        path = entry["path"] if isinstance(entry, dict) else entry
        assert path == ".env", f"{service}: env_file {path} is not modelled here"
        env.update(dotenv)
    for key, value in spec.get("environment", {}).items():
        env[key] = interpolate(str(value), dotenv)
    return env


def published_ports(service: str, dotenv: dict[str, str]) -> list[tuple[int, int]]:
    """(host port, container port) of each `ports` entry, interpolated from `.env`."""
    pairs = []
    for entry in SERVICES[service].get("ports", []):
        host, _, inside = interpolate(str(entry), dotenv).rpartition(":")
        pairs.append((int(host.rpartition(":")[2]), int(inside)))
    return pairs


def probed_port(service: str) -> int:
    """The port the service's health check asks on, inside the container."""
    command = " ".join(SERVICES[service]["healthcheck"]["test"])
    found = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)/", command)
    assert found is not None, command
    return int(found.group(1))


EXAMPLE = read_dotenv((ROOT / ".env.example").read_text())
OWN_VALUES = {
    "FB_APP_SECRET": "an-app-secret-of-my-own",
    "FB_VERIFY_TOKEN": "a-verify-token-of-my-own",
    "API_TOKEN": "an-api-token-of-my-own",
}
CHANGED = {
    **EXAMPLE, **OWN_VALUES,
    "INGEST_PORT": "9091", "INGEST_HOST": "127.0.0.1", "REDIS_URL": "redis://elsewhere:6379/0",
    "WORKER_METRICS_PORT": "9200", "INGEST_METRICS_PORT": "8080",
}
"""A `.env` copied from `.env.example` and edited: own secrets, another port, and settings that
make no sense inside a container."""


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
    for name in ("FB_APP_SECRET", "FB_VERIFY_TOKEN", "API_TOKEN"):
        assert EXAMPLE.get(name), name


@pytest.mark.parametrize("dotenv", [EXAMPLE, CHANGED], ids=["as-in-env-example", "changed"])
def test_the_ingest_listens_where_compose_publishes_and_probes_it(dotenv: dict[str, str]) -> None:
    settings = Settings.best_effort(container_env("ingest", dotenv))
    host_port = int(dotenv.get("INGEST_PORT", "8080"))
    assert published_ports("ingest", dotenv) == [(host_port, settings.ingest_port)]
    assert probed_port("ingest") == settings.ingest_port == 8080
    assert settings.ingest_host == "0.0.0.0"  # reachable through the port mapping
    # /metrics has a port of its own, published nowhere.
    assert settings.ingest_metrics_port == 9100
    assert all(inside != 9100 for _, inside in published_ports("ingest", dotenv))
    for service in ("ingest", "worker"):
        env = container_env(service, dotenv)
        assert env["REDIS_URL"] == "redis://redis:6379/0", service
        assert {k: env[k] for k in OWN_VALUES} == {k: dotenv[k] for k in OWN_VALUES}, service
    assert container_env("worker", dotenv)["WORKER_METRICS_PORT"] == "9100"


def test_compose_stops_with_a_message_when_env_lacks_a_secret() -> None:
    for name in OWN_VALUES:
        dotenv = {k: v for k, v in CHANGED.items() if k != name}
        with pytest.raises(ComposeError, match=f"set {name} in .env"):
            container_env("ingest", dotenv)


def _process_env(
    service: str, dotenv: dict[str, str], redis_url: str, port: int, metrics_port: int = 0
) -> dict[str, str]:
    """`container_env` for a process on this machine: REDIS_URL is the test Redis, and the
    container's own ports are free ones here: 8080 is `port`, the ingest's 9100 `metrics_port`
    (the worker's 9100 is turned off)."""
    env = {k: v for k, v in os.environ.items() if k not in _SPEC}
    env.update(container_env(service, dotenv))
    if service == "ingest":
        assert (env["INGEST_PORT"], env["INGEST_METRICS_PORT"]) == ("8080", "9100")
        env.update(INGEST_PORT=str(port), INGEST_METRICS_PORT=str(metrics_port))
    env.update(
        REDIS_URL=redis_url,
        WORKER_METRICS_PORT="0",
        WORKER_POLL_DELAY_SECONDS="0.01",
        LOG_LEVEL="warning",
    )
    return env


def _here(command: list[str]) -> list[str]:
    """A service's command with `python` meaning this interpreter (the image's is on PATH)."""
    return [sys.executable if part == "python" else part for part in command]


def test_the_services_refuse_to_start_with_the_placeholders_of_env_example(
    redis_proc: RedisProcess,
) -> None:
    for service in ("ingest", "worker"):
        env = _process_env(service, EXAMPLE, redis_proc.url, free_port())
        done = subprocess.run(_here(SERVICES[service]["command"]), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (service, done.stdout, done.stderr)
        assert "FB_APP_SECRET still holds a change-me-... placeholder" in done.stderr, service


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.slow
def test_service_commands_run_the_system_as_plain_processes(redis_proc: RedisProcess) -> None:
    import redis

    client = redis.Redis.from_url(redis_proc.url)
    client.flushall()
    port, metrics_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("ingest", "worker"):
            procs.append(
                subprocess.Popen(
                    _here(SERVICES[name]["command"]),
                    cwd=ROOT,
                    env=_process_env(name, CHANGED, redis_proc.url, port, metrics_port),
                )
            )
        deadline = time.monotonic() + 20
        while _get(f"http://127.0.0.1:{port}/readyz") != 200:
            assert time.monotonic() < deadline, "ingest never became ready"
            time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{metrics_port}/metrics") == 200
        assert _get(f"http://127.0.0.1:{port}/metrics") == 404

        secret = CHANGED["FB_APP_SECRET"].split(",")[0]
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

        # The services' own health checks, as compose would run them (port 8080 mapped).
        ingest_check: list[str] = _here(
            [
                part.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
                for part in SERVICES["ingest"]["healthcheck"]["test"][1:]
            ]
        )
        env = _process_env("worker", CHANGED, redis_proc.url, port)
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


# --- the ha profile ---------------------------------------------------------------------------

HA = {name for name, spec in SERVICES.items() if "ha" in spec.get("profiles", [])}
HA_URL = re.search(r"FBHOOK_REDIS_URL=(\S+)", (ROOT / "docker-compose.yml").read_text())[1]  # type: ignore[index]
"""The URL the file's header comment gives for the ha profile."""


def config_text(name: str) -> str:
    return str(COMPOSE["configs"][name]["content"])


def test_the_ha_profile_is_two_replicas_and_three_sentinels_around_redis() -> None:
    assert {"redis-2", "redis-3", "sentinel-1", "sentinel-2", "sentinel-3"} == HA
    assert all("profiles" not in SERVICES[name] for name in ("redis", "ingest", "worker"))
    for name in sorted(HA):
        spec = SERVICES[name]
        assert spec["healthcheck"]["test"][0] == "CMD-SHELL", name
        assert spec["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert spec["volumes"] == [f"{name}-data:/data"], name
        assert f"announce-ip {name}" in spec["command"][-1], name
    assert "replicaof redis 6379" in config_text("replica.conf").splitlines()
    sentinel = config_text("sentinel.conf").splitlines()
    parsed = parse(HA_URL)
    assert f"sentinel monitor {parsed.service} redis 6379 2" in sentinel
    assert parsed.sentinels == (("sentinel-1", 26379), ("sentinel-2", 26379),
                                ("sentinel-3", 26379))
    assert "--replica-announce-ip redis" in " ".join(SERVICES["redis"]["command"])


def test_fbhook_redis_url_in_env_points_the_services_at_the_sentinels() -> None:
    for service in ("ingest", "worker"):
        env = container_env(service, {**CHANGED, "FBHOOK_REDIS_URL": HA_URL, "ACK_REPLICAS": "1"})
        settings = Settings.best_effort(env)
        assert (settings.redis_url, settings.ack_replicas) == (HA_URL, 1), service


def _local_ha(tmp: Path) -> tuple[dict[str, int], list[tuple[list[str], Path]]]:
    """The ha profile's servers as commands for this machine, each with the directory to run
    in (the image's is /data): every host is 127.0.0.1, every server gets a free port, /data
    and the mounted configs are directories under `tmp`."""
    ports = {name: free_port() for name in ("redis", *sorted(HA))}

    def local(text: str) -> str:
        text = re.sub(r"\b(redis(?:-\d)?) 6379\b", lambda m: f"127.0.0.1 {ports[m[1]]}", text)
        return re.sub(r"(announce-ip) (redis|sentinel)-\d", r"\1 127.0.0.1", text)

    etc = tmp / "etc"
    etc.mkdir()
    for name in COMPOSE["configs"]:
        (etc / name).write_text(local(config_text(name)))
    commands = []
    for name, port in ports.items():
        data = tmp / name
        data.mkdir()
        command = SERVICES[name]["command"]
        if name == "redis":
            argv = [*command[:-1], "127.0.0.1", "--dir", str(data)]
        else:
            script = local(command[-1]).replace("/etc/fbhook", str(etc))
            script = script.replace("/data", str(data)).replace("docker-entrypoint.sh ", "")
            argv = [*command[:-1], script]
        argv[-1] += "" if name == "redis" else f" --port {port} --bind 127.0.0.1"
        if name == "redis":
            argv += ["--port", str(port), "--bind", "127.0.0.1"]
        commands.append((argv, data))
    return ports, commands


def _healthy(name: str, port: int) -> bool:
    check = interpolate(SERVICES[name]["healthcheck"]["test"][1], {})
    check = check.replace("-p 26379", f"-p {port}").replace("redis-cli ", f"redis-cli -p {port} ")
    check = check.replace(f"-p {port} -p {port}", f"-p {port}")
    return subprocess.run(["sh", "-c", check], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_the_ha_profile_runs_as_plain_processes_and_a_failover_is_recorded_in_its_configs(
    tmp_path: Path,
) -> None:
    import redis

    ports, commands = _local_ha(tmp_path)
    procs = []

    def start(argv: list[str], cwd: Path) -> None:
        with (cwd / "log").open("wb") as log:
            procs.append(subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT))

    def logs() -> str:
        return "".join(f"\n--- {name}\n" + (tmp_path / name / "log").read_text()
                       for name in sorted(HA))

    def quorum_and_one_replica(name: str) -> bool:
        with redis.Redis(port=ports[name]) as sentinel:
            try:
                sentinel.execute_command("SENTINEL", "CKQUORUM", "fbhook")
            except redis.ResponseError:
                return False
            return len(sentinel.execute_command("SENTINEL", "REPLICAS", "fbhook")) == 1

    sentinels = sorted(name for name in HA if name.startswith("sentinel"))
    late = tmp_path / "redis-3"
    try:
        for argv, cwd in commands:
            if cwd != late:
                start(argv, cwd)
        # With one replica up the sentinels can vote, but a failover now would leave redis-3
        # unseen, so they are not healthy yet.
        deadline = time.monotonic() + 30
        while not all(_healthy("redis-2", ports["redis-2"])
                      and quorum_and_one_replica(name) for name in sentinels):
            assert time.monotonic() < deadline, "redis-2 never got known to the sentinels"
            time.sleep(0.2)
        assert [_healthy(name, ports[name]) for name in sentinels] == [False] * 3
        start(*next(command for command in commands if command[1] == late))
        deadline = time.monotonic() + 30
        while not all(_healthy(name, ports[name]) for name in sorted(HA)):
            assert time.monotonic() < deadline, "the ha profile's health checks never passed"
            time.sleep(0.2)
        with redis.Redis(port=ports["sentinel-1"]) as sentinel:
            assert sentinel.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fbhook") == [b"127.0.0.1",
                                                                     str(ports["redis"]).encode()]
            deadline = time.monotonic() + 20
            while True:  # NOGOODSLAVE until the sentinels have looked at the replicas
                try:
                    sentinel.execute_command("SENTINEL", "FAILOVER", "fbhook")
                    break
                except redis.ResponseError as exc:
                    assert time.monotonic() < deadline, str(exc)
                    time.sleep(0.2)
            replicas = {ports["redis-2"]: "redis-2", ports["redis-3"]: "redis-3"}
            deadline = time.monotonic() + 20
            while True:
                _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                      "fbhook")
                if int(port) in replicas:
                    break
                assert time.monotonic() < deadline, "no replica was promoted"
                time.sleep(0.1)
        port = int(port)
        promoted = replicas.pop(port)
        [other] = replicas.values()
        # Sentinel's CONFIG REWRITE kept each role in the server's own /data/redis.conf. The
        # healthy sentinel knew both replicas, so it repoints the other one as part of the
        # failover, not failover-timeout (60 s) later (+fix-slave-config, by another sentinel).
        deadline = time.monotonic() + 20
        while f"replicaof 127.0.0.1 {port}" not in (tmp_path / other / "redis.conf").read_text():
            assert time.monotonic() < deadline, (
                f"{other} was not pointed at {promoted}:\n"
                + (tmp_path / other / "redis.conf").read_text() + logs())
            time.sleep(0.1)
        assert "replicaof" not in (tmp_path / promoted / "redis.conf").read_text()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
