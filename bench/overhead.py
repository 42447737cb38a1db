"""What routing through pgreplica costs on top of a plain psycopg pool.

Run ``python -m bench.overhead`` (``make bench``). It starts a local primary with one
streaming replica (or uses an existing cluster with ``--config pgreplica.toml``) and
times single operations, interleaved in small batches whose order rotates so that
machine noise hits every side alike:

* A ``with lb.read() as conn: conn.execute("SELECT 1").fetchone()``
* B ``with pool.connection() as conn: conn.execute("SELECT 1").fetchone()``, where
  ``pool`` is a ``psycopg_pool.ConnectionPool`` to the same replica with the very
  arguments the load balancer gives its own pool;
* C ``pool.getconn()`` / ``pool.putconn()`` around the same statement: the floor;
* the same three around an empty block (checkout and checkin only, no network), which
  isolates the in-process cost of routing;
* all of it again with :class:`pgreplica.AsyncLoadBalancer` and
  ``psycopg_pool.AsyncConnectionPool``.

By default the client and the replica backends serving A, B and C share one CPU (see
:class:`Pinning`). No write happens during the run, so every routed read must be
served by the replica; the benchmark fails (exit status 1) if one was not.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

import pgreplica
from pgreplica import AsyncLoadBalancer, LoadBalancer, Settings

SQL = "SELECT 1"
WARMUP_TIMEOUT = 30.0
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
#: Names this run's connections (pools of A and B alike) so that its backends are found.
APPLICATION_NAME = f"pgreplica-bench-{os.getpid()}"

# -- statistics --------------------------------------------------------------------------


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list, in nanoseconds."""
    if not sorted_ns:
        return float("nan")
    rank = max(1, min(len(sorted_ns), math.ceil(q / 100 * len(sorted_ns))))
    return float(sorted_ns[rank - 1])


def median(sorted_ns: list[int]) -> float:
    n = len(sorted_ns)
    if n == 0:
        return float("nan")
    mid = n // 2
    return float(sorted_ns[mid]) if n % 2 else (sorted_ns[mid - 1] + sorted_ns[mid]) / 2


@dataclass
class Stats:
    count: int
    median_us: float
    p99_us: float
    mean_us: float
    min_us: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Stats:
        ordered = sorted(samples_ns)
        return cls(
            count=len(ordered),
            median_us=median(ordered) / 1000,
            p99_us=percentile(ordered, 99) / 1000,
            mean_us=sum(ordered) / len(ordered) / 1000 if ordered else float("nan"),
            min_us=ordered[0] / 1000 if ordered else float("nan"),
        )


@dataclass
class Comparison:
    """Routed (A) against direct (B) timings of the same operation, with the bare
    ``getconn()``/``putconn()`` of the pool (C) as a lower bound."""

    name: str
    routed: Stats
    direct: Stats
    raw: Stats
    replica_reads: int
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def added_median_us(self) -> float:
        return self.routed.median_us - self.direct.median_us

    @property
    def added_p99_us(self) -> float:
        return self.routed.p99_us - self.direct.p99_us

    @property
    def ratio_median(self) -> float:
        return self.routed.median_us / self.direct.median_us

    @property
    def ratio_p99(self) -> float:
        return self.routed.p99_us / self.direct.p99_us

    @property
    def added_over_raw_median_us(self) -> float:
        return self.routed.median_us - self.raw.median_us

    @property
    def added_over_raw_p99_us(self) -> float:
        return self.routed.p99_us - self.raw.p99_us

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "routed": vars(self.routed),
            "direct": vars(self.direct),
            "raw_getconn_putconn": vars(self.raw),
            "added_median_us": round(self.added_median_us, 3),
            "added_p99_us": round(self.added_p99_us, 3),
            "ratio_median": round(self.ratio_median, 4),
            "ratio_p99": round(self.ratio_p99, 4),
            "added_over_raw_median_us": round(self.added_over_raw_median_us, 3),
            "added_over_raw_p99_us": round(self.added_over_raw_p99_us, 3),
            "replica_reads": self.replica_reads,
            **self.notes,
        }


# -- timing loops ------------------------------------------------------------------------


class ReadCheck:
    """Counts the routed reads served by a replica and checks every row."""

    def __init__(self) -> None:
        self.reads = 0
        self.on_replica = 0
        self.reasons: dict[str, int] = {}
        self.bad_rows = 0

    def record(self, conn: Any, row: Any) -> None:
        self.reads += 1
        if conn.on_replica:
            self.on_replica += 1
        else:
            self.reasons[conn.reason] = self.reasons.get(conn.reason, 0) + 1
        if row != (1,):
            self.bad_rows += 1


def sync_routed_read(lb: LoadBalancer, n: int, out: list[int], check: ReadCheck) -> None:
    clock = time.perf_counter_ns
    read = lb.read
    for _ in range(n):
        t0 = clock()
        with read() as conn:
            row = conn.execute(SQL).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        check.record(conn, row)  # after the clock: on_replica is not part of a read


def sync_direct_read(
    pool: psycopg_pool.ConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    connection = pool.connection
    for _ in range(n):
        t0 = clock()
        with connection() as conn:
            row = conn.execute(SQL).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        if row != (1,):
            check.bad_rows += 1


def sync_routed_noop(lb: LoadBalancer, n: int, out: list[int], check: ReadCheck) -> None:
    clock = time.perf_counter_ns
    read = lb.read
    for _ in range(n):
        t0 = clock()
        with read() as conn:
            pass
        t1 = clock()
        out.append(t1 - t0)
        check.record(conn, (1,))


def sync_direct_noop(
    pool: psycopg_pool.ConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    connection = pool.connection
    for _ in range(n):
        t0 = clock()
        with connection():
            pass
        t1 = clock()
        out.append(t1 - t0)


def sync_raw_read(
    pool: psycopg_pool.ConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    getconn, putconn = pool.getconn, pool.putconn
    for _ in range(n):
        t0 = clock()
        conn = getconn()
        row = conn.execute(SQL).fetchone()
        putconn(conn)
        t1 = clock()
        out.append(t1 - t0)
        if row != (1,):
            check.bad_rows += 1


def sync_raw_noop(
    pool: psycopg_pool.ConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    getconn, putconn = pool.getconn, pool.putconn
    for _ in range(n):
        t0 = clock()
        putconn(getconn())
        t1 = clock()
        out.append(t1 - t0)


async def async_routed_read(
    lb: AsyncLoadBalancer, n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    read = lb.read
    for _ in range(n):
        t0 = clock()
        async with read() as conn:
            row = await (await conn.execute(SQL)).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        check.record(conn, row)


async def async_direct_read(
    pool: psycopg_pool.AsyncConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    connection = pool.connection
    for _ in range(n):
        t0 = clock()
        async with connection() as conn:
            row = await (await conn.execute(SQL)).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        if row != (1,):
            check.bad_rows += 1


async def async_routed_noop(
    lb: AsyncLoadBalancer, n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    read = lb.read
    for _ in range(n):
        t0 = clock()
        async with read() as conn:
            pass
        t1 = clock()
        out.append(t1 - t0)
        check.record(conn, (1,))


async def async_direct_noop(
    pool: psycopg_pool.AsyncConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    connection = pool.connection
    for _ in range(n):
        t0 = clock()
        async with connection():
            pass
        t1 = clock()
        out.append(t1 - t0)


async def async_raw_read(
    pool: psycopg_pool.AsyncConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    getconn, putconn = pool.getconn, pool.putconn
    for _ in range(n):
        t0 = clock()
        conn = await getconn()
        row = await (await conn.execute(SQL)).fetchone()
        await putconn(conn)
        t1 = clock()
        out.append(t1 - t0)
        if row != (1,):
            check.bad_rows += 1


async def async_raw_noop(
    pool: psycopg_pool.AsyncConnectionPool[Any], n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    getconn, putconn = pool.getconn, pool.putconn
    for _ in range(n):
        t0 = clock()
        await putconn(await getconn())
        t1 = clock()
        out.append(t1 - t0)


def clock_overhead_ns(n: int = 20_000) -> float:
    """Median cost of one pair of clock readings (included in every sample)."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        t1 = clock()
        samples.append(t1 - t0)
    return median(sorted(samples))


@contextmanager
def gc_paused() -> Iterator[None]:
    """No collection inside a timed loop; collect between batches instead."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


SyncLoop = Callable[[Any, int, list[int], ReadCheck], None]
AsyncLoop = Callable[[Any, int, list[int], ReadCheck], Awaitable[None]]


def rotation(arms: int, round_no: int) -> list[int]:
    """ABC, BCA, CAB, ...: every arm runs first, middle and last equally often."""
    return [(round_no + i) % arms for i in range(arms)]


def interleave_sync(
    name: str, arms: list[tuple[SyncLoop, Any]], iterations: int, batch: int
) -> Comparison:
    """Run the arms in alternating small batches so that drift and noise hit all."""
    samples: list[list[int]] = [[] for _ in arms]
    check = ReadCheck()
    with gc_paused():
        done = rounds = 0
        while done < iterations:
            n = min(batch, iterations - done)
            for i in rotation(len(arms), rounds):
                loop, target = arms[i]
                loop(target, n, samples[i], check)
            done += n
            rounds += 1
            if rounds % 40 == 0:
                gc.collect()
    return finish(name, samples, check)


async def interleave_async(
    name: str, arms: list[tuple[AsyncLoop, Any]], iterations: int, batch: int
) -> Comparison:
    samples: list[list[int]] = [[] for _ in arms]
    check = ReadCheck()
    with gc_paused():
        done = rounds = 0
        while done < iterations:
            n = min(batch, iterations - done)
            for i in rotation(len(arms), rounds):
                loop, target = arms[i]
                await loop(target, n, samples[i], check)
            done += n
            rounds += 1
            if rounds % 40 == 0:
                gc.collect()
    return finish(name, samples, check)


def finish(name: str, samples: list[list[int]], check: ReadCheck) -> Comparison:
    routed, direct, raw = (Stats.of(s) for s in samples)
    comparison = Comparison(name, routed, direct, raw, replica_reads=check.on_replica)
    if check.reasons:
        comparison.notes["not_on_replica"] = dict(check.reasons)
    if check.bad_rows:
        comparison.notes["bad_rows"] = check.bad_rows
    return comparison


# -- setup -------------------------------------------------------------------------------


@dataclass
class Target:
    primary: str
    replica: str
    description: str
    local: bool
    """The replica runs on this machine (its backends can be pinned to a CPU)."""


@contextmanager
def cluster_target(config: str | None) -> Iterator[Target]:
    """A primary and one replica: from ``config``, or a fresh local cluster."""
    if config is not None:
        settings = Settings.from_toml(config)
        db = settings.database(None)
        if not db.replicas:
            raise SystemExit(f"{config}: database {db.name!r} has no replica to benchmark")
        yield Target(
            db.primary.conninfo,
            db.replicas[0].conninfo,
            f"{config} (database {db.name!r}, replica {db.replicas[0].label})",
            is_loopback(db.replicas[0].conninfo),
        )
        return

    from pgreplica.localcluster import LocalCluster

    directory = Path(tempfile.mkdtemp(prefix="pgreplica-"))
    os.chmod(directory, 0o755)  # the servers run as 'postgres' when we are root
    cluster = LocalCluster(directory, replicas=1)
    try:
        print("starting a local primary with 1 streaming replica ...", file=sys.stderr, flush=True)
        cluster.up()
        yield Target(
            cluster.primary_dsn,
            cluster.replica_dsns[0],
            f"local cluster in {directory} (1 replica)",
            True,
        )
    finally:
        try:
            cluster.destroy()
        except Exception as exc:
            print(f"warning: could not destroy {directory}: {exc}", file=sys.stderr)


def is_loopback(conninfo: str) -> bool:
    host = str(conninfo_to_dict(conninfo).get("host") or "localhost")
    return all(h in LOOPBACK or h.startswith("/") for h in host.split(","))


class Pinning:
    """Keeps the client and the replica's backends on one CPU.

    A query's latency depends on whether the server process that answers it runs on
    the client's CPU (a plain context switch) or on another one (a cross-CPU wake-up,
    tens of microseconds on some machines), and the scheduler places each backend
    independently. Unpinned, that placement, not pgreplica, can decide which of A and
    B looks faster, so by default everything involved shares one CPU.
    """

    def __init__(self, spec: str, target: Target) -> None:
        self.cpu: int | None = None
        self.pids: set[int] = set()
        self.note = ""
        if spec == "off":
            self.note = "off (--pin off)"
            return
        if not hasattr(os, "sched_setaffinity"):
            self.note = "off (not supported on this platform)"
            return
        allowed = sorted(os.sched_getaffinity(0))
        if spec == "auto":
            if len(allowed) == 1:
                self.note = f"not needed (this process may only use CPU {allowed[0]})"
                return
            if not target.local:
                self.note = "off (the replica is not on this machine)"
                return
            cpu = allowed[-1]
        else:
            cpu = int(spec)
            if cpu not in allowed:
                raise SystemExit(f"--pin {cpu}: this process may only use CPUs {allowed}")
        os.sched_setaffinity(0, {cpu})  # before any thread starts: the threads inherit it
        self.cpu = cpu

    def backends(self, pids: list[int]) -> None:
        if self.cpu is None:
            return
        for pid in pids:
            try:
                os.sched_setaffinity(pid, {self.cpu})
            except (PermissionError, ProcessLookupError) as exc:
                self.note = f"partial (backend {pid}: {type(exc).__name__})"
            else:
                self.pids.add(pid)

    def describe(self) -> str:
        if self.cpu is None:
            return self.note
        text = f"client and the replica backends of A, B and C ({len(self.pids)}) on CPU {self.cpu}"
        return f"{text}; {self.note}" if self.note else text


BACKENDS_SQL = (
    "SELECT pid FROM pg_stat_activity"
    " WHERE application_name = %s AND backend_type = 'client backend'"
)


def replica_host(lb: LoadBalancer | AsyncLoadBalancer) -> Any:
    route = lb._router.route(None)
    (host,) = route.replicas
    return host


def direct_pool_kwargs(lb: LoadBalancer | AsyncLoadBalancer) -> dict[str, Any]:
    """Exactly the arguments the balancer gives the pool of its replica."""
    kwargs = lb._pool_kwargs(replica_host(lb))
    kwargs["name"] = "direct"
    return kwargs


def sync_warmup(lb: LoadBalancer, pool: psycopg_pool.ConnectionPool[Any], n: int) -> None:
    """Wait until reads reach the replica (first probes done), then run every loop."""
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while True:
        with lb.read() as conn:
            conn.execute(SQL).fetchone()
        if conn.on_replica:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"reads never reached the replica (last reason: {conn.reason})")
        time.sleep(0.05)
    sink: list[int] = []
    check = ReadCheck()
    for loop, target in [*sync_read_arms(lb, pool), *sync_noop_arms(lb, pool)]:
        loop(target, n, sink, check)


async def async_warmup(
    lb: AsyncLoadBalancer, pool: psycopg_pool.AsyncConnectionPool[Any], n: int
) -> None:
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while True:
        async with lb.read() as conn:
            await (await conn.execute(SQL)).fetchone()
        if conn.on_replica:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"async reads never reached the replica (last: {conn.reason})")
        await asyncio.sleep(0.05)
    sink: list[int] = []
    check = ReadCheck()
    for loop, target in [*async_read_arms(lb, pool), *async_noop_arms(lb, pool)]:
        await loop(target, n, sink, check)


def sync_read_arms(lb: Any, pool: Any) -> list[tuple[SyncLoop, Any]]:
    return [(sync_routed_read, lb), (sync_direct_read, pool), (sync_raw_read, pool)]


def sync_noop_arms(lb: Any, pool: Any) -> list[tuple[SyncLoop, Any]]:
    return [(sync_routed_noop, lb), (sync_direct_noop, pool), (sync_raw_noop, pool)]


def async_read_arms(lb: Any, pool: Any) -> list[tuple[AsyncLoop, Any]]:
    return [(async_routed_read, lb), (async_direct_read, pool), (async_raw_read, pool)]


def async_noop_arms(lb: Any, pool: Any) -> list[tuple[AsyncLoop, Any]]:
    return [(async_routed_noop, lb), (async_direct_noop, pool), (async_raw_noop, pool)]


def run_sync(
    target: Target, args: argparse.Namespace, pinning: Pinning
) -> tuple[list[Comparison], str]:
    lb = LoadBalancer(
        primary=target.primary, replicas=[target.replica], application_name=APPLICATION_NAME
    )
    pool: psycopg_pool.ConnectionPool[Any] | None = None
    try:
        lb.open()
        pool = psycopg_pool.ConnectionPool(**direct_pool_kwargs(lb))
        pool.open(wait=True)
        with pool.connection() as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
            version = str(row[0]) if row else "?"
        sync_warmup(lb, pool, args.warmup)
        with pool.connection() as conn:
            rows = conn.execute(BACKENDS_SQL, [lb.settings.application_name]).fetchall()
        pinning.backends([row[0] for row in rows])
        n, batch = args.iterations, args.batch
        return [
            interleave_sync("sync SELECT 1", sync_read_arms(lb, pool), n, batch),
            interleave_sync("sync no-op block", sync_noop_arms(lb, pool), n, batch),
        ], version
    finally:
        with quiet_shutdown():
            if pool is not None:
                pool.close()
            lb.close()


async def run_async(target: Target, args: argparse.Namespace, pinning: Pinning) -> list[Comparison]:
    lb = AsyncLoadBalancer(
        primary=target.primary, replicas=[target.replica], application_name=APPLICATION_NAME
    )
    pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
    try:
        await lb.open()
        pool = psycopg_pool.AsyncConnectionPool(**direct_pool_kwargs(lb))
        await pool.open(wait=True)
        await async_warmup(lb, pool, args.warmup)
        async with pool.connection() as conn:
            cur = await conn.execute(BACKENDS_SQL, [lb.settings.application_name])
            rows = await cur.fetchall()
        pinning.backends([row[0] for row in rows])
        n, batch = args.async_iterations, args.batch
        return [
            await interleave_async("async SELECT 1", async_read_arms(lb, pool), n, batch),
            await interleave_async("async no-op block", async_noop_arms(lb, pool), n, batch),
        ]
    finally:
        with quiet_shutdown():
            if pool is not None:
                await pool.close()
            await lb.close()


# -- report ------------------------------------------------------------------------------


def fmt_us(value: float) -> str:
    return f"{value:9.2f} us"


def print_table(results: list[Comparison]) -> None:
    header = f"{'':38}{'median':>12}{'p99':>12}{'mean':>12}{'min':>12}"
    print(header)
    print("-" * len(header))
    for c in results:
        print(c.name)
        for label, s in [
            ("A  pgreplica lb.read()", c.routed),
            ("B  psycopg_pool pool.connection()", c.direct),
            ("C  psycopg_pool getconn/putconn", c.raw),
        ]:
            print(
                f"  {label:36}{fmt_us(s.median_us)}{fmt_us(s.p99_us)}"
                f"{fmt_us(s.mean_us)}{fmt_us(s.min_us)}"
            )
        print(f"  {'added A - B':36}{fmt_us(c.added_median_us)}{fmt_us(c.added_p99_us)}")
        print(f"  {'ratio A / B':36}{c.ratio_median:12.3f}{c.ratio_p99:12.3f}")
        print(
            f"  {'added A - C':36}"
            f"{fmt_us(c.added_over_raw_median_us)}{fmt_us(c.added_over_raw_p99_us)}"
        )
        share = 100 * c.replica_reads / c.routed.count
        print(
            f"  {'A served by the replica':36}{c.replica_reads:>6}/{c.routed.count} ({share:.1f}%)"
        )
        if "not_on_replica" in c.notes:
            print(f"  {'A served elsewhere (by reason)':36}{c.notes['not_on_replica']}")
        if c.notes.get("bad_rows"):
            print(f"  {'WRONG ROWS':36}{c.notes['bad_rows']}")
        print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Per-read cost of pgreplica routing against a plain psycopg pool.",
    )
    parser.add_argument(
        "--iterations", type=int, default=20_000, help="sync operations per side (20000)"
    )
    parser.add_argument(
        "--async-iterations", type=int, default=5_000, help="async operations per side (5000)"
    )
    parser.add_argument(
        "--batch", type=int, default=50, help="operations per alternating batch (50)"
    )
    parser.add_argument(
        "--warmup", type=int, default=500, help="untimed operations per loop first (500)"
    )
    parser.add_argument(
        "--pin",
        default="auto",
        metavar="auto|off|CPU",
        help="run the client and the replica's backends on one CPU (auto: the last"
        " allowed CPU, when the replica is local)",
    )
    parser.add_argument("--config", metavar="TOML", help="use this cluster instead of a new one")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for name in ("iterations", "async_iterations", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.pin not in ("auto", "off") and not args.pin.isdigit():
        parser.error("--pin takes auto, off or a CPU number")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def quiet_logging() -> None:
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    # A prober stopped in the middle of a probe can leave the probe's task behind; the
    # event loop then reports its late error. That is shutdown noise for this benchmark.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


@contextmanager
def quiet_shutdown() -> Iterator[None]:
    """Closing the balancer may interrupt a probe: no host_offline warning for that."""
    routing = logging.getLogger("pgreplica")
    level = routing.level
    routing.setLevel(logging.ERROR)
    try:
        yield
    finally:
        routing.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    started = time.monotonic()
    with cluster_target(args.config) as target:
        pinning = Pinning(args.pin, target)
        sync_results, version = run_sync(target, args, pinning)
        async_results = asyncio.run(run_async(target, args, pinning))
    results = sync_results + async_results
    elapsed = time.monotonic() - started

    clock_ns = clock_overhead_ns()
    print()
    print("pgreplica routing overhead")
    print("  A = pgreplica lb.read(), B = psycopg_pool pool.connection() to the same replica")
    print("  with the same pool arguments, C = that pool's bare getconn()/putconn()")
    print(f"  target      {target.description}")
    print(
        f"  versions    pgreplica {pgreplica.__version__}, psycopg {psycopg.__version__},"
        f" psycopg_pool {psycopg_pool.__version__}, PostgreSQL {version},"
        f" Python {platform.python_version()}"
    )
    print(
        f"  iterations  {args.iterations} sync, {args.async_iterations} async per arm,"
        f" interleaved in batches of {args.batch} (order rotated every batch)"
    )
    print(f"  cpu pinning {pinning.describe()}")
    print(f"  clock       {clock_ns:.0f} ns per pair of perf_counter_ns readings (in every sample)")
    print()
    print_table(results)

    ok = True
    for c in results:
        missed = c.routed.count - c.replica_reads
        if missed:
            ok = False
            print(f"FAILED: {c.name}: {missed} routed reads were not served by the replica")
        if c.notes.get("bad_rows"):
            ok = False
            print(f"FAILED: {c.name}: {c.notes['bad_rows']} reads returned a wrong row")
    by_name = {c.name: c for c in results}
    for label, name in [
        ("in-process routing (sync, median)", "sync no-op block"),
        ("in-process routing (async, median)", "async no-op block"),
        ("routed read (async, median)", "async SELECT 1"),
        ("routed read (sync, median)", "sync SELECT 1"),
    ]:
        c = by_name[name]
        print(
            f"added per {label}: {c.added_median_us:.1f} us (ratio {c.ratio_median:.2f});"
            f" over bare getconn/putconn: {c.added_over_raw_median_us:.1f} us"
        )
    print(f"(total run time {elapsed:.0f} s)")

    if args.json:
        payload = {
            "target": target.description,
            "versions": {
                "pgreplica": pgreplica.__version__,
                "psycopg": psycopg.__version__,
                "psycopg_pool": psycopg_pool.__version__,
                "postgresql": version,
                "python": platform.python_version(),
            },
            "iterations": args.iterations,
            "async_iterations": args.async_iterations,
            "batch": args.batch,
            "clock_overhead_ns": clock_ns,
            "cpu_pinning": pinning.describe(),
            "ok": ok,
            "results": [c.as_dict() for c in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
