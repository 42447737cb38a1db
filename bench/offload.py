"""How many reads leave the primary when no read may be stale: offload at zero stale reads.

Run ``python -m bench.offload [--seconds N] [--threads N]`` (part of ``make bench``). It
starts a local primary with two streaming replicas (a
:class:`pgreplica.testing.LocalCluster` in a new temporary directory): replica 1 replays
with a 50 ms apply delay, replica 2 has its replay paused for 3 s in the middle of every
strategy's run.

N simulated users (threads) each own a row. One cycle of a user: update its own row with
a new version number (a write), read it back at once (a read after its own write), then
read ``--others`` rows of other users. The strategies run one after another for the same
time each:

* ``primary``: every read on the primary;
* ``naive-rr``: round robin over the replicas, no consistency;
* ``pin-2s``: the primary for 2 s after the user's last write, else round robin (Rails'
  automatic role switching; Makara's sticking);
* ``gitlab``: GitLab's load balancer: after a write the user's reads need its WAL position;
  each replica is asked directly (one query each, in round-robin order) until one has
  replayed it, else the primary;
* ``pgpool`` / ``pgpool-delay``: Pgpool-II 4.3 in streaming-replication mode with load
  balancing, one connection per user, without and with ``delay_threshold`` (1 byte);
* ``pgreplica``: ``lb.read()`` in the user's context (its token comes from ``lb.write()``)
  with the default settings (an adaptive catch-up wait of at most ``max_wait`` = 5 ms);
* ``pgreplica-nowait``: the same with ``max_wait=0`` (each replica asked once, no wait);
* ``pgreplica-<N>ms``: the catch-up wait bound N ms (the curve of share against wait).

A read is **stale** when it is a read after the user's own write that did not see that
version. The **oracle share** is the share of reads that some replica had already
replayed the needed position for when the read began (the user's last write for every
read of pgreplica, GitLab and pinning's session; nothing for other users' rows in the
others): what a router with perfect knowledge could send to replicas at the same
consistency, without waiting. It comes from a timeline of every replica's replay
position, recorded during the run by a separate process that asks each replica
about every 0.3 ms; a sample's position was reached somewhere between the moment its query
was sent and the moment its answer came back, which gives a lower bound (a sample
answered before the read began has the position) and an upper bound (the first sample
sent after the read began has it). ``oracle@W`` is the same for a wait of W: some
replica had the position W after the read began.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.overhead import quiet_logging, quiet_shutdown
from bench.results import Results
from pgreplica import LoadBalancer
from pgreplica.testing import LocalCluster, make_cluster_directory

TABLE = "bench_offload"
LSN_OF = "(({}) - '0/0'::pg_lsn)::bigint"
REPLAY_SQL = "SELECT " + LSN_OF.format("pg_last_wal_replay_lsn()")
INSERT_LSN_SQL = "COMMIT; SELECT " + LSN_OF.format("pg_current_wal_insert_lsn()")
POSITION_SQL = "SELECT " + LSN_OF.format("pg_current_wal_insert_lsn()")
UPDATE_SQL = f"UPDATE {TABLE} SET v = %s WHERE id = %s"
SELECT_SQL = f"SELECT v FROM {TABLE} WHERE id = %s"
XACTS_SQL = (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)
PIN_SECONDS = 2.0
#: Between two samples of a replica's replay position.
SAMPLE_PAUSE = 0.0002
PAUSE_SECONDS = 3.0
#: Catch-up wait bounds of the curve (seconds); the default max_wait (5 ms) runs as ``pgreplica``.
CURVE = (0.0005, 0.001, 0.002, 0.01)


# -- replica replay positions over time ------------------------------------------------


def _sample(dsn: str, out: str, stop: Any) -> None:
    """In a process of its own: ask one replica its replay position continuously;
    write (sent, received, lsn) triples to ``out``."""
    sent, received, lsns = array("d"), array("d"), array("q")
    clock = time.monotonic
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        while not stop.is_set():
            t0 = clock()
            cur.execute(REPLAY_SQL, prepare=True)
            row = cur.fetchone()
            t1 = clock()
            if row and row[0] is not None:
                sent.append(t0)
                received.append(t1)
                lsns.append(int(row[0]))
            time.sleep(SAMPLE_PAUSE)  # leave the 2 cores to the workload
    with open(out, "wb") as f:
        for a in (sent, received, lsns):
            array("q", [len(a)]).tofile(f)
            a.tofile(f)


class Timeline:
    """Every replica's replay position over time, recorded by sampler processes."""

    def __init__(self, dsns: list[str], directory: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._files = [str(directory / f"replay-{i}.bin") for i in range(len(dsns))]
        self._procs = [
            ctx.Process(target=_sample, args=(d, f, self._stop), daemon=True)
            for d, f in zip(dsns, self._files, strict=True)
        ]
        self.sent: list[list[float]] = []
        self.received: list[list[float]] = []
        self.lsns: list[list[int]] = []

    def start(self) -> None:
        for p in self._procs:
            p.start()

    def stop(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(30)
        for name in self._files:
            with open(name, "rb") as f:
                arrays: list[list[Any]] = []
                for typecode in ("d", "d", "q"):
                    n = array("q")
                    n.fromfile(f, 1)
                    a = array(typecode)
                    a.fromfile(f, n[0])
                    arrays.append(a.tolist())
            self.sent.append(arrays[0])
            self.received.append(arrays[1])
            self.lsns.append(arrays[2])

    def samples(self) -> int:
        return sum(len(s) for s in self.sent)

    def possible(self, at: float, need: int) -> tuple[bool, bool]:
        """(certainly, perhaps): some replica had replayed ``need`` at time ``at``."""
        perhaps = False
        for sent, received, lsns in zip(self.sent, self.received, self.lsns, strict=True):
            # last sample answered by ``at``
            i = bisect.bisect_right(received, at) - 1
            if i >= 0 and lsns[i] >= need:
                return True, True
            # first sample sent at or after ``at``: if it lacks need, so did ``at``
            j = bisect.bisect_left(sent, at)
            if j >= len(sent) or lsns[j] >= need:
                perhaps = True
        return False, perhaps


# -- users -----------------------------------------------------------------------------


@dataclass
class Read:
    start: float
    latency_ns: int
    own: bool
    on_replica: bool
    stale: bool
    need: int


@dataclass
class User:
    uid: int
    users: int
    others: int
    reads: list[Read] = field(default_factory=list)
    version: int = 0
    cycles: int = 0
    checks: int = 0

    def other_ids(self) -> list[int]:
        return (
            [
                (self.uid + 1 + (self.cycles * self.others + k) % (self.users - 1)) % self.users
                for k in range(self.others)
            ]
            if self.users > 1
            else []
        )


class PlainClient:
    """The strategies without pgreplica: plain psycopg connections, one per server
    (or one through Pgpool-II)."""

    def __init__(self, primary: str, replicas: list[str], mode: str, user: User) -> None:
        self.primary = psycopg.connect(primary)  # a transaction per write
        self.primary_ro = psycopg.connect(primary, autocommit=True)
        self.replicas = [psycopg.connect(d, autocommit=True) for d in replicas]
        self.mode = mode
        self.user = user
        self.rr = user.uid
        self.last_write = -math.inf
        self.need = 0

    def close(self) -> None:
        for conn in (self.primary, self.primary_ro, *self.replicas):
            conn.close()

    def write(self, uid: int, version: int) -> int:
        self.primary.execute(UPDATE_SQL, (version, uid))
        cur = self.primary.execute(INSERT_LSN_SQL)
        cur.nextset()
        row = cur.fetchone()
        self.last_write = time.monotonic()
        self.need = int(row[0]) if row else 0
        return self.need

    def read(self, rid: int, own: bool) -> tuple[int, bool]:
        mode = self.mode
        conn: psycopg.Connection[Any] | None = None
        if mode == "primary":
            conn = self.primary_ro
        elif mode == "pin-2s":
            if time.monotonic() - self.last_write < PIN_SECONDS:
                conn = self.primary_ro
        elif mode == "gitlab":
            n = len(self.replicas)
            for k in range(n):
                candidate = self.replicas[(self.rr + k) % n]
                self.user.checks += 1
                row = candidate.execute(REPLAY_SQL).fetchone()
                if row and row[0] is not None and int(row[0]) >= self.need:
                    conn = candidate
                    break
            else:
                conn = self.primary_ro
            self.rr += 1
        if conn is None:
            conn = self.replicas[self.rr % len(self.replicas)]
            self.rr += 1
        row = conn.execute(SELECT_SQL, (rid,)).fetchone()
        return (int(row[0]) if row else -1), conn is not self.primary_ro


class PgpoolClient:
    """One autocommit connection through Pgpool-II, which routes each statement."""

    def __init__(self, dsn: str, primary: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.backend = psycopg.connect(primary, autocommit=True)
        self.primary_port = int(self.backend.info.port)

    def close(self) -> None:
        self.conn.close()
        self.backend.close()

    def write(self, uid: int, version: int) -> int:
        self.conn.execute(UPDATE_SQL, (version, uid))
        # the position the replicas must replay (asked of the primary itself: through
        # Pgpool-II the SELECT could go to a replica); only the oracle uses it
        row = self.backend.execute(POSITION_SQL).fetchone()
        return int(row[0]) if row else 0

    def read(self, rid: int, own: bool) -> tuple[int, bool]:
        # which server answered (Pgpool-II sends pg_is_in_recovery(), a volatile
        # function, to the primary; the port is the server's own)
        row = self.conn.execute(
            f"SELECT v, inet_server_port() FROM {TABLE} WHERE id = %s", (rid,)
        ).fetchone()
        if row is None:
            return -1, False
        return int(row[0]), int(row[1]) != self.primary_port


def run_user_plain(
    user: User,
    client: PlainClient | PgpoolClient,
    session: bool,
    start: threading.Barrier,
    stop: threading.Event,
) -> None:
    clock = time.perf_counter_ns
    start.wait()
    while not stop.is_set():
        user.version += 1
        need = client.write(user.uid, user.version)
        for rid, own in [(user.uid, True)] + [(r, False) for r in user.other_ids()]:
            t = time.monotonic()
            t0 = clock()
            v, on_replica = client.read(rid, own)
            lat = clock() - t0
            user.reads.append(
                Read(
                    t, lat, own, on_replica, own and v < user.version, need if own or session else 0
                )
            )
        user.cycles += 1


def run_user_pgreplica(
    user: User,
    lb: LoadBalancer,
    max_wait: float | None,
    start: threading.Barrier,
    stop: threading.Event,
) -> None:
    clock = time.perf_counter_ns
    start.wait()
    with lb.isolated():
        while not stop.is_set():
            user.version += 1
            with lb.write() as conn:
                conn.execute(UPDATE_SQL, (user.version, user.uid))
            need = lb.token().get("main")
            for rid, own in [(user.uid, True)] + [(r, False) for r in user.other_ids()]:
                t = time.monotonic()
                t0 = clock()
                with lb.read(max_wait=max_wait) as rconn:
                    row = rconn.execute(SELECT_SQL, (rid,)).fetchone()
                lat = clock() - t0
                v = int(row[0]) if row else -1
                user.reads.append(
                    Read(t, lat, own, rconn.on_replica, own and v < user.version, need)
                )
            user.cycles += 1


# -- one strategy ----------------------------------------------------------------------


def pct(part: float, whole: float) -> float:
    return 100 * part / whole if whole else math.nan


@dataclass
class Result:
    name: str
    reads: list[Read]
    cycles: int
    seconds: float
    checks: int
    primary_xacts: int
    oracle: list[tuple[bool, bool]] = field(default_factory=list)
    oracle_wait: list[tuple[bool, bool]] = field(default_factory=list)
    wait: float = 0.0
    skipped: str | None = None

    def _share(self, pred: Callable[[Read], bool], own: bool) -> float:
        rs = [r for r in self.reads if r.own or not own]
        return pct(sum(1 for r in rs if pred(r)), len(rs))

    @property
    def stale(self) -> int:
        return sum(1 for r in self.reads if r.stale)

    def replica(self, own: bool = False) -> float:
        return self._share(lambda r: r.on_replica, own)

    def oracle_share(self, own: bool = False, upper: bool = True, waited: bool = False) -> float:
        marks = self.oracle_wait if waited else self.oracle
        pairs = [
            m[1] if upper else m[0]
            for r, m in zip(self.reads, marks, strict=True)
            if r.own or not own
        ]
        return pct(sum(pairs), len(pairs))

    def latency_us(self, q: float, own: bool | None = None) -> float:
        lat = sorted(r.latency_ns for r in self.reads if own is None or r.own == own)
        if not lat:
            return math.nan
        rank = max(1, min(len(lat), math.ceil(q / 100 * len(lat))))
        return lat[rank - 1] / 1000


def strategy_wait(name: str) -> float | None:
    """The ``max_wait`` of a pgreplica strategy (None: the default setting)."""
    if name == "pgreplica":
        return None
    if name == "pgreplica-nowait":
        return 0.0
    return float(name.removeprefix("pgreplica-").removesuffix("ms")) / 1000


def xacts(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(XACTS_SQL).fetchone()
    return int(row[0]) if row else 0


def run_strategy(
    name: str,
    cluster: LocalCluster,
    lb: LoadBalancer,
    timeline: Timeline,
    pgpool: dict[str, str],
    args: argparse.Namespace,
) -> Result:
    users = [User(i, args.threads, args.others) for i in range(args.threads)]
    start = threading.Barrier(args.threads + 1)
    stop = threading.Event()
    clients: list[PlainClient | PgpoolClient] = []
    threads: list[threading.Thread] = []
    checks_before = lb.checks
    for user in users:
        target: Callable[..., None]
        if name.startswith("pgreplica"):
            target, targs = run_user_pgreplica, (user, lb, strategy_wait(name), start, stop)
        elif name.startswith("pgpool"):
            client: PlainClient | PgpoolClient = PgpoolClient(pgpool[name], cluster.primary_dsn)
            clients.append(client)
            target, targs = run_user_plain, (user, client, False, start, stop)
        else:
            client = PlainClient(cluster.primary_dsn, cluster.replica_dsns, name, user)
            clients.append(client)
            session = name in ("gitlab",)
            target, targs = run_user_plain, (user, client, session, start, stop)
        threads.append(threading.Thread(target=target, args=targs, daemon=True))
    before = xacts(cluster.primary_dsn)
    for t in threads:
        t.start()
    start.wait()
    began = time.monotonic()
    pause_at = max(0.0, (args.seconds - PAUSE_SECONDS) / 2)
    time.sleep(pause_at)
    cluster.pause(2)
    time.sleep(min(PAUSE_SECONDS, args.seconds - pause_at))
    cluster.resume(2)
    time.sleep(max(0.0, args.seconds - (time.monotonic() - began)))
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    primary_xacts = xacts(cluster.primary_dsn) - before - 1
    for c in clients:
        c.close()
    reads = [r for u in users for r in u.reads]
    reads.sort(key=lambda r: r.start)
    checks = sum(u.checks for u in users) + (lb.checks - checks_before)
    # the replicas catch up before the next strategy (and the timeline sees it)
    cluster.wait_replayed(timeout=30)
    time.sleep(0.05)
    wait = strategy_wait(name) if name.startswith("pgreplica") else 0.0
    return Result(
        name,
        reads,
        sum(u.cycles for u in users),
        elapsed,
        checks,
        primary_xacts,
        wait=lb.settings.max_wait if wait is None else wait,
    )


class CountingBalancer(LoadBalancer):
    """A load balancer that counts its direct replay checks (extra round trips)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checks = 0
        self._count_lock = threading.Lock()

    def _replay_lsn(self, host: Any, conn: Any) -> int:
        with self._count_lock:
            self.checks += 1
        return super()._replay_lsn(host, conn)


def strategies(args: argparse.Namespace) -> list[str]:
    names = ["primary", "naive-rr", "pin-2s", "gitlab", "pgpool", "pgpool-delay"]
    names += ["pgreplica", "pgreplica-nowait"]
    names += [f"pgreplica-{w * 1000:g}ms" for w in CURVE]
    if args.only:
        wanted = set(args.only.split(","))
        names = [n for n in names if n in wanted]
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.offload",
        description="Replica offload at zero stale reads, per routing strategy.",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per strategy (8)")
    parser.add_argument("--threads", type=int, default=8, help="simulated users (8)")
    parser.add_argument("--others", type=int, default=3, help="other users' rows read per cycle")
    parser.add_argument("--delay", default="50ms", help="apply delay of replica 1 (50ms)")
    parser.add_argument("--only", help="comma-separated strategies to run (default: all)")
    args = parser.parse_args(argv)
    if args.threads < 2:
        parser.error("--threads must be at least 2")
    if args.seconds <= PAUSE_SECONDS:
        parser.error(f"--seconds must be more than the {PAUSE_SECONDS:g} s pause")
    return args


def row(r: Result) -> list[Any]:
    lo, hi = r.oracle_share(upper=False), r.oracle_share()
    own_hi = r.oracle_share(own=True)
    n = len(r.reads)
    return [
        r.name,
        n,
        r.stale,
        round(r.replica(), 1),
        round(r.replica(own=True), 1),
        f"{lo:.1f}-{hi:.1f}",
        f"{r.oracle_share(own=True, upper=False):.1f}-{own_hi:.1f}",
        round(r.replica() / hi, 3) if hi else math.nan,
        round(r.checks / n, 2) if n else math.nan,
        round(r.primary_xacts / r.cycles, 2) if r.cycles else math.nan,
        round(n / r.seconds),
        round(r.latency_us(50)),
        round(r.latency_us(50, own=True)),
        round(r.latency_us(99)),
    ]


COLUMNS = [
    "strategy",
    "reads",
    "stale",
    "replica %",
    "own: replica %",
    "oracle %",
    "own: oracle %",
    "replica/oracle",
    "checks/read",
    "primary xacts/cycle",
    "reads/s",
    "p50 us",
    "own p50 us",
    "p99 us",
]


def report(
    out: Results, results: list[Result], args: argparse.Namespace, skipped: dict[str, str]
) -> Results:
    by = {r.name: r for r in results}
    out.table(
        "Strategies side by side",
        COLUMNS,
        [row(r) for r in results],
        note=(
            f"{args.threads} users, {args.seconds:g} s per strategy; a cycle = 1 write of the"
            f" user's row, 1 read of it at once (own), {args.others} reads of other users'"
            f" rows. Replica 1: {args.delay} apply delay; replica 2: replay paused"
            f" {PAUSE_SECONDS:g} s mid-run. oracle % = reads some replica had already"
            " replayed the needed position for when the read began (lower-upper bound from"
            " the replay timeline); replica/oracle uses the upper bound. checks/read ="
            " extra round trips asking a replica its replay position. primary xacts/cycle"
            " counts every transaction the primary ran (writes, the write's position,"
            " primary reads, probes)."
            + "".join(f" {k}: not run ({v})." for k, v in skipped.items())
        ),
    )
    curve = [r for r in results if r.name.startswith("pgreplica") and r.name != "pgreplica"]
    curve.sort(key=lambda r: r.wait)
    if "pgreplica" in by:
        curve.append(by["pgreplica"])
        curve.sort(key=lambda r: (r.wait, r.name != "pgreplica"))
    if curve:
        out.table(
            "Catch-up wait bound: the trade-off",
            [
                "max_wait ms",
                "strategy",
                "own: replica %",
                "own: oracle@wait %",
                "own: replica/oracle@wait",
                "own p50 us",
                "own p99 us",
                "all: replica %",
            ],
            [
                [
                    r.wait * 1000,
                    r.name,
                    round(r.replica(own=True), 1),
                    round(r.oracle_share(own=True, waited=True), 1),
                    round(r.replica(own=True) / r.oracle_share(own=True, waited=True), 3)
                    if r.oracle_share(own=True, waited=True)
                    else math.nan,
                    round(r.latency_us(50, own=True)),
                    round(r.latency_us(99, own=True)),
                    round(r.replica(), 1),
                ]
                for r in curve
            ],
            note="oracle@wait: reads after the user's own write for which some replica had"
            " replayed it within max_wait after the read began (upper bound): what waiting"
            " that long could achieve.",
        )
        uniq = [r for r in curve if r.name != "pgreplica"] or curve
        out.chart(
            "wait-curve",
            "Reads after own write on replicas, against the catch-up wait bound",
            x=[r.wait * 1000 for r in uniq],
            series={
                "own reads on replicas %": [r.replica(own=True) for r in uniq],
                "oracle@wait %": [r.oracle_share(own=True, waited=True) for r in uniq],
                "own read p50 latency (x10 us)": [r.latency_us(50, own=True) / 10 for r in uniq],
            },
            xlabel="max_wait (ms)",
            ylabel="% / tens of microseconds",
        )
    out.chart(
        "shares",
        "Share of reads on replicas, and stale reads",
        kind="bar",
        x=[r.name for r in results],
        series={
            "replica %": [r.replica() for r in results],
            "oracle % (upper)": [r.oracle_share() for r in results],
            "stale % of reads": [pct(r.stale, len(r.reads)) for r in results],
        },
        ylabel="% of reads",
    )
    pg = [r for r in results if r.name.startswith("pgreplica")]
    stale_pg = sum(r.stale for r in pg)
    out.target(
        "0 stale reads for pgreplica in every setting",
        f"{stale_pg} stale of {sum(len(r.reads) for r in pg)} reads over {len(pg)} settings",
        stale_pg == 0,
    )
    if "pgreplica" in by:
        d = by["pgreplica"]
        ratio = d.replica() / d.oracle_share() if d.oracle_share() else math.nan
        out.target(
            "replica share >= 98% of the oracle share, default settings",
            f"{d.replica():.1f}% vs oracle {d.oracle_share():.1f}% (upper bound):"
            f" {100 * ratio:.1f}%",
            ratio >= 0.98,
        )
        ow = d.oracle_share(own=True, waited=True)
        own_ratio = d.replica(own=True) / ow if ow else math.nan
        out.target(
            ">= 90% of reads after own write on replicas with a catch-up wait <= 5 ms",
            f"{d.replica(own=True):.1f}% of all own reads; {100 * own_ratio:.1f}% of those a"
            f" replica could serve within 5 ms (oracle@5ms {ow:.1f}%, the rest fall in the"
            " pause, when only the 50 ms delayed replica is up)",
            own_ratio >= 0.90,
        )
        if "pgreplica-nowait" in by:
            nw = by["pgreplica-nowait"]
            added = d.latency_us(50, own=True) - nw.latency_us(50, own=True)
            out.target(
                "<= 1 ms added median latency for the catch-up wait",
                f"own-read p50 {d.latency_us(50, own=True):.0f} us vs"
                f" {nw.latency_us(50, own=True):.0f} us without waiting: {added:+.0f} us;"
                f" all reads p50 {d.latency_us(50):.0f} vs {nw.latency_us(50):.0f} us",
                added <= 1000,
            )
    for r in results:
        if not r.name.startswith("pgreplica"):
            out.target(
                f"{r.name}: stale reads and replica share (no target)",
                f"{r.stale} stale ({pct(r.stale, len(r.reads)):.1f}% of reads,"
                f" {pct(r.stale, sum(1 for x in r.reads if x.own)):.1f}% of own reads);"
                f" {r.replica():.1f}% on replicas",
                None,
            )
    out.data = {
        "args": vars(args),
        "skipped": skipped,
        "strategies": {
            r.name: {
                "reads": len(r.reads),
                "own_reads": sum(1 for x in r.reads if x.own),
                "stale": r.stale,
                "replica_pct": r.replica(),
                "own_replica_pct": r.replica(own=True),
                "oracle_pct_lower": r.oracle_share(upper=False),
                "oracle_pct_upper": r.oracle_share(),
                "own_oracle_pct_lower": r.oracle_share(own=True, upper=False),
                "own_oracle_pct_upper": r.oracle_share(own=True),
                "own_oracle_wait_pct_upper": r.oracle_share(own=True, waited=True),
                "max_wait": r.wait,
                "checks": r.checks,
                "primary_xacts": r.primary_xacts,
                "cycles": r.cycles,
                "seconds": r.seconds,
                "p50_us": r.latency_us(50),
                "p99_us": r.latency_us(99),
                "own_p50_us": r.latency_us(50, own=True),
                "own_p99_us": r.latency_us(99, own=True),
            }
            for r in results
        },
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    began = time.monotonic()
    out = Results("offload", "Offload at zero stale reads")
    names = strategies(args)
    skipped: dict[str, str] = {}
    cluster = LocalCluster(make_cluster_directory("pgreplica-offload-"), replicas=2, keep=False)
    print("starting a local primary with 2 streaming replicas ...", file=sys.stderr, flush=True)
    results: list[Result] = []
    pools: contextlib.ExitStack = contextlib.ExitStack()
    pgpool: dict[str, str] = {}
    try:
        cluster.up()
        cluster.execute(0, f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v bigint NOT NULL)")
        cluster.execute(
            0, f"INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(0, {args.threads - 1}) g"
        )
        cluster.lag(1, args.delay)
        cluster.wait_replayed()
        if any(n.startswith("pgpool") for n in names):
            from bench.pgpool import Pgpool, pgpool_unavailable

            reason = pgpool_unavailable()
            if reason is not None:
                print(f"  Pgpool-II not run: {reason}", file=sys.stderr)
                for n in names:
                    if n.startswith("pgpool"):
                        skipped[n] = reason
                names = [n for n in names if not n.startswith("pgpool")]
            else:
                for n in names:
                    if n.startswith("pgpool"):
                        threshold = 1 if n == "pgpool-delay" else None
                        pp = pools.enter_context(Pgpool(cluster, delay_threshold=threshold))
                        pgpool[n] = pp.dsn
        with tempfile.TemporaryDirectory(prefix="pgreplica-offload-timeline-") as tmp:
            timeline = Timeline(cluster.replica_dsns, Path(tmp))
            timeline.start()
            lb = CountingBalancer(
                primary=cluster.primary_dsn,
                replicas=cluster.replica_dsns,
                pool_max_size=args.threads + 2,
            )
            try:
                lb.open()
                for name in names:
                    print(f"  {name} ...", file=sys.stderr, flush=True)
                    results.append(run_strategy(name, cluster, lb, timeline, pgpool, args))
            finally:
                with quiet_shutdown():
                    lb.close()
                timeline.stop()
            for r in results:
                r.oracle = [timeline.possible(x.start, x.need) for x in r.reads]
                r.oracle_wait = [timeline.possible(x.start + r.wait, x.need) for x in r.reads]
            print(f"  replay timeline: {timeline.samples()} samples", file=sys.stderr)
    finally:
        pools.close()
        with contextlib.suppress(Exception):
            cluster.resume(2)
        cluster.destroy()
    logging.shutdown()
    report(out, results, args, skipped)
    out.summary = (
        "Simulated users write their own row and read it back at once, then read other"
        " users' rows, while one replica replays 50 ms late and the other pauses replay"
        " for 3 s. Stale = a read after the user's own write that missed it. The oracle"
        " share is measured from a replay timeline recorded during the run."
    )
    out.data["seconds"] = time.monotonic() - began
    print()
    print("offload at zero stale reads")
    print_table(out.tables[0])
    if len(out.tables) > 1:
        print()
        print_table(out.tables[1])
    print()
    for t in out.targets:
        mark = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        print(f"  [{mark}] {t['target']}: {t['measured']}")
    out.save()
    print(f"(total run time {time.monotonic() - began:.0f} s)")
    return 0


def print_table(table: dict[str, Any]) -> None:
    cols = table["columns"]
    rows = [[str(c) for c in r] for r in table["rows"]]
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    print(table["title"])
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    if table.get("note"):
        print(table["note"])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
