"""Per-statement cost of lb.connection() against a plain psycopg connection.

    python -m bench.routing [--iterations 20000]

A: a routing connection in autocommit mode, `conn.execute(SQL).fetchone()`: classified
(cached), routed to the replica it already holds. B: a psycopg connection to the same
replica, same statement. Interleaved in batches of 50 with the order alternating, so
machine noise hits both. Reports medians, p99, the added microseconds and the ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time

import psycopg

import pgreplica
from bench.results import Results
from pgreplica.localcluster import LocalCluster

STATEMENTS = {
    "SELECT 1": "SELECT 1",
    "ORM-shaped read": (
        'SELECT "t"."id", "t"."v" FROM "bench_items" "t" WHERE "t"."id" = %s LIMIT 21'
    ),
}


def percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def pin(backend_pids: list[int]) -> str:
    """Run this process and both server backends on one CPU: on a 2-CPU machine a
    backend on the other CPU costs ~40 us per round trip, which would swamp the figure."""
    try:
        cpu = max(os.sched_getaffinity(0))
        for pid in [0, *backend_pids]:
            os.sched_setaffinity(pid, {cpu})
        said = f"client and both server backends pinned to CPU {cpu}"
    except (AttributeError, OSError) as exc:
        said = f"not pinned ({exc}): figures depend on where the scheduler puts backends"
    print(said)
    return said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    args = parser.parse_args()
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    results = Results("routing", "Routing connection: per-statement cost against plain psycopg")
    rows: list[list[object]] = []
    pinning = "not measured"

    tmp = tempfile.mkdtemp(prefix="pgreplica-bench-")
    os.chmod(tmp, 0o755)
    cluster = LocalCluster(os.path.join(tmp, "cluster"), replicas=1)
    try:
        cluster.up()
        cluster.execute(0, "CREATE TABLE bench_items (id int PRIMARY KEY, v text)")
        cluster.execute(0, "INSERT INTO bench_items SELECT g, 'x' FROM generate_series(1, 100) g")
        cluster.wait_replayed()
        with pgreplica.LoadBalancer(config=cluster.config()) as lb, lb.connection() as conn:
            conn.autocommit = True
            raw = psycopg.connect(cluster.dsn(1), autocommit=True)
            try:
                conn.execute("SELECT 1")  # the routing connection takes its replica connection
                pids = [
                    conn.execute("SELECT pg_backend_pid()").fetchone()[0],
                    raw.execute("SELECT pg_backend_pid()").fetchone()[0],
                ]
                pinning = pin(pids)
                print(
                    f"{'statement':18} {'A routed':>10} {'B direct':>10} {'added':>8}"
                    f" {'ratio':>6} {'A p99':>8} {'B p99':>8} {'on replica':>11}"
                )
                for name, sql in STATEMENTS.items():
                    params = (7,) if "%s" in sql else None
                    a: list[int] = []
                    b: list[int] = []
                    on_replica = 0
                    for _ in range(200):  # warm-up: caches, prepared statements
                        conn.execute(sql, params).fetchone()
                        raw.execute(sql, params).fetchone()
                    batches = args.iterations // 50
                    for batch in range(batches):
                        order = (a, b) if batch % 2 else (b, a)
                        for samples in order:
                            if samples is a:
                                for _ in range(50):
                                    t0 = time.perf_counter_ns()
                                    conn.execute(sql, params).fetchone()
                                    a.append(time.perf_counter_ns() - t0)
                                    on_replica += conn.reason == "replica"
                            else:
                                for _ in range(50):
                                    t0 = time.perf_counter_ns()
                                    raw.execute(sql, params).fetchone()
                                    b.append(time.perf_counter_ns() - t0)
                    ma, mb = statistics.median(a) / 1000, statistics.median(b) / 1000
                    print(
                        f"{name:18} {ma:8.2f}us {mb:8.2f}us {ma - mb:6.2f}us {ma / mb:6.3f}"
                        f" {percentile(a, 0.99):6.1f}us {percentile(b, 0.99):6.1f}us"
                        f" {on_replica:>5}/{len(a)}"
                    )
                    rows.append(
                        [
                            name,
                            round(ma, 2),
                            round(mb, 2),
                            round(ma - mb, 2),
                            round(ma / mb, 3),
                            round(percentile(a, 0.99), 1),
                            round(percentile(b, 0.99), 1),
                            f"{on_replica}/{len(a)}",
                        ]
                    )
            finally:
                raw.close()
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    results.table(
        "lb.connection() (A, routed) against a psycopg connection to the replica (B)",
        [
            "statement",
            "A routed median (us)",
            "B direct median (us)",
            "added (us)",
            "ratio",
            "A p99 (us)",
            "B p99 (us)",
            "A on replica",
        ],
        rows,
        note=(
            f"{args.iterations} statements per side in autocommit, interleaved in batches"
            f" of 50 with the order alternating, after 200 warm-up statements; {pinning}."
        ),
    )
    results.chart(
        "cost",
        "Median per statement: routed vs direct",
        x=[r[0] for r in rows],
        series={"A routed (us)": [r[1] for r in rows], "B direct (us)": [r[2] for r in rows]},
        kind="bar",
        xlabel="statement",
        ylabel="microseconds",
    )
    results.summary = (
        "A routing connection adds "
        + ", ".join(f"{r[3]} us per statement for {r[0]} (ratio {r[4]})" for r in rows)
        + " over a plain psycopg connection to the same replica (medians)."
    )
    results.data = {"iterations": args.iterations, "pinning": pinning, "rows": rows}
    results.save()


if __name__ == "__main__":
    main()
