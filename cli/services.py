"""`fbhook serve` and `fbhook worker`: the two long-running services."""

from __future__ import annotations

import argparse
import asyncio
import sys

from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve the webhook endpoint (same as `python -m ingest`)",
        description=(
            "Serve the webhook endpoint: GET/POST /webhook, /healthz, /readyz and "
            "GET /attribution/{user}. Configured by the environment only (see "
            "`fbhook check-config`): FB_APP_SECRET, FB_VERIFY_TOKEN, API_TOKEN, REDIS_URL, "
            "INGEST_HOST, INGEST_PORT, ..."
        ),
    )
    serve.set_defaults(run=run_serve)
    worker = sub.add_parser(
        "worker",
        help="run one worker (same as `python -m workers`)",
        description=(
            "Run one worker: it takes the queued events, runs your handlers and writes the "
            "event streams and attribution records. Start as many as you like against one "
            "Redis. Configured by the environment only (see `fbhook check-config`)."
        ),
    )
    mode = worker.add_mutually_exclusive_group()
    mode.add_argument("--burst", action="store_true",
                      help="process what is queued, then exit (for scripts and batch jobs)")
    mode.add_argument("--check", action="store_true",
                      help="exit 0 if this host's worker is alive, 1 if not (health check)")
    worker.set_defaults(run=run_worker)


def run_serve(args: argparse.Namespace) -> int:
    from ingest.__main__ import main

    return main()


def run_worker(args: argparse.Namespace) -> int:
    from workers.__main__ import main

    if not args.burst:
        return main(["--check"] if args.check else [])
    # `python -m workers` has no burst mode: this is its start-up, with `burst=True`.
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        import uvloop

        asyncio.set_event_loop(uvloop.new_event_loop())
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        asyncio.set_event_loop(asyncio.new_event_loop())
    from arq.worker import Worker

    import workers.handlers  # noqa: F401 - registers the project's own handlers
    from workers.settings import worker_settings

    Worker(**worker_settings(settings), burst=True).run()
    return 0
