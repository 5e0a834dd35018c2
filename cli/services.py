"""`fbhook serve` and `fbhook worker`: the two long-running services."""

from __future__ import annotations

import argparse


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

    return main(["--check"] if args.check else ["--burst"] if args.burst else [])
