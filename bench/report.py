"""Turns results.json into the markdown tables, the pass/miss verdicts and the chart."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import forward, report_cost

Point = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    value: float
    limit: float
    at_least: bool
    unit: str

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    @property
    def verdict(self) -> str:
        if self.passed:
            return "PASS"
        gap = (self.limit - self.value) / self.limit if self.at_least else (
            (self.value - self.limit) / self.limit)
        return f"MISS ({gap:.0%} {'short' if self.at_least else 'over'})"


def best(points: list[Point], key: str = "rps") -> Point:
    return max(points, key=lambda p: float(p[key]))


def at(points: list[Point], conns: int) -> Point:
    return next(p for p in points if p["connections"] == conns)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def targets(r: dict[str, Any]) -> list[Target]:
    c, p, j = r["ceiling"], r["peer"], r["project"]
    live1 = j["live"]["1"]["events_per_s"]
    drain = j["drain"]
    return [
        Target("ingest 1-event req/s vs ceiling", ratio(best(j["sweep"])["rps"],
               best(c["sweep"])["rps"]), 0.6, True, "x"),
        Target("ingest 50-event events/s", best(j["batch"], "events_per_s")["events_per_s"],
               150_000, True, "events/s"),
        Target("e2e live 1 worker events/s", live1, 25_000, True, "events/s"),
        Target("e2e live 1 worker vs peer", ratio(live1, p["live"]["events_per_s"]), 15, True,
               "x"),
        Target("backlog 2 workers vs 1", ratio(drain["2"]["events_per_s"],
               drain["1"]["events_per_s"]), 1.5, True, "x"),
        Target("ack p99 at 2,000 req/s (ms)", j["paced"]["p99_ms"], 10, False, "ms"),
        Target("Redis bytes per attributed user, 1 touch",
               j["attribution"]["1"]["bytes_per_user"], 400, False, "bytes"),
        Target("Redis bytes per attributed user, 3 touches",
               j["attribution"]["3"]["bytes_per_user"], 400, False, "bytes"),
    ]


def _worker_us(point: dict[str, Any]) -> float:
    """Worker CPU per event, all worker processes together."""
    return sum(v for k, v in point["cpu_us_per_event"].items() if k.startswith("worker"))


def n(x: float) -> str:
    return f"{x:,.0f}"


def x(v: float) -> str:
    return f"{v:.2f}x"


def ms(point: Point) -> str:
    return f"{point['p50_ms']:.2f} / {point['p99_ms']:.2f} ms"


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def table(r: dict[str, Any]) -> str:
    c, p, j = r["ceiling"], r["peer"], r["project"]
    sat = r["plan"]["saturation_conns"]
    t = {t.name: t for t in targets(r)}
    jb, cb, pb = best(j["sweep"]), best(c["sweep"]), best(p["sweep"])
    j50, p50 = best(j["batch"], "events_per_s"), best(p["batch"], "events_per_s")
    live, drain, attr = j["live"], j["drain"], j["attribution"]
    ordered = j["drain_ordered"]
    handler = j["drain_handler"]
    cores = r["meta"]["cpus"]
    idle = cores * 100 - drain["1"]["cpu_pct"]["machine"]
    handler_us = _worker_us(handler["1"]) - _worker_us(drain["1"])
    rss = r["rss_kb"]
    gen = max(pt["generator_cpu_pct"] for s in (c, p, j) for pt in s["sweep"])
    rows = [
        ("Ingest, 1 event/POST, req/s (best concurrency)",
         f"{n(jb['rps'])} (c={jb['connections']})",
         f"ceiling {n(cb['rps'])} (c={cb['connections']})", x(jb["rps"] / cb["rps"]),
         ">= 0.6x ceiling", t["ingest 1-event req/s vs ceiling"].verdict),
        ("Ingest CPU us per request, 1 event, same points (ratio: ceiling / project)",
         f"{us(jb, 'ingest'):.0f} (+ Redis {us(jb, 'redis'):.0f})",
         f"ceiling {us(cb, 'ceiling'):.0f}; peer {us(pb, 'peer-ingest'):.0f} "
         f"(+ Redis {us(pb, 'redis'):.0f})", x(ratio(us(cb, "ceiling"), us(jb, "ingest"))),
         "", ""),
        ("Ingest, 1 event/POST, req/s vs peer", n(jb["rps"]),
         f"peer {n(pb['rps'])} (c={pb['connections']})", x(ratio(jb["rps"], pb["rps"])), "", ""),
        ("Ingest, 50 events/POST, events/s (req/s)",
         f"{n(j50['events_per_s'])} ({n(j50['rps'])}, c={j50['connections']})",
         f"peer {n(p50['events_per_s'])} ({n(p50['rps'])})",
         x(ratio(j50["events_per_s"], p50["events_per_s"])), ">= 150,000 events/s",
         t["ingest 50-event events/s"].verdict),
        (f"Ack p50 / p99 at saturation, 1 event, c={sat}", ms(at(j["sweep"], sat)),
         f"ceiling {ms(at(c['sweep'], sat))}; peer {ms(at(p['sweep'], sat))}", "", "", ""),
        ("Ack p50 / p99 at 2,000 req/s, ingest alone", ms(j["paced"]),
         f"ceiling {ms(c['paced'])}; peer {ms(p['paced'])}", "", "p99 <= 10 ms",
         t["ack p99 at 2,000 req/s (ms)"].verdict),
        ("Ack p50 / p99 at 2,000 req/s, one worker running", ms(j["paced_with_worker"]), "", "",
         "", ""),
        ("End to end, live load, 1 worker, events/s", n(live["1"]["events_per_s"]),
         f"peer {n(p['live']['events_per_s'])}", x(ratio(live["1"]["events_per_s"],
                                                          p["live"]["events_per_s"])),
         ">= 25,000 and >= 15x peer",
         _both(t["e2e live 1 worker events/s"], t["e2e live 1 worker vs peer"])),
        ("End to end, live load, 2 workers, events/s", n(live["2"]["events_per_s"]),
         f"1 worker {n(live['1']['events_per_s'])}",
         x(ratio(live["2"]["events_per_s"], live["1"]["events_per_s"])), "", ""),
        ("Backlog drain, 1 worker, events/s", n(drain["1"]["events_per_s"]),
         f"peer {n(p['drain']['events_per_s'])}",
         x(ratio(drain["1"]["events_per_s"], p["drain"]["events_per_s"])), "", ""),
        ("Backlog drain, 2 workers, events/s", n(drain["2"]["events_per_s"]),
         f"1 worker {n(drain['1']['events_per_s'])}",
         x(ratio(drain["2"]["events_per_s"], drain["1"]["events_per_s"])), ">= 1.5x one worker",
         t["backlog 2 workers vs 1"].verdict),
        (f"Backlog drain, ordered case: {n(ordered['users'])} users, mixed kinds, 2 workers, "
         "events/s", n(ordered["events_per_s"]),
         f"per-user order violations {n(ordered['order_violations'])}",
         x(ratio(ordered["events_per_s"], drain["2"]["events_per_s"])), "0 violations",
         "PASS" if ordered["order_violations"] == 0 and ordered["outputs_ok"] else "FAIL"),
        ("Backlog drain, CPU the 1-worker run left idle: most 2 workers could add",
         f"{idle:.0f}% of {cores}00% idle",
         f"1 worker + Redis {drain['1']['cpu_pct']['machine']:.0f}%",
         x(ratio(cores * 100, drain["1"]["cpu_pct"]["machine"])), "", ""),
        ("Backlog drain, CPU-bound handler per event (bench.handler_worker), 1 worker",
         n(handler["1"]["events_per_s"]),
         f"handler adds {handler_us:.0f} us of worker CPU per event", "", "", ""),
        ("Backlog drain, CPU-bound handler per event, 2 workers",
         n(handler["2"]["events_per_s"]), f"1 worker {n(handler['1']['events_per_s'])}",
         x(ratio(handler["2"]["events_per_s"], handler["1"]["events_per_s"])), "", ""),
        (f"Redis bytes per attributed user, 1 touch ({n(attr['1']['users'])} users)",
         n(attr["1"]["bytes_per_user"]), f"MEMORY USAGE {n(attr['1']['memory_usage_per_user'])}",
         "", "<= 400", t["Redis bytes per attributed user, 1 touch"].verdict),
        (f"Redis bytes per attributed user, 3 touches ({n(attr['3']['users'])} users)",
         n(attr["3"]["bytes_per_user"]), f"MEMORY USAGE {n(attr['3']['memory_usage_per_user'])}",
         "", "<= 400", t["Redis bytes per attributed user, 3 touches"].verdict),
        ("Redis bytes per queued event (50-event POSTs)",
         n(drain["1"]["bytes_per_queued_event"]),
         f"peer {n(p['drain']['bytes_per_queued_event'])}",
         x(ratio(drain["1"]["bytes_per_queued_event"], p["drain"]["bytes_per_queued_event"])),
         "", ""),
        ("Peak RSS, ingest process", mb(rss.get("ingest", 0)),
         f"peer {mb(rss.get('peer-ingest', 0))}; ceiling {mb(rss.get('ceiling', 0))}", "", "", ""),
        ("Peak RSS, worker process", mb(rss.get("worker", 0)),
         f"peer {mb(rss.get('peer-worker', 0))}", "", "", ""),
        ("Load generator CPU, max over saturation runs", f"{gen:.0f}% of one core",
         r["meta"]["generator"], "", "", ""),
    ]
    head = ("| Measure | This project | Reference (same run) | Ratio | Target | Result |\n"
            "|---|---:|---|---:|---|---|\n")
    return head + "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _both(a: Target, b: Target) -> str:
    if a.passed and b.passed:
        return "PASS"
    return "; ".join(f"{n(t.limit)}{t.unit if t.unit == 'x' else ''}: {t.verdict}"
                     for t in (a, b) if not t.passed)


def us(point: Point, name: str) -> float:
    return float(point["cpu_us_per_request"].get(name, 0.0))


def sweep_table(r: dict[str, Any]) -> str:
    c, p, j = r["ceiling"], r["peer"], r["project"]
    lines = ["| Connections | Ceiling req/s | Peer req/s | Project req/s | Ceiling p50/p99 ms"
             " | Peer p50/p99 ms | Project p50/p99 ms | server CPU us/req (c/p/j) | generator"
             " CPU % (c/p/j) |",
             "|---:|---:|---:|---:|---|---|---|---|---|"]
    servers = ("ceiling", "peer-ingest", "ingest")
    for conns in r["plan"]["sweep"]:
        pts = [at(s["sweep"], conns) for s in (c, p, j)]
        lines.append(
            f"| {conns} | " + " | ".join(n(pt["rps"]) for pt in pts) + " | "
            + " | ".join(f"{pt['p50_ms']:.2f} / {pt['p99_ms']:.2f}" for pt in pts) + " | "
            + " / ".join(f"{us(pt, name):.0f}" for pt, name in zip(pts, servers, strict=True))
            + " | " + " / ".join(f"{pt['generator_cpu_pct']:.0f}" for pt in pts) + " |")
    return "\n".join(lines)


def cpu_table(r: dict[str, Any]) -> str:
    """Where the two cores went during the main runs (% of one core; 200% is the machine)."""
    j = r["project"]
    rows = [
        ("Ingest, 1 event/POST, best point", best(j["sweep"])),
        ("Ingest, 50 events/POST, best point", best(j["batch"], "events_per_s")),
        ("Live load, 1 worker", j["live"]["1"]),
        ("Live load, 2 workers", j["live"]["2"]),
        ("Backlog, 1 worker", j["drain"]["1"]),
        ("Backlog, 2 workers", j["drain"]["2"]),
        ("Backlog, 1 worker, CPU-bound handler", j["drain_handler"]["1"]),
        ("Backlog, 2 workers, CPU-bound handler", j["drain_handler"]["2"]),
    ]
    lines = ["| Run (this project) | ingest | workers | redis | load generator | other tenants"
             " | CPU us per event: ingest / workers / redis |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, pt in rows:
        cpu = pt["cpu_pct"]
        per = pt.get("cpu_us_per_event") or {
            k: v / pt["events_per_request"] for k, v in pt["cpu_us_per_request"].items()}
        workers = sum(v for k, v in cpu.items() if k.startswith("worker"))
        per_workers = sum(v for k, v in per.items() if k.startswith("worker"))
        gen = pt.get("generator_cpu_pct")
        lines.append(
            f"| {label} | {cpu.get('ingest', 0):.0f}% | {workers:.0f}% | {cpu.get('redis', 0):.0f}%"
            f" | {'' if gen is None else f'{gen:.0f}%'} | {cpu.get('other', 0):.0f}% | "
            f"{per.get('ingest', 0):.1f} / {per_workers:.1f} / {per.get('redis', 0):.1f} |")
    return "\n".join(lines)


def render(r: dict[str, Any]) -> str:
    meta = r["meta"]
    return (
        f"## fbhook benchmark ({r['plan']['name']} run, {meta['cpus']} CPUs, "
        f"load generator: {meta['generator']}, {meta['seconds']:.0f} s, best of "
        f"{r['plan']['rounds']} round(s); other tenants used {other_load(r):.0f}% of one core "
        f"during the ingest runs, {other_load(r, e2e=True):.0f}% during the end-to-end runs)\n\n"
        + table(r) + "\n\n### Saturation sweep, 1 event per POST\n\n" + sweep_table(r)
        + "\n\n### CPU use (% of one core)\n\n" + cpu_table(r) + "\n"
        + ("\n### The report's cost (bench.report_cost)\n\n"
           + report_cost.table(r["report_cost"]) if "report_cost" in r else "")
        + ("\n\n### Forwarding to a bot that answers at once (bench.forward)\n\n"
           + forward.table(r["forward"]) if "forward" in r else "")
    )


def other_load(r: dict[str, Any], e2e: bool = False) -> float:
    """Mean CPU that none of our processes used during the kept ingest points (or the kept
    end-to-end runs): the noise, in % of one core."""
    if e2e:
        j = r["project"]
        points = [*j["live"].values(), *j["drain"].values(), r["peer"]["live"],
                  r["peer"]["drain"]]
    else:
        points = [pt for s in ("ceiling", "peer", "project") for pt in r[s]["sweep"]]
    values = [float(pt["cpu_pct"].get("other", 0.0)) for pt in points]
    return sum(values) / len(values) if values else 0.0


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**asdict(t), "passed": t.passed, "verdict": t.verdict} for t in targets(r)]


def chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = [("ceiling (bare aiohttp)", r["ceiling"], "tab:gray"),
              ("peer (stock arq)", r["peer"], "tab:red"),
              ("this project", r["project"], "tab:blue")]
    for label, data, color in series:
        pts = sorted(data["sweep"], key=lambda pt: pt["connections"])
        conns = [pt["connections"] for pt in pts]
        left.plot(conns, [pt["rps"] for pt in pts], "o-", color=color, label=label)
        right.plot(conns, [pt["p50_ms"] for pt in pts], "o-", color=color, label=f"{label} p50")
        right.plot(conns, [pt["p99_ms"] for pt in pts], "s--", color=color,
                   label=f"{label} p99")
    ticks = list(r["plan"]["sweep"])
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent connections (wrk, 1 event per POST)")
        ax.grid(True, alpha=0.3)
    top = max(pt["rps"] for _, data, _ in series for pt in data["sweep"])
    left.set_ylim(0, top * 1.3)
    left.set_ylabel("acknowledged requests / s")
    left.set_title("Throughput")
    left.legend(loc="upper center", ncol=3, fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("ack latency (ms)")
    right.set_title("Ack latency")
    right.legend(fontsize=7)
    fig.suptitle(f"fbhook bench ({r['plan']['name']}): same run, same load generator")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
