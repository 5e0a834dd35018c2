"""`fbhook simulate`: send realistic, correctly signed webhook events to a running endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from itertools import islice

import aiohttp

from cli import payloads
from cli.common import CommandFailed, positive_int
from cli.dev import DEV_DEFAULTS
from cli.progress import Progress, wanted
from shared.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8080/webhook"
SHOW_EACH_UP_TO = 50
"""Without --verbose, every event is printed only for runs of at most this many users."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="send realistic signed webhook events to a running endpoint",
        description=(
            "Send realistic, correctly signed Messenger webhook events to a running endpoint "
            "(`fbhook serve` or `fbhook dev`). Each simulated user arrives one way, in turn: "
            f"{', '.join(payloads.SCENARIOS)}. Users are numbered, so running it again makes "
            "the same users come back (returning users). Prints what it sent and the answers; "
            "the exit status is 1 when any request did not get a 2xx answer."
        ),
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"webhook URL (default: {DEFAULT_URL})")
    p.add_argument(
        "--secret",
        help="App Secret to sign with (default: the first of FB_APP_SECRET, else the "
        "local `fbhook dev` secret)",
    )
    p.add_argument("--users", type=positive_int, default=len(payloads.SCENARIOS), metavar="N",
                   help="how many users to simulate, one event each (default: %(default)s)")
    p.add_argument("--scenario", action="append", choices=payloads.SCENARIOS, dest="scenarios",
                   help="only this way of arriving (repeat for several; default: all)")
    p.add_argument("--first-user", type=int, default=0, metavar="N",
                   help="number of the first user (default: 0); users are PSID "
                   f"{payloads.PSID_BASE}+N")
    p.add_argument("--page-id", default=payloads.PAGE_ID, help="Page id (default: %(default)s)")
    p.add_argument("--batch", type=positive_int, default=1, metavar="N",
                   help="events per webhook POST, as Facebook batches under load (default: 1)")
    p.add_argument("--concurrency", type=positive_int, default=8, metavar="N",
                   help="requests in flight at once (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="per-request timeout (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help=f"print every event even when there are more than {SHOW_EACH_UP_TO}")
    p.add_argument("--show-payloads", action="store_true", help="also print each body sent")
    p.add_argument("--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal")
    p.set_defaults(run=run)


def signing_secret(given: str | None) -> tuple[bytes, str]:
    """The secret to sign with and where it came from."""
    if given:
        return given.encode(), "--secret"
    secrets = Settings.for_tools().fb_app_secrets
    if secrets:
        return secrets[0], "FB_APP_SECRET"
    return DEV_DEFAULTS["FB_APP_SECRET"].encode(), "the local `fbhook dev` default"


@dataclass(slots=True)
class Outcome:
    events: list[payloads.SimEvent]
    status: int
    answer: str


@dataclass(slots=True)
class Summary:
    requests: int = 0
    events: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.requests > 0 and all(200 <= s < 300 for s in self.statuses)


async def send_all(
    url: str,
    secret: bytes,
    events: Iterable[payloads.SimEvent],
    *,
    page_id: str = payloads.PAGE_ID,
    batch: int = 1,
    concurrency: int = 8,
    timeout_s: float = 10.0,
) -> list[Outcome]:
    """POST every event and return the outcomes (see `stream_all`)."""
    return [
        outcome
        async for outcome in stream_all(url, secret, events, page_id=page_id, batch=batch,
                                        concurrency=concurrency, timeout_s=timeout_s)
    ]


async def stream_all(
    url: str,
    secret: bytes,
    events: Iterable[payloads.SimEvent],
    *,
    page_id: str = payloads.PAGE_ID,
    batch: int = 1,
    concurrency: int = 8,
    timeout_s: float = 10.0,
) -> AsyncIterator[Outcome]:
    """POST the events, `batch` per signed body and `concurrency` bodies at once, yielding
    each outcome as its answer arrives. Raises CommandFailed when the endpoint cannot be
    reached; the generator reads `events` lazily, so any number of users costs little memory."""
    source = iter(events)
    done: asyncio.Queue[Outcome | BaseException | None] = asyncio.Queue(maxsize=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def worker(session: aiohttp.ClientSession) -> None:
        try:
            while chunk := list(islice(source, batch)):
                data, headers = payloads.signed(
                    payloads.envelope([e.item for e in chunk], page_id=page_id), secret
                )
                async with session.post(url, data=data, headers=headers) as response:
                    answer = (await response.text()).strip()
                await done.put(Outcome(chunk, response.status, answer))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await done.put(exc)
            return
        await done.put(None)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        try:
            running = len(tasks)
            while running:
                item = await done.get()
                if item is None:
                    running -= 1
                elif isinstance(item, aiohttp.ClientError | TimeoutError):
                    raise CommandFailed(_unreachable(url, item)) from item
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _unreachable(url: str, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    return (f"cannot reach {url}: {reason}\n"
            "is the endpoint running? start it with `fbhook dev` or `fbhook serve`")


def describe(event: payloads.SimEvent) -> str:
    touch = event.touch
    parts = [f"{event.scenario:<11}", f"user={event.user}"]
    if touch is not None:
        for name in ("source", "ref", "ad_id", "product_id", "referer_uri"):
            value = getattr(touch, name)
            if value is not None:
                parts.append(f"{name}={value}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    secret, origin = signing_secret(args.secret)
    print(f"signing with the App Secret from {origin}", file=sys.stderr)
    return asyncio.run(_run(args, secret))


async def _run(args: argparse.Namespace, secret: bytes) -> int:
    events = payloads.scenario_events(
        args.users, scenarios=args.scenarios or payloads.SCENARIOS, first_user=args.first_user,
        start_ms=int(time.time() * 1000), run=os.urandom(4).hex(), page_id=args.page_id,
    )
    show_each = args.verbose or args.users <= SHOW_EACH_UP_TO
    progress = Progress(wanted(args.progress) and not show_each)
    summary = Summary()
    async for outcome in stream_all(
        args.url, secret, events, page_id=args.page_id, batch=args.batch,
        concurrency=args.concurrency, timeout_s=args.timeout,
    ):
        summary.requests += 1
        summary.events += len(outcome.events)
        summary.statuses[outcome.status] += 1
        if show_each:
            _print_outcome(outcome, args.show_payloads)
        elif outcome.status >= 300:
            print(f"HTTP {outcome.status} {outcome.answer}", file=sys.stderr)
        progress.tick(lambda: f"sent {summary.events}/{args.users} events "
                      f"({progress.rate(summary.events):.0f}/s)")
    progress.done(f"sent {summary.events}/{args.users} events")
    answers = ", ".join(f"{n} x HTTP {status}" for status, n in sorted(summary.statuses.items()))
    print(f"sent {summary.events} events in {summary.requests} requests to {args.url}: {answers}")
    return 0 if summary.ok else 1


def _print_outcome(outcome: Outcome, show_payloads: bool) -> None:
    for event in outcome.events:
        print(f"sent {describe(event)}  -> HTTP {outcome.status} {outcome.answer}")
        if show_payloads:
            print("  " + json.dumps(event.item, ensure_ascii=False))
    sys.stdout.flush()
