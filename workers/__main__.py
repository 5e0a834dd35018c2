"""`python -m workers`: run one worker; start as many as you like against one Redis.

`python -m workers --check` exits 0 when the worker on this host wrote its health-check key in
the last few seconds, 1 otherwise: the container's health check.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from wsgiref.simple_server import WSGIServer

from redis.exceptions import RedisError

from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.redis import connect
from shared.settings import Settings

log = logging.getLogger("fbhook.worker")


async def check(settings: Settings) -> int:
    """0 when this host's worker is alive (its health-check key exists), else 1."""
    from workers.settings import health_check_key

    key = health_check_key(settings)
    redis = connect(settings)
    try:
        value = await redis.get(key)
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        print(f"unhealthy: redis: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    if value is None:
        print(f"unhealthy: no {key} (the worker has not reported in the last seconds)",
              file=sys.stderr)
        return 1
    print(f"healthy: {value.decode(errors='replace')}")
    return 0


def serve_metrics(settings: Settings) -> WSGIServer | None:
    """Prometheus metrics on WORKER_METRICS_PORT (a daemon thread), unless it is 0."""
    if not settings.worker_metrics_port:
        return None
    from prometheus_client import start_http_server

    server, _ = start_http_server(
        settings.worker_metrics_port, addr="0.0.0.0",  # noqa: S104 - one port per container
    )
    log.info("metrics on port %d", settings.worker_metrics_port)
    return server


def log_handlers() -> None:
    """One line at start: which handlers this worker runs, so that a handler that was never
    imported shows at once."""
    from workers.registry import registered

    found = {kind: [f"{fn.__module__}.{fn.__qualname__}" for fn in fns]
             for kind, fns in sorted(registered().items())}
    if not found:
        log.info("no handlers registered: built-in outputs only (add them in workers/handlers.py)",
                 extra={"handlers": {}})
        return
    listed = "; ".join(f"{kind} -> {', '.join(names)}" for kind, names in found.items())
    log.info("handlers: %s", listed, extra={"handlers": found})


def warn_unclassified_forward_kinds(settings: Settings) -> list[str]:
    """A warning at start for FORWARD_KINDS names that no built-in kind and no handler has
    (a misspelt `mesage` would otherwise forward nothing, silently). They are kept: a `changes`
    field names its own kind (`feed`), which no list holds. Returns those names."""
    from shared.kinds import KINDS
    from workers.registry import registered

    known = set(KINDS) | set(registered())
    odd = sorted(kind for kind in settings.forward_kinds if kind not in known)
    if odd and settings.forward_url:
        log.warning("FORWARD_KINDS names kinds that are neither built in nor handled here: %s "
                    "(right for a changes field such as feed; else check the spelling: built-in "
                    "kinds are %s)", ", ".join(odd), ", ".join(KINDS),
                    extra={"forward_kinds": odd})
    return odd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 0 if this host's worker is alive, 1 if not")
    mode.add_argument("--burst", action="store_true",
                      help="process what is queued, then exit")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return asyncio.run(check(settings))
    setup_logging(settings)
    try:
        import uvloop

        asyncio.set_event_loop(uvloop.new_event_loop())
    except ImportError:  # pragma: no cover
        asyncio.set_event_loop(asyncio.new_event_loop())
    import workers.handlers  # noqa: F401 - registers the project's own handlers
    from workers.leased_worker import LeasedWorker as Worker
    from workers.settings import worker_settings

    log_handlers()
    warn_unclassified_forward_kinds(settings)
    if args.burst:
        Worker(**worker_settings(settings), burst=True).run()
        return 0
    serve_metrics(settings)
    while True:
        try:
            Worker(**worker_settings(settings)).run()
            return 0
        except (RedisError, OSError) as exc:
            # arq ends its poll loop on some connection errors (a WATCH that loses its
            # connection, for one); a Redis restart must not end the worker process.
            log.warning("worker stopped by a Redis error (%s: %s); starting it again",
                        type(exc).__name__, exc)
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
