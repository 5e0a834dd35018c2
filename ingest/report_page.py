"""The attribution report as one self-contained HTML page: tables and inline SVG charts, no
script, no external resource (the page works offline and under a strict CSP).

Every value from Facebook (sources, refs, ad titles) is escaped: anyone can craft an m.me ref.
"""

from __future__ import annotations

import math
from html import escape
from urllib.parse import urlencode

from shared.report import Report, Row, most_rows, sent_value

NEW_COLOUR = "#2563eb"
RETURNING_COLOUR = "#f59e0b"
TOP_SOURCES = 5
"""Sources given their own column in the per-day table."""
SPARKLINE_ROWS = 50
"""Rows of a table drawn with their per-day chart: 500 rows of a 401-day range would take the
event loop tens of ms to draw."""

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
       "base-uri 'none'; frame-ancestors 'none'")

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111;background:#fff}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:28px 0 8px}
form{margin:0 0 16px}input,button{font:inherit;padding:2px 6px}
.sum{display:flex;gap:24px;margin:8px 0 16px}.sum div{padding:8px 12px;background:#f3f4f6}
.sum b{display:block;font-size:22px}
table{border-collapse:collapse;margin:4px 0 8px}
th,td{border-bottom:1px solid #e5e7eb;padding:3px 10px;text-align:right;white-space:nowrap}
th:first-child,td:first-child,th.t,td.t{text-align:left}td.t{white-space:normal;max-width:360px}
.key{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
.note{color:#6b7280}.raw{color:#6b7280;font-size:12px;margin-left:6px}
svg text{font:11px system-ui,sans-serif;fill:#374151}
"""


def render(report: Report, token: str | None = None, limit: int | None = None) -> str:
    """The page for `report`; `token` (from `?token=`) is carried by the form and the links."""
    params = {"from": report.start, "to": report.to}
    extra = {k: v for k, v in (("limit", limit), ("token", token)) if v is not None}
    json_href = "report.json?" + urlencode({**params, **extra})
    hidden = "".join(f'<input type="hidden" name="{k}" value="{escape(str(v))}">'
                     for k, v in extra.items())
    t = report.totals
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>Referral report {report.start} to {report.to}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Referral attribution, {report.start} to {report.to} (UTC)</h1>",
        '<form method="get" action="report">',
        f'<label>From <input type="date" name="from" value="{report.start}"></label> ',
        f'<label>to <input type="date" name="to" value="{report.to}"></label> ',
        f'{hidden}<button type="submit">Show</button> ',
        f'<a href="{escape(json_href)}">JSON</a></form>',
        '<div class="sum">',
        f'<div id="total-users">Users<b>{t.users}</b></div>',
        f'<div id="total-new">New users<b>{t.new}</b></div>',
        f'<div id="total-returning">Returning users<b>{t.returning}</b></div>',
        f'<div id="total-touches">Referral touches<b>{t.touches}</b></div></div>',
        _legend(),
        _daily_chart(report),
        "<h2>Per day</h2>", _daily_table(report),
        "<h2>By source</h2>", _dimension_table(report, "source", report.source),
        "<h2>By ref</h2>", _dimension_table(report, "ref", report.ref),
        "<h2>By ad</h2>", _dimension_table(report, "ad", report.ad),
        f'<p class="note">{_NOTE}</p>',
        "</body></html>",
    ]
    return "".join(parts)


_NOTE = (
    "A user counts once a day: new on the day of their first referral touch, returning on each "
    "later day they come back, under the source, ref and ad of their first touch that day (days "
    "in UTC, from the touch's timestamp). A row adds up its days, so a user who comes back on "
    "three days counts three times in a row; its share is its part of all those user-days. Users "
    "and returning users over the whole range count each user once, estimated (about 0.8%); new "
    "users, the days' figures and the rows shown are exact."
)


def _legend() -> str:
    return (f'<div><span class="key" style="background:{NEW_COLOUR}"></span>new'
            f'<span class="key" style="background:{RETURNING_COLOUR}"></span>returning</div>')


def _tick(peak: int) -> int:
    """The y axis' grid step, 4 steps up to at least `peak`: a round whole number."""
    rough = max(peak / 4, 1)
    power: int = 10 ** int(math.log10(rough))
    steps = (m * power for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10))
    return int(next(s for s in steps if s >= rough and s == int(s)))


def _daily_chart(report: Report) -> str:
    """Stacked bars per day, new below returning, with a y grid and every few days labelled."""
    width, height, left, bottom, top = 1000, 240, 44, 24, 10
    plot_w, plot_h = width - left - 8, height - bottom - top
    top_value = 4 * _tick(max((d.new + d.returning for d in report.daily), default=0))
    step = plot_w / max(len(report.daily), 1)
    bar = max(step * 0.8, 1.0)
    label_every = math.ceil(len(report.daily) / 15)
    out = [f'<svg id="chart" role="img" aria-label="new and returning users per day" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for n in range(5):
        value = top_value * n / 4
        y = top + plot_h - plot_h * n / 4
        out.append(f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#e5e7eb"/><text x="{left - 6}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{value:.0f}</text>')
    for i, day in enumerate(report.daily):
        x = left + i * step + (step - bar) / 2
        h_new = plot_h * day.new / top_value
        h_ret = plot_h * day.returning / top_value
        y_new = top + plot_h - h_new
        tip = f"{day.day}: {day.new} new, {day.returning} returning"
        out.append(f"<g><title>{tip}</title>"
                   f'<rect x="{x:.1f}" y="{y_new:.1f}" width="{bar:.1f}" height="{h_new:.1f}" '
                   f'fill="{NEW_COLOUR}"/><rect x="{x:.1f}" y="{y_new - h_ret:.1f}" '
                   f'width="{bar:.1f}" height="{h_ret:.1f}" fill="{RETURNING_COLOUR}"/></g>')
        if i % label_every == 0:
            out.append(f'<text x="{x + bar / 2:.1f}" y="{height - 6}" '
                       f'text-anchor="middle">{day.day[5:]}</text>')
    out.append("</svg>")
    return "".join(out)


def _sparkline(positions: dict[str, int], row: Row) -> str:
    """A row's users per day as tiny stacked bars, on the row's own scale; `positions` gives each
    day of the report its place."""
    width, height = 120, 20
    peak = max((c.new + c.returning for c in row.days.values()), default=0) or 1
    step = width / max(len(positions), 1)
    bars = []
    for day, cell in row.days.items():
        i = positions[day]
        h_new = height * cell.new / peak
        h_ret = height * cell.returning / peak
        x = i * step
        bars.append(f'<rect x="{x:.1f}" y="{height - h_new:.1f}" width="{max(step, 1):.1f}" '
                    f'height="{h_new:.1f}" fill="{NEW_COLOUR}"/><rect x="{x:.1f}" '
                    f'y="{height - h_new - h_ret:.1f}" width="{max(step, 1):.1f}" '
                    f'height="{h_ret:.1f}" fill="{RETURNING_COLOUR}"/>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'{"".join(bars)}</svg>')


def _name(row: Row) -> str:
    """The row's readable name, with the value Facebook sent beside it when they differ."""
    sent = sent_value(row)
    raw = f'<span class="raw">{escape(sent)}</span>' if sent is not None else ""
    return f"{escape(row.label or row.key)}{raw}"


def _dimension_table(report: Report, dimension: str, rows: list[Row]) -> str:
    if not rows:
        return '<p class="note">No referral touches in this range.</p>'
    title_head = "<th class=\"t\">Title</th>" if dimension == "ad" else ""
    out = [f'<table id="by-{dimension}"><tr><th>{dimension.capitalize()}</th>{title_head}'
           "<th>New</th><th>Returning</th><th>Users</th><th>Share</th><th>Per day</th></tr>"]
    positions = {day: i for i, day in enumerate(report.days)}
    for n, row in enumerate(rows):
        title = (f'<td class="t">{escape(row.title or "")}</td>' if dimension == "ad" else "")
        chart = _sparkline(positions, row) if n < SPARKLINE_ROWS else ""
        out.append(
            f'<tr data-key="{escape(row.key)}"><td class="t">{_name(row)}</td>{title}'
            f'<td data-col="new">{row.new}</td><td data-col="returning">{row.returning}</td>'
            f'<td data-col="total">{row.new + row.returning}</td>'
            f'<td data-col="share">{100 * row.share:.1f}%</td>'
            f"<td>{chart}</td></tr>"
        )
    out.append("</table>")
    omitted = report.omitted.get(dimension, 0)
    if omitted:
        out.append(f'<p class="note">At least {omitted} smaller rows left out (raise limit=, '
                   f"up to {most_rows(len(report.days))} over this range).</p>")
    return "".join(out)


def _daily_table(report: Report) -> str:
    sources = report.source[:TOP_SOURCES]
    heads = "".join(f"<th>{escape(s.label or s.key)}<br>new / ret</th>" for s in sources)
    out = [f'<table id="per-day"><tr><th>Day</th><th>New</th><th>Returning</th><th>Users</th>'
           f"<th>Touches</th>{heads}</tr>"]
    for day in reversed(report.daily):
        if not day.new and not day.returning and not day.touches:
            continue
        cells = []
        for s in sources:
            c = s.days.get(day.day)
            cells.append(f"<td>{c.new} / {c.returning}</td>" if c else "<td></td>")
        out.append(f'<tr data-key="{day.day}"><td>{day.day}</td>'
                   f'<td data-col="new">{day.new}</td>'
                   f'<td data-col="returning">{day.returning}</td>'
                   f'<td data-col="total">{day.new + day.returning}</td>'
                   f'<td data-col="touches">{day.touches}</td>{"".join(cells)}</tr>')
    if len(out) == 1:
        return '<p class="note">No referral touches in this range.</p>'
    out.append("</table>")
    return "".join(out)
