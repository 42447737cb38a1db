"""What classifying a statement costs, next to one loopback round trip.

Run ``python -m bench.classify``. For a dozen statements shaped like what Django and
SQLAlchemy 2 (psycopg) send, it times

* warm: ``pgreplica.sql.classify(sql)`` for a text already in the cache (what every
  execution of a parametrised ORM statement pays after the first), in batches of calls;
  the figure is the median over batches of the mean cost per call, in ns;
* cold: ``pgreplica.sql._classify_cached.__wrapped__(sql)``, the uncached work (parse
  and walk), call by call; the figure is the median, in us;

and, for scale, the median of one ``conn.execute("SELECT 1").fetchone()`` through
psycopg over loopback to a local server (a :class:`pgreplica.testing.LocalCluster`
without replicas, started in a new temporary directory and destroyed at the end;
``--no-server`` skips it). ``--json PATH`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pglast
import psycopg

import pgreplica
from bench.results import Results
from pgreplica.sql import _classify_cached, classify
from pgreplica.testing import LocalCluster, make_cluster_directory

#: (label, statement): the shapes an application sends most.
STATEMENTS: list[tuple[str, str]] = [
    ("plain SELECT 1", "SELECT 1"),
    (
        "django get() LIMIT 21",
        'SELECT "shop_book"."id", "shop_book"."title", "shop_book"."author_id", '
        '"shop_book"."price", "shop_book"."stock", "shop_book"."published", '
        '"shop_book"."is_active" FROM "shop_book" WHERE "shop_book"."id" = %s LIMIT 21',
    ),
    (
        "django exists()",
        'SELECT 1 AS "a" FROM "shop_book" WHERE "shop_book"."author_id" = %s LIMIT 1',
    ),
    (
        "django count()",
        'SELECT COUNT(*) AS "__count" FROM "shop_book" WHERE "shop_book"."price" < %s',
    ),
    (
        "django join + annotate",
        'SELECT "shop_author"."id", "shop_author"."name", COUNT("shop_book"."id") AS '
        '"num_books" FROM "shop_author" LEFT OUTER JOIN "shop_book" ON ("shop_author"."id" '
        '= "shop_book"."author_id") GROUP BY "shop_author"."id" ORDER BY "num_books" DESC',
    ),
    (
        "django create() RETURNING",
        'INSERT INTO "shop_book" ("title", "author_id", "price", "stock", "published", '
        '"is_active") VALUES (%s, %s, %s, %s, %s, %s) RETURNING "shop_book"."id"',
    ),
    (
        "django select_for_update()",
        'SELECT "shop_book"."id", "shop_book"."stock" FROM "shop_book" WHERE '
        '"shop_book"."id" = %s LIMIT 21 FOR UPDATE',
    ),
    ("django savepoint", 'SAVEPOINT "s140245683246912_x1"'),
    (
        "sqlalchemy get()",
        "SELECT user_account.id AS user_account_id, user_account.name AS "
        "user_account_name, user_account.fullname AS user_account_fullname\n"
        "FROM user_account\nWHERE user_account.id = %(pk_1)s::INTEGER",
    ),
    (
        "sqlalchemy count(subquery)",
        "SELECT count(*) AS count_1\nFROM (SELECT user_account.id AS user_account_id, "
        "user_account.name AS user_account_name\nFROM user_account\n"
        "WHERE user_account.name LIKE %(name_1)s::VARCHAR) AS anon_1",
    ),
    (
        "sqlalchemy .cte()",
        "WITH anon_1 AS\n(SELECT address.user_id AS user_id, count(address.id) AS count\n"
        "FROM address GROUP BY address.user_id)\n SELECT user_account.name, anon_1.count\n"
        "FROM user_account LEFT OUTER JOIN anon_1 ON user_account.id = anon_1.user_id",
    ),
    ("sqlalchemy version()", "select pg_catalog.version()"),
]


@dataclass
class Row:
    label: str
    target: str
    reason: str
    warm_ns: float
    cold_us: float


def warm_ns(sql: str, batches: int, batch: int) -> float:
    """Median over ``batches`` of the mean cost of one cached classify() call, in ns."""
    classify(sql)
    call = classify
    means: list[float] = []
    loop = range(batch)
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in loop:
            call(sql)
        means.append((time.perf_counter_ns() - start) / batch)
    return statistics.median(means)


def cold_us(sql: str, repeat: int) -> float:
    """Median cost of one uncached classification, in us."""
    uncached: Callable[[str], object] = _classify_cached.__wrapped__
    uncached(sql)
    samples: list[int] = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        uncached(sql)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


#: Tables the statements name, so that the catalog-aware classifier finds them.
SHOP_SCHEMA = """
CREATE TABLE IF NOT EXISTS shop_author (id bigint PRIMARY KEY, name text);
CREATE TABLE IF NOT EXISTS shop_book (id bigint PRIMARY KEY, title text, author_id bigint,
    price numeric, stock int, published date, is_active boolean);
"""


@dataclass
class CatalogRow:
    label: str
    reason: str
    warm_ns: float
    resolve_us: float
    lookup_us: float


def round_trip_us(repeat: int, args: argparse.Namespace) -> tuple[float, str, list[CatalogRow]]:
    """Median of a loopback ``SELECT 1`` through psycopg, in us, the server version,
    and ``lb.classify()`` (the catalog-aware classifier) on the same server: warm (the
    database's cache of classifications), resolved again from cached catalog facts, and
    with the catalog asked (one round trip per kind of name)."""
    cluster = LocalCluster(make_cluster_directory("pgreplica-classify-"), replicas=0, keep=False)
    try:
        print("starting a local server ...", file=sys.stderr, flush=True)
        cluster.up()
        cluster.execute(0, SHOP_SCHEMA)
        with psycopg.connect(cluster.dsn(0), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "?"
            for _ in range(200):
                conn.execute("SELECT 1").fetchone()
            samples: list[int] = []
            for _ in range(repeat):
                start = time.perf_counter_ns()
                conn.execute("SELECT 1").fetchone()
                samples.append(time.perf_counter_ns() - start)
        with pgreplica.LoadBalancer(cluster.dsn(0)) as lb:
            catalog = [catalog_row(lb, label, sql, args) for label, sql in STATEMENTS]
        return statistics.median(samples) / 1000, version, catalog
    finally:
        cluster.destroy()


def catalog_row(
    lb: pgreplica.LoadBalancer, label: str, sql: str, args: argparse.Namespace
) -> CatalogRow:
    route = lb._router.route(None)
    result = lb.classify(sql)
    call = lb.classify
    means: list[float] = []
    for _ in range(args.batches // 4):
        start = time.perf_counter_ns()
        for _ in range(args.batch):
            call(sql)
        means.append((time.perf_counter_ns() - start) / args.batch)

    def timed(prepare: Callable[[], None]) -> float:
        samples = []
        for _ in range(args.repeat):
            prepare()
            start = time.perf_counter_ns()
            call(sql)
            samples.append(time.perf_counter_ns() - start)
        return statistics.median(samples) / 1000

    return CatalogRow(
        label,
        result.reason,
        statistics.median(means),
        timed(route.classified.clear),
        timed(lb.refresh_functions),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.classify", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batches", type=int, default=200, help="warm: batches (200)")
    parser.add_argument("--batch", type=int, default=1000, help="warm: calls per batch (1000)")
    parser.add_argument("--repeat", type=int, default=300, help="cold: calls per statement")
    parser.add_argument("--round-trips", type=int, default=3000, help="SELECT 1 round trips")
    parser.add_argument("--no-server", action="store_true", help="skip the round trip")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    return parser.parse_args(argv)


def save_results(
    res: Results,
    args: argparse.Namespace,
    rows: list[Row],
    catalog: list[CatalogRow],
    warm: float,
    cold: float,
    round_trip: float | None,
    payload: dict[str, object],
) -> None:
    """``bench/results/classify.json``: the tables and the figures (no targets)."""
    res.summary = (
        f"pgreplica.sql.classify() on {len(rows)} statements shaped like Django's and"
        f" SQLAlchemy's: warm (cached) {warm:.0f} ns per call at the median of"
        f" {args.batches} batches of {args.batch} calls, cold (parse and walk) {cold:.1f} us"
        f" per statement at the median of {args.repeat} calls"
        + (
            f"; one loopback SELECT 1 through psycopg takes {round_trip:.1f} us."
            if round_trip is not None
            else "."
        )
    )
    res.table(
        "classify(): cold and warm, per statement",
        ["statement", "target", "reason", "warm ns", "cold µs"],
        [[r.label, r.target, r.reason, round(r.warm_ns), round(r.cold_us, 1)] for r in rows],
        "Warm: a text already in the cache (median over batches of the mean per call);"
        " cold: the uncached parse and walk, call by call (median).",
    )
    if catalog:
        res.table(
            "lb.classify(): the catalog-aware classifier, per statement",
            ["statement", "reason", "warm ns", "resolve µs", "lookup µs"],
            [
                [c.label, c.reason, round(c.warm_ns), round(c.resolve_us, 1), round(c.lookup_us, 1)]
                for c in catalog
            ],
            "Warm: cached per database; resolve: again from cached catalog facts; lookup:"
            " after refresh_functions(), asking the catalog.",
        )
    res.target("classify() warm, median per call", f"{warm:.0f} ns", None)
    res.target("classify() cold, median per statement", f"{cold:.1f} µs", None)
    if round_trip is not None:
        res.target("loopback SELECT 1 round trip through psycopg", f"{round_trip:.1f} µs", None)
        res.target(
            "classify() as a share of one loopback round trip",
            f"warm {100 * warm / 1000 / round_trip:.2f}%, cold {100 * cold / round_trip:.0f}%",
            None,
        )
    if catalog:
        res.target(
            "lb.classify() medians",
            f"warm {statistics.median(c.warm_ns for c in catalog):.0f} ns, resolve"
            f" {statistics.median(c.resolve_us for c in catalog):.1f} µs, lookup"
            f" {statistics.median(c.lookup_us for c in catalog):.1f} µs",
            None,
        )
    res.data = payload
    res.save()


def main(argv: list[str] | None = None) -> int:
    res = Results("classify", "Statement classification: cold and warm")
    args = parse_args(argv)
    gc.collect()
    gc.disable()
    try:
        rows = []
        for label, sql in STATEMENTS:
            result = classify(sql)
            rows.append(
                Row(
                    label,
                    result.target,
                    result.reason,
                    warm_ns(sql, args.batches, args.batch),
                    cold_us(sql, args.repeat),
                )
            )
    finally:
        gc.enable()
    round_trip: float | None = None
    server_version = None
    catalog: list[CatalogRow] = []
    if not args.no_server:
        round_trip, server_version, catalog = round_trip_us(args.round_trips, args)

    print()
    print("pgreplica.sql.classify() cost")
    print(
        f"  versions  pgreplica {pgreplica.__version__}, pglast {pglast.__version__},"
        f" psycopg {psycopg.__version__}, Python {platform.python_version()}"
        + (f", PostgreSQL {server_version}" if server_version else "")
    )
    print(
        f"  warm      median of {args.batches} batches of {args.batch} cached calls"
        f" (mean per call); cold: median of {args.repeat} uncached calls"
    )
    print()
    header = f"{'statement':28}{'target':>9}  {'reason':21}{'warm ns':>10}{'cold us':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.label:28}{row.target:>9}  {row.reason:21}{row.warm_ns:10.0f}{row.cold_us:10.1f}"
        )
    warm = statistics.median(r.warm_ns for r in rows)
    cold = statistics.median(r.cold_us for r in rows)
    print("-" * len(header))
    print(f"{'median':60}{warm:10.0f}{cold:10.1f}")
    if round_trip is not None:
        print(f"{'loopback SELECT 1 round trip through psycopg':60}{'':10}{round_trip:10.1f}")
    print()
    summary = (
        f"classify: warm {warm:.0f} ns per call (max {max(r.warm_ns for r in rows):.0f}),"
        f" cold {cold:.1f} us per statement (max {max(r.cold_us for r in rows):.1f})"
    )
    if round_trip is not None:
        summary += (
            f"; a loopback SELECT 1 takes {round_trip:.1f} us:"
            f" warm classify is {100 * warm / 1000 / round_trip:.2f}% of it,"
            f" cold {100 * cold / round_trip:.0f}%"
        )
    print(summary)
    if catalog:
        print()
        print("lb.classify(): the catalog-aware classifier on the same server")
        print("  warm: cached per database; resolve: again from cached catalog facts;")
        print("  lookup: after refresh_functions(), asking the catalog")
        header = f"{'statement':28}{'reason':21}{'warm ns':>10}{'resolve us':>12}{'lookup us':>11}"
        print(header)
        print("-" * len(header))
        for c in catalog:
            print(
                f"{c.label:28}{c.reason:21}{c.warm_ns:10.0f}{c.resolve_us:12.1f}{c.lookup_us:11.1f}"
            )
        print("-" * len(header))
        print(
            f"{'median':49}{statistics.median(c.warm_ns for c in catalog):10.0f}"
            f"{statistics.median(c.resolve_us for c in catalog):12.1f}"
            f"{statistics.median(c.lookup_us for c in catalog):11.1f}"
        )

    payload = {
        "versions": {
            "pgreplica": pgreplica.__version__,
            "pglast": pglast.__version__,
            "psycopg": psycopg.__version__,
            "python": platform.python_version(),
            "postgresql": server_version,
        },
        "batches": args.batches,
        "batch": args.batch,
        "repeat": args.repeat,
        "round_trips": None if args.no_server else args.round_trips,
        "statements": [asdict(r) for r in rows],
        "median_warm_ns": warm,
        "median_cold_us": cold,
        "round_trip_us": round_trip,
        "lb_classify": [asdict(c) for c in catalog],
    }
    save_results(res, args, rows, catalog, warm, cold, round_trip, payload)
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
