"""Export throughput of ``pgreplica dump`` next to ``pg_dump --data-only -Fd -j N``.

    python -m bench.dump [--rows 200000] [--repeats 5] [--jobs 1 4]

Starts a local primary with one streaming replica, fills three tables linked by foreign
keys (10% authors, 30% books, 60% reviews of ``--rows`` rows in all), waits until the
replica has replayed them, then exports the same three tables from the same replica:

* A ``pgreplica.dump.dump(..., jobs=N)``, in process: probing the replicas, one snapshot
  shared by N connections, CSV files plus schema.sql, import.sql and metadata.json;
* B ``pg_dump --data-only -Fd -j N -Z 0 -t ...``, a subprocess connecting over TCP with
  ``PGPASSWORD`` (uncompressed, like A: both tools write plain text).

Every run is timed wall-clock from start to the last file written. Runs are interleaved
(A and B alternate, their order flipping every repeat) after one warm-up run of each, so
machine noise and cache state hit both alike. Reported: median seconds, rows/s (same
rows for both) and MB/s of each tool's own output (CSV for A, COPY text for B).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench.results import Results
from pgreplica.config import Settings
from pgreplica.dump import Visibility, dump
from pgreplica.localcluster import LocalCluster, find_bindir

DATABASE = "bench_dump"
TABLES = ("authors", "books", "reviews")
SCHEMA = """
CREATE TABLE authors (id bigint PRIMARY KEY, name text NOT NULL, bio text NOT NULL);
CREATE TABLE books (
    id bigint PRIMARY KEY,
    author_id bigint NOT NULL REFERENCES authors,
    title text NOT NULL,
    published date NOT NULL,
    price numeric(8, 2) NOT NULL
);
CREATE TABLE reviews (
    id bigint PRIMARY KEY,
    book_id bigint NOT NULL REFERENCES books,
    stars int NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL
);
"""
FILL = """
INSERT INTO authors
SELECT g, 'author ' || g, repeat(md5(g::text), 2) FROM generate_series(1, {authors}) g;
INSERT INTO books
SELECT g, 1 + g % {authors}, 'title ' || md5(g::text), date '2000-01-01' + g % 8000,
       (g % 10000) / 100.0
FROM generate_series(1, {books}) g;
INSERT INTO reviews
SELECT g, 1 + g % {books}, 1 + g % 5, 'review ' || md5(g::text) || ', "quoted"',
       timestamptz '2020-01-01' + g * interval '1 minute'
FROM generate_series(1, {reviews}) g;
"""
VISIBILITY = {
    "tables": {
        "authors": {"columns": {"id": "public", "name": "public", "bio": "public"}},
        "books": {
            "columns": {
                "id": "public",
                "author_id": "public",
                "title": "public",
                "published": "public",
                "price": "public",
            }
        },
        "reviews": {
            "columns": {
                "id": "public",
                "book_id": "public",
                "stars": "public",
                "body": "public",
                "created_at": "public",
            }
        },
    }
}


def size_of(directory: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in directory.rglob(f"*{suffix}") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows over 3 tables")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per tool and N")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4], help="values of N")
    args = parser.parse_args()

    on_fresh_cluster(run, args)


def on_fresh_cluster(
    run: Callable[[LocalCluster, argparse.Namespace, Path], None], args: argparse.Namespace
) -> None:
    """``run(cluster, args, tmp)`` on a fresh primary with one streaming replica, in a
    temporary directory removed afterwards (the dump scenarios share it)."""
    tmp = tempfile.mkdtemp(prefix="pgreplica-bench-")
    os.chmod(tmp, 0o755)  # the servers may run as another user
    cluster = LocalCluster(os.path.join(tmp, "cluster"), replicas=1)
    try:
        cluster.up()
        run(cluster, args, Path(tmp))
    finally:
        cluster.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def run(cluster: LocalCluster, args: argparse.Namespace, tmp: Path) -> None:
    results = Results("dump", "pgreplica dump against pg_dump --data-only -Fd")
    cluster.execute(0, f"CREATE DATABASE {DATABASE}")
    primary, replica = (cluster.dsn(i)[: -len("postgres")] + DATABASE for i in (0, 1))
    authors, books = args.rows // 10, args.rows * 3 // 10
    reviews = args.rows - authors - books
    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(FILL.format(authors=authors, books=books, reviews=reviews))
        conn.execute("VACUUM ANALYZE")
    cluster.wait_replayed()

    settings = Settings.from_dict(
        {"databases": {"main": {"primary": primary, "replicas": [replica]}}}, environ={}
    )
    visibility = Visibility.from_dict(VISIBILITY, source="bench")
    params = conninfo_to_dict(replica)
    pg_dump = os.path.join(find_bindir(), "pg_dump")
    env = {**os.environ, "PGPASSWORD": str(params["password"])}
    counter = iter(range(1_000_000))

    def run_pgreplica(jobs: int) -> tuple[float, int]:
        out = tmp / f"pgreplica-{next(counter)}"
        started = time.perf_counter()
        result = dump(settings, visibility, out, jobs=jobs, quiet=True, stderr=io.StringIO())
        elapsed = time.perf_counter() - started
        assert result.role == "replica" and sum(result.tables.values()) == args.rows
        size = size_of(out, ".csv")
        shutil.rmtree(out)
        return elapsed, size

    def run_pg_dump(jobs: int) -> tuple[float, int]:
        out = tmp / f"pg_dump-{next(counter)}"
        command = [pg_dump, "--data-only", "-Fd", "-j", str(jobs), "-Z", "0", "-f", str(out)]
        command += ["-h", str(params["host"]), "-p", str(params["port"])]
        command += ["-U", str(params["user"]), "-d", DATABASE]
        for table in TABLES:
            command += ["-t", f"public.{table}"]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
        elapsed = time.perf_counter() - started
        size = size_of(out, ".dat")
        shutil.rmtree(out)
        return elapsed, size

    tools: dict[str, Callable[[int], tuple[float, int]]] = {"pgreplica dump": run_pgreplica}
    if os.access(pg_dump, os.X_OK):
        tools["pg_dump -Fd"] = run_pg_dump
    else:
        missing = f"{pg_dump} not found: pgreplica dump timed alone"
        print(missing)
        results.data["pg_dump_missing"] = missing
    times: dict[tuple[str, int], list[float]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for jobs in args.jobs:  # warm-up: caches, connections, first-run costs
        for tool in tools.values():
            tool(jobs)
    for repeat in range(args.repeats):
        for jobs in args.jobs:
            order = list(tools.items())
            if repeat % 2:
                order.reverse()
            for name, tool in order:
                elapsed, size = tool(jobs)
                times.setdefault((name, jobs), []).append(elapsed)
                sizes[(name, jobs)] = size

    cpus = os.cpu_count()
    print(
        f"{args.rows} rows in 3 tables ({authors}/{books}/{reviews}), one replica on "
        f"127.0.0.1, {cpus} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}; median of {args.repeats} interleaved runs"
    )
    print(
        f"{'tool':16} {'N':>2} {'median s':>9} {'rows/s':>11} {'MB/s':>7} {'output MB':>10}"
        f" {'vs pg_dump':>11}"
    )
    rows = []
    for jobs in args.jobs:
        base = statistics.median(times.get(("pg_dump -Fd", jobs)) or [float("nan")])
        for name in tools:
            seconds = statistics.median(times[(name, jobs)])
            megabytes = sizes[(name, jobs)] / 1e6
            print(
                f"{name:16} {jobs:>2} {seconds:9.3f} {args.rows / seconds:11,.0f}"
                f" {megabytes / seconds:7.1f} {megabytes:10.1f} {seconds / base:10.2f}x"
            )
            rows.append(
                [
                    name,
                    jobs,
                    round(seconds, 3),
                    round(args.rows / seconds),
                    round(megabytes / seconds, 1),
                    round(megabytes, 1),
                    round(seconds / base, 2),
                ]
            )
    results.table(
        "Export throughput",
        ["tool", "N (jobs)", "median s", "rows/s", "MB/s", "output MB", "time vs pg_dump"],
        rows,
        note=(
            f"{args.rows} rows in 3 tables ({authors}/{books}/{reviews}) read from one local"
            f" replica; median of {args.repeats} interleaved runs after a warm-up run each;"
            " MB/s of each tool's own output (CSV for pgreplica dump, COPY text for pg_dump)."
        ),
    )
    results.chart(
        "rows",
        "Rows per second by jobs",
        x=[str(j) for j in args.jobs],
        series={name: [r[3] for r in rows if r[0] == name] for name in tools},
        kind="bar",
        xlabel="jobs (N)",
        ylabel="rows per second",
    )
    results.summary = (
        "Exporting the same three tables from a replica: "
        + "; ".join(f"{r[0]} with {r[1]} job(s) {r[2]} s ({r[6]}x pg_dump's time)" for r in rows)
        + f" ({args.rows} rows, medians of {args.repeats} runs)."
    )
    results.data |= {
        "args": vars(args),
        "times": {f"{name} -j {jobs}": t for (name, jobs), t in times.items()},
        "sizes": {f"{name} -j {jobs}": b for (name, jobs), b in sizes.items()},
    }
    results.save()


if __name__ == "__main__":
    main()
