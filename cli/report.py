"""`fbhook report`: the attribution report's figures (the same as GET /report) in a terminal."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys

from cli.common import CommandFailed, add_redis_option, open_redis, tool_settings
from shared.report import (
    DEFAULT_LIMIT,
    MAX_CELLS,
    MAX_LIMIT,
    Report,
    ReportRangeError,
    Row,
    build_report,
    encode_report,
    parse_range,
    sent_value,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="new and returning users by source, ref and ad, per day",
        description=(
            "Print the attribution report for a date range (UTC days, inclusive; default the "
            "last 30 days): users (new, returning, distinct), users per day, and the top "
            "sources, refs and ads with their share and the ad titles. The same figures as "
            "GET /report; docs/report.md says which are estimates."
        ),
    )
    p.add_argument("--from", dest="start", metavar="YYYY-MM-DD", help="first day")
    p.add_argument("--to", dest="end", metavar="YYYY-MM-DD", help="last day (default: today)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"rows per dimension, largest first, at most {MAX_LIMIT} (fewer over "
                        f"long ranges: {MAX_CELLS:,} rows x days, never under {DEFAULT_LIMIT}); "
                        "0 for the most (default: %(default)s)")
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
    """One dimension: readable name (with the value Facebook sent when it differs), users new
    and returning added up over the days, and the row's share of the range's user-days."""
    if not rows:
        return [f"{title}: none", ""]
    names = [r.label if sent_value(r) is None else f"{r.label} ({r.key})" for r in rows]
    width = max(len(title), *(len(n) for n in names))
    header = f"{title:<{width}}  {'new':>8}  {'returning':>9}  {'share':>6}"
    lines = [header + ("  ad title" if with_title else "")]
    for name, r in zip(names, rows, strict=True):
        line = f"{name:<{width}}  {r.new:>8}  {r.returning:>9}  {100 * r.share:>5.1f}%"
        lines.append(line + (f"  {r.title or ''}" if with_title else ""))
    return [*lines, ""]


def render_text(report: Report) -> str:
    t = report.totals
    lines = [
        f"Attribution report {report.start} to {report.to} (UTC)",
        f"users: {t.users}, {t.new} new, {t.returning} returning "
        "(users and returning users are estimates, about 0.8%)",
        f"referral touches: {t.touches}",
        "",
        f"{'day':<10}  {'new':>8}  {'returning':>9}  {'touches':>8}",
        *(f"{d.day:<10}  {d.new:>8}  {d.returning:>9}  {d.touches:>8}"
          for d in report.daily if d.new or d.returning or d.touches),
        "",
        "A user counts once a day, under the source, ref and ad of their first touch that day; "
        "rows add up their days.",
        "",
        *_table("source", report.source),
        *_table("ref", report.ref),
        *_table("ad", report.ad, with_title=True),
    ]
    omitted = {k: v for k, v in report.omitted.items() if v}
    if omitted:
        left = ", ".join(f"{k} {v}" for k, v in omitted.items())
        lines.append(f"rows left out by --limit, at least: {left}")
    return "\n".join(lines) + "\n"
