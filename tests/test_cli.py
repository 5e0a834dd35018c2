"""The `fbhook` command-line tool, run as real processes against a real Redis and a live ingest."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio import Redis

from cli import payloads
from cli.dev import DEV_DEFAULTS
from cli.main import build_parser
from ingest.envelope import parse
from ingest.signature import SignatureVerifier
from shared.errors import ConfigError
from shared.settings import _SPEC, Settings, environ_with_defaults
from tests.conftest import API_TOKEN, SECRET, VERIFY_TOKEN, stream_rows
from tests.redis_server import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any of the project's settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _SPEC}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def full_env(redis_url: str, **extra: str) -> dict[str, str]:
    return clean_env(
        FB_APP_SECRET=SECRET.decode(), FB_VERIFY_TOKEN=VERIFY_TOKEN, API_TOKEN=API_TOKEN,
        REDIS_URL=redis_url, **extra,
    )


def fbhook_sync(*args: str, env: dict[str, str], timeout: float = 60) -> Result:
    done = subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return Result(done.returncode, done.stdout, done.stderr)


async def fbhook(*args: str, env: dict[str, str], wait_s: float = 60) -> Result:
    """Run the CLI without blocking the event loop (the test's ingest server runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), wait_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def expected(users: int, first_user: int = 0) -> list[payloads.SimEvent]:
    """What `fbhook simulate --users N` sends (ids and touches; mids and times differ)."""
    return list(payloads.scenario_events(users, first_user=first_user, start_ms=0, run="x"))


def check_touch(touch: dict[str, Any], want: payloads.ExpectedTouch) -> None:
    got = {k: touch[k] for k in ("via", "source", "ref", "ad_id", "product_id", "referer_uri")}
    assert got == {
        "via": want.via, "source": want.source, "ref": want.ref, "ad_id": want.ad_id,
        "product_id": want.product_id, "referer_uri": want.referer_uri,
    }


# --- payloads ------------------------------------------------------------------------------


def test_simulated_events_are_signed_and_route_to_the_right_kinds() -> None:
    events = expected(6)
    assert [e.scenario for e in events] == list(payloads.SCENARIOS)
    data, headers = payloads.signed(payloads.envelope([e.item for e in events]), SECRET)
    assert SignatureVerifier((SECRET,)).verify(headers["X-Hub-Signature-256"], data)
    assert not SignatureVerifier((b"other",)).verify(headers["X-Hub-Signature-256"], data)
    kinds = [routed.kind for routed in parse(data, 0)]
    assert kinds == ["referral", "referral", "postback", "referral", "message", "message"]
    chat = events[3].item
    assert chat["sender"] == {"user_ref": events[3].user}
    assert chat["referral"]["source"] == "CUSTOMER_CHAT_PLUGIN"
    assert events[4].item["message"]["referral"] == {"product": {"id": events[4].touch.product_id}}  # type: ignore[union-attr]
    assert events[1].item["referral"]["ads_context_data"]["ad_title"]
    assert events[5].touch is None


def test_same_user_number_is_the_same_user_in_every_run() -> None:
    a = payloads.scenario_event("ad", 7, timestamp=1, run="a")
    b = payloads.scenario_event("ad", 7, timestamp=2, run="b")
    assert a.user == b.user and a.touch == b.touch
    with pytest.raises(ValueError, match="unknown scenario"):
        payloads.scenario_event("nope", 1, timestamp=1, run="a")


# --- settings helpers ------------------------------------------------------------------------


def test_tool_settings_need_no_secrets_and_take_a_redis_url() -> None:
    settings = Settings.for_tools({}, redis_url="redis://127.0.0.1:1/2")
    assert settings.redis_url == "redis://127.0.0.1:1/2"
    assert settings.fb_app_secrets == ()
    assert settings.redacted()["api_token"] == "<unset>"
    with pytest.raises(ConfigError, match="--redis-url"):
        Settings.for_tools({}, redis_url="http://nope")
    with pytest.raises(ConfigError, match="INGEST_PORT"):
        Settings.for_tools({"INGEST_PORT": "0"})


def test_problems_lists_every_bad_variable() -> None:
    env = {"FB_VERIFY_TOKEN": "short", "INGEST_PORT": "x", "HISTORY_CAP": "3"}
    problems = Settings.problems(env)
    assert sorted(problems) == ["API_TOKEN", "FB_APP_SECRET", "FB_VERIFY_TOKEN", "INGEST_PORT"]
    assert problems["FB_APP_SECRET"] == "FB_APP_SECRET is required but not set"
    assert "8 characters" in problems["FB_VERIFY_TOKEN"]
    assert Settings.problems(full_env("redis://127.0.0.1:1/0")) == {}
    shown = Settings.best_effort(env)
    assert shown.history_cap == 3 and shown.ingest_port == 8080 and shown.fb_verify_token == ""


def test_environ_with_defaults_fills_only_what_is_unset() -> None:
    env, applied = environ_with_defaults({"A": "1", "B": "2", "C": "3"}, {"A": "x", "C": ""})
    assert env == {"A": "x", "B": "2", "C": "3"}
    assert applied == ["B", "C"]


# --- help ------------------------------------------------------------------------------------


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    commands = [
        ["serve"], ["worker"], ["dev"], ["check-config"], ["simulate"], ["attribution", "get"],
        ["attribution", "export"], ["events", "tail"], ["events", "list"],
        ["dead-letters", "list"], ["dead-letters", "replay"], ["dead-letters", "purge"],
    ]
    for words in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*words, "--help"])
        assert exit_info.value.code == 0


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("fbhook")
    assert script.exists(), "run `pip install -e .`: pyproject's [project.scripts] makes it"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    for command in ("serve", "worker", "dev", "check-config", "simulate", "attribution",
                    "events", "dead-letters"):
        assert command in done.stdout


def subcommands() -> list[str]:
    """Every top-level command of `fbhook`, from its parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_every_command_is_in_the_readme_list_and_the_cli_docs_table() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = readme.split("- **`fbhook`**, installed with the package:", 1)[1].split("\n- ", 1)[0]
    table = (ROOT / "docs" / "cli.md").read_text().split("\n\n|", 1)[1].split("\n\n", 1)[0]
    for command in subcommands():
        assert f"`{command}" in listed, f"README's command list lacks {command}"
        assert f"[`{command}" in table, f"docs/cli.md's table lacks {command}"


def test_the_readme_opens_with_the_two_commands_of_a_fresh_machine() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    commands = [line for line in lines if not line.startswith("#")]
    assert commands == ["make dev", "make test"]
    about_tests = " ".join(lines[lines.index("make dev") + 1:lines.index("make test")])
    assert "../shared/corpus/cases" in about_tests and "FBHOOK_CORPUS" in about_tests
    targets = re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M)
    assert "dev" in targets and "test" in targets


# --- simulate and attribution ------------------------------------------------------------------


async def test_simulate_then_attribution_get_and_export(
    client: Any, drain: Any, redis: Redis, redis_proc: RedisProcess
) -> None:
    url = str(client.make_url("/webhook"))
    env = clean_env(FB_APP_SECRET=f"{SECRET.decode()},previous")
    sent = await fbhook("simulate", "--url", url, "--users", "12", env=env)
    assert sent.code == 0, sent
    assert sent.out.count("HTTP 200 EVENT_RECEIVED") == 12
    assert "12 x HTTP 200" in sent.out
    assert "FB_APP_SECRET" in sent.err
    await drain()

    want = expected(12)
    tools = clean_env(REDIS_URL=redis_proc.url)
    for event in want:
        got = await fbhook("attribution", "get", event.user, "--space", event.space, env=tools)
        if event.touch is None:
            assert got.code == 1 and "no attribution" in got.err, got
            continue
        assert got.code == 0, got
        record = json.loads(got.out)
        assert record["user"] == event.key and record["touches"] == 1
        check_touch(record["last"], event.touch)
        check_touch(record["first"], event.touch)
        if event.scenario == "ad":
            assert record["last"]["ads_context_data"]["ad_title"]
            assert record["vars"]["_fbRefAdId"] == event.touch.ad_id

    with_touch = {e.key: e.touch for e in want if e.touch is not None}
    jsonl = await fbhook("attribution", "export", "--format", "jsonl", env=tools)
    assert jsonl.code == 0, jsonl
    records = [json.loads(line) for line in jsonl.out.splitlines()]
    assert sorted(r["user"] for r in records) == sorted(with_touch)
    for record in records:
        check_touch(record["last"], with_touch[record["user"]])  # type: ignore[arg-type]

    exported = await fbhook("attribution", "export", "--format", "csv",
                            "--redis-url", redis_proc.url, env=clean_env())
    assert exported.code == 0, exported
    rows = list(csv.DictReader(io.StringIO(exported.out)))
    assert sorted(r["user"] for r in rows) == sorted(with_touch)
    for row in rows:
        touch = with_touch[row["user"]]
        assert touch is not None
        assert row["touches"] == "1"
        assert row["last_via"] == row["first_via"] == touch.via
        assert row["last_source"] == (touch.source or "")
        assert row["last_ref"] == (touch.ref or "")
        assert row["last_ad_id"] == (touch.ad_id or "")
        assert row["last_product_id"] == (touch.product_id or "")
        assert row["last_referer_uri"] == (touch.referer_uri or "")
        if touch.source == "ADS":
            assert json.loads(row["last_ads_context_data"])["ad_title"]

    # Running again brings the same users back: a second touch each, nothing taken as duplicate.
    again = await fbhook("simulate", "--url", url, "--users", "12", "--batch", "5", env=env)
    assert again.code == 0, again
    assert "12 events in 3 requests" in again.out
    await drain()
    record = json.loads((await fbhook("attribution", "get", want[0].user, env=tools)).out)
    assert record["touches"] == 2 and len(record["history"]) == 2


async def test_export_streams_many_users_over_small_batches(
    client: Any, drain: Any, redis: Redis, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    url = str(client.make_url("/webhook"))
    sent = await fbhook("simulate", "--url", url, "--users", "300", "--batch", "25",
                        "--secret", SECRET.decode(), "--progress", env=clean_env())
    assert sent.code == 0, sent
    assert "sent 300 events in 12 requests" in sent.out
    assert "sent 300/300 events" in sent.err  # the progress line
    assert "HTTP 200 EVENT_RECEIVED" not in sent.out  # big runs print a summary only
    await drain()
    out = tmp_path / "export.csv"
    done = await fbhook("attribution", "export", "--format", "csv", "--batch", "7",
                        "--progress", "-o", str(out), "--redis-url", redis_proc.url,
                        env=clean_env())
    assert done.code == 0, done
    assert "exported 250 users" in done.err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == len({r["user"] for r in rows}) == 250  # 300 users, 1 in 6 only texted
    assert {r["last_source"] for r in rows} == {"SHORTLINK", "ADS", "CUSTOMER_CHAT_PLUGIN", ""}


async def test_simulate_reports_bad_signatures_and_unreachable_endpoints(client: Any) -> None:
    url = str(client.make_url("/webhook"))
    bad = await fbhook("simulate", "--url", url, "--users", "2", "--secret", "wrong-secret",
                       env=clean_env())
    assert bad.code == 1, bad
    assert bad.out.count("-> HTTP 403 invalid or missing X-Hub-Signature-256") == 2
    assert "2 x HTTP 403" in bad.out
    nowhere = f"http://127.0.0.1:{free_port()}/webhook"
    down = await fbhook("simulate", "--url", nowhere, "--users", "2", env=clean_env())
    assert down.code == 1, down
    assert "cannot reach" in down.err and "fbhook dev" in down.err


# --- serve and worker ----------------------------------------------------------------------


async def test_worker_burst_processes_the_queue_and_exits(
    post: Any, redis: Redis, redis_proc: RedisProcess
) -> None:
    for event in expected(6):
        assert (await post(payloads.envelope([event.item]))).status == 200
    assert await redis.zcard("fb:queue") > 0
    done = await fbhook("worker", "--burst", env=full_env(redis_proc.url, LOG_LEVEL="warning"))
    assert done.code == 0, done
    assert await redis.zcard("fb:queue") == 0
    assert len(await stream_rows(redis)) == 6
    # A worker that has exited removes its health-check key: the health check says so.
    check = await fbhook("worker", "--check", env=full_env(redis_proc.url))
    assert check.code == 1 and "unhealthy" in check.err, check


def test_serve_answers_until_sigterm(redis_proc: RedisProcess, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([*CLI, "serve"], cwd=ROOT, stdout=log, stderr=log,
                            env=full_env(redis_proc.url, INGEST_HOST="127.0.0.1",
                                         INGEST_PORT=str(port)))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert http_get(f"http://127.0.0.1:{port}/readyz") == (200, {"status": "ready"})
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# --- events ----------------------------------------------------------------------------------


async def test_events_tail_prints_existing_and_new_entries(
    post: Any, drain: Any, redis: Redis, redis_proc: RedisProcess
) -> None:
    for event in expected(6):
        assert (await post(payloads.envelope([event.item]))).status == 200
    await drain()
    env = clean_env(REDIS_URL=redis_proc.url)
    old = await fbhook("events", "tail", "referral", "message", "--from-start", "--count", "5",
                       env=env)
    assert old.code == 0, old
    lines = [json.loads(line) for line in old.out.splitlines()]
    assert len(lines) == 5
    assert {line["stream"] for line in lines} == {"fb:events:referral", "fb:events:message"}
    for line in lines:
        assert line["event"]["kind"] == line["kind"] == line["stream"].rsplit(":", 1)[1]
        assert isinstance(line["timestamp"], int)
    referrals = [line for line in lines if line["kind"] == "referral"]
    assert {r["event"]["referral"]["source"] for r in referrals} == {
        "SHORTLINK", "ADS", "CUSTOMER_CHAT_PLUGIN"}

    listing = await fbhook("events", "list", env=env)
    assert re.search(r"fb:events:referral\s+3\s", listing.out), listing

    # Without --from-start only what arrives after the start is printed.
    proc = await asyncio.create_subprocess_exec(
        *CLI, "events", "tail", "postback", "--count", "1", cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    await wait_for_blocked_xread(redis, proc)
    fresh = payloads.scenario_event("get-started", 99, timestamp=int(time.time() * 1000),
                                    run="tail")
    assert (await post(payloads.envelope([fresh.item]))).status == 200
    await drain()
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    [line] = [json.loads(x) for x in out.decode().splitlines()]
    assert line["sender"] == fresh.user and line["kind"] == "postback"


async def wait_for_blocked_xread(redis: Redis, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        clients = await redis.client_list()
        if any(c.get("cmd") == "xread" for c in clients):
            return
        assert proc.returncode is None, "events tail exited early"
        await asyncio.sleep(0.05)
    raise AssertionError("events tail never blocked on XREAD")


# --- check-config ----------------------------------------------------------------------------


def test_check_config_passes_and_hides_secrets(redis_proc: RedisProcess) -> None:
    done = fbhook_sync("check-config", env=full_env(redis_proc.url))
    assert done.code == 0, done
    assert "answers PING" in done.out and "check-config: OK" in done.out
    assert "fb_app_secrets" in done.out and "<set>" in done.out
    for secret in (SECRET.decode(), VERIFY_TOKEN, API_TOKEN):
        assert secret not in done.out + done.err


def test_check_config_names_a_missing_variable(redis_proc: RedisProcess) -> None:
    env = full_env(redis_proc.url)
    del env["FB_APP_SECRET"]
    done = fbhook_sync("check-config", env=env)
    assert done.code == 1, done
    assert "FB_APP_SECRET is required but not set" in done.out
    assert "answers PING" in done.out  # the rest is still checked
    assert "check-config: FAILED" in done.out


def test_check_config_reports_every_bad_value_and_an_unreachable_redis() -> None:
    env = clean_env(FB_APP_SECRET="s", FB_VERIFY_TOKEN="short", API_TOKEN="long-enough-token",
                    INGEST_PORT="99999", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    done = fbhook_sync("check-config", "--timeout", "0.5", env=env)
    assert done.code == 1, done
    assert "FB_VERIFY_TOKEN must be at least 8 characters long" in done.out
    assert "INGEST_PORT must be between 1 and 65535" in done.out
    assert "does NOT answer" in done.out


def env_example() -> dict[str, str]:
    """The variables `.env.example` sets, as a copied `.env` would give them."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_check_config_refuses_the_placeholders_of_env_example(redis_proc: RedisProcess) -> None:
    example = env_example()
    done = fbhook_sync("check-config", env=clean_env(**example, REDIS_URL=redis_proc.url))
    assert done.code == 1, done
    refused = [line for line in done.out.splitlines() if "placeholder" in line]
    assert refused == [
        f"  - {name} still holds a change-me-... placeholder from .env.example: set your own value"
        for name in ("FB_APP_SECRET", "FB_VERIFY_TOKEN", "API_TOKEN")
    ], done
    # One placeholder left among rotated secrets is refused too.
    rotated = f"a-real-secret,{example['FB_APP_SECRET']}"
    with pytest.raises(ConfigError, match="FB_APP_SECRET still holds a change-me"):
        Settings.from_env({**example, "FB_APP_SECRET": rotated, "FB_VERIFY_TOKEN": VERIFY_TOKEN,
                           "API_TOKEN": API_TOKEN})


def test_the_local_defaults_of_dev_are_accepted_settings() -> None:
    settings = Settings.from_env(DEV_DEFAULTS)
    assert settings.api_token == DEV_DEFAULTS["API_TOKEN"]


# --- dead letters ----------------------------------------------------------------------------


async def bury_three(redis: Redis, settings: Settings) -> list[str]:
    """Three real dead letters, as a worker writes them after the last try."""
    from workers.deadletters import bury

    ids = []
    for n in range(3):
        event = payloads.scenario_event("text", 40 + n, timestamp=1_700_000_000_000 + n,
                                        run="dead")
        data, _ = payloads.signed(payloads.envelope([event.item]), SECRET)
        [routed] = parse(data, 1_700_000_000_000)
        await bury(redis, routed.kind, routed.id, routed.blob.decode(), "RuntimeError: boom", 3,
                   settings.dedupe_ttl_s)
        ids.append(routed.id)
    return ids


async def test_dead_letters_list_replay_and_purge(
    redis: Redis, settings: Settings, drain: Any, redis_proc: RedisProcess
) -> None:
    event_ids = await bury_three(redis, settings)
    env = clean_env(REDIS_URL=redis_proc.url)
    listed = await fbhook("dead-letters", "list", env=env)
    assert listed.code == 0, listed
    assert len(listed.out.splitlines()) == 3
    assert all(i in listed.out for i in event_ids) and "RuntimeError: boom" in listed.out
    as_json = [json.loads(x) for x in (await fbhook("dead-letters", "list", "--json",
                                                    env=env)).out.splitlines()]
    assert [x["event_id"] for x in as_json] == event_ids
    assert all(json.loads(x["payload"])["id"] == x["event_id"] for x in as_json)
    entries = [x["entry_id"] for x in as_json]

    refused = await fbhook("dead-letters", "replay", env=env)
    assert refused.code == 1 and "--all" in refused.err, refused

    replayed = await fbhook("dead-letters", "replay", entries[0], env=env)
    assert replayed.code == 0, replayed
    assert "1 dead letter queued again" in replayed.out
    await drain()
    assert [r["id"] for r in await stream_rows(redis, "message")] == [event_ids[0]]
    assert await redis.xlen("fb:dead") == 2

    purged = await fbhook("dead-letters", "purge", entries[1], "0-1", env=env)
    assert purged.code == 1, purged  # one of the two ids was not there
    assert "1 dead letter purged" in purged.out and "1 of the given ids" in purged.out
    assert await redis.xlen("fb:dead") == 1

    rest = await fbhook("dead-letters", "replay", "--all", env=env)
    assert "1 dead letter queued again" in rest.out
    await drain()
    assert len(await stream_rows(redis, "message")) == 2
    await bury_three(redis, settings)
    gone = await fbhook("dead-letters", "purge", "--all", env=env)
    assert gone.code == 0 and "3 dead letters purged" in gone.out, gone
    assert (await fbhook("dead-letters", "list", env=env)).out.strip() == "no dead letters"


# --- dev -------------------------------------------------------------------------------------


class Dev:
    """`fbhook dev` as a subprocess, its stdout read line by line in a thread."""

    def __init__(self, env: dict[str, str], port: int, log: Path, *extra: str,
                 command: list[str] = CLI, cwd: Path = ROOT) -> None:
        self.port = port
        self.log = log
        self.cwd = cwd
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [*command, "dev", "--port", str(port), *extra], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=self._log_file, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"dev exited early:\n{self.report()}"
                continue
            self.out.append(line)
            if text in line:
                return line
        raise AssertionError(f"dev never printed {text!r}:\n{self.report()}")

    def report(self) -> str:
        return "".join(self.out) + "\n--- stderr\n" + self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log_file.close()


@pytest.fixture
def dev_run(tmp_path: Path) -> Iterator[Any]:
    started: list[Dev] = []

    def start(env: dict[str, str], *extra: str, command: list[str] = CLI) -> Dev:
        """`fbhook dev` run in its own directory, tmp_path/project, as a user would in theirs."""
        cwd = tmp_path / "project"
        cwd.mkdir(exist_ok=True)
        dev = Dev(env, free_port(), tmp_path / f"dev-{len(started)}.log", *extra,
                  command=command, cwd=cwd)
        started.append(dev)
        return dev

    yield start
    for dev in started:
        dev.stop()


def http_get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("how", ["embedded-redis-sigint", "redis-url-sigterm"])
def test_dev_runs_everything_and_stops_cleanly(
    how: str, dev_run: Any, redis_proc: RedisProcess
) -> None:
    embedded = how.startswith("embedded")
    env = clean_env() if embedded else clean_env(REDIS_URL=redis_proc.url)
    if not embedded:
        with redis_sync.Redis.from_url(redis_proc.url) as client:
            client.flushall()
    dev = dev_run(env)
    dev.wait_for("Press Ctrl-C to stop.")
    banner = "".join(dev.out)
    base = f"http://127.0.0.1:{dev.port}"
    assert f"{base}/webhook" in banner
    assert f"{sys.executable} -m cli simulate" in banner and "NOT for production" in banner
    assert DEV_DEFAULTS["FB_APP_SECRET"] in banner
    redis_line = re.search(r"redis\s+(redis://127\.0\.0\.1:(\d+)/0)(.*)", banner)
    assert redis_line is not None, banner
    redis_url, redis_port = redis_line.group(1), int(redis_line.group(2))
    assert (redis_url != redis_proc.url) == embedded
    assert http_get(base + "/healthz") == (200, {"status": "ok"})

    sent = fbhook_sync("simulate", "--url", f"{base}/webhook", "--users", "6", env=clean_env())
    assert sent.code == 0, sent
    ad = expected(6)[1]
    deadline = time.monotonic() + 30
    status, record = http_get(f"{base}/attribution/{ad.user}", DEV_DEFAULTS["API_TOKEN"])
    while status == 404 and time.monotonic() < deadline:
        time.sleep(0.1)
        status, record = http_get(f"{base}/attribution/{ad.user}", DEV_DEFAULTS["API_TOKEN"])
    assert status == 200, dev.report()
    assert record["last"]["ad_id"] == ad.touch.ad_id and record["last"]["source"] == "ADS"  # type: ignore[union-attr]

    data_dir = re.search(r"data in (\S+),", redis_line.group(3))
    dev.proc.send_signal(signal.SIGINT if embedded else signal.SIGTERM)
    assert dev.proc.wait(60) == 0, dev.report()
    assert "fbhook dev: stopped" in dev.log.read_text()
    assert refuses_connections(dev.port)
    if embedded:
        assert refuses_connections(redis_port)
        assert data_dir is not None and not Path(data_dir.group(1)).exists()
    else:
        with redis_sync.Redis.from_url(redis_proc.url) as client:
            assert client.ping()  # not ours to stop


def test_dev_keeps_data_in_a_data_dir_across_runs(dev_run: Any, tmp_path: Path) -> None:
    data = tmp_path / "fbhook-dev-data"
    first = dev_run(clean_env(), "--data-dir", str(data))
    first.wait_for("Press Ctrl-C to stop.")
    assert "kept across runs" in "".join(first.out)
    sent = fbhook_sync("simulate", "--url", f"http://127.0.0.1:{first.port}/webhook",
                       "--users", "1", env=clean_env())
    assert sent.code == 0, sent
    user = expected(1)[0].user
    url = f"http://127.0.0.1:{first.port}/attribution/{user}"
    deadline = time.monotonic() + 30
    while http_get(url, DEV_DEFAULTS["API_TOKEN"])[0] != 200:
        assert time.monotonic() < deadline, first.report()
        time.sleep(0.1)
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(60) == 0, first.report()

    second = dev_run(clean_env(), "--data-dir", str(data))
    second.wait_for("Press Ctrl-C to stop.")
    status, record = http_get(f"http://127.0.0.1:{second.port}/attribution/{user}",
                              DEV_DEFAULTS["API_TOKEN"])
    assert status == 200 and record["touches"] == 1, second.report()
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(60) == 0, second.report()


def test_dev_fails_fast_when_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = fbhook_sync("dev", "--port", str(port), env=clean_env(), timeout=60)
    assert done.code == 1, done
    assert f"cannot listen on 127.0.0.1:{port}" in done.err


def try_it_lines(banner: str) -> list[str]:
    """The commands under "Try it" in the dev banner, without their trailing comments."""
    block = banner.split("Try it, from another terminal in ", 1)[1].split("\n\n", 1)[0]
    return [line.split("    #", 1)[0].strip() for line in block.splitlines()[1:]]


def test_the_commands_dev_prints_run_as_shown_and_read_its_redis(dev_run: Any) -> None:
    """`make dev` runs the console script from .venv/bin, not on PATH: the banner says how to
    run each command from this directory, and the commands find dev's Redis without REDIS_URL."""
    script = Path(sys.executable).with_name("fbhook")
    bin_dir = str(script.parent)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d != bin_dir)
    env = clean_env(PATH=path)
    dev = dev_run(env, command=[str(script)])
    dev.wait_for("Press Ctrl-C to stop.")
    banner = "".join(dev.out)
    assert f"Try it, from another terminal in {dev.cwd}:" in banner
    redis_url = re.search(r"redis\s+(redis://127\.0\.0\.1:\d+/0)", banner).group(1)  # type: ignore[union-attr]
    state = json.loads((dev.cwd / ".fbhook-dev.json").read_text())
    assert state == {"redis_url": redis_url, "pid": dev.proc.pid}

    simulate, events_list, report, export, curl = try_it_lines(banner)
    assert simulate == f"{script} simulate --url http://127.0.0.1:{dev.port}/webhook"

    def shell(line: str) -> Result:
        done = subprocess.run(line, shell=True, cwd=dev.cwd, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        return Result(done.returncode, done.stdout, done.stderr)

    assert shell(simulate).code == 0
    touched = [e for e in expected(6) if e.touch is not None]
    deadline = time.monotonic() + 30
    while len((exported := shell(export)).out.splitlines()) < len(touched):
        assert time.monotonic() < deadline, f"{exported}\n{dev.report()}"
        time.sleep(0.2)
    assert sorted(json.loads(x)["user"] for x in exported.out.splitlines()) == sorted(
        e.key for e in touched)
    reading = f"fbhook: reading Redis {redis_url} (started by fbhook dev, pid {dev.proc.pid}, "
    for line in (events_list, report, export):
        done = shell(line)
        assert done.code == 0, done
        assert done.err.startswith(reading), done
    assert "fb:events:referral" in shell(events_list).out
    answer = json.loads(shell(curl).out)
    assert answer["user"] == expected(6)[1].user and answer["last"]["source"] == "ADS"

    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(60) == 0, dev.report()
    assert not (dev.cwd / ".fbhook-dev.json").exists()


def test_the_banner_names_the_script_make_dev_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.dev import self_command

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [".venv/bin/fbhook", "dev"])
    assert self_command() == ".venv/bin/fbhook"
    monkeypatch.setattr(sys, "argv", [str(ROOT / ".venv/bin/fbhook"), "dev"])
    assert self_command() == ".venv/bin/fbhook"
    monkeypatch.setenv("PATH", str(ROOT / ".venv/bin"))
    assert self_command() == "fbhook"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "cli/__main__.py"), "dev"])
    python = Path(sys.executable)
    shown = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    assert self_command() == f"{shown} -m cli"


def test_a_dev_state_file_counts_only_while_its_process_lives(tmp_path: Path) -> None:
    from cli import devstate

    with devstate.announced("redis://127.0.0.1:1/0", tmp_path) as path:
        found = devstate.read(tmp_path)
        assert found == devstate.DevState("redis://127.0.0.1:1/0", os.getpid(), path)
        assert path.stat().st_mode & 0o777 == 0o600
    assert not path.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path.write_text(json.dumps({"redis_url": "redis://127.0.0.1:1/0", "pid": int(gone.stdout)}))
    assert devstate.read(tmp_path) is None
    assert devstate.read(tmp_path, check_alive=False) is not None
    path.write_text("{not json")
    assert devstate.read(tmp_path) is None


def test_redis_tools_say_which_redis_they_read_and_that_it_is_empty(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    with redis_sync.Redis.from_url(redis_proc.url) as client:
        client.flushall()
    # A dev state file here (of a live process: this one) loses to REDIS_URL and --redis-url.
    from cli import devstate

    with devstate.announced(f"redis://127.0.0.1:{free_port()}/0", tmp_path):
        for how, env, args in [
            ("from REDIS_URL", clean_env(REDIS_URL=redis_proc.url), ()),
            ("from --redis-url", clean_env(), ("--redis-url", redis_proc.url)),
        ]:
            done = subprocess.run([*CLI, "events", "list", *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done
            assert done.stdout == "no event streams yet\n"
            assert done.stderr.splitlines() == [
                f"fbhook: reading Redis {redis_proc.url} ({how})",
                "fbhook: this Redis holds no data at all (no webhook has reached it)",
            ]
