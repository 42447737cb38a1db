"""What the SQLAlchemy routing session costs over a plain ``Session`` on the same replica.

Run ``python -m bench.sqlalchemy_session`` (``make bench``). It starts a local primary
with two streaming replicas (a :class:`pgreplica.testing.LocalCluster` in a new
temporary directory, destroyed at the end) and times, interleaved in small batches
whose order rotates so that noise hits every arm alike:

1. per query: ``session.execute(select(t.c.id).where(t.c.id == 1)).scalar_one()`` in a
   transaction already open, by a :class:`~pgreplica.contrib.sqlalchemy.RoutingSession`
   (``sessionmaker(class_=RoutingSession, lb=LoadBalancer(config=cluster.config()))``)
   and by a plain ``Session`` bound to a ``create_engine("postgresql+psycopg://...")``
   of the replica the routing transaction runs on;
2. per request: ``with Session() as s: s.execute(...).scalar_one()`` (open, one read,
   close), the routing session choosing a replica and checking a connection out of
   pgreplica's pool; the plain sessions take the two replicas in turn, as the routing
   session's round robin does, so both sides read the same replicas;
3. per write unit: ``s.add(row); s.commit()``, the routing session on the primary (it
   also reads the primary's WAL position after the commit, to advance the token), the
   plain one on an engine of the primary;
4. case 2 again with :class:`~pgreplica.contrib.sqlalchemy.AsyncRoutingSession` over a
   :class:`pgreplica.AsyncLoadBalancer` against a plain ``AsyncSession`` on
   ``create_async_engine("postgresql+psycopg://...")``.

The plain engines' pools are as large as the balancer's (``pool_max_size``). Reads run
in a context without a token, after ``cluster.wait_replayed()``: every routed read must
be served by a replica (checked after the clock for each request, and once with
``SELECT inet_server_port()``); the benchmark fails (exit status 1) if one was not.
By default the client and every server backend share one CPU (``--pin``, as in
``bench.overhead``). The garbage collector is paused in the timed loops. Medians, p99,
the added microseconds and the ratio; timings are reported, never asserted.
``--profile N`` also profiles N routing requests (case 2) and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import itertools
import pstats
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Engine, String, create_engine, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from bench.overhead import (
    Pinning,
    Stats,
    Target,
    gc_paused,
    quiet_logging,
    quiet_shutdown,
    rotation,
)
from bench.results import Results
from bench.token_cost import Arm, interleave, timed
from pgreplica import AsyncLoadBalancer, LoadBalancer
from pgreplica.contrib.sqlalchemy import AsyncRoutingSession, RoutingSession
from pgreplica.testing import LocalCluster, make_cluster_directory

REPLICAS = 2
ROWS = 100
AsyncArm = Callable[[int, list[int]], Awaitable[None]]


class Base(DeclarativeBase):
    pass


class BenchItem(Base):
    __tablename__ = "bench_sa_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    v: Mapped[str] = mapped_column(String)


ITEMS = BenchItem.__table__
READ = select(ITEMS.c.id).where(ITEMS.c.id == 1)  # Core: an indexed read of one row
PORT = select(func.inet_server_port())
SCHEMA = (
    "CREATE TABLE bench_sa_items (id serial PRIMARY KEY, v text NOT NULL);"
    f" INSERT INTO bench_sa_items (v) SELECT 'x' FROM generate_series(1, {ROWS})"
)
BACKENDS = (
    "SELECT pid FROM pg_stat_activity"
    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def url(dsn: str) -> str:
    """A ``postgresql://`` URL of the cluster as SQLAlchemy's psycopg 3 URL."""
    return "postgresql+psycopg://" + dsn.removeprefix("postgresql://")


class Where:
    """Where the routed units ran (host label per unit), recorded after the clock."""

    def __init__(self) -> None:
        self.on_replica: Counter[str] = Counter()
        self.elsewhere: Counter[str] = Counter()

    def reset(self) -> None:
        self.on_replica.clear()
        self.elsewhere.clear()

    def record(self, unit: Any) -> None:
        if unit is not None and unit.kind == "replica":
            self.on_replica[unit.host.label] += 1
        else:
            self.elsewhere["no unit" if unit is None else f"{unit.kind} {unit.host.label}"] += 1

    def describe(self) -> str:
        served = ", ".join(f"{label} {n}" for label, n in sorted(self.on_replica.items()))
        return served + (f"; NOT on a replica: {dict(self.elsewhere)}" if self.elsewhere else "")


class Check:
    """The checks outside the timed loops (``SELECT inet_server_port()``): a failure ends
    the run at once (exit status 1), before anything wrong is timed."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.replica_ports = {cluster.port(i) for i in range(1, REPLICAS + 1)}
        self.primary_port = cluster.port(0)

    def replica(self, what: str, port: int) -> int:
        if port not in self.replica_ports:
            raise SystemExit(
                f"FAILED: {what} ran on port {port}, not on a replica {sorted(self.replica_ports)}"
            )
        return port

    def primary(self, what: str, port: int) -> None:
        if port != self.primary_port:
            raise SystemExit(f"FAILED: {what} ran on port {port}, not on the primary")


def pin_backends(cluster: LocalCluster, pinning: Pinning) -> None:
    """Every client backend of the cluster (pools, engines, prober) on the client's CPU."""
    for index in range(REPLICAS + 1):
        pinning.backends([row[0] for row in cluster.execute(index, BACKENDS)])


def describe_pinning(pinning: Pinning) -> str:
    if pinning.cpu is None:
        return pinning.note
    text = f"client and {len(pinning.pids)} server backends on CPU {pinning.cpu}"
    return f"{text}; {pinning.note}" if pinning.note else text


# -- sync: per query, per request, per write unit -----------------------------------------


def routing_requests(maker: Callable[[], Session], where: Where) -> Arm:
    def loop(n: int, out: list[int]) -> None:
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            with maker() as s:
                s.execute(READ).scalar_one()
                unit = s._pg_last
            out.append(clock() - t0)
            where.record(unit)

    return loop


def plain_requests(makers: list[Callable[[], Session]]) -> Arm:
    turn = itertools.cycle(makers)  # the replicas in turn, like the routing round robin

    def loop(n: int, out: list[int]) -> None:
        clock = time.perf_counter_ns
        for _ in range(n):
            maker = next(turn)
            t0 = clock()
            with maker() as s:
                s.execute(READ).scalar_one()
            out.append(clock() - t0)

    return loop


def write_unit(maker: Callable[[], Session]) -> Callable[[], None]:
    def op() -> None:
        with maker() as s:
            s.add(BenchItem(v="w"))
            s.commit()

    return op


def run_sync(
    cluster: LocalCluster, args: argparse.Namespace, check: Check, pinning: Pinning
) -> dict[str, Any]:
    lb = LoadBalancer(config=cluster.config())
    pool_size = lb.settings.pool_max_size
    engines: dict[int, Engine] = {
        cluster.port(i): create_engine(url(cluster.dsn(i)), pool_size=pool_size, max_overflow=0)
        for i in range(REPLICAS + 1)
    }
    try:
        lb.open()
        Routing = sessionmaker(class_=RoutingSession, lb=lb)
        plain = {port: sessionmaker(bind=engine) for port, engine in engines.items()}
        replica_makers = [plain[port] for port in sorted(check.replica_ports)]
        n, batch, warmup = args.iterations, args.batch, args.warmup
        out: dict[str, Any] = {}

        with lb.isolated():  # reads: a context that never writes (no token)
            # 1. per query, in one open transaction each, on the same replica
            routing_tx = Routing()
            port = check.replica(
                "per query: routing session", routing_tx.execute(PORT).scalar_one()
            )
            plain_tx = plain[port]()
            plain_tx.execute(PORT).scalar_one()
            query_arms = [
                timed(lambda: routing_tx.execute(READ).scalar_one()),
                timed(lambda: plain_tx.execute(READ).scalar_one()),
            ]
            for arm in query_arms:
                arm(warmup, [])
            pin_backends(cluster, pinning)
            out["query"] = interleave(query_arms, n, batch)
            check.replica(
                "per query: routing session, after", routing_tx.execute(PORT).scalar_one()
            )
            routing_tx.close()
            plain_tx.close()
            out["query_port"] = port

            # 2. per request: open, one read, close
            with Routing() as s:
                check.replica("per request: routing session", s.execute(PORT).scalar_one())
            where = Where()
            request_arms = [routing_requests(Routing, where), plain_requests(replica_makers)]
            for arm in request_arms:
                arm(warmup, [])
            pin_backends(cluster, pinning)
            where.reset()  # count the timed requests only
            out["request"] = interleave(request_arms, n, batch)
            out["request_where"] = where
            if args.profile:
                out["profile"] = profile(routing_requests(Routing, Where()), args.profile)

        # 3. per write unit, in a context of its own (its token grows with every commit)
        with lb.isolated():
            with Routing() as s:
                s.add(BenchItem(v="check"))
                s.flush()
                check.primary("write unit: routing session", s.execute(PORT).scalar_one())
                s.commit()
            if not lb.token().get("main"):
                raise SystemExit("FAILED: write unit: the commit did not advance the token")
            write_arms = [timed(write_unit(Routing)), timed(write_unit(plain[check.primary_port]))]
            for arm in write_arms:
                arm(warmup // 2, [])
            pin_backends(cluster, pinning)
            out["write"] = interleave(write_arms, args.write_iterations, batch)
        return out
    finally:
        with quiet_shutdown():
            for engine in engines.values():
                engine.dispose()
            lb.close()


def profile(arm: Arm, n: int) -> str:
    """Where the time of ``n`` routing requests goes (cProfile, top functions)."""
    profiler = cProfile.Profile()
    with gc_paused():
        profiler.enable()
        arm(n, [])
        profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).strip_dirs()
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(30)
    return stream.getvalue()


# -- asyncio: per request ------------------------------------------------------------------


async def ainterleave(arms: list[AsyncArm], iterations: int, batch: int) -> list[Stats]:
    samples: list[list[int]] = [[] for _ in arms]
    with gc_paused():
        done = rounds = 0
        while done < iterations:
            n = min(batch, iterations - done)
            for i in rotation(len(arms), rounds):
                await arms[i](n, samples[i])
            done += n
            rounds += 1
    return [Stats.of(s) for s in samples]


def arouting_requests(maker: Any, where: Where) -> AsyncArm:
    async def loop(n: int, out: list[int]) -> None:
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            async with maker() as s:
                (await s.execute(READ)).scalar_one()
                unit = s.sync_session._pg_last
            out.append(clock() - t0)
            where.record(unit)

    return loop


def aplain_requests(makers: list[Any]) -> AsyncArm:
    turn = itertools.cycle(makers)

    async def loop(n: int, out: list[int]) -> None:
        clock = time.perf_counter_ns
        for _ in range(n):
            maker = next(turn)
            t0 = clock()
            async with maker() as s:
                (await s.execute(READ)).scalar_one()
            out.append(clock() - t0)

    return loop


async def run_async(
    cluster: LocalCluster, args: argparse.Namespace, check: Check, pinning: Pinning
) -> tuple[list[Stats], Where]:
    alb = AsyncLoadBalancer(config=cluster.config())
    pool_size = alb.settings.pool_max_size
    engines: list[AsyncEngine] = [
        create_async_engine(url(cluster.dsn(i)), pool_size=pool_size, max_overflow=0)
        for i in range(1, REPLICAS + 1)
    ]
    try:
        await alb.open()
        Routing = async_sessionmaker(class_=AsyncRoutingSession, lb=alb)
        plain = [async_sessionmaker(bind=engine) for engine in engines]
        with alb.isolated():
            async with Routing() as s:
                port = (await s.execute(PORT)).scalar_one()
                check.replica("asyncio per request: routing session", port)
            where = Where()
            arms = [arouting_requests(Routing, where), aplain_requests(plain)]
            for arm in arms:
                await arm(args.warmup, [])
            pin_backends(cluster, pinning)
            where.reset()
            stats = await ainterleave(arms, args.async_iterations, args.batch)
        return stats, where
    finally:
        with quiet_shutdown():
            for engine in engines:
                await engine.dispose()
            await alb.close()


# -- report --------------------------------------------------------------------------------


def row(label: str, s: Stats) -> None:
    print(f"  {label:<52} median {s.median_us:8.1f} us   p99 {s.p99_us:8.1f} us")


def added(label: str, routing: Stats, plain: Stats) -> None:
    print(
        f"  {label:<52} added  {routing.median_us - plain.median_us:8.1f} us"
        f"   ratio {routing.median_us / plain.median_us:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000, help="reads per arm (3000)")
    parser.add_argument(
        "--async-iterations", type=int, default=2000, help="asyncio requests per arm (2000)"
    )
    parser.add_argument(
        "--write-iterations", type=int, default=1000, help="write units per arm (1000)"
    )
    parser.add_argument("--batch", type=int, default=50, help="batch size (50)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed operations per arm (200)")
    parser.add_argument(
        "--pin",
        default="auto",
        metavar="auto|off|CPU",
        help="run the client and the cluster's backends on one CPU (auto: the last allowed CPU)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N routing requests too"
    )
    args = parser.parse_args(argv)
    quiet_logging()
    started = time.monotonic()
    directory = make_cluster_directory("pgreplica-bench-sa-")
    cluster = LocalCluster(directory, replicas=REPLICAS, keep=False)
    try:
        print(
            f"starting a local primary with {REPLICAS} streaming replicas ...",
            file=sys.stderr,
            flush=True,
        )
        cluster.up()
        cluster.execute(0, SCHEMA)
        cluster.wait_replayed()  # the replicas have the table: reads can go there
        target = Target(
            cluster.primary_dsn, cluster.dsn(1), f"local cluster in {directory}", local=True
        )
        pinning = Pinning(args.pin, target)  # before the balancers start their threads
        check = Check(cluster)
        sync = run_sync(cluster, args, check, pinning)
        (arouting, aplain), awhere = asyncio.run(run_async(cluster, args, check, pinning))
    finally:
        cluster.destroy()
    elapsed = time.monotonic() - started

    q, r, w = sync["query"], sync["request"], sync["write"]
    print()
    print(
        "pgreplica.contrib.sqlalchemy: RoutingSession against a plain Session"
        " (medians; interleaved, order rotated)"
    )
    print(f"  target {target.description} (1 primary + {REPLICAS} replicas)")
    print(
        f"  {args.iterations} reads, {args.async_iterations} asyncio requests,"
        f" {args.write_iterations} write units per arm, batches of {args.batch};"
        f" cpu pinning {describe_pinning(pinning)}"
    )
    print("per query (open transaction, select(t.c.id).where(id == 1).scalar_one()):")
    row(f"routing session (replica port {sync['query_port']})", q[0])
    row("plain Session, same replica", q[1])
    added("routing - plain", q[0], q[1])
    print("per request (with Session() as s: one read; open + read + close):")
    row("routing session", r[0])
    row("plain Session (the same replicas in turn)", r[1])
    added("routing - plain", r[0], r[1])
    print(f"  routing reads served by: {sync['request_where'].describe()}")
    print("per write unit (add one row + commit, on the primary):")
    row("routing session (+ WAL position read for the token)", w[0])
    row("plain Session on the primary", w[1])
    added("routing - plain", w[0], w[1])
    print("asyncio, per request (async with Session() as s: one read):")
    row("AsyncRoutingSession (AsyncLoadBalancer)", arouting)
    row("plain AsyncSession (the same replicas in turn)", aplain)
    added("routing - plain", arouting, aplain)
    print(f"  routing reads served by: {awhere.describe()}")
    print(
        f"added per query {q[0].median_us - q[1].median_us:.1f} us,"
        f" per request {r[0].median_us - r[1].median_us:.1f} us"
        f" (ratio {r[0].median_us / r[1].median_us:.2f}),"
        f" per write unit {w[0].median_us - w[1].median_us:.1f} us"
        f" (ratio {w[0].median_us / w[1].median_us:.2f}),"
        f" per asyncio request {arouting.median_us - aplain.median_us:.1f} us"
        f" (ratio {arouting.median_us / aplain.median_us:.2f})"
    )
    print(f"(total run time {elapsed:.0f} s)")
    if "profile" in sync:
        print()
        print(f"cProfile of {args.profile} routing requests (sync, per request):")
        print(sync["profile"])

    failed = False
    for name, where in (("sync", sync["request_where"]), ("asyncio", awhere)):
        if where.elsewhere:
            failed = True
            print(f"FAILED: {name} routed reads not served by a replica: {dict(where.elsewhere)}")
    save(args, describe_pinning(pinning), sync, (arouting, aplain), awhere)
    return 1 if failed else 0


def save(
    args: argparse.Namespace,
    pinning: str,
    sync: dict[str, Any],
    async_stats: tuple[Stats, Stats],
    awhere: Where,
) -> None:
    results = Results("sqlalchemy_session", "SQLAlchemy RoutingSession against a plain Session")
    cases = [
        ("per query (open transaction, one select)", *sync["query"]),
        ("per request (open + one read + close)", *sync["request"]),
        ("per write unit (add one row + commit)", *sync["write"]),
        ("asyncio, per request (AsyncRoutingSession)", *async_stats),
    ]
    rows = [
        [
            case,
            round(routing.median_us, 1),
            round(plain.median_us, 1),
            round(routing.median_us - plain.median_us, 1),
            round(routing.median_us / plain.median_us, 2),
            round(routing.p99_us, 1),
            round(plain.p99_us, 1),
        ]
        for case, routing, plain in cases
    ]
    results.table(
        "Routing session against a plain session",
        [
            "case",
            "routing median (us)",
            "plain median (us)",
            "added (us)",
            "ratio",
            "routing p99 (us)",
            "plain p99 (us)",
        ],
        rows,
        note=(
            f"1 primary + {REPLICAS} local replicas; {args.iterations} reads,"
            f" {args.async_iterations} asyncio requests, {args.write_iterations} write units"
            f" per arm, interleaved in batches of {args.batch} (order rotated); cpu pinning:"
            f" {pinning}. Routing reads served by: {sync['request_where'].describe()} (sync),"
            f" {awhere.describe()} (asyncio)."
        ),
    )
    results.chart(
        "medians",
        "Routing vs plain SQLAlchemy session (medians)",
        x=[r[0].split(" (")[0] for r in rows],
        series={"routing (us)": [r[1] for r in rows], "plain (us)": [r[2] for r in rows]},
        kind="bar",
        xlabel="case",
        ylabel="microseconds",
    )
    results.summary = (
        "The routing session adds "
        + "; ".join(f"{r[3]} us {r[0].split(' (')[0]} (ratio {r[4]})" for r in rows)
        + " over a plain SQLAlchemy session on the same servers (medians)."
    )
    elsewhere = {**sync["request_where"].elsewhere, **awhere.elsewhere}
    results.target(
        "every routed read served by a replica",
        "yes" if not elsewhere else f"not on a replica: {dict(elsewhere)}",
        not elsewhere,
    )
    results.data = {
        "args": vars(args),
        "cases": {
            case: {
                "routing": {"median_us": r.median_us, "p99_us": r.p99_us, "count": r.count},
                "plain": {"median_us": p.median_us, "p99_us": p.p99_us, "count": p.count},
            }
            for case, r, p in cases
        },
    }
    results.save()


if __name__ == "__main__":
    raise SystemExit(main())
