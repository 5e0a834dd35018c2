"""`fbhook report`: the attribution report's figures (the same as GET /report) in a terminal."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys

from cli.common import CommandFailed, add_redis_option, open_redis, tool_settings
from shared.report import (
    DEFAULT_LIMIT,
    Report,
    ReportRangeError,
    Row,
    build_report,
    encode_report,
    parse_range,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="new and returning users by source, ref and ad, per day",
        description=(
            "Print the attribution report for a date range (UTC days, inclusive; default the "
            "last 30 days): totals, users per day, and the top sources, refs and ads with the "
            "ad titles. The same figures as GET /report."
        ),
    )
    p.add_argument("--from", dest="start", metavar="YYYY-MM-DD", help="first day")
    p.add_argument("--to", dest="end", metavar="YYYY-MM-DD", help="last day (default: today)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help="rows per dimension, largest first; 0 for all (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_redis_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        first, last = parse_range(args.start, args.end)
    except ReportRangeError as exc:
        raise CommandFailed(str(exc)) from None
    report = asyncio.run(_build(args, first, last))
    if args.json:
        sys.stdout.write(encode_report(report).decode() + "\n")
    else:
        sys.stdout.write(render_text(report))
    return 0


async def _build(args: argparse.Namespace, first: dt.date, last: dt.date) -> Report:
    async with open_redis(tool_settings(args)) as redis:
        return await build_report(redis, first, last, max(0, args.limit))


def _table(title: str, rows: list[Row], with_title: bool = False) -> list[str]:
    if not rows:
        return [f"{title}: none", ""]
    width = max(len(title), *(len(r.key or "(none)") for r in rows))
    header = f"{title:<{width}}  {'new':>8}  {'returning':>9}"
    lines = [header + ("  ad title" if with_title else "")]
    for r in rows:
        line = f"{r.key or '(none)':<{width}}  {r.new:>8}  {r.returning:>9}"
        lines.append(line + (f"  {r.title or ''}" if with_title else ""))
    return [*lines, ""]


def render_text(report: Report) -> str:
    lines = [
        f"Attribution report {report.start} to {report.to} (UTC)",
        f"users: {report.totals.new} new, {report.totals.returning} returning",
        "",
        f"{'day':<10}  {'new':>8}  {'returning':>9}",
        *(f"{d.day:<10}  {d.new:>8}  {d.returning:>9}"
          for d in report.daily if d.new or d.returning),
        "",
        *_table("source", report.source),
        *_table("ref", report.ref),
        *_table("ad", report.ad, with_title=True),
    ]
    omitted = {k: v for k, v in report.omitted.items() if v}
    if omitted:
        left = ", ".join(f"{k} {v}" for k, v in omitted.items())
        lines.append(f"rows left out by --limit: {left}")
    return "\n".join(lines) + "\n"
