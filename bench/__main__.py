"""`python -m bench [--quick]`: run every measurement, print the table, write bench-results/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import forward, report, report_cost
from bench.load import disable_wrk, generator_name
from bench.plan import FULL, QUICK
from bench.procs import REPO, service_env
from bench.run import Bench
from tests.redis_server import redis_server


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results",
                        help="where results.json, chart.png and the logs go")
    parser.add_argument("--no-wrk", action="store_true",
                        help="drive the load with the Python generator even if wrk is installed")
    args = parser.parse_args()
    if args.no_wrk:
        disable_wrk()
    plan = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    secret = os.environ.get("FB_APP_SECRET", "").split(",")[0] or os.urandom(16).hex()
    started = time.perf_counter()
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="fbhook-bench-") as tmp:
        env = service_env(secret, server.url)
        bench = Bench(plan, server.url, server.process.pid, Path(tmp), secret.encode(), env)
        bench.log(f"redis {server.url}, load generator: {generator_name()}, plan {plan.name}")
        try:
            results: dict[str, Any] = {"plan": {**dataclasses.asdict(plan),
                                                "saturation_conns": plan.saturation_conns}}
            ingest = bench.ingest()
            results["ceiling"] = ingest["ceiling"]
            results["peer"] = {**ingest["peer"], **bench.peer()}
            results["project"] = {**ingest["project"], **bench.project()}
            results["report_cost"] = report_cost.measure(bench)
            bench.log("forwarding to a local bot (bench.forward)")
            results["forward"] = forward.ForwardBench(bench, 20_000, 500.0, 5.0, 2).run()
        finally:
            bench.procs.stop_all()
            _keep_logs(Path(tmp) / "logs", args.out / "logs")
        results["rss_kb"] = bench.rss_kb
    results["meta"] = {
        "generator": generator_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.machine(), "seconds": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["targets"] = report.verdicts(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.chart(results, args.out / "chart.png")
    text = report.render(results)
    (args.out / "table.md").write_text(text)
    print(text)
    print(f"results: {args.out / 'results.json'}, chart: {args.out / 'chart.png'}")
    return 0


def _keep_logs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for log in src.glob("*.log"):
        (dst / log.name).write_bytes(log.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
