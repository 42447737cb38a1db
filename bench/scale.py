"""The scale scenario: throughput by replicas and clients, and what the prober costs.

    python -m bench.scale [--duration 1.5] [--replicas 0 1 2 4] [--clients 1 4 16 64]

One local cluster (a primary and ``max(--replicas)`` streaming replicas) is started
once. For every number of replicas k, every number of clients and both client kinds
(threads on a :class:`pgreplica.LoadBalancer`, asyncio tasks on a
:class:`pgreplica.AsyncLoadBalancer`), a fresh balancer over the primary and the first k
replicas runs ``--warmup`` seconds of untimed load, then ``--duration`` timed seconds.
Each client owns one counter row and loops: every 10th cycle a write unit (``UPDATE ...
RETURNING``), then a primary-key read of its row through ``lb.read()`` in the same
context, so the read carries the writer's causal token and goes to a replica only once
the replica has replayed the write (a read returning less than the value written is
counted as stale; must be 0). Reported per cell: reads/s, the share of reads served by a
replica (``conn.on_replica``), primary statements/s counted by the clients (write units
+ reads served by the primary) and, as a cross-check from the servers, the
``xact_commit`` rate of ``pg_stat_database`` on the primary and on the replicas over
the balancer's whole life (open, warm-up, timed run, close; probes included). The
balancers use pgreplica's defaults (``pool_max_size`` 10 per server), so 64 clients
share at most 10 connections per server; on a 2-CPU machine 64 clients are CPU-bound.

Then the prober's cost with an idle balancer over 0, 1, 2 and 4 replicas for
``--idle-seconds``: transactions per second each server sees (``xact_commit``, from
opening the balancer to closing it: probes and the pool's own statements), this
process's CPU time (``time.process_time``, every thread) and the memory of an opened
balancer (``tracemalloc`` and RSS over ``--balancers`` balancers). Linear fits give the
growth per replica.

Writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import psycopg

from bench.results import Results
from pgreplica import AsyncLoadBalancer, LoadBalancer
from pgreplica.testing import LocalCluster, make_cluster_directory
from pgreplica.workload import INCREMENT_SQL, READ_SQL, prepare

WRITE_EVERY = 10
STATS_SQL = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


@dataclass
class Counts:
    reads: int = 0
    on_replica: int = 0
    writes: int = 0
    stale: int = 0
    errors: int = 0
    slowest: float = 0.0  # seconds, the slowest read

    def add(self, other: Counts) -> None:
        for f in fields(self):
            if f.name == "slowest":
                self.slowest = max(self.slowest, other.slowest)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Servers:
    """One autocommit connection per server, for reading ``xact_commit``."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.conns = [
            psycopg.connect(cluster.dsn(i), autocommit=True) for i in range(cluster.replicas + 1)
        ]

    def xacts(self) -> list[int]:
        out = []
        for conn in self.conns:
            row = conn.execute(STATS_SQL).fetchone()
            out.append(int(row[0]) if row else 0)
        return out

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


@contextmanager
def counted(servers: Servers) -> Iterator[dict[str, Any]]:
    """xact_commit deltas of every server over the block, after the balancer's backends
    have exited (their statistics are flushed at exit)."""
    out: dict[str, Any] = {}
    before = servers.xacts()
    started = time.monotonic()
    yield out
    time.sleep(0.25)  # backends of the closed pools exit and flush their statistics
    out["seconds"] = time.monotonic() - started - 0.25
    # each snapshot itself is one transaction per server
    out["deltas"] = [max(0, a - b - 1) for a, b in zip(servers.xacts(), before, strict=True)]


# -- the client loops ---------------------------------------------------------------


def sync_client(lb: LoadBalancer, key: int, until: float, counts: Counts) -> None:
    cycle = written = 0
    with lb.isolated():
        while time.monotonic() < until:
            try:
                if cycle % WRITE_EVERY == 0:
                    with lb.write() as conn:
                        row = conn.execute(INCREMENT_SQL, (key,)).fetchone()
                    written = int(row[0]) if row else written
                    counts.writes += 1
                began = time.monotonic()
                with lb.read() as conn:
                    row = conn.execute(READ_SQL, (key,)).fetchone()
                    on_replica = conn.on_replica
                counts.slowest = max(counts.slowest, time.monotonic() - began)
                counts.reads += 1
                counts.on_replica += on_replica
                if row is None or int(row[0]) < written:
                    counts.stale += 1
            except Exception:
                counts.errors += 1
            cycle += 1


async def async_client(alb: AsyncLoadBalancer, key: int, until: float, counts: Counts) -> None:
    cycle = written = 0
    with alb.isolated():
        while time.monotonic() < until:
            try:
                if cycle % WRITE_EVERY == 0:
                    async with alb.write() as conn:
                        cur = await conn.execute(INCREMENT_SQL, (key,))
                        row = await cur.fetchone()
                    written = int(row[0]) if row else written
                    counts.writes += 1
                began = time.monotonic()
                async with alb.read() as conn:
                    cur = await conn.execute(READ_SQL, (key,))
                    row = await cur.fetchone()
                    on_replica = conn.on_replica
                counts.slowest = max(counts.slowest, time.monotonic() - began)
                counts.reads += 1
                counts.on_replica += on_replica
                if row is None or int(row[0]) < written:
                    counts.stale += 1
            except Exception:
                counts.errors += 1
            cycle += 1


def run_threads(lb: LoadBalancer, clients: int, seconds: float) -> tuple[Counts, float]:
    per_client = [Counts() for _ in range(clients)]
    start = threading.Event()
    until = [0.0]

    def body(i: int) -> None:
        start.wait()
        sync_client(lb, i, until[0], per_client[i])

    threads = [threading.Thread(target=body, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    until[0] = began + seconds
    start.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    total = Counts()
    for c in per_client:
        total.add(c)
    return total, elapsed


async def run_tasks(alb: AsyncLoadBalancer, clients: int, seconds: float) -> tuple[Counts, float]:
    per_client = [Counts() for _ in range(clients)]
    began = time.monotonic()
    until = began + seconds
    await asyncio.gather(*(async_client(alb, i, until, per_client[i]) for i in range(clients)))
    elapsed = time.monotonic() - began
    total = Counts()
    for c in per_client:
        total.add(c)
    return total, elapsed


@dataclass
class Cell:
    kind: str
    replicas: int
    clients: int
    counts: Counts
    seconds: float
    server_seconds: float
    server_deltas: list[int]

    @property
    def reads_per_s(self) -> float:
        return self.counts.reads / self.seconds

    @property
    def primary_per_s(self) -> float:
        c = self.counts
        return (c.writes + c.reads - c.on_replica) / self.seconds

    @property
    def replica_share(self) -> float:
        return self.counts.on_replica / self.counts.reads if self.counts.reads else 0.0

    @property
    def server_primary_per_s(self) -> float:
        return self.server_deltas[0] / self.server_seconds

    @property
    def server_replicas_per_s(self) -> float:
        return sum(self.server_deltas[1:]) / self.server_seconds


def throughput(cluster: LocalCluster, servers: Servers, args: argparse.Namespace) -> list[Cell]:
    cells = []
    for kind in ("threads", "asyncio"):
        for k in args.replicas:
            replicas = cluster.replica_dsns[:k]
            for clients in args.clients:
                with counted(servers) as seen:
                    if kind == "threads":
                        with LoadBalancer(primary=cluster.primary_dsn, replicas=replicas) as lb:
                            run_threads(lb, clients, args.warmup)
                            counts, seconds = run_threads(lb, clients, args.duration)
                    else:
                        counts, seconds = asyncio.run(
                            async_cell(cluster.primary_dsn, replicas, clients, args)
                        )
                cell = Cell(kind, k, clients, counts, seconds, seen["seconds"], seen["deltas"])
                cells.append(cell)
                print(
                    f"  {kind:8} {k} replicas {clients:3} clients: {cell.reads_per_s:8.0f}"
                    f" reads/s, {cell.replica_share:6.1%} on replicas,"
                    f" {cell.primary_per_s:7.0f} primary statements/s, slowest read"
                    f" {counts.slowest * 1000:.0f} ms"
                    f" (server: {cell.server_primary_per_s:7.0f} xact/s),"
                    f" {counts.stale} stale, {counts.errors} errors",
                    file=sys.stderr,
                    flush=True,
                )
    return cells


async def async_cell(
    primary: str, replicas: list[str], clients: int, args: argparse.Namespace
) -> tuple[Counts, float]:
    async with AsyncLoadBalancer(primary=primary, replicas=replicas) as alb:
        await run_tasks(alb, clients, args.warmup)
        return await run_tasks(alb, clients, args.duration)


# -- what an idle balancer costs ------------------------------------------------------


@dataclass
class Idle:
    replicas: int
    seconds: float
    cpu_seconds: float
    primary_xacts_per_s: float
    replica_xacts_per_s: float | None  # per replica, mean


def idle_cost(cluster: LocalCluster, servers: Servers, k: int, seconds: float) -> Idle:
    replicas = cluster.replica_dsns[:k]
    with counted(servers) as seen, LoadBalancer(primary=cluster.primary_dsn, replicas=replicas):
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = time.process_time(), time.monotonic()
    deltas, life = seen["deltas"], seen["seconds"]
    return Idle(
        replicas=k,
        seconds=t1 - t0,
        cpu_seconds=cpu1 - cpu0,
        primary_xacts_per_s=deltas[0] / life,
        replica_xacts_per_s=statistics.mean(d / life for d in deltas[1 : k + 1]) if k else None,
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_cost(cluster: LocalCluster, k: int, n: int) -> tuple[float, float, float]:
    """Bytes per balancer: constructed only (tracemalloc), opened (tracemalloc, RSS)."""
    replicas = cluster.replica_dsns[:k]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        built = [LoadBalancer(primary=cluster.primary_dsn, replicas=replicas) for _ in range(n)]
        gc.collect()
        constructed = (tracemalloc.get_traced_memory()[0] - base) / n
        rss0 = rss_bytes()
        base = tracemalloc.get_traced_memory()[0]
        for lb in built:
            lb.open()
        time.sleep(0.3)  # the pools' first connections
        gc.collect()
        opened = (tracemalloc.get_traced_memory()[0] - base) / n + constructed
        rss = (rss_bytes() - rss0) / n
        for lb in built:
            lb.close()
        del built
    finally:
        tracemalloc.stop()
    return constructed, opened, rss


def fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, the largest relative residual)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    worst = max(
        (abs(a + b * x - y) / abs(y) for x, y in zip(xs, ys, strict=True) if y), default=0.0
    )
    return a, b, worst


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.5, help="timed seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.3, help="untimed seconds per cell")
    parser.add_argument("--replicas", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--idle-seconds", type=float, default=2.0, help="idle balancer per replica count"
    )
    parser.add_argument("--balancers", type=int, default=4, help="balancers for memory")
    args = parser.parse_args(argv)
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    logging.getLogger("pgreplica").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)

    results = Results("scale", "Scale: throughput by replicas and clients, prober cost")
    most = max(args.replicas)
    print(f"starting a local primary with {most} streaming replicas ...", file=sys.stderr)
    directory = make_cluster_directory("pgreplica-bench-scale-")
    cluster = LocalCluster(directory, replicas=most, keep=False)
    servers: Servers | None = None
    try:
        cluster.up()
        with LoadBalancer(primary=cluster.primary_dsn) as lb:
            prepare(lb, range(max(args.clients)))
        cluster.wait_replayed()
        servers = Servers(cluster)
        results.data["probe_interval"] = LoadBalancer(
            primary=cluster.primary_dsn
        ).settings.probe_interval
        cells = throughput(cluster, servers, args)
        idle = []
        memory: dict[int, tuple[float, float, float]] = {}
        for k in args.replicas:
            idle.append(idle_cost(cluster, servers, k, args.idle_seconds))
            memory[k] = memory_cost(cluster, k, args.balancers)
            i = idle[-1]
            print(
                f"  idle, {k} replicas: {i.cpu_seconds / i.seconds * 1000:.1f} ms CPU/s,"
                f" primary {i.primary_xacts_per_s:.1f} xact/s, per replica"
                f" {i.replica_xacts_per_s or 0:.1f} xact/s;"
                f" {memory[k][1] / 1024:.0f} KiB per opened balancer",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if servers is not None:
            servers.close()
        cluster.destroy()
    report(results, args, cells, idle, memory)
    results.save()
    failed = any(c.counts.stale or c.counts.errors for c in cells)
    return 1 if failed else 0


def report(
    results: Results,
    args: argparse.Namespace,
    cells: list[Cell],
    idle: list[Idle],
    memory: dict[int, tuple[float, float, float]],
) -> None:
    interval = results.data.pop("probe_interval")
    columns = [
        "clients",
        "replicas",
        "reads/s",
        "on replicas",
        "primary statements/s",
        "server xact/s primary",
        "server xact/s replicas",
        "slowest read (ms)",
        "stale",
        "errors",
    ]
    for kind in ("threads", "asyncio"):
        rows = []
        print()
        print(
            f"{kind}: {'clients':>7} {'replicas':>8} {'reads/s':>9} {'on repl.':>9}"
            f" {'primary st/s':>12} {'srv prim/s':>10} {'srv repl/s':>10} {'max ms':>8}"
            f" {'stale':>5} {'errors':>6}"
        )
        for c in cells:
            if c.kind != kind:
                continue
            row = [
                c.clients,
                c.replicas,
                round(c.reads_per_s),
                f"{c.replica_share:.1%}",
                round(c.primary_per_s),
                round(c.server_primary_per_s),
                round(c.server_replicas_per_s),
                round(c.counts.slowest * 1000, 1),
                c.counts.stale,
                c.counts.errors,
            ]
            rows.append(row)
            print(
                f"{'':9}{c.clients:7} {c.replicas:8} {row[2]:9} {row[3]:>9} {row[4]:12}"
                f" {row[5]:10} {row[6]:10} {row[7]:8} {row[8]:5} {row[9]:6}"
            )
        results.table(
            f"Throughput, {kind} ({'LoadBalancer' if kind == 'threads' else 'AsyncLoadBalancer'})",
            columns,
            rows,
            note=(
                f"{args.duration:g} s timed per cell after {args.warmup:g} s of warm-up, a fresh"
                " balancer per cell with pgreplica's defaults (pool_max_size 10 per server)."
                f" Each client: a write unit every {WRITE_EVERY} cycles, then a primary-key read"
                " of its own row in the writer's context (token). Primary statements/s:"
                " write units + reads served by the primary, counted by the clients. Server"
                " xact/s: pg_stat_database.xact_commit over the balancer's whole life (open,"
                " warm-up, run, close; probes included), primary and the replicas summed; a"
                " write unit is two server transactions (its COMMIT and the WAL position read"
                " sent in the same round trip)."
            ),
        )

    for kind in ("threads", "asyncio"):
        results.chart(
            f"reads-{kind}",
            f"Reads/s vs clients ({kind})",
            x=args.clients,
            series={
                f"{k} replicas": [
                    round(c.reads_per_s) for c in cells if c.kind == kind and c.replicas == k
                ]
                for k in args.replicas
            },
            kind="line",
            xlabel="concurrent clients",
            ylabel="reads per second",
            logx=True,
        )
    results.chart(
        "primary",
        "Primary statements/s vs replicas (client-side count)",
        x=[str(k) for k in args.replicas],
        series={
            f"{kind}, {n} clients": [
                round(c.primary_per_s) for c in cells if c.kind == kind and c.clients == n
            ]
            for kind in ("threads", "asyncio")
            for n in args.clients
        },
        kind="line",
        xlabel="replicas",
        ylabel="primary statements per second",
        logy=True,
    )

    # -- prober cost
    print()
    print(
        f"idle balancer ({args.idle_seconds:g} s): {'replicas':>8} {'CPU ms/s':>9}"
        f" {'primary xact/s':>14} {'per-replica xact/s':>18} {'KiB built':>9}"
        f" {'KiB opened':>10} {'RSS KiB':>8}"
    )
    cost_rows = []
    for i in idle:
        constructed, opened, rss = memory[i.replicas]
        row = [
            i.replicas,
            round(i.cpu_seconds / i.seconds * 1000, 2),
            round(i.primary_xacts_per_s, 1),
            None if i.replica_xacts_per_s is None else round(i.replica_xacts_per_s, 1),
            round(constructed / 1024, 1),
            round(opened / 1024, 1),
            round(rss / 1024, 1),
        ]
        cost_rows.append(row)
        print(
            f"{'':21}{row[0]:8} {row[1]:9} {row[2]:14} {row[3] if row[3] is not None else '-':>18}"
            f" {row[4]:9} {row[5]:10} {row[6]:8}"
        )
    results.table(
        "Cost of an idle balancer by replicas",
        [
            "replicas",
            "CPU (ms per s)",
            "primary xact/s",
            "xact/s per replica",
            "KiB per balancer, constructed",
            "KiB per balancer, opened",
            "RSS KiB per opened balancer",
        ],
        cost_rows,
        note=(
            f"A LoadBalancer over the primary and k replicas, idle for {args.idle_seconds:g} s"
            f" (probe_interval {interval:g} s): CPU time of this process (every thread: the"
            " prober's and the pools'), pg_stat_database.xact_commit per second on each"
            " server from open to close (probes and the pools' own statements), and memory"
            f" per balancer over {args.balancers} balancers (tracemalloc: Python objects,"
            " constructed and after open(); RSS: the process, after open())."
        ),
    )
    ks = [float(i.replicas) for i in idle]
    cpu = [i.cpu_seconds / i.seconds * 1000 for i in idle]
    mem = [memory[i.replicas][1] / 1024 for i in idle]
    with_replicas = [i for i in idle if i.replica_xacts_per_s is not None]
    rep_q = [i.replica_xacts_per_s or 0.0 for i in with_replicas]
    results.chart(
        "prober-cost",
        "Idle balancer: CPU and memory vs replicas",
        x=[i.replicas for i in idle],
        series={
            "CPU (ms per s)": [round(c, 2) for c in cpu],
            "KiB per opened balancer (tracemalloc)": [round(m, 1) for m in mem],
        },
        kind="bar",
        xlabel="replicas",
        ylabel="ms CPU per s / KiB",
    )
    growth = []
    if len(ks) >= 2:
        a, b, worst = fit(ks, cpu)
        growth.append(
            f"CPU of an idle balancer {a:.1f} + {b:.2f}·k ms per second for k replicas"
            f" (linear fit, worst point off by {worst:.0%})"
        )
        a, b, worst = fit(ks, mem)
        growth.append(
            f"Python memory per opened balancer {a:.0f} + {b:.0f}·k KiB"
            f" (worst point off by {worst:.0%})"
        )
    if rep_q:
        spread = (max(rep_q) - min(rep_q)) / statistics.mean(rep_q) if statistics.mean(rep_q) else 0
        growth.append(
            f"each replica sees {statistics.mean(rep_q):.1f} transactions/s from the prober"
            f" whatever k (spread {spread:.0%}; probe_interval {interval:g} s), so the probe"
            " load of the cluster grows linearly with replicas and is constant per server"
        )

    # -- summary
    best = {
        kind: max((c for c in cells if c.kind == kind), key=lambda c: c.reads_per_s)
        for kind in ("threads", "asyncio")
        if any(c.kind == kind for c in cells)
    }
    errors = sum(c.counts.errors for c in cells)
    stale = sum(c.counts.stale for c in cells)
    parts = [
        f"{kind}: best {c.reads_per_s:,.0f} reads/s ({c.replicas} replicas, {c.clients}"
        f" clients, {c.replica_share:.0%} on replicas)"
        for kind, c in best.items()
    ]
    offload = []
    mid = 16 if 16 in args.clients else args.clients[len(args.clients) // 2]
    for kind in ("threads", "asyncio"):
        row = {c.replicas: c for c in cells if c.kind == kind and c.clients == mid}
        if 0 in row and max(args.replicas) in row and max(args.replicas) > 0:
            offload.append(
                f"{kind} at {mid} clients: primary statements/s"
                f" {row[0].primary_per_s:,.0f} with 0 replicas,"
                f" {row[max(args.replicas)].primary_per_s:,.0f} with {max(args.replicas)}"
            )
    results.summary = (
        f"On {os.cpu_count()} CPUs, a cluster of 1 primary + {max(args.replicas)} replicas on the"
        " same machine (so more replicas add servers but no CPUs; with many clients the"
        " machine is CPU-bound). "
        + "; ".join(parts)
        + ". "
        + "; ".join(offload)
        + f". {errors} errors and {stale} stale reads in all cells. Cost: "
        + "; ".join(growth)
        + "."
    )
    results.target(
        "0 stale reads (scale scenario)",
        f"{stale} stale in {sum(c.counts.reads for c in cells)} reads",
        stale == 0,
    )
    results.target("0 caller errors (scale scenario)", f"{errors} errors", errors == 0)
    results.data = {
        "args": vars(args),
        "probe_interval": interval,
        "cells": [
            {
                "kind": c.kind,
                "replicas": c.replicas,
                "clients": c.clients,
                "seconds": c.seconds,
                "reads": c.counts.reads,
                "on_replica": c.counts.on_replica,
                "writes": c.counts.writes,
                "stale": c.counts.stale,
                "errors": c.counts.errors,
                "slowest_read": c.counts.slowest,
                "server_seconds": c.server_seconds,
                "server_xact_deltas": c.server_deltas,
            }
            for c in cells
        ],
        "idle": [vars(i) for i in idle],
        "memory": {
            str(k): {"constructed": v[0], "opened": v[1], "rss": v[2]} for k, v in memory.items()
        },
        "growth": growth,
    }
    print()
    print(results.summary)


if __name__ == "__main__":
    raise SystemExit(main())
