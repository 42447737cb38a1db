"""What routing through pgreplica costs on top of a raw connection, a plain psycopg pool
and Pgpool-II.

Run ``python -m bench.overhead`` (``make bench``). It starts a local primary with one
streaming replica (or uses an existing cluster with ``--config pgreplica.toml``),
creates a 10,000-row table on the primary and waits until the replica has replayed it,
starts Pgpool-II in front of the local cluster (:mod:`bench.pgpool`; skipped, with the
reason, when it cannot run or with ``--config``), and times single operations of two
statements, ``SELECT 1`` and a primary-key lookup
(``SELECT id, v FROM pgreplica_bench_items WHERE id = %s``, a different id each time),
interleaved in small batches whose order rotates so that machine noise hits every side
alike:

* (a) ``raw``: one persistent psycopg connection to the replica (autocommit, the
  arguments the balancer gives its pool's connections);
* (b) ``pool``: ``with pool.connection() as conn: conn.execute(...).fetchone()``, where
  ``pool`` is a ``psycopg_pool.ConnectionPool`` to the same replica with the very
  arguments the load balancer gives its own pool;
* ``getconn``: that pool's bare ``getconn()`` / ``putconn()`` around the statement;
* (c) ``lb.read()``: ``with lb.read() as conn: conn.execute(...).fetchone()``;
* (d) ``lb.connection()``: one routing connection in autocommit, which classifies each
  statement and routes it (to the replica: no write happens during the run);
* (e) Pgpool-II: one persistent psycopg connection through Pgpool-II in
  streaming-replication mode with load balancing (the primary's weight 0, so the
  session's reads go to the replica);
* the three checkouts (``lb.read()``, ``pool.connection()``, ``getconn``/``putconn``)
  around an empty block, no network: the pool's checkout/checkin alone, and the
  in-process cost of routing on top of it;
* all of it again with asyncio: :class:`pgreplica.AsyncLoadBalancer`,
  ``psycopg_pool.AsyncConnectionPool``, ``psycopg.AsyncConnection`` (raw and through
  Pgpool-II) and ``await alb.connection()``.

For each path it reports the median and p99, the microseconds added over (a) the raw
connection and over (b) the pool, and the ratios; the gap from ``lb.read()`` to a raw
connection is accounted for as the pool's checkout/checkin (b - a) plus routing
(c - b), next to the same two parts measured without a statement (no-op blocks).

By default the client, the replica backends serving every path and the Pgpool-II
processes share one CPU (see :class:`Pinning`). No write happens during the run, so
every routed read must be served by the replica (and Pgpool-II's ``select_cnt`` must
grow on the replica only); the benchmark fails (exit status 1) if one was not or a read
returned a wrong row. It writes ``bench/results/overhead.json``
(:class:`bench.results.Results`), and ``--json PATH`` the raw figures as well.
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
import random
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
from bench.results import Results
from pgreplica import AsyncLoadBalancer, LoadBalancer, Settings

SQL = "SELECT 1"
TABLE = "pgreplica_bench_items"
ROWS = 10_000
PK_SQL = f"SELECT id, v FROM {TABLE} WHERE id = %s"
WARMUP_TIMEOUT = 30.0
REPLAY_TIMEOUT = 30.0
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
#: Names this run's connections (every path alike) so that its backends are found.
APPLICATION_NAME = f"pgreplica-bench-{os.getpid()}"
#: lb.read() over a psycopg pool, at the median (the suite's target).
TARGET_ADDED_US = 5.0
#: Pgpool-II's added time over pgreplica's (both over a raw connection), at least.
TARGET_PGPOOL_FACTOR = 10.0

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

    def at(self, which: str) -> float:
        return self.median_us if which == "median" else self.p99_us


# -- what is timed -----------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """A statement with its parameters and the row each must return."""

    name: str
    sql: str
    params: list[tuple[int] | None]
    rows: list[tuple[Any, ...]]

    @classmethod
    def select_1(cls) -> Statement:
        return cls("SELECT 1", SQL, [None], [(1,)])

    @classmethod
    def pk_lookup(cls, rows: int = ROWS) -> Statement:
        ids = list(range(1, rows + 1))
        random.Random(7).shuffle(ids)
        return cls("PK lookup", PK_SQL, [(i,) for i in ids], [(i, i * 7) for i in ids])


#: A block with no statement (checkout and checkin only).
NOOP = Statement("no-op block", "", [None], [(1,)])

#: Path keys, in the order of the tables, with their labels.
LABELS: dict[str, str] = {
    "raw": "(a) raw psycopg connection",
    "pool": "(b) psycopg_pool pool.connection()",
    "getconn": "    psycopg_pool getconn/putconn",
    "read": "(c) pgreplica lb.read()",
    "routing": "(d) pgreplica lb.connection() autocommit",
    "pgpool": "(e) Pgpool-II, persistent connection",
}
SHORT: dict[str, str] = {
    "raw": "raw connection",
    "pool": "psycopg pool",
    "getconn": "getconn/putconn",
    "read": "lb.read()",
    "routing": "lb.connection()",
    "pgpool": "Pgpool-II",
}


class ReadCheck:
    """One path's reads: how many a replica served (where that is known) and wrong rows."""

    def __init__(self) -> None:
        self.reads = 0
        self.on_replica = 0
        self.reasons: dict[str, int] = {}
        self.bad_rows = 0

    def route(self, on_replica: bool, reason: Any) -> None:
        self.reads += 1
        if on_replica:
            self.on_replica += 1
        else:
            self.reasons[str(reason)] = self.reasons.get(str(reason), 0) + 1


# Every loop: (target, statement, n, samples out, check). Parameters and the expected
# row are picked before the first clock reading, checks happen after the second.


def _start(stmt: Statement) -> tuple[int, int]:
    k = len(stmt.params)
    return k, random.randrange(k)


def sync_conn_read(conn: Any, stmt: Statement, n: int, out: list[int], check: ReadCheck) -> None:
    """A persistent connection: (a) raw, (e) through Pgpool-II."""
    clock = time.perf_counter_ns
    execute = conn.execute
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        row = execute(sql, p).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        if row != rows[j]:
            check.bad_rows += 1


def sync_routing_read(conn: Any, stmt: Statement, n: int, out: list[int], check: ReadCheck) -> None:
    """(d) a routing connection: the same, and where each statement went."""
    clock = time.perf_counter_ns
    execute = conn.execute
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        row = execute(sql, p).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        check.route(conn.reason == "replica", conn.reason)
        if row != rows[j]:
            check.bad_rows += 1


def sync_routed_read(
    lb: LoadBalancer, stmt: Statement, n: int, out: list[int], check: ReadCheck
) -> None:
    """(c) lb.read()."""
    clock = time.perf_counter_ns
    read = lb.read
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        with read() as conn:
            row = conn.execute(sql, p).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        check.route(conn.on_replica, conn.reason)  # after the clock
        if row != rows[j]:
            check.bad_rows += 1


def sync_direct_read(
    pool: psycopg_pool.ConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
) -> None:
    """(b) pool.connection()."""
    clock = time.perf_counter_ns
    connection = pool.connection
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        with connection() as conn:
            row = conn.execute(sql, p).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        if row != rows[j]:
            check.bad_rows += 1


def sync_raw_read(
    pool: psycopg_pool.ConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
) -> None:
    """getconn()/putconn() around the statement."""
    clock = time.perf_counter_ns
    getconn, putconn = pool.getconn, pool.putconn
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        conn = getconn()
        row = conn.execute(sql, p).fetchone()
        putconn(conn)
        t1 = clock()
        out.append(t1 - t0)
        if row != rows[j]:
            check.bad_rows += 1


def sync_routed_noop(
    lb: LoadBalancer, stmt: Statement, n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    read = lb.read
    for _ in range(n):
        t0 = clock()
        with read() as conn:
            pass
        t1 = clock()
        out.append(t1 - t0)
        check.route(conn.on_replica, conn.reason)


def sync_direct_noop(
    pool: psycopg_pool.ConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
) -> None:
    clock = time.perf_counter_ns
    connection = pool.connection
    for _ in range(n):
        t0 = clock()
        with connection():
            pass
        t1 = clock()
        out.append(t1 - t0)


def sync_raw_noop(
    pool: psycopg_pool.ConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
) -> None:
    clock = time.perf_counter_ns
    getconn, putconn = pool.getconn, pool.putconn
    for _ in range(n):
        t0 = clock()
        putconn(getconn())
        t1 = clock()
        out.append(t1 - t0)


async def async_conn_read(
    conn: Any, stmt: Statement, n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    execute = conn.execute
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        row = await (await execute(sql, p)).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        if row != rows[j]:
            check.bad_rows += 1


async def async_routing_read(
    conn: Any, stmt: Statement, n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    execute = conn.execute
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        row = await (await execute(sql, p)).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        check.route(conn.reason == "replica", conn.reason)
        if row != rows[j]:
            check.bad_rows += 1


async def async_routed_read(
    lb: AsyncLoadBalancer, stmt: Statement, n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    read = lb.read
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        async with read() as conn:
            row = await (await conn.execute(sql, p)).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        check.route(conn.on_replica, conn.reason)
        if row != rows[j]:
            check.bad_rows += 1


async def async_direct_read(
    pool: psycopg_pool.AsyncConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
) -> None:
    clock = time.perf_counter_ns
    connection = pool.connection
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        async with connection() as conn:
            row = await (await conn.execute(sql, p)).fetchone()
        t1 = clock()
        out.append(t1 - t0)
        if row != rows[j]:
            check.bad_rows += 1


async def async_raw_read(
    pool: psycopg_pool.AsyncConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
) -> None:
    clock = time.perf_counter_ns
    getconn, putconn = pool.getconn, pool.putconn
    sql, params, rows = stmt.sql, stmt.params, stmt.rows
    k, start = _start(stmt)
    for i in range(start, start + n):
        j = i % k
        p = params[j]
        t0 = clock()
        conn = await getconn()
        row = await (await conn.execute(sql, p)).fetchone()
        await putconn(conn)
        t1 = clock()
        out.append(t1 - t0)
        if row != rows[j]:
            check.bad_rows += 1


async def async_routed_noop(
    lb: AsyncLoadBalancer, stmt: Statement, n: int, out: list[int], check: ReadCheck
) -> None:
    clock = time.perf_counter_ns
    read = lb.read
    for _ in range(n):
        t0 = clock()
        async with read() as conn:
            pass
        t1 = clock()
        out.append(t1 - t0)
        check.route(conn.on_replica, conn.reason)


async def async_direct_noop(
    pool: psycopg_pool.AsyncConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
) -> None:
    clock = time.perf_counter_ns
    connection = pool.connection
    for _ in range(n):
        t0 = clock()
        async with connection():
            pass
        t1 = clock()
        out.append(t1 - t0)


async def async_raw_noop(
    pool: psycopg_pool.AsyncConnectionPool[Any],
    stmt: Statement,
    n: int,
    out: list[int],
    check: ReadCheck,
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


SyncLoop = Callable[[Any, Statement, int, list[int], ReadCheck], None]
AsyncLoop = Callable[[Any, Statement, int, list[int], ReadCheck], Awaitable[None]]
#: (path key, loop, what it runs on)
SyncArm = tuple[str, SyncLoop, Any]
AsyncArm = tuple[str, AsyncLoop, Any]


def rotation(arms: int, round_no: int) -> list[int]:
    """ABC, BCA, CAB, ...: every arm runs first, middle and last equally often."""
    return [(round_no + i) % arms for i in range(arms)]


@dataclass
class Measured:
    """One statement (or the no-op block) timed along every path, sync or asyncio."""

    mode: str  # "sync" | "async"
    statement: str
    stats: dict[str, Stats]
    checks: dict[str, ReadCheck]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.mode} {self.statement}"

    def added(self, key: str, base: str, which: str = "median") -> float:
        return self.stats[key].at(which) - self.stats[base].at(which)

    def ratio(self, key: str, base: str, which: str = "median") -> float:
        return self.stats[key].at(which) / self.stats[base].at(which)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "statement": self.statement,
            "paths": {key: vars(s) for key, s in self.stats.items()},
        }
        for base in ("raw", "pool"):
            if base not in self.stats:
                continue
            out[f"over_{base}"] = {
                key: {
                    "added_median_us": round(self.added(key, base), 3),
                    "added_p99_us": round(self.added(key, base, "p99"), 3),
                    "ratio_median": round(self.ratio(key, base), 4),
                    "ratio_p99": round(self.ratio(key, base, "p99"), 4),
                }
                for key in self.stats
                if key != base
            }
        out["checks"] = {
            key: {
                "routed_reads": c.reads,
                "on_replica": c.on_replica,
                "elsewhere": dict(c.reasons),
                "bad_rows": c.bad_rows,
            }
            for key, c in self.checks.items()
        }
        out.update(self.notes)
        return out


def interleave_sync(
    mode: str,
    stmt: Statement,
    arms: list[SyncArm],
    iterations: int,
    batch: int,
    seconds: float = math.inf,
) -> Measured:
    """Run the arms in alternating small batches so that drift and noise hit all;
    ``iterations`` per arm, or fewer once ``seconds`` have passed (after a whole round,
    so every arm has as many samples)."""
    samples: list[list[int]] = [[] for _ in arms]
    checks = [ReadCheck() for _ in arms]
    deadline = time.monotonic() + seconds
    with gc_paused():
        done = rounds = 0
        while done < iterations and time.monotonic() < deadline:
            n = min(batch, iterations - done)
            for i in rotation(len(arms), rounds):
                _, loop, target = arms[i]
                loop(target, stmt, n, samples[i], checks[i])
            done += n
            rounds += 1
            if rounds % 40 == 0:
                gc.collect()
    return finish(mode, stmt, arms, samples, checks)


async def interleave_async(
    mode: str,
    stmt: Statement,
    arms: list[AsyncArm],
    iterations: int,
    batch: int,
    seconds: float = math.inf,
) -> Measured:
    samples: list[list[int]] = [[] for _ in arms]
    checks = [ReadCheck() for _ in arms]
    deadline = time.monotonic() + seconds
    with gc_paused():
        done = rounds = 0
        while done < iterations and time.monotonic() < deadline:
            n = min(batch, iterations - done)
            for i in rotation(len(arms), rounds):
                _, loop, target = arms[i]
                await loop(target, stmt, n, samples[i], checks[i])
            done += n
            rounds += 1
            if rounds % 40 == 0:
                gc.collect()
    return finish(mode, stmt, arms, samples, checks)


def finish(
    mode: str,
    stmt: Statement,
    arms: list[Any],
    samples: list[list[int]],
    checks: list[ReadCheck],
) -> Measured:
    keys = [arm[0] for arm in arms]
    order = [k for k in LABELS if k in keys]
    stats = {k: Stats.of(samples[keys.index(k)]) for k in order}
    return Measured(mode, stmt.name, stats, {k: checks[keys.index(k)] for k in order})


# -- setup -------------------------------------------------------------------------------


@dataclass
class Target:
    primary: str
    replica: str
    description: str
    local: bool
    """The replica runs on this machine (its backends can be pinned to a CPU)."""
    cluster: Any = None
    """The :class:`~pgreplica.testing.LocalCluster`, when this run started one."""


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
            cluster,
        )
    finally:
        try:
            cluster.destroy()
        except Exception as exc:
            print(f"warning: could not destroy {directory}: {exc}", file=sys.stderr)


def is_loopback(conninfo: str) -> bool:
    host = str(conninfo_to_dict(conninfo).get("host") or "localhost")
    return all(h in LOOPBACK or h.startswith("/") for h in host.split(","))


@contextmanager
def items_table(target: Target, rows: int = ROWS) -> Iterator[None]:
    """``pgreplica_bench_items`` (``id`` primary key, ``v = 7 * id``) on the primary,
    replayed by the replica before the run; dropped afterwards."""
    with psycopg.connect(target.primary, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v int NOT NULL)")
        conn.execute(f"INSERT INTO {TABLE} SELECT i, 7 * i FROM generate_series(1, %s) i", [rows])
        conn.execute(f"VACUUM ANALYZE {TABLE}")
        row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        lsn = str(row[0]) if row else "0/0"
    deadline = time.monotonic() + REPLAY_TIMEOUT
    with psycopg.connect(target.replica, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]).fetchone()
            if row and row[0]:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the replica did not replay {TABLE} within {REPLAY_TIMEOUT:g}s")
            time.sleep(0.02)
    try:
        yield
    finally:
        try:
            with psycopg.connect(target.primary, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        except psycopg.Error as exc:
            print(f"warning: could not drop {TABLE}: {exc}", file=sys.stderr)


@dataclass
class PgpoolSide:
    """Pgpool-II for this run, or why it is skipped."""

    pgpool: Any = None
    skipped: str | None = None
    version: str = ""
    replica_node: str = "1"
    notes: dict[str, Any] = field(default_factory=dict)


@contextmanager
def pgpool_side(target: Target, args: argparse.Namespace) -> Iterator[PgpoolSide]:
    """Pgpool-II in front of the local cluster (never in front of ``--config``'s)."""
    if args.no_pgpool:
        yield PgpoolSide(skipped="--no-pgpool")
        return
    if target.cluster is None:
        yield PgpoolSide(skipped="--config: Pgpool-II runs only in front of a local cluster")
        return
    from bench.pgpool import Pgpool, PgpoolError, pgpool_unavailable, pgpool_version

    reason = pgpool_unavailable()
    if reason is not None:
        print(f"Pgpool-II skipped: {reason}", file=sys.stderr)
        yield PgpoolSide(skipped=reason)
        return
    pgpool = Pgpool(target.cluster, num_init_children=8)
    try:
        print("starting Pgpool-II in front of it ...", file=sys.stderr, flush=True)
        pgpool.start()
    except (PgpoolError, OSError, psycopg.Error) as exc:
        reason = f"Pgpool-II did not start: {exc}"
        print(reason, file=sys.stderr)
        yield PgpoolSide(skipped=reason)
        return
    try:
        yield PgpoolSide(pgpool, version=pgpool_version(pgpool.binary))
    finally:
        pgpool.stop()


def pgpool_select_counts(side: PgpoolSide) -> dict[str, int]:
    """``select_cnt`` per Pgpool-II node id."""
    return {n["node_id"]: int(n.get("select_cnt") or 0) for n in side.pgpool.pool_nodes()}


def process_group(pgid: int) -> list[int]:
    """Every process of process group ``pgid`` (Pgpool-II's parent and children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


class Pinning:
    """Keeps the client and the replica's backends on one CPU.

    A query's latency depends on whether the server process that answers it runs on
    the client's CPU (a plain context switch) or on another one (a cross-CPU wake-up,
    tens of microseconds on some machines), and the scheduler places each backend
    independently. Unpinned, that placement, not pgreplica, can decide which path
    looks faster, so by default everything involved shares one CPU.
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
        text = f"client and {len(self.pids)} server processes (replica backends"
        text += f" of every path, Pgpool-II) on CPU {self.cpu}"
        return f"{text}; {self.note}" if self.note else text


BACKENDS_SQL = (
    "SELECT pid FROM pg_stat_activity"
    " WHERE application_name = %s AND backend_type = 'client backend'"
)
#: Where a session through Pgpool-II reads (checked before the run). Not
#: pg_is_in_recovery(): it is VOLATILE, so Pgpool-II sends it to the primary.
WHERE_SQL = "SELECT inet_server_port()"


def replica_host(lb: LoadBalancer | AsyncLoadBalancer) -> Any:
    route = lb._router.route(None)
    (host,) = route.replicas
    return host


def direct_pool_kwargs(lb: LoadBalancer | AsyncLoadBalancer) -> dict[str, Any]:
    """Exactly the arguments the balancer gives the pool of its replica."""
    kwargs = lb._pool_kwargs(replica_host(lb))
    kwargs["name"] = "direct"
    return kwargs


def pin_everything(
    pinning: Pinning, rows: list[Any], side: PgpoolSide, lb: LoadBalancer | AsyncLoadBalancer
) -> None:
    pinning.backends([row[0] for row in rows])
    if side.pgpool is not None and side.pgpool.process is not None:
        pinning.backends(process_group(side.pgpool.process.pid))


def check_pgpool_session(where: Any, side: PgpoolSide, replica_port: int) -> None:
    port = where[0] if where else None
    if port is None or int(port) != replica_port:
        raise SystemExit(
            f"the Pgpool-II session reads from port {port}, not from the replica on {replica_port}"
        )


def sync_arms(
    lb: LoadBalancer, pool: Any, raw: Any, routing: Any, pgpool_conn: Any
) -> list[SyncArm]:
    arms: list[SyncArm] = [
        ("raw", sync_conn_read, raw),
        ("pool", sync_direct_read, pool),
        ("getconn", sync_raw_read, pool),
        ("read", sync_routed_read, lb),
        ("routing", sync_routing_read, routing),
    ]
    if pgpool_conn is not None:
        arms.append(("pgpool", sync_conn_read, pgpool_conn))
    return arms


def sync_noop_arms(lb: LoadBalancer, pool: Any) -> list[SyncArm]:
    return [
        ("pool", sync_direct_noop, pool),
        ("getconn", sync_raw_noop, pool),
        ("read", sync_routed_noop, lb),
    ]


def async_arms(
    lb: AsyncLoadBalancer, pool: Any, raw: Any, routing: Any, pgpool_conn: Any
) -> list[AsyncArm]:
    arms: list[AsyncArm] = [
        ("raw", async_conn_read, raw),
        ("pool", async_direct_read, pool),
        ("getconn", async_raw_read, pool),
        ("read", async_routed_read, lb),
        ("routing", async_routing_read, routing),
    ]
    if pgpool_conn is not None:
        arms.append(("pgpool", async_conn_read, pgpool_conn))
    return arms


def async_noop_arms(lb: AsyncLoadBalancer, pool: Any) -> list[AsyncArm]:
    return [
        ("pool", async_direct_noop, pool),
        ("getconn", async_raw_noop, pool),
        ("read", async_routed_noop, lb),
    ]


def sync_wait_for_replica(lb: LoadBalancer) -> None:
    """Wait until reads reach the replica (the first probes are done)."""
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while True:
        with lb.read() as conn:
            conn.execute(SQL).fetchone()
        if conn.on_replica:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"reads never reached the replica (last reason: {conn.reason})")
        time.sleep(0.05)


async def async_wait_for_replica(lb: AsyncLoadBalancer) -> None:
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while True:
        async with lb.read() as conn:
            await (await conn.execute(SQL)).fetchone()
        if conn.on_replica:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"async reads never reached the replica (last: {conn.reason})")
        await asyncio.sleep(0.05)


def statements(args: argparse.Namespace) -> list[Statement]:
    return [Statement.select_1(), Statement.pk_lookup()]


def read_seconds(args: argparse.Namespace) -> float:
    """The time cap of one statement's measurement: ``--duration`` shared by the four
    (sync and async, two statements); the no-op blocks take little and are not capped."""
    return args.duration / 4 if args.duration > 0 else math.inf


def run_sync(
    target: Target, args: argparse.Namespace, pinning: Pinning, side: PgpoolSide
) -> tuple[list[Measured], str]:
    lb = LoadBalancer(
        primary=target.primary, replicas=[target.replica], application_name=APPLICATION_NAME
    )
    pool: psycopg_pool.ConnectionPool[Any] | None = None
    opened: list[Any] = []
    try:
        lb.open()
        kwargs = direct_pool_kwargs(lb)
        pool = psycopg_pool.ConnectionPool(**kwargs)
        pool.open(wait=True)
        raw = psycopg.connect(kwargs["conninfo"], **kwargs["kwargs"])
        opened.append(raw)
        row = raw.execute("SELECT current_setting('server_version'), inet_server_port()").fetchone()
        version, replica_port = (str(row[0]), int(row[1] or 0)) if row else ("?", 0)
        routing = lb.connection()
        opened.append(routing)
        routing.autocommit = True
        pgpool_conn = None
        if side.pgpool is not None:
            pgpool_conn = psycopg.connect(side.pgpool.dsn, **kwargs["kwargs"])
            opened.append(pgpool_conn)
            check_pgpool_session(pgpool_conn.execute(WHERE_SQL).fetchone(), side, replica_port)
        sync_wait_for_replica(lb)
        arms = sync_arms(lb, pool, raw, routing, pgpool_conn)
        stmts = statements(args)
        sink: list[int] = []
        for stmt in stmts:
            for _, loop, on in arms:
                loop(on, stmt, args.warmup, sink, ReadCheck())
        for _, loop, on in sync_noop_arms(lb, pool):
            loop(on, NOOP, args.warmup, sink, ReadCheck())
        rows = raw.execute(BACKENDS_SQL, [lb.settings.application_name]).fetchall()
        pin_everything(pinning, rows, side, lb)
        n, batch = args.iterations, args.batch
        results = []
        for stmt in stmts:
            before = pgpool_select_counts(side) if pgpool_conn is not None else {}
            measured = interleave_sync("sync", stmt, arms, n, batch, read_seconds(args))
            if pgpool_conn is not None:
                note_pgpool_counts(measured, before, pgpool_select_counts(side))
            results.append(measured)
        results.append(interleave_sync("sync", NOOP, sync_noop_arms(lb, pool), n, batch))
        return results, version
    finally:
        with quiet_shutdown():
            for conn in reversed(opened):
                conn.close()
            if pool is not None:
                pool.close()
            lb.close()


async def run_async(
    target: Target, args: argparse.Namespace, pinning: Pinning, side: PgpoolSide
) -> list[Measured]:
    lb = AsyncLoadBalancer(
        primary=target.primary, replicas=[target.replica], application_name=APPLICATION_NAME
    )
    pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
    opened: list[Any] = []
    try:
        await lb.open()
        kwargs = direct_pool_kwargs(lb)
        pool = psycopg_pool.AsyncConnectionPool(**kwargs)
        await pool.open(wait=True)
        raw = await psycopg.AsyncConnection.connect(kwargs["conninfo"], **kwargs["kwargs"])
        opened.append(raw)
        row = await (await raw.execute("SELECT inet_server_port()")).fetchone()
        replica_port = int(row[0] or 0) if row else 0
        routing = await lb.connection()
        opened.append(routing)
        await routing.set_autocommit(True)
        pgpool_conn = None
        if side.pgpool is not None:
            pgpool_conn = await psycopg.AsyncConnection.connect(side.pgpool.dsn, **kwargs["kwargs"])
            opened.append(pgpool_conn)
            where = await (await pgpool_conn.execute(WHERE_SQL)).fetchone()
            check_pgpool_session(where, side, replica_port)
        await async_wait_for_replica(lb)
        arms = async_arms(lb, pool, raw, routing, pgpool_conn)
        stmts = statements(args)
        sink: list[int] = []
        for stmt in stmts:
            for _, loop, on in arms:
                await loop(on, stmt, args.warmup, sink, ReadCheck())
        for _, loop, on in async_noop_arms(lb, pool):
            await loop(on, NOOP, args.warmup, sink, ReadCheck())
        cur = await raw.execute(BACKENDS_SQL, [lb.settings.application_name])
        pin_everything(pinning, await cur.fetchall(), side, lb)
        n, batch = args.async_iterations, args.batch
        results = []
        for stmt in stmts:
            before = pgpool_select_counts(side) if pgpool_conn is not None else {}
            measured = await interleave_async("async", stmt, arms, n, batch, read_seconds(args))
            if pgpool_conn is not None:
                note_pgpool_counts(measured, before, pgpool_select_counts(side))
            results.append(measured)
        results.append(await interleave_async("async", NOOP, async_noop_arms(lb, pool), n, batch))
        return results
    finally:
        with quiet_shutdown():
            for conn in reversed(opened):
                await conn.close()
            if pool is not None:
                await pool.close()
            await lb.close()


def note_pgpool_counts(measured: Measured, before: dict[str, int], after: dict[str, int]) -> None:
    """Pgpool-II's own count of the SELECTs each node served during the run (the
    pgpool path's reads, plus the SHOW POOL_NODES of this check)."""
    grown = {node: after.get(node, 0) - before.get(node, 0) for node in after}
    measured.notes["pgpool_select_cnt_delta"] = grown


# -- report ------------------------------------------------------------------------------


def fmt_us(value: float) -> str:
    return f"{value:9.2f} us"


def print_table(results: list[Measured]) -> None:
    header = f"{'':44}{'median':>12}{'p99':>12}{'mean':>12}{'min':>12}"
    print(header)
    print("-" * len(header))
    for m in results:
        print(m.name)
        for key, s in m.stats.items():
            print(
                f"  {LABELS[key]:42}{fmt_us(s.median_us)}{fmt_us(s.p99_us)}"
                f"{fmt_us(s.mean_us)}{fmt_us(s.min_us)}"
            )
        for base in ("raw", "pool"):
            if base not in m.stats:
                continue
            print(f"  added over {SHORT[base]} (median, p99) and ratio (median, p99):")
            for key in m.stats:
                if key in (base, "getconn") or (base == "pool" and key == "raw"):
                    continue
                print(
                    f"    {SHORT[key]:40}{fmt_us(m.added(key, base))}"
                    f"{fmt_us(m.added(key, base, 'p99'))}"
                    f"{m.ratio(key, base):12.3f}{m.ratio(key, base, 'p99'):12.3f}"
                )
        for key, c in m.checks.items():
            if c.reads:
                share = 100 * c.on_replica / c.reads
                print(
                    f"  {SHORT[key] + ' served by the replica':42}"
                    f"{c.on_replica:>6}/{c.reads} ({share:.1f}%)"
                )
            if c.reasons:
                print(f"  {SHORT[key] + ' served elsewhere (by reason)':42}{c.reasons}")
            if c.bad_rows:
                print(f"  {SHORT[key] + ': WRONG ROWS':42}{c.bad_rows}")
        if "pgpool_select_cnt_delta" in m.notes:
            print(
                f"  {'Pgpool-II select_cnt growth by node':42}{m.notes['pgpool_select_cnt_delta']}"
            )
        print()


@dataclass
class Account:
    """lb.read()'s remaining gap to a raw connection, in two measured parts."""

    name: str
    gap_us: float  # read - raw
    pool_us: float  # pool.connection() - raw, with the statement
    routing_us: float  # lb.read() - pool.connection(), with the statement
    noop_pool_us: float  # pool.connection() around an empty block
    noop_getconn_us: float  # getconn/putconn alone
    noop_routing_us: float  # lb.read() - pool.connection(), empty blocks

    @property
    def pool_beyond_checkout_us(self) -> float:
        """What the pool path costs with a statement beyond its checkout/checkin alone
        (a persistent connection stays hot in the CPU caches; a checkout does not)."""
        return self.pool_us - self.noop_pool_us

    def text(self) -> str:
        return (
            f"{self.name}: lb.read() - raw = {self.gap_us:+.1f} us ="
            f" pool checkout/checkin {self.pool_us:+.1f} us (pool.connection() - raw;"
            f" of which {self.noop_pool_us:.1f} us is checkout/checkin alone, no statement,"
            f" getconn/putconn {self.noop_getconn_us:.1f} us of it, and"
            f" {self.pool_beyond_checkout_us:+.1f} us more with a statement)"
            f" + routing {self.routing_us:+.1f} us (lb.read() - pool.connection();"
            f" alone: {self.noop_routing_us:+.1f} us)"
        )


def accounts(results: list[Measured]) -> list[Account]:
    by = {m.name: m for m in results}
    out = []
    for m in results:
        if m.statement == NOOP.name:
            continue
        noop = by[f"{m.mode} {NOOP.name}"]
        out.append(
            Account(
                m.name,
                gap_us=m.added("read", "raw"),
                pool_us=m.added("pool", "raw"),
                routing_us=m.added("read", "pool"),
                noop_pool_us=noop.stats["pool"].median_us,
                noop_getconn_us=noop.stats["getconn"].median_us,
                noop_routing_us=noop.added("read", "pool"),
            )
        )
    return out


def pgpool_factor(m: Measured) -> float:
    """Pgpool-II's added median over raw, per microsecond lb.read() adds over raw."""
    pgreplica_added = m.added("read", "raw")
    pgpool_added = m.added("pgpool", "raw")
    if pgreplica_added <= 0:
        return math.inf
    return pgpool_added / pgreplica_added


def build_results(
    results: list[Measured],
    args: argparse.Namespace,
    target: Target,
    side: PgpoolSide,
    version: str,
    clock_ns: float,
    pinning: Pinning,
    ok: bool,
) -> Results:
    res = Results("overhead", "Per-read overhead: pgreplica vs a pool, a raw connection, Pgpool-II")
    reads = [m for m in results if m.statement != NOOP.name]
    by = {m.name: m for m in results}
    sync1 = by["sync SELECT 1"]
    pgpool_text = (
        f"Pgpool-II {side.version} (streaming-replication mode, load balancing, one"
        " persistent connection whose session reads from the replica)"
        if side.pgpool is not None
        else f"Pgpool-II skipped ({side.skipped})"
    )
    res.summary = (
        f"Single reads on one local streaming replica, timed along every path and"
        f" interleaved in batches of {args.batch} whose order rotates:"
        f" up to {args.iterations} sync and {args.async_iterations} asyncio operations per"
        f" path and statement (at most {args.duration:g} s in all; counts in the data):"
        f" `SELECT 1`, and a primary-key lookup in a {ROWS:,}-row table. Paths: (a) one"
        " raw psycopg connection, (b) a psycopg pool"
        " with the balancer's pool arguments, (c) `lb.read()`, (d) a routing connection"
        f" (`lb.connection()`, autocommit), (e) {pgpool_text}. CPU pinning:"
        f" {pinning.describe()}. At the median, sync `SELECT 1`: `lb.read()` adds"
        f" {sync1.added('read', 'pool'):.1f} us over the pool and"
        f" {sync1.added('read', 'raw'):.1f} us over a raw connection"
        + (
            f"; Pgpool-II adds {sync1.added('pgpool', 'raw'):.1f} us over a raw connection."
            if "pgpool" in sync1.stats
            else "."
        )
    )
    columns = [
        "path",
        "median µs",
        "p99 µs",
        "mean µs",
        "added over raw, median µs",
        "added over raw, p99 µs",
        "ratio to raw, median",
        "ratio to raw, p99",
        "added over pool, median µs",
        "added over pool, p99 µs",
        "ratio to pool, median",
        "ratio to pool, p99",
    ]
    for m in reads:
        rows = []
        for key, s in m.stats.items():
            rows.append(
                [
                    LABELS[key].strip(),
                    round(s.median_us, 2),
                    round(s.p99_us, 2),
                    round(s.mean_us, 2),
                    round(m.added(key, "raw"), 2),
                    round(m.added(key, "raw", "p99"), 2),
                    round(m.ratio(key, "raw"), 3),
                    round(m.ratio(key, "raw", "p99"), 3),
                    round(m.added(key, "pool"), 2),
                    round(m.added(key, "pool", "p99"), 2),
                    round(m.ratio(key, "pool"), 3),
                    round(m.ratio(key, "pool", "p99"), 3),
                ]
            )
        note = (
            "The raw connection, lb.connection() and Pgpool-II's are persistent"
            " connections; the pool and lb.read() check a connection out and in per read."
        )
        if "pgpool_select_cnt_delta" in m.notes:
            note += (
                f" Pgpool-II's select_cnt growth per node: {m.notes['pgpool_select_cnt_delta']}."
            )
        res.table(f"{m.mode}: {m.statement}", columns, rows, note)
    noops = [m for m in results if m.statement == NOOP.name]
    res.table(
        "Checkout and checkin alone (an empty block, no statement)",
        ["mode", "path", "median µs", "p99 µs", "added over pool, median µs"],
        [
            [
                m.mode,
                LABELS[key].strip(),
                round(s.median_us, 2),
                round(s.p99_us, 2),
                round(m.added(key, "pool"), 2),
            ]
            for m in noops
            for key, s in m.stats.items()
        ],
        "What the pool's checkout/checkin costs in process, and what routing adds to it.",
    )
    accts = accounts(results)
    res.table(
        "lb.read()'s remaining gap to a raw connection, accounted (medians)",
        [
            "measurement",
            "gap lb.read() - raw µs",
            "pool checkout/checkin (pool - raw) µs",
            "routing (lb.read() - pool) µs",
            "pool.connection() alone µs",
            "getconn/putconn alone µs",
            "pool path beyond checkout alone µs",
            "routing alone µs",
        ],
        [
            [
                a.name,
                round(a.gap_us, 2),
                round(a.pool_us, 2),
                round(a.routing_us, 2),
                round(a.noop_pool_us, 2),
                round(a.noop_getconn_us, 2),
                round(a.pool_beyond_checkout_us, 2),
                round(a.noop_routing_us, 2),
            ]
            for a in accts
        ],
        "The gap is the pool's part (pool - raw) plus routing (lb.read() - pool). 'Alone'"
        " are the same parts timed around an empty block (no network); the pool's part"
        " with a statement exceeds its checkout/checkin alone by the 'beyond' column.",
    )
    paths = [k for k in ("pool", "read", "routing", "pgpool") if k in sync1.stats]
    res.chart(
        "added-median",
        "Added µs per read over a raw connection, at the median",
        x=[SHORT[k] for k in paths],
        series={m.name: [round(m.added(k, "raw"), 2) for k in paths] for m in reads},
        kind="bar",
        xlabel="path",
        ylabel="µs added over a raw psycopg connection (median)",
    )
    for m in reads:
        added = m.added("read", "pool")
        res.target(
            f"At most {TARGET_ADDED_US:g} µs added per lb.read() over a psycopg pool at the"
            f" median ({m.name})",
            f"{added:+.2f} µs ({m.stats['read'].median_us:.1f} vs"
            f" {m.stats['pool'].median_us:.1f} µs)",
            added <= TARGET_ADDED_US,
        )
    for m in reads:
        if "pgpool" not in m.stats:
            res.target(
                f"Pgpool-II's added overhead at least {TARGET_PGPOOL_FACTOR:g} times"
                f" pgreplica's ({m.name})",
                f"not measured: Pgpool-II skipped ({side.skipped})",
                None,
            )
            continue
        factor = pgpool_factor(m)
        res.target(
            f"Pgpool-II's added overhead at least {TARGET_PGPOOL_FACTOR:g} times pgreplica's"
            f" ({m.name}; both over a raw psycopg connection to the replica, at the median:"
            " (Pgpool-II - raw) / (lb.read() - raw))",
            f"{factor:.1f}x (Pgpool-II +{m.added('pgpool', 'raw'):.1f} µs,"
            f" lb.read() +{m.added('read', 'raw'):.1f} µs)",
            factor >= TARGET_PGPOOL_FACTOR,
        )
    for a in accts:
        res.target(f"Remaining gap lb.read() vs a raw connection ({a.name})", a.text(), None)
    for m in reads:
        res.target(
            f"lb.connection() (autocommit) vs a raw connection ({m.name}, median)",
            f"{m.added('routing', 'raw'):+.2f} µs (ratio {m.ratio('routing', 'raw'):.3f})",
            None,
        )
    res.data = payload(results, args, target, side, version, clock_ns, pinning, ok)
    return res


def payload(
    results: list[Measured],
    args: argparse.Namespace,
    target: Target,
    side: PgpoolSide,
    version: str,
    clock_ns: float,
    pinning: Pinning,
    ok: bool,
) -> dict[str, Any]:
    return {
        "target": target.description,
        "versions": {
            "pgreplica": pgreplica.__version__,
            "psycopg": psycopg.__version__,
            "psycopg_pool": psycopg_pool.__version__,
            "postgresql": version,
            "pgpool": side.version or None,
            "python": platform.python_version(),
        },
        "pgpool": {"skipped": side.skipped} if side.skipped else {"skipped": None},
        "iterations": args.iterations,
        "async_iterations": args.async_iterations,
        "duration_cap_s": args.duration,
        "done_per_path": {m.name: next(iter(m.stats.values())).count for m in results},
        "batch": args.batch,
        "warmup": args.warmup,
        "rows": ROWS,
        "clock_overhead_ns": clock_ns,
        "cpu_pinning": pinning.describe(),
        "ok": ok,
        "results": [m.as_dict() for m in results],
        "accounts": [
            {**vars(a), "pool_beyond_checkout_us": a.pool_beyond_checkout_us}
            for a in accounts(results)
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Per-read cost of pgreplica routing against a raw connection, a plain"
        " psycopg pool and Pgpool-II.",
    )
    parser.add_argument(
        "--iterations", type=int, default=10_000, help="sync operations per path (10000)"
    )
    parser.add_argument(
        "--async-iterations", type=int, default=5_000, help="async operations per path (5000)"
    )
    parser.add_argument(
        "--batch", type=int, default=50, help="operations per alternating batch (50)"
    )
    parser.add_argument(
        "--warmup", type=int, default=300, help="untimed operations per loop first (300)"
    )
    parser.add_argument(
        "--pin",
        default="auto",
        metavar="auto|off|CPU",
        help="run the client, the replica's backends and Pgpool-II on one CPU (auto: the"
        " last allowed CPU, when the replica is local)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=48.0,
        metavar="SECONDS",
        help="at most this long for the timed reads, shared by the four measurements;"
        " fewer iterations when it runs out (48; 0: no cap)",
    )
    parser.add_argument("--config", metavar="TOML", help="use this cluster instead of a new one")
    parser.add_argument("--no-pgpool", action="store_true", help="leave Pgpool-II out")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    parser.add_argument(
        "--results-dir",
        metavar="DIR",
        help="where overhead.json goes (default bench/results)",
    )
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


def load_text(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def check_results(results: list[Measured]) -> bool:
    ok = True
    for m in results:
        for key, c in m.checks.items():
            missed = c.reads - c.on_replica
            if missed:
                ok = False
                print(f"FAILED: {m.name}: {missed} {SHORT[key]} reads not served by the replica")
            if c.bad_rows:
                ok = False
                print(f"FAILED: {m.name}: {c.bad_rows} {SHORT[key]} reads returned a wrong row")
        grown = m.notes.get("pgpool_select_cnt_delta")
        if grown and grown.get("0", 0) > 0:
            ok = False
            print(f"FAILED: {m.name}: Pgpool-II sent {grown['0']} SELECTs to the primary")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    started = time.monotonic()
    load_before = os.getloadavg()
    with (
        cluster_target(args.config) as target,
        items_table(target),
        pgpool_side(target, args) as side,
    ):
        pinning = Pinning(args.pin, target)
        sync_results, version = run_sync(target, args, pinning, side)
        async_results = asyncio.run(run_async(target, args, pinning, side))
    results = sync_results + async_results
    elapsed = time.monotonic() - started

    clock_ns = clock_overhead_ns()
    print()
    print("pgreplica routing overhead")
    print("  (a) one raw psycopg connection to the replica, (b) a psycopg_pool pool to it with")
    print("  the balancer's pool arguments, (c) lb.read(), (d) lb.connection() in autocommit,")
    print("  (e) one connection through Pgpool-II; SELECT 1 and a primary-key lookup")
    print(f"  target      {target.description}")
    print(
        f"  versions    pgreplica {pgreplica.__version__}, psycopg {psycopg.__version__},"
        f" psycopg_pool {psycopg_pool.__version__}, PostgreSQL {version},"
        f" Python {platform.python_version()}"
    )
    if side.pgpool is not None:
        print(f"  Pgpool-II   {side.version}, streaming replication, load balancing")
    else:
        print(f"  Pgpool-II   skipped: {side.skipped}")
    counts = ", ".join(f"{m.name} {next(iter(m.stats.values())).count}" for m in results)
    print(
        f"  iterations  up to {args.iterations} sync, {args.async_iterations} async per path"
        f" (--duration {args.duration:g} s), interleaved in batches of {args.batch} (order"
        f" rotated every batch); done per path: {counts}"
    )
    print(f"  load avg    {load_text(load_before)} before, {load_text(os.getloadavg())} after")
    print(f"  cpu pinning {pinning.describe()}")
    print(f"  clock       {clock_ns:.0f} ns per pair of perf_counter_ns readings (in every sample)")
    print()
    print_table(results)

    ok = check_results(results)
    for a in accounts(results):
        print(a.text())
    for m in results:
        if m.statement == NOOP.name:
            continue
        line = (
            f"{m.name}: lb.read() +{m.added('read', 'pool'):.1f} us over the pool"
            f" (ratio {m.ratio('read', 'pool'):.3f}), +{m.added('read', 'raw'):.1f} us over raw;"
            f" lb.connection() +{m.added('routing', 'raw'):.1f} us over raw"
        )
        if "pgpool" in m.stats:
            line += (
                f"; Pgpool-II +{m.added('pgpool', 'raw'):.1f} us over raw"
                f" ({pgpool_factor(m):.1f}x lb.read()'s)"
            )
        print(line)
    print(f"(total run time {elapsed:.0f} s)")

    res = build_results(results, args, target, side, version, clock_ns, pinning, ok)
    res.data["load_average"] = {"before": load_before, "after": os.getloadavg()}
    res.summary += (
        f" Load average (1, 5, 15 min) {load_text(load_before)} before the run,"
        f" {load_text(os.getloadavg())} after, on {os.cpu_count()} CPUs."
    )
    res.save(Path(args.results_dir) if args.results_dir else None)
    if args.json:
        Path(args.json).write_text(json.dumps(res.data, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
