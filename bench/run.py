"""The measurements. Every server is started here, loaded, read and stopped; Redis is flushed
before each measurement so none inherits another's queue.

The three ingest servers (ceiling, peer, project) stay up side by side, idle when not loaded, so
that each point is measured for all three back to back: on a shared machine a burst of outside
load then hits one point of all three rather than all points of one.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from redis import Redis

from bench.load import LoadResult, Running, start_closed, start_paced
from bench.payloads import Factory, Pool
from bench.plan import Plan
from bench.procs import CpuMeter, Proc, Procs, wait_http, wait_idle
from bench.servers import PEER_QUEUE
from shared import keys
from tests.redis_server import free_port

PROJECT_QUEUE = "fb:queue"
CEILING_POOL = 20_000
E2E_TIMEOUT_S = 300.0
SERVERS = ("ceiling", "peer", "project")
FIRST_BOUND_RPS = {1: 25_000.0, 50: 3_000.0}
"""Pool sizes for a server's first run: requests/s x seconds. Later runs use 2x the best rate
seen (concurrency rises along the sweep). A pool answered early only shortens the run; the rate
stays right."""

Point = dict[str, Any]


def load_point(res: LoadResult, pool: Pool, meter: CpuMeter) -> Point:
    """One measurement as it goes into results.json."""
    return {
        "connections": res.connections, "duration_s": round(res.duration_s, 3),
        "requests": res.acked, "failed": res.failed, "socket_errors": res.socket_errors,
        "rps": round(res.rps, 1), "events_per_request": pool.events_per_request,
        "events_per_s": round(res.rps * pool.events_per_request, 1),
        "p50_ms": round(res.p50_ms, 3), "p90_ms": round(res.p90_ms, 3),
        "p99_ms": round(res.p99_ms, 3), "max_ms": round(res.max_ms, 3),
        "pool_answered": res.acked + res.failed >= pool.requests,
        "generator": res.generator, "generator_cpu_pct": round(res.cpu_pct, 1),
        "cpu_pct": {k: round(v, 1) for k, v in meter.percent(res.cpu_s).items()},
        "cpu_us_per_request": per_unit(meter, res.acked, res.cpu_s),
    }


def per_unit(meter: CpuMeter, count: int, generator_s: float = 0.0) -> dict[str, float]:
    """CPU microseconds per request (or event) of each of our processes: unlike rates, this
    barely moves when other tenants take cores away."""
    if not count:
        return {}
    used = {k: v for k, v in meter.used.items() if k != "machine"}
    if generator_s:
        used["generator"] = generator_s
    return {k: round(1e6 * v / count, 2) for k, v in used.items()}


def keep_best(runs: list[Point], key: str, lowest: bool = False) -> Point:
    """The best of repeated runs, carrying every run's figure for the record."""
    pick = (min if lowest else max)(runs, key=lambda p: float(p[key]))
    return {**pick, "runs": [p[key] for p in runs]}


class Bench:
    """Runs every measurement of a plan against one Redis server."""

    def __init__(self, plan: Plan, redis_url: str, redis_pid: int, work: Path, secret: bytes,
                 env: dict[str, str]) -> None:
        self.plan = plan
        self.redis_url = redis_url
        self.redis = Redis.from_url(redis_url)
        self.redis_pid = redis_pid
        self.work = work
        self.factory = Factory(secret)
        self.secret = secret
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = Procs(work / "logs", env)
        self.rss_kb: dict[str, int] = {}
        self.ports: dict[str, int] = {}
        self.servers: dict[str, Proc] = {}
        self._best_rps: dict[tuple[str, int], float] = {}
        self._pools = itertools.count()
        self._t0 = time.perf_counter()

    # -- plumbing ---------------------------------------------------------------------------

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self._t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def pool(self, bodies: Iterator[list[str]]) -> Pool:
        return self.factory.write(self.work / f"pool-{next(self._pools)}.bin", bodies)

    def flush(self) -> None:
        self.redis.flushall()

    def memory(self) -> int:
        """Redis's used_memory less what its client connections hold."""
        info: dict[str, Any] = self.redis.info("memory")  # type: ignore[assignment]
        return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))

    def meter(self, procs: list[Proc]) -> CpuMeter:
        return CpuMeter({**{p.name: p.pid for p in procs}, "redis": self.redis_pid})

    def stop(self, *procs: Proc) -> None:
        for proc in procs:
            proc.stop()
            role = proc.name.rstrip("0123456789").rstrip("-")
            self.rss_kb[role] = max(self.rss_kb.get(role, 0), proc.peak_rss_kb)

    def until(self, done: Callable[[], bool], run: Running | None = None,
              timeout: float = E2E_TIMEOUT_S) -> float:
        """Poll every 5 ms; the perf_counter() time at which `done()` first held."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if run is not None:
                run.poll()
            if done():
                return time.perf_counter()
            time.sleep(0.005)
        raise RuntimeError(f"not done after {timeout:.0f} s")

    def zcard(self, name: str) -> int:
        count: int = self.redis.zcard(name)  # type: ignore[assignment]
        return count

    def xlen(self, names: list[str]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.xlen(name)
        return sum(int(n) for n in pipe.execute())

    # -- ingest: the three servers side by side ----------------------------------------------

    def start_ingests(self) -> None:
        for name in SERVERS:
            self.ports[name] = free_port()
        port = {k: str(v) for k, v in self.ports.items()}
        self.servers["ceiling"] = self.procs.python(
            "ceiling", "-m", "bench.servers", "ceiling", port["ceiling"])
        self.servers["peer"] = self.procs.python(
            "peer-ingest", "-m", "bench.servers", "peer-ingest", port["peer"], self.redis_url)
        self.servers["project"] = self.procs.python(
            "ingest", "-m", "ingest", env={"INGEST_PORT": port["project"]})
        for name, proc in self.servers.items():
            wait_http(proc, self.ports[name])

    def saturate(self, server: str, per_request: int, conns: int,
                 extra: list[Proc] | None = None) -> Point:
        """Closed-loop load at `conns` connections; a fresh pool of unique events each run
        (the ceiling, which checks nothing, cycles through one pool)."""
        self.flush()
        plan = self.plan
        if server == "ceiling":
            pool = self.pool(self.factory.mixed(CEILING_POOL, per_request))
            mode = "wrap"
        else:
            bound = self._best_rps.get((server, per_request), FIRST_BOUND_RPS[per_request])
            pool = self.pool(self.factory.mixed(max(200, int(bound * plan.sweep_s)), per_request))
            mode = "once"
        meter = self.meter([self.servers[server], *(extra or [])])
        run = start_closed(self.ports[server], pool, conns, plan.sweep_s, mode)
        run.wait_ready()
        meter.start()
        res = run.wait()
        meter.stop()
        pool.path.unlink()
        key = (server, per_request)
        self._best_rps[key] = max(self._best_rps.get(key, 0.0), 2.0 * res.rps)
        point = load_point(res, pool, meter)
        self.log(f"  {server:<8} c={conns:<4}{res.rps:>9,.0f} req/s"
                 f"{point['events_per_s']:>10,.0f} ev/s  p50 {res.p50_ms:6.2f}  p99 "
                 f"{res.p99_ms:7.2f} ms  gen {res.cpu_pct:3.0f}%  other "
                 f"{point['cpu_pct'].get('other', 0):3.0f}%"
                 + (f"  FAILED {res.failed}" if res.failed else ""))
        return point

    def paced(self, server: str, extra: list[Proc] | None = None) -> Point:
        self.flush()
        plan = self.plan
        pool = self.pool(self.factory.mixed(int(plan.rate * plan.rate_s) + 1, 1))
        meter = self.meter([self.servers[server], *(extra or [])])
        run = start_paced(self.ports[server], pool, plan.rate, plan.rate_s)
        run.wait_ready()
        meter.start()
        res = run.wait()
        meter.stop()
        pool.path.unlink()
        point = load_point(res, pool, meter)
        self.log(f"  {server:<8} paced {plan.rate:,.0f} req/s: got {res.rps:,.0f}  p50 "
                 f"{res.p50_ms:.2f}  p99 {res.p99_ms:.2f}  max {res.max_ms:.2f} ms  other "
                 f"{point['cpu_pct'].get('other', 0):3.0f}%")
        return point

    def ingest(self) -> dict[str, dict[str, Any]]:
        """Saturation sweeps (1 event), 50-event POSTs and the fixed rate, servers in turn."""
        plan = self.plan
        self.start_ingests()
        runs: dict[tuple[str, str, int], list[Point]] = {}
        for r in range(plan.rounds):
            self.log(f"ingest, round {r + 1}/{plan.rounds}: 1 event per POST")
            for c in plan.sweep:
                for server in SERVERS:
                    runs.setdefault((server, "sweep", c), []).append(self.saturate(server, 1, c))
            self.log(f"ingest, round {r + 1}/{plan.rounds}: {plan.batch} events per POST")
            for c in plan.batch_conns:
                for server in ("peer", "project"):
                    runs.setdefault((server, "batch", c), []).append(
                        self.saturate(server, plan.batch, c))
            self.log(f"ingest, round {r + 1}/{plan.rounds}: fixed rate (open loop)")
            for server in SERVERS:
                runs.setdefault((server, "paced", 0), []).append(self.paced(server))
        self.stop(self.servers.pop("ceiling"))
        out: dict[str, dict[str, Any]] = {s: {"sweep": [], "batch": []} for s in SERVERS}
        for (server, what, _), points in runs.items():
            if what == "paced":
                out[server]["paced"] = keep_best(points, "p99_ms", lowest=True)
            else:
                out[server][what].append(keep_best(points, "rps"))
        return out

    # -- end to end: the peer -------------------------------------------------------------------

    def peer_worker(self) -> Proc:
        worker = self.procs.python("peer-worker", "-m", "bench.servers", "peer-worker",
                                   self.redis_url)
        wait_idle([worker])
        return worker

    def peer_live(self) -> Point:
        self.flush()
        worker = self.peer_worker()
        plan = self.plan
        pool = self.pool(self.factory.mixed(plan.peer_events // plan.batch, plan.batch))
        meter = self.meter([self.servers["peer"], worker])
        run = start_closed(self.ports["peer"], pool, plan.e2e_conns, E2E_TIMEOUT_S)
        t0 = run.wait_ready()
        meter.start()
        t_end = self.until(lambda: run.poll() is not None
                           and self.zcard(PEER_QUEUE) == 0, run)
        meter.stop()
        res = run.wait()
        self.stop(worker)
        pool.path.unlink()
        return self.e2e_point("peer live, 1 worker", pool.events, t_end - t0, meter, res)

    def peer_drain(self) -> Point:
        self.flush()
        worker = self.peer_worker()
        worker.pause()
        plan = self.plan
        pool = self.pool(self.factory.mixed(plan.peer_events // plan.batch, plan.batch))
        before = self.memory()
        res = start_closed(self.ports["peer"], pool, plan.e2e_conns, E2E_TIMEOUT_S).wait()
        queued = self.zcard(PEER_QUEUE)
        per_event = (self.memory() - before) / pool.events
        meter = self.meter([worker])
        meter.start()
        t0 = time.perf_counter()
        worker.resume()
        t_end = self.until(lambda: self.zcard(PEER_QUEUE) == 0)
        meter.stop()
        self.stop(worker)
        pool.path.unlink()
        point = self.e2e_point("peer backlog, 1 worker", pool.events, t_end - t0, meter, res)
        point.update(queued_jobs=queued, bytes_per_queued_event=round(per_event, 1))
        return point

    def e2e_point(self, label: str, events: int, seconds: float, meter: CpuMeter,
                  res: LoadResult) -> Point:
        rate = events / seconds
        cpu = meter.percent(res.cpu_s if "live" in label else 0.0)
        self.log(f"  {label}: {events:,} events in {seconds:.2f} s = {rate:,.0f} events/s"
                 f"  other {cpu.get('other', 0):3.0f}%")
        generator = 100 * res.cpu_s / seconds if "live" in label else None
        return {"events": events, "seconds": round(seconds, 3), "events_per_s": round(rate, 1),
                "ingest_rps": round(res.rps, 1), "failed": res.failed,
                "generator_cpu_pct": None if generator is None else round(generator, 1),
                "cpu_pct": {k: round(v, 1) for k, v in cpu.items()},
                "cpu_us_per_event": per_unit(meter, events)}

    def peer(self) -> dict[str, Point]:
        self.log("peer end to end: ingest + one stock arq worker")
        out = {"live": self.peer_live(), "drain": self.peer_drain()}
        self.stop(self.servers.pop("peer"))
        return out

    # -- end to end: this project ---------------------------------------------------------------

    def workers(self, count: int, module: str = "workers") -> list[Proc]:
        procs = [self.procs.python(f"worker-{i}", "-m", module) for i in range(count)]
        wait_idle(procs)
        return procs

    def project_live(self, count: int) -> Point:
        self.flush()
        workers = self.workers(count)
        plan = self.plan
        pool = self.pool(self.factory.mixed(plan.events // plan.batch, plan.batch))
        names = [keys.stream(kind) for kind in pool.kinds]
        meter = self.meter([self.servers["project"], *workers])
        run = start_closed(self.ports["project"], pool, plan.e2e_conns, E2E_TIMEOUT_S)
        t0 = run.wait_ready()
        meter.start()
        seen: list[tuple[float, int]] = []  # (when, events written): how far the workers were

        def written() -> bool:
            seen.append((time.perf_counter(), self.xlen(names)))
            return seen[-1][1] >= pool.events

        t_end = self.until(written, run)
        meter.stop()
        res = run.wait()
        self.stop(*workers)
        pool.path.unlink()
        point = self.e2e_point(f"live, {count} worker(s)", pool.events, t_end - t0, meter, res)
        point.update(self.outputs(pool), sent_s=round(run.done_at - t0, 3),
                     written_when_sent=max((n for at, n in seen if at <= run.done_at), default=0))
        return point

    def project_drain(self, count: int, module: str = "workers", users: int | None = None
                      ) -> Point:
        """A pre-filled backlog drained by `count` workers (`module`: bench.handler_worker for
        workers that run a CPU-bound handler per event). With `users`, the ordered case: the
        backlog comes from that many users (many events each, each user's in many requests),
        and every user's stream entries are then checked against the order the user made them."""
        self.flush()
        workers = self.workers(count, module)
        for w in workers:
            w.pause()
        plan = self.plan
        factory = self.factory if users is None else Factory(self.secret, users=users)
        pool = self.pool(factory.mixed(plan.events // plan.batch, plan.batch))
        names = [keys.stream(kind) for kind in pool.kinds]
        before = self.memory()
        filling = self.meter([self.servers["project"]])
        filling.start()
        res = start_closed(self.ports["project"], pool, plan.e2e_conns, E2E_TIMEOUT_S).wait()
        filling.stop()
        jobs = self.zcard(PROJECT_QUEUE)
        per_event = (self.memory() - before) / pool.events
        meter = self.meter(workers)
        meter.start()
        t0 = time.perf_counter()
        for w in workers:
            w.resume()
        t_end = self.until(lambda: self.xlen(names) >= pool.events)
        meter.stop()
        self.stop(*workers)
        pool.path.unlink()
        label = f"backlog, {count} worker(s)" + (", handler" if module != "workers" else "") + (
            f", ordered, {users:,} users" if users else "")
        point = self.e2e_point(label, pool.events, t_end - t0, meter, res)
        point.update(self.outputs(pool), queued_jobs=jobs,
                     bytes_per_queued_event=round(per_event, 1),
                     prefill_events_per_s=round(res.rps * pool.events_per_request, 1),
                     prefill_cpu_us_per_event=per_unit(filling, pool.events))
        if users:
            point.update(users=users, order_violations=self.order_violations())
        return point

    def project_ordered(self, count: int = 2, users: int = 10_000) -> Point:
        """The ordered case (see project_drain). Order is promised as ingest accepted the
        events, and the closed-loop generator's connections take the next request from one
        list: two requests in flight at once may be accepted in either order. A user's events
        therefore recur only every `users` events (200 requests of 50 with 10,000 users), so
        that no two of them are in flight together unless a request is overtaken by 200 others
        (with 2,000 users, 40: one full run counted one such pair in 150,000 events)."""
        return self.project_drain(count, users=users)

    def order_violations(self) -> int:
        """Users' events whose stream entry comes before that of an event the same user made
        earlier: entry ids compared by their milliseconds across streams (each stream numbers
        its entries within one), the users' own timestamps giving the order they were made."""
        by_user: dict[str, list[tuple[int, int]]] = {}
        for name in self.redis.scan_iter(keys.STREAM_PREFIX + "*"):
            for entry_id, fields in self.redis.xrange(name):
                ms = int(entry_id.decode().partition("-")[0])
                by_user.setdefault(fields[b"sender"].decode(), []).append(
                    (int(fields[b"timestamp"]), ms))
        violations = 0
        for entries in by_user.values():
            entries.sort()
            violations += sum(1 for a, b in itertools.pairwise(entries) if b[1] < a[1])
        return violations

    def outputs(self, pool: Pool) -> dict[str, Any]:
        """Checks that every event landed exactly once and that referrals were attributed."""
        names = sorted(k.decode() for k in self.redis.scan_iter(keys.STREAM_PREFIX + "*"))
        per_stream = {n: self.xlen([n]) for n in names}
        users = sum(1 for _ in self.redis.scan_iter(keys.ATTR_PREFIX + "*", count=1000))
        ok = per_stream == {keys.stream(k): v for k, v in pool.kinds.items()} and users > 0
        if not ok:
            self.log(f"  OUTPUT MISMATCH: streams {per_stream}, expected {pool.kinds}")
        return {"streams": per_stream, "attributed_users": users, "outputs_ok": ok}

    def attribution(self, touches: int) -> Point:
        """Bytes per attributed user: the real pipeline writes the records, which are then
        copied (DUMP/RESTORE, encoding kept) into an empty database and measured there alone."""
        self.flush()
        workers = self.workers(2)
        users = self.plan.users
        pool = self.pool(self.factory.touches(users, touches))
        run = start_closed(self.ports["project"], pool, self.plan.e2e_conns, E2E_TIMEOUT_S)
        self.until(lambda: self.xlen([keys.stream("referral")]) >= pool.events, run)
        run.wait()
        self.stop(*workers)
        pool.path.unlink()
        names = [k.decode() for k in self.redis.scan_iter(keys.ATTR_PREFIX + "*", count=1000)]
        scratch = Redis.from_url(self.redis_url.rsplit("/", 1)[0] + "/1")  # the URL's db wins
        scratch.flushdb()
        before = self.memory()
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            dumps = self.redis.pipeline(transaction=False)
            for name in chunk:
                dumps.dump(name)
            restore = scratch.pipeline(transaction=False)
            for name, blob in zip(chunk, dumps.execute(), strict=True):
                restore.restore(name, 0, blob)
            restore.execute()
        delta = self.memory() - before
        usage = scratch.pipeline(transaction=False)
        for name in names:
            usage.memory_usage(name, samples=0)
        per_key = sum(int(u) for u in usage.execute()) / max(1, len(names))
        encoding = scratch.object("encoding", names[0]) if names else None
        sample: bytes | None = scratch.get(names[0]) if names else None  # type: ignore[assignment]
        history = len(sample or b"")
        scratch.flushdb()
        scratch.close()
        per_user = delta / max(1, len(names))
        self.log(f"  attribution, {touches} touch(es): {len(names):,} users, {per_user:,.0f} "
                 f"bytes/user (MEMORY USAGE {per_key:,.0f}), encoding {encoding!r}, "
                 f"history field {history} bytes")
        return {"users": len(names), "touches": touches, "bytes_per_user": round(per_user, 1),
                "memory_usage_per_user": round(per_key, 1),
                "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
                "history_field_bytes": history}

    def project(self) -> dict[str, Any]:
        """End to end with 1 and 2 workers, live and from a backlog, rounds interleaved."""
        plan = self.plan
        self.log("project: fixed rate with one worker running")
        worker = self.workers(1)
        out: dict[str, Any] = {"paced_with_worker": self.paced("project", worker)}
        self.stop(*worker)
        live: dict[int, list[Point]] = {1: [], 2: []}
        drain: dict[int, list[Point]] = {1: [], 2: []}
        handler: dict[int, list[Point]] = {1: [], 2: []}
        ordered: list[Point] = []
        for r in range(plan.rounds):
            self.log(f"project end to end, round {r + 1}/{plan.rounds}")
            for count in (1, 2):
                live[count].append(self.project_live(count))
            for count in (1, 2):
                drain[count].append(self.project_drain(count))
            for count in (1, 2):
                handler[count].append(self.project_drain(count, "bench.handler_worker"))
            ordered.append(self.project_ordered(2))
        out["live"] = {str(c): keep_best(p, "events_per_s") for c, p in live.items()}
        out["drain"] = {str(c): keep_best(p, "events_per_s") for c, p in drain.items()}
        out["drain_handler"] = {str(c): keep_best(p, "events_per_s")
                                for c, p in handler.items()}
        out["drain_ordered"] = keep_best(ordered, "events_per_s")
        self.log("project: Redis memory per attributed user")
        out["attribution"] = {str(n): self.attribution(n) for n in (1, 3)}
        self.stop(self.servers.pop("project"))
        return out
