"""`fbhook check-config`: is the environment valid, and does Redis answer?"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import Any

from redis.asyncio import Redis

from shared.redis import connect, wait_replicas
from shared.settings import Settings, redact_url


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate the environment and try to reach Redis",
        description=(
            "Validate every setting the ingest and the workers read from the environment, "
            "print them with secrets hidden, and PING Redis. Every problem is reported, each "
            "naming its variable. Exit status 0 when all is well, 1 otherwise."
        ),
    )
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="how long to wait for Redis (default: REDIS_TIMEOUT_SECONDS, 1.5)")
    p.add_argument("--no-redis", action="store_true", help="only validate the environment")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    problems = Settings.problems()
    settings = Settings.best_effort()
    print("settings (secrets hidden; defaults in place of bad values):" if problems
          else "settings (secrets hidden):")
    for name, value in settings.redacted().items():
        print(f"  {name:<20} {value}")
    if problems:
        print(f"\n{len(problems)} problem{'s' if len(problems) > 1 else ''} in the environment:")
        for problem in problems.values():
            print(f"  - {problem}")
    redis_ok = True
    if args.no_redis:
        pass
    elif "REDIS_URL" in problems:
        print("\nredis: not tried, REDIS_URL is not valid")
    else:
        timeout = args.timeout or settings.redis_timeout_s
        redis_ok = asyncio.run(_check_redis(settings, timeout))
    if problems or not redis_ok:
        print("\ncheck-config: FAILED")
        return 1
    print("\ncheck-config: OK")
    return 0


async def _check_redis(settings: Settings, timeout_s: float) -> bool:
    where = redact_url(settings.redis_url)
    client = connect(dataclasses.replace(settings, redis_timeout_s=timeout_s))
    try:
        try:
            async with asyncio.timeout(timeout_s + 0.5):
                await client.ping()
                info: dict[str, Any] = await client.info("server")
        except Exception as exc:  # noqa: BLE001 - whatever the failure, report it
            reason = str(exc) or type(exc).__name__
            print(f"\nredis: {where} does NOT answer: {reason}")
            return False
        version = info.get("valkey_version") or info.get("redis_version", "?")
        print(f"\nredis: {where} answers PING (server version {version})")
        primary = getattr(client.connection_pool, "master_address", None)
        if primary is not None:
            print(f"  the sentinels name the primary {primary[0]}:{primary[1]}")
        policy = await _maxmemory_policy(client)
        if policy not in {None, "noeviction"}:
            print(f"  warning: maxmemory-policy is {policy}: Redis may evict queued jobs and "
                  "attribution records when full; use noeviction")
        return await _replicas_confirm(client, settings.ack_replicas, timeout_s)
    finally:
        await client.aclose()


async def _replicas_confirm(client: Redis, replicas: int, timeout_s: float) -> bool:
    """With ACK_REPLICAS set, whether that many replicas confirm a write (as the ingest asks
    after every enqueue): a Redis without them, or one that refuses WAIT (some managed
    services), would have every webhook answered 503."""
    if not replicas:
        return True
    one = Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        await one.ping()
        await wait_replicas(one, replicas, max(1, int(timeout_s * 1000)))
    except Exception as exc:  # noqa: BLE001 - whatever the failure, report it
        print(f"  ACK_REPLICAS={replicas}: NOT confirmed, every webhook would get 503: "
              f"{str(exc) or type(exc).__name__}")
        return False
    finally:
        await one.aclose()
    print(f"  ACK_REPLICAS={replicas}: {replicas} replica(s) confirmed a write")
    return True


async def _maxmemory_policy(client: Redis) -> str | None:
    """The eviction policy, or None when CONFIG is not allowed (managed Redis services)."""
    try:
        values: dict[Any, Any] = await client.config_get("maxmemory-policy")
    except Exception:  # noqa: BLE001 - CONFIG may be renamed or forbidden
        return None
    raw = values.get(b"maxmemory-policy") or values.get("maxmemory-policy")
    return raw.decode() if isinstance(raw, bytes) else raw
