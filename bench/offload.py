"""How many reads leave the primary when no read may be stale: offload at zero stale reads.

Run ``python -m bench.offload [--seconds N] [--threads N]``. It starts a local primary
with two streaming replicas (a :class:`pgreplica.testing.LocalCluster` in a new temporary
directory): replica 1 replays with a 50 ms apply delay, replica 2 has its replay paused
for 3 s in the middle of every strategy's run.

N simulated users (threads) each own a row. One cycle of a user: update its own row with
a new version number (a write), read it back at once (a read after its own write), then
read ``--others`` rows of other users (no freshness requirement). The strategies run one
after another for the same time each:

* ``primary``: every read on the primary;
* ``naive-rr``: round robin over the replicas, no consistency;
* ``pin-2s``: the primary for 2 s after the user's last write, else round robin (session
  pinning, as many frameworks do it); ``pin-2s-row`` pins only reads of the user's own row;
* ``pgreplica``: ``lb.read()`` in the user's context, whose token comes from ``lb.write()``;
* ``pgreplica-2ms`` / ``-5ms``: the same with a catch-up wait (``max_wait``).

Per strategy: stale reads (a read after the user's own write that did not see that
version), the share of all reads and of own-write reads served by a replica, read latency,
and the *oracle* share: the reads for which some replica had already replayed the needed
position (the user's last write for own reads, nothing for others' reads) when the read
began. A sampler thread polls ``pg_last_wal_replay_lsn()`` on every replica about every
millisecond on its own connections; a sample counts from the moment its answer arrived,
and a read is "possible on a replica" when the last such sample of some replica before the
read's start has the needed position. That is a lower bound: a replica may have replayed
the write between that sample and the read's start. For reads that begin a fraction of
a millisecond after their write (the own-write reads), sampling every millisecond makes
it far too low (a few percent, where pgreplica itself serves 70-86 % of them from
replicas with no stale read), so it cannot judge a strategy against the ideal yet: the
next step is an upper bound too (the first sample after the read's start), and finer
sampling.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from bench.overhead import quiet_logging, quiet_shutdown
from pgreplica import LoadBalancer
from pgreplica.testing import LocalCluster, make_cluster_directory

TABLE = "bench_offload"
LSN_OF = "(({}) - '0/0'::pg_lsn)::bigint"
REPLAY_SQL = "SELECT " + LSN_OF.format("pg_last_wal_replay_lsn()")
INSERT_LSN_SQL = "COMMIT; SELECT " + LSN_OF.format("pg_current_wal_insert_lsn()")
UPDATE_SQL = f"UPDATE {TABLE} SET v = %s WHERE id = %s"
SELECT_SQL = f"SELECT v FROM {TABLE} WHERE id = %s"
PIN_SECONDS = 2.0
PAUSE_SECONDS = 3.0


# -- replica replay positions over time ------------------------------------------------


class Sampler(threading.Thread):
    """Polls every replica's replay position; keeps (time of the answer, lsn)."""

    def __init__(self, dsns: list[str], period: float = 0.001) -> None:
        super().__init__(daemon=True, name="replay-sampler")
        self.conns = [psycopg.connect(d, autocommit=True) for d in dsns]
        self.times: list[list[float]] = [[] for _ in dsns]
        self.lsns: list[list[int]] = [[] for _ in dsns]
        self.period = period
        self.stop = threading.Event()

    def run(self) -> None:
        clock = time.monotonic
        while not self.stop.is_set():
            for i, conn in enumerate(self.conns):
                row = conn.execute(REPLAY_SQL).fetchone()
                now = clock()  # the position was reached by the time the answer arrived
                if row and row[0] is not None:
                    self.times[i].append(now)
                    self.lsns[i].append(int(row[0]))
            time.sleep(self.period)

    def close(self) -> None:
        self.stop.set()
        self.join()
        for conn in self.conns:
            conn.close()

    def possible(self, start: float, need: int) -> bool:
        """Some replica's last sample before ``start`` had replayed ``need``."""
        for times, lsns in zip(self.times, self.lsns, strict=True):
            i = bisect.bisect_right(times, start) - 1
            if i >= 0 and lsns[i] >= need:
                return True
        return False


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
    """The non-pgreplica strategies: plain psycopg connections, one per server."""

    def __init__(self, primary: str, replicas: list[str], mode: str) -> None:
        self.primary = psycopg.connect(primary)  # a transaction per write
        self.primary_ro = psycopg.connect(primary, autocommit=True)
        self.replicas = [psycopg.connect(d, autocommit=True) for d in replicas]
        self.mode = mode
        self.rr = 0
        self.last_write = -math.inf

    def close(self) -> None:
        for conn in (self.primary, self.primary_ro, *self.replicas):
            conn.close()

    def write(self, uid: int, version: int) -> int:
        self.primary.execute(UPDATE_SQL, (version, uid))
        cur = self.primary.execute(INSERT_LSN_SQL)
        cur.nextset()
        row = cur.fetchone()
        self.last_write = time.monotonic()
        return int(row[0]) if row else 0

    def read(self, rid: int, own: bool) -> tuple[int, bool]:
        mode = self.mode
        if mode == "primary":
            use_primary = True
        elif mode == "pin-2s":
            use_primary = time.monotonic() - self.last_write < PIN_SECONDS
        elif mode == "pin-2s-row":
            use_primary = own and time.monotonic() - self.last_write < PIN_SECONDS
        else:
            use_primary = False
        if use_primary:
            conn = self.primary_ro
        else:
            conn = self.replicas[self.rr % len(self.replicas)]
            self.rr += 1
        row = conn.execute(SELECT_SQL, (rid,)).fetchone()
        return (int(row[0]) if row else -1), not use_primary


def run_user_plain(
    user: User, client: PlainClient, start: threading.Barrier, stop: threading.Event
) -> None:
    clock = time.perf_counter_ns
    start.wait()
    need = 0
    while not stop.is_set():
        user.version += 1
        need = client.write(user.uid, user.version)
        for rid, own in [(user.uid, True)] + [(r, False) for r in user.other_ids()]:
            t = time.monotonic()
            t0 = clock()
            v, on_replica = client.read(rid, own)
            lat = clock() - t0
            user.reads.append(
                Read(t, lat, own, on_replica, own and v < user.version, need if own else 0)
            )
        user.cycles += 1


def run_user_pgreplica(
    user: User,
    lb: LoadBalancer,
    max_wait: float,
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
                    Read(
                        t, lat, own, rconn.on_replica, own and v < user.version, need if own else 0
                    )
                )
            user.cycles += 1


# -- one strategy ----------------------------------------------------------------------


@dataclass
class Result:
    name: str
    reads: list[Read]
    oracle: list[bool]
    cycles: int
    seconds: float

    def share(self, pred: Callable[[Read], bool], sel: Callable[[Read], bool]) -> float:
        rs = [r for r in self.reads if sel(r)]
        return 100 * sum(1 for r in rs if pred(r)) / len(rs) if rs else math.nan

    @property
    def stale(self) -> int:
        return sum(1 for r in self.reads if r.stale)

    @property
    def replica_all(self) -> float:
        return self.share(lambda r: r.on_replica, lambda r: True)

    @property
    def replica_own(self) -> float:
        return self.share(lambda r: r.on_replica, lambda r: r.own)

    def oracle_share(self, own_only: bool = False) -> float:
        pairs = [ok for r, ok in zip(self.reads, self.oracle, strict=True) if r.own or not own_only]
        return 100 * sum(pairs) / len(pairs) if pairs else math.nan

    def latency_us(self, q: float) -> float:
        lat = sorted(r.latency_ns for r in self.reads)
        if not lat:
            return math.nan
        rank = max(1, min(len(lat), math.ceil(q / 100 * len(lat))))
        return lat[rank - 1] / 1000


def run_strategy(
    name: str,
    cluster: LocalCluster,
    lb: LoadBalancer,
    sampler: Sampler,
    args: argparse.Namespace,
) -> Result:
    users = [User(i, args.threads, args.others) for i in range(args.threads)]
    start = threading.Barrier(args.threads + 1)
    stop = threading.Event()
    clients: list[PlainClient] = []
    threads: list[threading.Thread] = []
    for user in users:
        if name.startswith("pgreplica"):
            wait = {"pgreplica": 0.0, "pgreplica-2ms": 0.002, "pgreplica-5ms": 0.005}[name]
            args_ = (user, lb, wait, start, stop)
            thread = threading.Thread(target=run_user_pgreplica, args=args_, daemon=True)
        else:
            client = PlainClient(cluster.primary_dsn, cluster.replica_dsns, name)
            clients.append(client)
            thread = threading.Thread(
                target=run_user_plain, args=(user, client, start, stop), daemon=True
            )
        threads.append(thread)
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
    for c in clients:
        c.close()
    reads = [r for u in users for r in u.reads]
    reads.sort(key=lambda r: r.start)
    # the replicas catch up before the next strategy (and the sampler sees it)
    cluster.wait_replayed(timeout=30)
    time.sleep(0.05)
    oracle = [sampler.possible(r.start, r.need) for r in reads]
    return Result(name, reads, oracle, sum(u.cycles for u in users), elapsed)


STRATEGIES = [
    "primary",
    "naive-rr",
    "pin-2s",
    "pin-2s-row",
    "pgreplica",
    "pgreplica-2ms",
    "pgreplica-5ms",
]


def print_table(results: list[Result]) -> None:
    header = (
        f"{'strategy':15}{'reads':>8}{'stale':>7}{'repl%all':>10}{'repl%own':>10}"
        f"{'orac%all':>10}{'orac%own':>10}{'repl/orac':>10}{'own r/o':>9}"
        f"{'p50 us':>9}{'p99 us':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        oa, oo = r.oracle_share(), r.oracle_share(own_only=True)
        ratio_all = r.replica_all / oa if oa else math.nan
        ratio_own = r.replica_own / oo if oo else math.nan
        print(
            f"{r.name:15}{len(r.reads):>8}{r.stale:>7}{r.replica_all:>10.1f}"
            f"{r.replica_own:>10.1f}{oa:>10.1f}{oo:>10.1f}{ratio_all:>10.2f}"
            f"{ratio_own:>9.2f}{r.latency_us(50):>9.0f}{r.latency_us(99):>9.0f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.offload",
        description="Replica offload at zero stale reads, per routing strategy.",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per strategy (8)")
    parser.add_argument("--threads", type=int, default=8, help="simulated users (8)")
    parser.add_argument("--others", type=int, default=3, help="other users' rows read per cycle")
    parser.add_argument("--delay", default="50ms", help="apply delay of replica 1 (50ms)")
    args = parser.parse_args(argv)
    if args.threads < 2:
        parser.error("--threads must be at least 2")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    began = time.monotonic()
    cluster = LocalCluster(make_cluster_directory("pgreplica-offload-"), replicas=2, keep=False)
    print("starting a local primary with 2 streaming replicas ...", file=sys.stderr, flush=True)
    results: list[Result] = []
    try:
        cluster.up()
        cluster.execute(0, f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v bigint NOT NULL)")
        cluster.execute(
            0, f"INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(0, {args.threads - 1}) g"
        )
        cluster.lag(1, args.delay)
        cluster.wait_replayed()
        sampler = Sampler(cluster.replica_dsns)
        sampler.start()
        lb = LoadBalancer(
            primary=cluster.primary_dsn,
            replicas=cluster.replica_dsns,
            pool_max_size=args.threads + 2,
        )
        try:
            lb.open()
            for name in STRATEGIES:
                print(f"  {name} ...", file=sys.stderr, flush=True)
                results.append(run_strategy(name, cluster, lb, sampler, args))
        finally:
            with quiet_shutdown():
                lb.close()
            sampler.close()
    finally:
        with contextlib.suppress(Exception):
            cluster.resume(2)
        cluster.destroy()
    logging.shutdown()
    print()
    print("offload at zero stale reads")
    print(
        f"  {args.threads} users, {args.seconds:g} s per strategy; a cycle = 1 write of the"
        f" user's row, 1 read of it at once, {args.others} reads of other users' rows"
    )
    print(
        f"  replica 1: {args.delay} apply delay; replica 2: replay paused {PAUSE_SECONDS:g} s"
        " mid-run"
    )
    print(
        "  repl% = reads served by a replica; orac% = reads some replica could have served"
        " (lower bound, 1 ms sampling); own = reads after the user's own write"
    )
    print()
    print_table(results)
    print()
    for r in results:
        print(f"  {r.name:15}{r.cycles / r.seconds:>8.0f} cycles/s")
    print(f"(total run time {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
