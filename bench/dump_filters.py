"""Row filters through foreign keys: ``pgreplica dump``'s queries next to crates.io's own
export SQL, on a crates.io-shaped schema from 10k to 1M rows.

    python -m bench.dump_filters [--rows 10000 100000 1000000] [--repeats 7]
                                 [--before-timeout 60] [--no-whole-dump]

Starts a local primary with one streaming replica and, for each size, a database with
crates.io's shape: ``users`` (10% of the rows), ``crates`` (10%), ``versions`` (60%,
``published_by`` nullable, one in ten NULL) and ``crate_owners`` (20%, one in ten
``deleted``, ``created_by`` nullable and pointing at any user). ``users`` has crates.io's
filter, a subquery over the two other tables::

    id IN (SELECT owner_id FROM crate_owners WHERE NOT deleted
           UNION SELECT published_by FROM versions)

which keeps about 4 users in 10; ``crate_owners`` has ``NOT deleted``. Then, on the
replica, in one ``REPEATABLE READ, READ ONLY`` transaction per run, the four tables are
exported with ``COPY (...) TO STDOUT`` (output read and thrown away, the same client
path for all, :func:`pgreplica.dump.copy_out`) by:

* **crates.io's SQL**: its ``export.sql`` style written by hand, ``\\copy (SELECT ...
  FROM users WHERE id IN (SELECT ...))`` and ``WHERE NOT deleted``; no foreign key is
  checked, so ``crate_owners.created_by`` may name a user the dump leaves out;
* **pgreplica dump**: the per-table queries of the dump's plan (``_build_plan`` on the
  replica): the same rows, with each child's foreign keys to the filtered ``users``
  checked against the kept keys, computed once per query (a hash join), and a dangling
  ``created_by`` exported as NULL;
* **before**: the correlated ``EXISTS`` semi-joins the dump used until now, once per
  size, cancelled after ``--before-timeout`` seconds.

Runs are interleaved (the order flips every repeat) after one warm-up run of each;
reported: medians, the ratio to crates.io's SQL, and the growth exponent (log time /
log rows between sizes: 1 is linear). Also timed, unless ``--no-whole-dump``: the whole
``pgreplica dump`` command (host probe, catalog, EXPLAIN of every query, CSV files,
schema and metadata) with 1 job.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.dump import on_fresh_cluster
from bench.results import Results
from pgreplica.config import Settings
from pgreplica.dump import Visibility, copy_out, dump
from pgreplica.dump.catalog import _build_plan
from pgreplica.localcluster import LocalCluster

TABLES = ("users", "crates", "versions", "crate_owners")
SCHEMA = """
CREATE TABLE users (
    id integer PRIMARY KEY, gh_login text NOT NULL, name text, gh_avatar text,
    gh_id integer NOT NULL, gh_access_token text NOT NULL
);
CREATE TABLE crates (
    id integer PRIMARY KEY, name text NOT NULL UNIQUE, description text,
    created_at timestamp NOT NULL, downloads integer NOT NULL
);
CREATE TABLE versions (
    id integer PRIMARY KEY, crate_id integer NOT NULL REFERENCES crates,
    num text NOT NULL, published_by integer REFERENCES users,
    created_at timestamp NOT NULL, yanked boolean NOT NULL, UNIQUE (crate_id, num)
);
CREATE TABLE crate_owners (
    crate_id integer NOT NULL REFERENCES crates,
    owner_id integer NOT NULL REFERENCES users,
    created_at timestamp NOT NULL, created_by integer REFERENCES users,
    deleted boolean NOT NULL, owner_kind integer NOT NULL,
    PRIMARY KEY (crate_id, owner_id)
);
"""
# Publishers among the first 30% of users, owners among the first 40%; created_by any.
FILL = """
INSERT INTO users
SELECT g, 'login' || g, 'name ' || g, 'https://avatars.example/' || md5(g::text), g * 3,
       md5('token' || g)
FROM generate_series(1, {users}) g;
INSERT INTO crates
SELECT g, 'crate-' || g, 'description of ' || md5(g::text),
       timestamp '2015-01-01' + g * interval '1 minute', g % 1000
FROM generate_series(1, {crates}) g;
INSERT INTO versions
SELECT g, 1 + g % {crates}, '1.' || g,
       CASE WHEN g % 10 <> 0 THEN 1 + (g * 17) % ({users} * 3 / 10) END,
       timestamp '2015-01-01' + g * interval '1 minute', g % 50 = 0
FROM generate_series(1, {versions}) g;
INSERT INTO crate_owners
SELECT 1 + g % {crates}, 1 + ((g % {crates}) * 3 + g / {crates}) % ({users} * 4 / 10),
       timestamp '2015-01-01' + g * interval '1 minute',
       CASE WHEN g % 4 <> 0 THEN 1 + (g * 13) % {users} END, g % 10 = 0, 0
FROM generate_series(0, {owners} - 1) g;
"""
USERS_FILTER = (
    "id IN (SELECT owner_id FROM crate_owners WHERE NOT deleted "
    "UNION SELECT published_by FROM versions)"
)
VISIBILITY = {
    "tables": {
        "users": {
            "columns": {
                "id": "public",
                "gh_login": "public",
                "name": "public",
                "gh_avatar": "public",
                "gh_id": "public",
                "gh_access_token": "private",
            },
            "filter": USERS_FILTER,
        },
        "crates": {
            "columns": {
                c: "public" for c in ("id", "name", "description", "created_at", "downloads")
            }
        },
        "versions": {
            "columns": {
                "id": "public",
                "crate_id": "public",
                "num": "public",
                "published_by": "public",
                "created_at": "public",
                "yanked": "private",
            }
        },
        "crate_owners": {
            "columns": {
                "crate_id": "public",
                "owner_id": "public",
                "created_at": "public",
                "created_by": "public",
                "deleted": "private",
                "owner_kind": "public",
            },
            "filter": "NOT deleted",
        },
    }
}
# crates.io's export.sql, by hand: each table's public columns and its own filter.
CRATES_IO_SQL = {
    "users": f"SELECT id, gh_login, name, gh_avatar, gh_id FROM users WHERE {USERS_FILTER}",
    "crates": "SELECT id, name, description, created_at, downloads FROM crates",
    "versions": "SELECT id, crate_id, num, published_by, created_at FROM versions",
    "crate_owners": "SELECT crate_id, owner_id, created_at, created_by, owner_kind "
    "FROM crate_owners WHERE NOT deleted",
}
# What the dump ran before: correlated EXISTS semi-joins, each re-running the filter.
_USER_KEPT = "SELECT 1 FROM users AS _pgr_1 WHERE _pgr_1.id = _pgr_0.{column} AND ({filter})"
BEFORE_SQL = {
    "users": f"SELECT id, gh_login, name, gh_avatar, gh_id FROM users AS _pgr_0 "
    f"WHERE ({USERS_FILTER})",
    "crates": CRATES_IO_SQL["crates"],
    "versions": "SELECT id, crate_id, num, published_by, created_at FROM versions AS _pgr_0 "
    "WHERE (_pgr_0.published_by IS NULL OR EXISTS ("
    + _USER_KEPT.format(column="published_by", filter=USERS_FILTER)
    + "))",
    "crate_owners": "SELECT crate_id, owner_id, created_at, created_by, owner_kind "
    "FROM crate_owners AS _pgr_0 WHERE (NOT deleted) AND EXISTS ("
    + _USER_KEPT.format(column="owner_id", filter=USERS_FILTER)
    + ") AND (_pgr_0.created_by IS NULL OR EXISTS ("
    + _USER_KEPT.format(column="created_by", filter=USERS_FILTER)
    + "))",
}
CRATES_IO, PGREPLICA = "crates.io's SQL", "pgreplica dump queries"


def sizes(rows: int) -> dict[str, int]:
    return {
        "users": rows // 10,
        "crates": rows // 10,
        "versions": rows * 6 // 10,
        "owners": rows // 5,
    }


def copy_statement(select: str) -> str:
    return f"COPY ({select}) TO STDOUT WITH (FORMAT csv, HEADER)"


def discard(_: bytes | memoryview) -> None:
    pass


def run_set(dsn: str, statements: dict[str, str]) -> tuple[float, dict[str, float], dict[str, int]]:
    """Every statement in one read-only snapshot: total seconds, per table, rows."""
    seconds: dict[str, float] = {}
    rows: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for table, statement in statements.items():
            begun = time.perf_counter()
            rows[table], _ = copy_out(conn, statement, discard)
            seconds[table] = time.perf_counter() - begun
        conn.execute("COMMIT")
        total = time.perf_counter() - started
    return total, seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="sizes: rows over the 4 tables",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per tool and size")
    parser.add_argument(
        "--before-timeout",
        type=float,
        default=60.0,
        help="seconds after which the previous queries are cancelled (0: do not run them)",
    )
    parser.add_argument(
        "--no-whole-dump", action="store_true", help="do not time the whole dump command"
    )
    args = parser.parse_args()

    on_fresh_cluster(run, args)


def prepare(cluster: LocalCluster, rows: int) -> tuple[str, str]:
    """The database of one size, filled and replayed: (primary DSN, replica DSN)."""
    name = f"bench_filters_{rows}"
    cluster.execute(0, f"CREATE DATABASE {name}")
    primary, replica = (cluster.dsn(i)[: -len("postgres")] + name for i in (0, 1))
    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(FILL.format(**sizes(rows)))
        conn.execute("VACUUM ANALYZE")
    cluster.wait_replayed()
    return primary, replica


def pgreplica_statements(replica: str, visibility: Visibility) -> dict[str, str]:
    """The dump's own COPY statements, from its plan on the replica."""
    with psycopg.connect(replica) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        plan = _build_plan(conn, visibility)
        conn.rollback()
    return {t.name: t.copy_sql() for t in plan.tables}


def run_before(replica: str, timeout: float) -> float | None:
    """The previous queries once, or None when cancelled after ``timeout`` seconds."""
    statements = {t: copy_statement(BEFORE_SQL[t]) for t in TABLES}
    with psycopg.connect(replica, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
        started = time.perf_counter()
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            for statement in statements.values():
                copy_out(conn, statement, discard)
            conn.execute("COMMIT")
        except psycopg.errors.QueryCanceled:
            return None
        return time.perf_counter() - started


def run(cluster: LocalCluster, args: argparse.Namespace, tmp: Path) -> None:
    results = Results("dump_filters", "Row filters through foreign keys against crates.io's SQL")
    visibility = Visibility.from_dict(VISIBILITY, source="bench")
    counter = iter(range(1_000_000))
    per_size: list[dict[str, Any]] = []

    for rows in args.rows:
        primary, replica = prepare(cluster, rows)
        statements = {
            CRATES_IO: {t: copy_statement(CRATES_IO_SQL[t]) for t in TABLES},
            PGREPLICA: pgreplica_statements(replica, visibility),
        }
        settings = Settings.from_dict(
            {"databases": {"main": {"primary": primary, "replicas": [replica]}}}, environ={}
        )

        def whole_dump(settings: Settings = settings) -> float:
            out = tmp / f"dump-{next(counter)}"
            started = time.perf_counter()
            dump(settings, visibility, out, jobs=1, quiet=True, stderr=io.StringIO())
            elapsed = time.perf_counter() - started
            shutil.rmtree(out)
            return elapsed

        times: dict[str, list[float]] = {name: [] for name in statements}
        tables: dict[str, dict[str, list[float]]] = {name: {} for name in statements}
        exported: dict[str, dict[str, int]] = {}
        for name, set_ in statements.items():  # warm-up
            _, _, exported[name] = run_set(replica, set_)
        assert exported[CRATES_IO] == exported[PGREPLICA], exported  # the same rows
        dumps: list[float] = []
        if not args.no_whole_dump:
            whole_dump()
        for repeat in range(args.repeats):
            order = list(statements.items())
            if repeat % 2:
                order.reverse()
            for name, set_ in order:
                total, seconds, _ = run_set(replica, set_)
                times[name].append(total)
                for table, s in seconds.items():
                    tables[name].setdefault(table, []).append(s)
            if not args.no_whole_dump:
                dumps.append(whole_dump())
        with psycopg.connect(replica, autocommit=True) as conn:
            # A join, not NOT IN: the kept ids outgrow a hashed subplan at 1M rows.
            dangling = conn.execute(
                f"SELECT count(*) FROM crate_owners LEFT JOIN (SELECT id FROM users WHERE "
                f"{USERS_FILTER}) AS kept ON kept.id = created_by "
                "WHERE NOT deleted AND created_by IS NOT NULL AND kept.id IS NULL"
            ).fetchone()
        before = run_before(replica, args.before_timeout) if args.before_timeout > 0 else None
        per_size.append(
            {
                "rows": rows,
                "exported": sum(exported[PGREPLICA].values()),
                "per_table": exported[PGREPLICA],
                "dangling_created_by": dangling[0] if dangling else None,
                "times": times,
                "tables": tables,
                "whole_dump": dumps,
                "before": before,
            }
        )
        cluster.execute(0, f"DROP DATABASE bench_filters_{rows}")
        print(
            f"{rows:>9} rows: crates.io {statistics.median(times[CRATES_IO]):.3f} s, "
            f"pgreplica {statistics.median(times[PGREPLICA]):.3f} s"
            + (f", whole dump {statistics.median(dumps):.3f} s" if dumps else "")
            + (
                f", before {before:.3f} s"
                if before is not None
                else f", before > {args.before_timeout:.0f} s (cancelled)"
                if args.before_timeout > 0
                else ""
            ),
            flush=True,
        )
    report(results, args, per_size)


def growth(points: list[tuple[int, float]]) -> list[float]:
    """log(time ratio) / log(rows ratio) between consecutive sizes: 1 is linear."""
    return [
        math.log(t2 / t1) / math.log(n2 / n1) for (n1, t1), (n2, t2) in itertools.pairwise(points)
    ]


def report(results: Results, args: argparse.Namespace, per_size: list[dict[str, Any]]) -> None:
    cpus = os.cpu_count()
    print(
        f"\ncrates.io-shaped schema (users 10%, crates 10%, versions 60%, crate_owners 20% of "
        f"the rows), one replica on 127.0.0.1, {cpus} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}; medians of {args.repeats} interleaved runs"
    )
    header = (
        f"{'rows':>9} {'exported':>9} {'crates.io s':>12} {'pgreplica s':>12} {'ratio':>6}"
        f" {'µs/row':>7} {'whole dump s':>13} {'before s':>9}"
    )
    print(header)
    table_rows = []
    for size in per_size:
        ours = statistics.median(size["times"][PGREPLICA])
        theirs = statistics.median(size["times"][CRATES_IO])
        whole = statistics.median(size["whole_dump"]) if size["whole_dump"] else None
        before = size["before"]
        before_text = (
            (f"{before:.3f}" if before is not None else f"> {args.before_timeout:.0f}")
            if args.before_timeout > 0
            else "-"
        )
        row = [
            size["rows"],
            size["exported"],
            round(theirs, 3),
            round(ours, 3),
            round(ours / theirs, 2),
            round(ours / size["exported"] * 1e6, 2),
            round(whole, 3) if whole is not None else "-",
            before_text,
        ]
        table_rows.append(row)
        print(
            f"{row[0]:>9} {row[1]:>9} {row[2]:>12.3f} {row[3]:>12.3f} {row[4]:>5.2f}x"
            f" {row[5]:>7.2f} {row[6]!s:>13} {row[7]:>9}"
        )
    results.table(
        "Export queries by size",
        [
            "rows",
            "rows exported",
            "crates.io's SQL median s",
            "pgreplica dump queries median s",
            "ratio",
            "pgreplica µs per row",
            "whole pgreplica dump median s",
            "before (correlated EXISTS) s",
        ],
        table_rows,
        note=(
            "The four tables of a crates.io-shaped schema exported from one local replica in "
            f"one REPEATABLE READ snapshot per run; medians of {args.repeats} interleaved "
            "runs after a warm-up; COPY output read and thrown away, through the same client "
            "code. 'before' ran once, cancelled after "
            f"{args.before_timeout:.0f} s; the whole dump writes the CSV files too."
        ),
    )
    largest = per_size[-1]
    breakdown = []
    for table in TABLES:
        theirs = statistics.median(largest["tables"][CRATES_IO][table])
        ours = statistics.median(largest["tables"][PGREPLICA][table])
        breakdown.append([table, largest["per_table"][table], round(theirs, 3), round(ours, 3)])
    results.table(
        f"Per table at {largest['rows']} rows",
        ["table", "rows exported", "crates.io's SQL median s", "pgreplica median s"],
        breakdown,
        note=(
            f"crate_owners: {largest['dangling_created_by']} live rows whose created_by "
            "names a user the filter leaves out; pgreplica exports them with created_by "
            "NULL (crates.io's SQL exports the dangling id)."
        ),
    )
    series: dict[str, list[float | None]] = {
        CRATES_IO: [statistics.median(s["times"][CRATES_IO]) for s in per_size],
        PGREPLICA: [statistics.median(s["times"][PGREPLICA]) for s in per_size],
    }
    if args.before_timeout > 0:
        series["before (correlated EXISTS)"] = [s["before"] for s in per_size]
    results.chart(
        "scaling",
        "Export time by size",
        x=[s["rows"] for s in per_size],
        series=series,
        xlabel="rows (4 tables)",
        ylabel="seconds (median)",
        logx=True,
        logy=True,
    )
    ratios = [r[4] for r in table_rows]
    worst = max(ratios)
    results.target(
        "pgreplica dump's queries within 3x of crates.io's export SQL",
        ", ".join(f"{r[4]}x at {r[0]} rows" for r in table_rows),
        worst <= 3.0,
    )
    exponents = growth([(s["rows"], series[PGREPLICA][i] or 0.0) for i, s in enumerate(per_size)])
    if exponents:
        results.target(
            "linear growth (time exponent between sizes at most 1.1)",
            ", ".join(
                f"{e:.2f} from {a['rows']} to {b['rows']}"
                for e, (a, b) in zip(exponents, itertools.pairwise(per_size), strict=True)
            ),
            max(exponents) <= 1.1,
        )
    results.summary = (
        "Exporting crates.io's shape with its users filter (a subquery over crate_owners and "
        "versions) from a replica: "
        + "; ".join(
            f"{r[0]} rows {r[3]} s against {r[2]} s for crates.io's own SQL ({r[4]}x)"
            for r in table_rows
        )
        + ". Each child's foreign keys to users are checked against the kept keys computed "
        "once per query; the correlated EXISTS used before took "
        + ", ".join(f"{r[7]} s at {r[0]} rows" for r in table_rows)
        + "."
    )
    results.data |= {"args": vars(args), "sizes": per_size}
    results.save()


if __name__ == "__main__":
    main()
