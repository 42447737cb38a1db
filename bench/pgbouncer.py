"""What PgBouncer in front of the replica adds to a routed read.

Run ``python -m bench.pgbouncer`` (``make bench``). It starts a local primary with one
streaming replica (a :class:`pgreplica.testing.LocalCluster` in a new temporary
directory, destroyed at the end) and two PgBouncer processes in front of both servers,
one in session and one in transaction pooling mode (the launcher of the tests,
``tests/pgbouncer_server.py``), and times
``with lb.read() as conn: conn.execute("SELECT 1").fetchone()`` with four load
balancers, interleaved in small batches whose order rotates so that noise hits every
arm alike:

* ``direct``: the servers' own addresses, pgreplica's defaults;
* ``direct, unprepared``: the same with ``prepare_threshold=None`` on the connections,
  what transaction pooling requires (psycopg then sends the statement as a simple
  query, which the server parses and plans every time, instead of running the
  statement it prepared after the 5th execution);
* ``session``: through PgBouncer in session pooling, pgreplica's defaults;
* ``transaction``: through PgBouncer in transaction pooling, ``prepare_threshold=None``
  (``transaction_pooling = true``: connections that never prepare statements).

No write happens during the run, so every read must be served by the replica; the
benchmark fails (exit status 1) if one was not or returned a wrong row. By default the
client, both PgBouncer processes and every backend of the replica share one CPU
(``--pin``, as in ``bench.overhead``): on a small machine a cross-CPU wake-up costs
tens of microseconds, and PgBouncer adds a process to every round trip. The garbage
collector is paused in the timed loops. Medians, p99, the added microseconds and the
ratio; timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool

import pgreplica
from bench.overhead import (
    Stats,
    clock_overhead_ns,
    gc_paused,
    quiet_logging,
    quiet_shutdown,
    rotation,
)
from bench.results import Results
from pgreplica import LoadBalancer
from pgreplica.testing import LocalCluster, make_cluster_directory

# One launcher for the tests and this benchmark: tests/pgbouncer_server.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgbouncer_server import PgBouncer, UnpreparedLoadBalancer, find_pgbouncer

SQL = "SELECT 1"
WARMUP_TIMEOUT = 30.0
APPLICATION_NAME = f"pgreplica-bench-{os.getpid()}"


class Arm:
    """One load balancer's timed reads, with the check that each was served by the
    replica and returned the right row."""

    def __init__(self, label: str, lb: LoadBalancer) -> None:
        self.label = label
        self.lb = lb
        self.samples: list[int] = []
        self.off_replica: dict[str, int] = {}
        self.bad_rows = 0

    def run(self, n: int, out: list[int] | None = None) -> None:
        clock = time.perf_counter_ns
        read = self.lb.read
        samples = self.samples if out is None else out
        for _ in range(n):
            t0 = clock()
            with read() as conn:
                row = conn.execute(SQL).fetchone()
            t1 = clock()
            samples.append(t1 - t0)
            if not conn.on_replica:  # after the clock
                self.off_replica[conn.reason] = self.off_replica.get(conn.reason, 0) + 1
            if row != (1,):
                self.bad_rows += 1

    def warm_up(self, n: int) -> None:
        deadline = time.monotonic() + WARMUP_TIMEOUT
        while True:
            with self.lb.read() as conn:
                conn.execute(SQL).fetchone()
            if conn.on_replica:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: reads never reached the replica ({conn.reason})")
            time.sleep(0.05)
        self.run(n, out=[])
        self.off_replica.clear()


def interleave(arms: list[Arm], iterations: int, batch: int) -> list[Stats]:
    with gc_paused():
        done = rounds = 0
        while done < iterations:
            n = min(batch, iterations - done)
            for i in rotation(len(arms), rounds):
                arms[i].run(n)
            done += n
            rounds += 1
    return [Stats.of(arm.samples) for arm in arms]


def pin(spec: str, pids: list[int]) -> str:
    """Run this process, PgBouncer and the replica's backends on one CPU."""
    if spec == "off":
        return "off (--pin off)"
    if not hasattr(os, "sched_setaffinity"):
        return "off (not supported on this platform)"
    allowed = sorted(os.sched_getaffinity(0))
    if spec == "auto" and len(allowed) == 1:
        return f"not needed (this process may only use CPU {allowed[0]})"
    cpu = allowed[-1] if spec == "auto" else int(spec)
    if cpu not in allowed:
        raise SystemExit(f"--pin {cpu}: this process may only use CPUs {allowed}")
    pinned = failed = 0
    for pid in [0, *pids]:
        try:
            os.sched_setaffinity(pid, {cpu})
            pinned += 1
        except (PermissionError, ProcessLookupError):
            failed += 1
    note = f", {failed} not pinned" if failed else ""
    return f"client, PgBouncer and replica backends ({pinned - 1} processes) on CPU {cpu}{note}"


def replica_backends(cluster: LocalCluster) -> list[int]:
    """Every client backend of the replica (direct pools and PgBouncer's servers)."""
    with psycopg.connect(cluster.dsn(1), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(row[0]) for row in rows]


def pgbouncer_version(binary: str) -> str:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False, timeout=10
    )
    first = out.stdout.strip().splitlines()[:1]
    return first[0].removeprefix("PgBouncer ").strip() if first else "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pgbouncer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--iterations", type=int, default=5000, help="reads per arm (5000)")
    parser.add_argument("--batch", type=int, default=50, help="reads per alternating batch (50)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed reads per arm (300)")
    parser.add_argument(
        "--pin",
        default="auto",
        metavar="auto|off|CPU",
        help="run the client, PgBouncer and the replica's backends on one CPU (auto: the"
        " last allowed CPU)",
    )
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--iterations and --batch must be at least 1, --warmup at least 0")
    if args.pin not in ("auto", "off") and not args.pin.isdigit():
        parser.error("--pin takes auto, off or a CPU number")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results("pgbouncer", "PgBouncer in front of the replica: cost per routed read")
    binary = find_pgbouncer()
    if binary is None:
        return skipped(results, "pgbouncer not found (/usr/sbin/pgbouncer nor on PATH)")
    quiet_logging()
    started = time.monotonic()
    cluster = LocalCluster(make_cluster_directory(), replicas=1)
    bouncers: list[PgBouncer] = []
    balancers: list[LoadBalancer] = []
    try:
        print("starting a local primary with 1 streaming replica ...", file=sys.stderr)
        cluster.up()
        try:
            for mode in ("session", "transaction"):
                bouncers.append(PgBouncer(cluster, mode, binary=binary).start())
        except Exception as exc:
            return skipped(results, f"PgBouncer ({binary}) did not start: {exc}")
        session, transaction = bouncers
        options: dict[str, Any] = {"application_name": APPLICATION_NAME}

        def make(cls: Callable[..., LoadBalancer], primary: str, replica: str) -> LoadBalancer:
            lb = cls(primary=primary, replicas=[replica], **options)
            balancers.append(lb)
            lb.open()
            return lb

        arms = [
            Arm("direct", make(LoadBalancer, cluster.dsn(0), cluster.dsn(1))),
            Arm("direct, unprepared", make(UnpreparedLoadBalancer, cluster.dsn(0), cluster.dsn(1))),
            Arm("session", make(LoadBalancer, session.dsn(0), session.dsn(1))),
            Arm(
                "transaction", make(UnpreparedLoadBalancer, transaction.dsn(0), transaction.dsn(1))
            ),
        ]
        for arm in arms:
            arm.warm_up(args.warmup)
        pinning = pin(
            args.pin, [b.process.pid for b in bouncers if b.process] + replica_backends(cluster)
        )
        with psycopg.connect(cluster.dsn(1)) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
        stats = interleave(arms, args.iterations, args.batch)
    finally:
        with quiet_shutdown():
            for lb in balancers:
                lb.close()
        for bouncer in bouncers:
            bouncer.stop()
        try:
            cluster.destroy()
        except Exception as exc:
            print(f"warning: could not destroy {cluster.directory}: {exc}", file=sys.stderr)
    elapsed = time.monotonic() - started

    print()
    print("pgreplica lb.read() + SELECT 1: directly vs through PgBouncer")
    print("  target      local cluster (1 replica), PgBouncer on 127.0.0.1 in front of both")
    print(
        f"  versions    pgreplica {pgreplica.__version__}, psycopg {psycopg.__version__},"
        f" psycopg_pool {psycopg_pool.__version__}, PgBouncer {pgbouncer_version(binary)},"
        f" PostgreSQL {version}, Python {platform.python_version()}"
    )
    print(
        f"  iterations  {args.iterations} reads per arm, interleaved in batches of"
        f" {args.batch} (order rotated every batch)"
    )
    print(f"  cpu pinning {pinning}")
    print(f"  clock       {clock_overhead_ns():.0f} ns per pair of perf_counter_ns readings")
    print()
    header = f"  {'':34}{'median':>12}{'p99':>12}{'mean':>12}{'min':>12}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for arm, s in zip(arms, stats, strict=True):
        print(
            f"  {arm.label:34}{s.median_us:9.1f} us{s.p99_us:9.1f} us"
            f"{s.mean_us:9.1f} us{s.min_us:9.1f} us"
        )
    print()
    direct, unprepared, via_session, via_transaction = stats
    added_rows = []
    for label, s, base, base_label in [
        ("session pooling", via_session, direct, "direct"),
        ("transaction pooling", via_transaction, unprepared, "direct, unprepared"),
        ("transaction pooling", via_transaction, direct, "direct"),
    ]:
        print(
            f"added by PgBouncer, {label} vs {base_label}:"
            f" {s.median_us - base.median_us:+.1f} us median"
            f" (ratio {s.median_us / base.median_us:.2f}),"
            f" p99 {s.p99_us - base.p99_us:+.1f} us"
        )
        added_rows.append(
            [
                f"{label} vs {base_label}",
                round(s.median_us - base.median_us, 1),
                round(s.median_us / base.median_us, 2),
                round(s.p99_us - base.p99_us, 1),
            ]
        )
    print(f"(total run time {elapsed:.0f} s)")
    save(results, args, arms, stats, added_rows, pinning, binary, version)

    ok = True
    for arm in arms:
        if arm.off_replica:
            ok = False
            print(f"FAILED: {arm.label}: reads not served by the replica: {arm.off_replica}")
        if arm.bad_rows:
            ok = False
            print(f"FAILED: {arm.label}: {arm.bad_rows} reads returned a wrong row")
    return 0 if ok else 1


def skipped(results: Results, reason: str) -> int:
    """No measurement: say why, in the output and in the results."""
    print(f"{reason}: benchmark skipped")
    results.summary = f"Skipped: {reason}."
    results.data = {"skipped": reason}
    results.target("PgBouncer benchmark ran", f"skipped: {reason}", None)
    results.save()
    return 0


def save(
    results: Results,
    args: argparse.Namespace,
    arms: list[Arm],
    stats: list[Stats],
    added_rows: list[list[Any]],
    pinning: str,
    binary: str,
    version: str,
) -> None:
    results.table(
        "lb.read() + SELECT 1, directly and through PgBouncer",
        ["arm", "median (us)", "p99 (us)", "mean (us)", "min (us)"],
        [
            [
                arm.label,
                round(s.median_us, 1),
                round(s.p99_us, 1),
                round(s.mean_us, 1),
                round(s.min_us, 1),
            ]
            for arm, s in zip(arms, stats, strict=True)
        ],
        note=(
            f"{args.iterations} reads per arm, interleaved in batches of {args.batch} (order"
            f" rotated every batch) after {args.warmup} warm-up reads; PgBouncer"
            f" {pgbouncer_version(binary)} on 127.0.0.1, PostgreSQL {version}; cpu pinning:"
            f" {pinning}."
        ),
    )
    results.table(
        "Added by PgBouncer",
        ["comparison", "added median (us)", "ratio", "added p99 (us)"],
        added_rows,
    )
    results.chart(
        "read",
        "Median lb.read() + SELECT 1 by arm",
        x=[arm.label for arm in arms],
        series={"median (us)": [round(s.median_us, 1) for s in stats]},
        kind="bar",
        xlabel="arm",
        ylabel="microseconds",
    )
    results.summary = (
        "PgBouncer in front of the replica adds "
        + "; ".join(f"{r[1]:+.1f} us per read in {r[0]} (ratio {r[2]})" for r in added_rows)
        + " (medians)."
    )
    off = {arm.label: arm.off_replica for arm in arms if arm.off_replica}
    bad = {arm.label: arm.bad_rows for arm in arms if arm.bad_rows}
    results.target(
        "every read served by the replica with the right row",
        "yes" if not off and not bad else f"off replica: {off}; wrong rows: {bad}",
        not off and not bad,
    )
    results.data = {
        "args": vars(args),
        "pinning": pinning,
        "arms": {
            arm.label: {"median_us": s.median_us, "p99_us": s.p99_us, "count": s.count}
            for arm, s in zip(arms, stats, strict=True)
        },
    }
    results.save()


if __name__ == "__main__":
    sys.exit(main())
