"""One big table exported by ``pgreplica dump`` with 1 and 4 workers, and by ``pg_dump``.

    python -m bench.dump_parallel [--rows 1000000] [--repeats 5] [--shuffle] [--link 20]
                                  [--by block|key]

Starts a local primary with one streaming replica, fills ONE table of ``--rows`` rows
(``events``: a bigint primary key, two more numbers, text with CSV quoting, a timestamp),
waits until the replica has replayed it, then exports it from the replica with:

* ``pgreplica dump`` split in primary key ranges (``split_rows`` below the table's size):
  N = 1 copies the table in key order by one connection, N = 4 in 8 key ranges by 4;
* ``pgreplica dump`` not split (``split_rows=None``, one plain ``COPY``, as before the
  split existed), N = 1 and 4: what the split costs and buys;
* ``pg_dump --data-only -Fd -j N -Z 0``, N = 1 and 4 (it copies one table with one
  connection whatever N).

Then again, split and pg_dump only, through a TCP proxy (``FaultProxy``, in a process of
its own) that lets ``--link`` MB/s through each connection: a replica across a network,
where one connection's throughput is the limit (``--link 0`` skips it).

Runs are interleaved (the order of the tools flips every repeat) after one warm-up run
of each. Reported: median seconds, rows/s, the ratio to pg_dump's time and the speed-up
over N = 1. Every split run's CSV must have the same SHA-256 (1 or 4 workers, every
repeat, direct or through the proxy): the run fails otherwise. With ``--shuffle`` the
rows are inserted in random key order, so that key order is not the physical order (the
worst case for a copy in key order).

``--by key`` gives ``events`` a foreign key to an ``accounts`` table (50,000 rows) with a
row filter that keeps them all: the export then checks each row's account against the
exported accounts (a join), so the table is split in primary key ranges and copied in key
order, with one worker too. pgreplica then also exports ``accounts``; pg_dump exports
``events`` only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.dump import on_fresh_cluster
from bench.results import Results
from pgreplica.config import Settings
from pgreplica.dump import Visibility, dump
from pgreplica.localcluster import LocalCluster, find_bindir

DATABASE = "bench_dump_parallel"
SCHEMA = """
CREATE TABLE events (
    id bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    kind int NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL
);
"""
FILL = """
INSERT INTO events
SELECT g, 1 + g % 50000, g % 7, 'event ' || md5(g::text) || ', "quoted"',
       timestamptz '2020-01-01' + g * interval '1 second'
FROM generate_series(1, {rows}) g {order}
"""
COLUMNS = ("id", "account_id", "kind", "body", "created_at")
VISIBILITY: dict[str, Any] = {"tables": {"events": {"columns": dict.fromkeys(COLUMNS, "public")}}}
ACCOUNTS = """
CREATE TABLE accounts (id bigint PRIMARY KEY, closed boolean NOT NULL);
INSERT INTO accounts SELECT g, false FROM generate_series(1, 50000) g;
ALTER TABLE events ADD FOREIGN KEY (account_id) REFERENCES accounts;
"""
ACCOUNTS_VISIBILITY = {"columns": {"id": "public", "closed": "private"}, "filter": "NOT closed"}

SPLIT = "pgreplica dump"
WHOLE = "pgreplica dump, not split"
PG_DUMP = "pg_dump -Fd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the table")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per tool and N")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4], help="values of N")
    parser.add_argument(
        "--split-rows",
        type=int,
        default=100_000,
        help="pgreplica's split threshold for the split runs (below --rows)",
    )
    parser.add_argument("--shuffle", action="store_true", help="insert in random key order")
    parser.add_argument(
        "--by",
        choices=("block", "key"),
        default="block",
        help="key: a filtered parent makes the table split by primary key (see above)",
    )
    parser.add_argument(
        "--link",
        type=float,
        default=20.0,
        metavar="MB_PER_S",
        help="also through a proxy letting this many MB/s through each connection (0: no)",
    )
    parser.add_argument(
        "--link-repeats", type=int, default=3, help="timed runs per tool and N through it"
    )
    args = parser.parse_args()

    on_fresh_cluster(run, args)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def size_of(directory: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in directory.rglob(f"*{suffix}") if p.is_file())


class Link:
    """A FaultProxy in a process of its own (off the dump's interpreter lock) in front of
    the replica, at most ``mb_per_s`` MB/s each way on each connection: a replica across
    a network, where one connection's throughput is the limit."""

    CODE = (
        "import sys; from pgreplica.faultproxy import FaultProxy\n"
        "proxy = FaultProxy(('127.0.0.1', int(sys.argv[1]))).start()\n"
        "proxy.bandwidth(float(sys.argv[2]))\n"
        "print(proxy.port, flush=True)\n"
        "sys.stdin.read()\n"
    )

    def __init__(self, port: int, mb_per_s: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.CODE, str(port), str(mb_per_s * 1e6)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


def run(cluster: LocalCluster, args: argparse.Namespace, tmp: Path) -> None:
    results = Results("dump_parallel", "One big table: pgreplica dump split across workers")
    cluster.execute(0, f"CREATE DATABASE {DATABASE}")
    primary, replica = (cluster.dsn(i)[: -len("postgres")] + DATABASE for i in (0, 1))
    fill_started = time.monotonic()
    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute(SCHEMA)
        order = "ORDER BY random()" if args.shuffle else ""
        conn.execute(FILL.format(rows=args.rows, order=order))
        if args.by == "key":
            conn.execute(ACCOUNTS)
        conn.execute("VACUUM ANALYZE")
        row = conn.execute(
            "SELECT pg_relation_size('events'), reltuples::int8 FROM pg_class "
            "WHERE oid = 'events'::regclass"
        ).fetchone()
        assert row is not None
        table_bytes, estimate = row
    cluster.wait_replayed()
    print(
        f"filled {args.rows} rows ({table_bytes / 1e6:.0f} MB on disk, "
        f"{'shuffled' if args.shuffle else 'in key order'}) in "
        f"{time.monotonic() - fill_started:.1f} s"
    )
    assert estimate >= args.split_rows, "the table must be above the split threshold"
    digests: set[str] = set()
    parts: dict[int, int] = {}
    cpus = os.cpu_count()
    layout = "shuffled key order" if args.shuffle else "key order = physical order"
    layout += ", split by primary key" if args.by == "key" else ""
    setup = (
        f"one table of {args.rows} rows ({layout}), one replica on 127.0.0.1, {cpus} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )

    def scenario(
        title: str, dsn: str, tool_names: list[str], repeats: int
    ) -> tuple[list[list[Any]], dict[str, Any]]:
        times, sizes = measure(
            args, tmp, primary, dsn, tool_names, repeats, digests=digests, parts=parts
        )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\n{title}: {setup}; median of {repeats} interleaved runs (load {load:.1f})")
        print(
            f"{'tool':26} {'N':>2} {'ranges':>6} {'median s':>9} {'rows/s':>11} {'MB/s':>7}"
            f" {'vs pg_dump':>11} {'vs N=1':>7}"
        )
        rows: list[list[Any]] = []
        tools = [t for t in tool_names if any(k[0] == t for k in times)]
        for jobs in args.jobs:
            base = statistics.median(times.get((PG_DUMP, jobs)) or [float("nan")])
            if PG_DUMP in tools and (PG_DUMP, jobs) not in times:
                base = statistics.median(times[(PG_DUMP, max(j for t, j in times if t == PG_DUMP))])
            for name in tools:
                if (name, jobs) not in times:
                    continue
                seconds = statistics.median(times[(name, jobs)])
                first = statistics.median(times.get((name, args.jobs[0])) or [seconds])
                megabytes = sizes[(name, jobs)] / 1e6
                ranges = parts.get(jobs, "") if name == SPLIT else ""
                print(
                    f"{name:26} {jobs:>2} {ranges!s:>6} {seconds:9.3f}"
                    f" {args.rows / seconds:11,.0f} {megabytes / seconds:7.1f}"
                    f" {seconds / base:10.2f}x {first / seconds:6.2f}x"
                )
                rows.append(
                    [
                        name,
                        jobs,
                        ranges,
                        round(seconds, 3),
                        round(args.rows / seconds),
                        round(megabytes / seconds, 1),
                        round(seconds / base, 2),
                        round(first / seconds, 2),
                    ]
                )
        raw = {
            "load_average_end": load,
            "times": {f"{name} -j {jobs}": t for (name, jobs), t in times.items()},
            "sizes": {f"{name} -j {jobs}": b for (name, jobs), b in sizes.items()},
        }
        return rows, raw

    columns = [
        "tool",
        "N (jobs)",
        "key ranges",
        "median s",
        "rows/s",
        "MB/s",
        "time vs pg_dump",
        "speed-up vs N=1",
    ]
    direct, direct_raw = scenario("Direct", replica, [SPLIT, WHOLE, PG_DUMP], args.repeats)
    results.table(
        "One big table, replica on the same machine",
        columns,
        direct,
        note=(
            f"One table of {args.rows} rows ({layout}) read from one local replica on a "
            f"{cpus}-CPU machine; median of {args.repeats} interleaved runs after a warm-up "
            "run each. 'pgreplica dump' splits the table in primary key ranges (in key "
            f"order; split_rows={args.split_rows}); 'not split' is one plain COPY. pg_dump "
            "copies one table with one connection whatever -j."
        ),
    )
    results.chart(
        "rows",
        "One big table: rows per second by jobs (replica on the same machine)",
        x=[str(j) for j in args.jobs],
        series={name: [r[4] for r in direct if r[0] == name] for name in (SPLIT, WHOLE, PG_DUMP)},
        kind="bar",
        xlabel="jobs (N)",
        ylabel="rows per second",
    )
    linked: list[list[Any]] = []
    if args.link > 0:
        link = Link(int(conninfo_to_dict(replica)["port"] or 5432), args.link)
        try:
            through = make_conninfo(replica, port=str(link.port))
            linked, linked_raw = scenario(
                f"Through a link of {args.link:g} MB/s per connection",
                through,
                [SPLIT, PG_DUMP],
                args.link_repeats,
            )
        finally:
            link.close()
        results.table(
            f"One big table, replica behind a link of {args.link:g} MB/s per connection",
            columns,
            linked,
            note=(
                f"The same table through a TCP proxy (pgreplica.testing.FaultProxy, in a "
                f"process of its own) that lets {args.link:g} MB/s through each connection "
                "each way, as a replica across a network where one connection's throughput "
                f"is the limit; median of {args.link_repeats} interleaved runs. pg_dump -j 4 "
                "still reads the table through one connection."
            ),
        )
        results.chart(
            "link",
            f"One big table through {args.link:g} MB/s per connection: rows per second",
            x=[str(j) for j in args.jobs],
            series={
                SPLIT: [
                    next((r[4] for r in linked if r[:2] == [SPLIT, j]), None) for j in args.jobs
                ],
                PG_DUMP: [
                    next((r[4] for r in linked if r[:2] == [PG_DUMP, j]), None) for j in args.jobs
                ],
            },
            kind="bar",
            xlabel="jobs (N)",
            ylabel="rows per second",
        )
        results.data["link"] = {"mb_per_s": args.link, **linked_raw}

    identical = len(digests) == 1
    print(f"\nsplit CSV identical across every run (1 and 4 workers): {identical}")
    by = {(r[0], r[1]): r for r in direct}
    high = args.jobs[-1]
    if (SPLIT, high) in by:
        speedup = by[(SPLIT, high)][7]
        results.target(
            f"one big table split across {high} workers, replica on the same machine: "
            "faster than 1 worker",
            f"{speedup}x the rows/s of N={args.jobs[0]} ({cpus} CPUs shared by the client "
            "and the server)",
            speedup > 1.0,
        )
    link_by = {(r[0], r[1]): r for r in linked}
    if (SPLIT, high) in link_by and (PG_DUMP, high) in link_by:
        speedup = link_by[(SPLIT, high)][7]
        results.target(
            f"one big table split across {high} workers behind a per-connection limit: "
            "faster than 1 worker and than pg_dump",
            f"{speedup}x the rows/s of N={args.jobs[0]}, {link_by[(SPLIT, high)][6]}x "
            f"pg_dump -j {high}'s time",
            speedup > 1.0 and link_by[(SPLIT, high)][6] < 1.0,
        )
    results.target(
        "the split table's CSV is byte-identical whatever the number of workers",
        f"{len(digests)} distinct SHA-256 over every split run (1 and {high} workers)",
        identical,
    )

    def sentence(rows: list[list[Any]]) -> str:
        return "; ".join(
            f"{r[0]} with {r[1]} job(s) {r[3]} s, {r[4]:,} rows/s ({r[6]}x pg_dump's time)"
            for r in rows
        )

    results.summary = (
        f"Exporting one table of {args.rows} rows from a replica on the same {cpus}-CPU "
        f"machine: {sentence(direct)} (medians of {args.repeats} runs)."
        + (
            f" Through a link of {args.link:g} MB/s per connection: {sentence(linked)}"
            f" (medians of {args.link_repeats} runs)."
            if linked
            else ""
        )
        + " The split table's CSV was "
        + ("identical" if identical else "NOT identical")
        + " in every run."
    )
    results.data |= {
        "args": vars(args),
        "table_bytes": table_bytes,
        **direct_raw,
        "key_ranges": parts,
        "split_csv_sha256": sorted(digests),
    }
    results.save()
    if not identical:
        raise SystemExit("the split table's CSV differed between runs")


def measure(
    args: argparse.Namespace,
    tmp: Path,
    primary: str,
    replica: str,
    tool_names: list[str],
    repeats: int,
    *,
    digests: set[str],
    parts: dict[int, int],
) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], int]]:
    """Time each tool with each N against ``replica``: (seconds, output bytes)."""
    settings = Settings.from_dict(
        {"databases": {"main": {"primary": primary, "replicas": [replica]}}}, environ={}
    )
    tables = dict(VISIBILITY["tables"])
    if args.by == "key":
        tables["accounts"] = ACCOUNTS_VISIBILITY
    visibility = Visibility.from_dict({"tables": tables}, source="bench")
    params = conninfo_to_dict(replica)
    pg_dump = os.path.join(find_bindir(), "pg_dump")
    env = {**os.environ, "PGPASSWORD": str(params["password"])}
    counter = iter(range(1_000_000))

    def pgreplica(split: bool) -> Callable[[int], tuple[float, int]]:
        def run_dump(jobs: int) -> tuple[float, int]:
            out = tmp / f"pgreplica-{next(counter)}"
            split_rows = args.split_rows if split else None
            stderr = io.StringIO()
            started = time.perf_counter()
            result = dump(
                settings, visibility, out, jobs=jobs, split_rows=split_rows, stderr=stderr
            )
            elapsed = time.perf_counter() - started
            assert result.role == "replica" and result.tables["public.events"] == args.rows
            if split:
                parts[jobs] = result.parts["public.events"]
                event = next(
                    e
                    for e in map(json.loads, stderr.getvalue().splitlines())
                    if e.get("table") == "public.events"
                )
                assert event["split"] == args.by, event
                digests.add(sha256(out / "data" / "public.events.csv"))
            size = size_of(out, ".csv")
            shutil.rmtree(out)
            return elapsed, size

        return run_dump

    def run_pg_dump(jobs: int) -> tuple[float, int]:
        out = tmp / f"pg_dump-{next(counter)}"
        command = [pg_dump, "--data-only", "-Fd", "-j", str(jobs), "-Z", "0", "-f", str(out)]
        command += ["-h", str(params["host"]), "-p", str(params["port"])]
        command += ["-U", str(params["user"]), "-d", DATABASE, "-t", "public.events"]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
        elapsed = time.perf_counter() - started
        size = size_of(out, ".dat")
        shutil.rmtree(out)
        return elapsed, size

    available: dict[str, Callable[[int], tuple[float, int]]] = {
        SPLIT: pgreplica(True),
        WHOLE: pgreplica(False),
    }
    if os.access(pg_dump, os.X_OK):
        available[PG_DUMP] = run_pg_dump
    else:
        print(f"{pg_dump} not found: pgreplica dump timed alone")
    tools = {name: available[name] for name in tool_names if name in available}
    runs = [(name, jobs) for jobs in args.jobs for name in tools]
    if PG_DUMP in tools and len(tool_names) < 3:  # one connection whatever -j: once is enough
        runs = [(n, j) for n, j in runs if n != PG_DUMP or j == args.jobs[-1]]
    times: dict[tuple[str, int], list[float]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for name, jobs in runs:  # warm-up: caches, connections, first-run costs
        tools[name](jobs)
    for repeat in range(repeats):
        for name, jobs in runs if repeat % 2 == 0 else reversed(runs):
            elapsed, size = tools[name](jobs)
            times.setdefault((name, jobs), []).append(elapsed)
            sizes[(name, jobs)] = size
    return times, sizes


if __name__ == "__main__":
    main()
