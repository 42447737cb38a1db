"""A replica that hangs (SIGSTOP) under concurrent reads.

Reads in flight on it when it freezes, and reads that start just after, all complete
elsewhere (another replica, or the primary when it was the only one) with the right
result and no error, while it is still frozen: the prober marks it down, its pool is
closed and the sockets lent on it are shut down, and each read retries once. A read in
a transaction on it fails promptly instead (no retry inside a transaction), and once it
answers again it is back in the read set within about a second.

No timing threshold is asserted (machines are noisy): every wait is bounded generously,
so that a regression fails instead of hanging, and the latencies are printed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

import pgreplica
from pgreplica.testing import LocalCluster
from pgreplica.workload import wait_until

#: Reads mid-query on the replicas when the freeze lands, and reads started just after.
IN_FLIGHT = 4
LATER = 4
#: Each later read starts this much after the previous one (all before the mark-down).
STAGGER = 0.05
#: Every read must have returned this long after the freeze, before the thaw.
OVERALL = 20.0
QUERY = "SELECT %s::int, inet_server_port(), pg_is_in_recovery() FROM pg_sleep(0.2)"


def label(cluster: LocalCluster, index: int) -> str:
    return f"127.0.0.1:{cluster.port(index)}/postgres"


def state_of(lb: pgreplica.LoadBalancer | pgreplica.AsyncLoadBalancer, host: str) -> str:
    return next(s.state for s in lb.status() if s.host == host)


def all_up(lb: pgreplica.LoadBalancer | pgreplica.AsyncLoadBalancer) -> bool:
    return all(s.state == "up" for s in lb.status())


def config_for(cluster: LocalCluster, topology: str) -> dict[str, object]:
    """Both replicas, or replica 1 alone (then the primary takes what it cannot)."""
    if topology == "two_replicas":
        return cluster.config()
    return {"databases": {"main": {"primary": cluster.primary_dsn, "replicas": [cluster.dsn(1)]}}}


@dataclass
class Read:
    """One read of the trial, as the caller saw it."""

    nonce: int
    in_flight: bool
    started: float = 0.0
    finished: float | None = None
    first_host: str | None = None  # where an in-flight read was when the freeze landed
    host: str | None = None
    reason: str | None = None
    row: tuple[Any, ...] | None = None
    error: BaseException | None = None

    @property
    def latency(self) -> float:
        assert self.finished is not None
        return self.finished - self.started


def victim_of(cluster: LocalCluster, reads: list[Read], topology: str) -> int:
    """The replica to freeze: the one most in-flight reads are on (replica 1 alone in
    the single-replica topology)."""
    if topology == "only_replica":
        return 1
    on = [sum(r.first_host == label(cluster, i) for r in reads) for i in (1, 2)]
    return 1 if on[0] >= on[1] else 2


def check(
    cluster: LocalCluster,
    reads: list[Read],
    victim: int,
    topology: str,
    hung: int,
    what: str,
    log: str,
) -> None:
    victim_label, victim_port = label(cluster, victim), cluster.port(victim)
    assert hung == 0, f"{hung} reads still blocked {OVERALL}s after the freeze (before thaw)"
    errors = [(r.nonce, r.first_host, repr(r.error)) for r in reads if r.error is not None]
    assert errors == [], f"errors reached the caller: {errors}"
    for r in reads:
        assert r.row is not None and r.row[0] == r.nonce, (r.nonce, r.row)
    on_victim = [r for r in reads if r.in_flight and r.first_host == victim_label]
    assert on_victim, "no read was in flight on the frozen replica"
    moved = [r for r in on_victim if r.row is not None and r.row[1] != victim_port]
    # The freeze lands a few milliseconds after the reads sent their 0.2 s query.
    assert moved, "no read in flight on the frozen replica was moved elsewhere"
    for r in moved:
        assert r.reason is not None and r.reason.startswith("fallback_"), r.reason
    for r in reads:
        assert r.row is not None
        if not r.in_flight:
            # Started after the freeze: it can only have been served elsewhere.
            assert r.row[1] != victim_port, (r.nonce, r.host, r.reason)
        if topology == "only_replica" and r.row[1] != victim_port:
            assert r.row[1] == cluster.port(0) and r.row[2] is False, (r.host, r.reason)
    worst = max(reads, key=lambda r: r.latency)
    worst_moved = max(r.latency for r in moved)
    print(
        f"\n{what}: {len(reads)} reads, {len(moved)} moved off the frozen replica;"
        f" worst latency {worst.latency:.3f}s (reason {worst.reason}),"
        f" worst of the moved reads {worst_moved:.3f}s"
    )
    # Why reads left the frozen replica: OperationalError (its socket was shut down
    # under a query), PoolClosed / PoolTimeout (waiting for one of its connections).
    causes = Counter(
        re.findall(rf"db_routing_fallback host={re.escape(victim_label)} error=(\w+)", log)
    )
    print(f"  fallbacks off the frozen replica by cause: {dict(causes)}")


# -- sync ---------------------------------------------------------------------------------


def sync_read(lb: pgreplica.LoadBalancer, api: str, read: Read, ready: threading.Event) -> None:
    read.started = time.monotonic()
    try:
        with lb.isolated():
            if api == "read":
                with lb.read() as conn:
                    read.first_host = conn.host
                    if read.in_flight:
                        ready.set()
                    read.row = conn.execute(QUERY, (read.nonce,)).fetchone()
                    read.host, read.reason = conn.host, conn.reason
            else:
                with lb.connection() as rconn:
                    rconn.autocommit = True
                    if read.in_flight:
                        # The routing connection now holds a replica connection, which
                        # the next statement prefers.
                        rconn.execute("SELECT 1")
                        read.first_host = rconn.host
                        ready.set()
                    read.row = rconn.execute(QUERY, (read.nonce,)).fetchone()
                    read.host, read.reason = rconn.host, rconn.reason
    except BaseException as exc:  # asserted to be none
        read.error = exc
    finally:
        read.finished = time.monotonic()
        ready.set()


@pytest.mark.parametrize("topology", ["two_replicas", "only_replica"])
@pytest.mark.parametrize("api", ["read", "connection"])
def test_sync_reads_survive_a_replica_freezing_under_them(
    healthy_cluster: LocalCluster, api: str, topology: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = healthy_cluster
    caplog.set_level(logging.WARNING, logger="pgreplica")
    with pgreplica.LoadBalancer(config=config_for(cluster, topology)) as lb:
        wait_until(lambda: all_up(lb), what="every host up")
        reads = [Read(n, in_flight=n < IN_FLIGHT) for n in range(IN_FLIGHT + LATER)]
        readies = [threading.Event() for _ in reads]
        threads = [
            threading.Thread(target=sync_read, args=(lb, api, r, e), daemon=True)
            for r, e in zip(reads, readies, strict=True)
        ]
        victim = 0
        hung = 0
        try:
            for t in threads[:IN_FLIGHT]:
                t.start()
            for e in readies[:IN_FLIGHT]:
                assert e.wait(10), "an in-flight read never got a connection"
            victim = victim_of(cluster, reads[:IN_FLIGHT], topology)
            cluster.freeze(victim)
            frozen_at = time.monotonic()
            for t in threads[IN_FLIGHT:]:
                t.start()
                time.sleep(STAGGER)
            for t in threads:
                t.join(max(0.0, frozen_at + OVERALL - time.monotonic()))
            hung = sum(t.is_alive() for t in threads)
        finally:
            if victim:
                cluster.thaw(victim)
            for t in threads:
                if t.ident is not None:
                    t.join(10)
    check(cluster, reads, victim, topology, hung, f"sync {api} {topology}", caplog.text)


# -- asyncio ------------------------------------------------------------------------------


async def async_read(
    alb: pgreplica.AsyncLoadBalancer, api: str, read: Read, ready: asyncio.Event
) -> None:
    read.started = time.monotonic()
    try:
        with alb.isolated():
            if api == "read":
                async with alb.read() as conn:
                    read.first_host = conn.host
                    if read.in_flight:
                        ready.set()
                    cur = await conn.execute(QUERY, (read.nonce,))
                    read.row = await cur.fetchone()
                    read.host, read.reason = conn.host, conn.reason
            else:
                async with alb.connection() as rconn:
                    await rconn.set_autocommit(True)
                    if read.in_flight:
                        await rconn.execute("SELECT 1")
                        read.first_host = rconn.host
                        ready.set()
                    cur = await rconn.execute(QUERY, (read.nonce,))
                    read.row = await cur.fetchone()
                    read.host, read.reason = rconn.host, rconn.reason
    except BaseException as exc:  # asserted to be none
        read.error = exc
    finally:
        read.finished = time.monotonic()
        ready.set()


@pytest.mark.parametrize("topology", ["two_replicas", "only_replica"])
@pytest.mark.parametrize("api", ["read", "connection"])
def test_async_reads_survive_a_replica_freezing_under_them(
    healthy_cluster: LocalCluster, api: str, topology: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = healthy_cluster
    caplog.set_level(logging.WARNING, logger="pgreplica")
    reads = [Read(n, in_flight=n < IN_FLIGHT) for n in range(IN_FLIGHT + LATER)]

    async def main() -> tuple[int, int]:
        async with pgreplica.AsyncLoadBalancer(config=config_for(cluster, topology)) as alb:
            deadline = time.monotonic() + 10
            while not all_up(alb):
                assert time.monotonic() < deadline, "hosts never all up"
                await asyncio.sleep(0.01)
            readies = [asyncio.Event() for _ in reads]
            tasks: list[asyncio.Task[None]] = []
            victim = 0
            try:
                for r, e in zip(reads[:IN_FLIGHT], readies[:IN_FLIGHT], strict=True):
                    tasks.append(asyncio.create_task(async_read(alb, api, r, e)))
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies[:IN_FLIGHT])), 10)
                victim = victim_of(cluster, reads[:IN_FLIGHT], topology)
                await asyncio.to_thread(cluster.freeze, victim)
                frozen_at = time.monotonic()
                for r, e in zip(reads[IN_FLIGHT:], readies[IN_FLIGHT:], strict=True):
                    tasks.append(asyncio.create_task(async_read(alb, api, r, e)))
                    await asyncio.sleep(STAGGER)
                _, pending = await asyncio.wait(
                    tasks, timeout=max(0.0, frozen_at + OVERALL - time.monotonic())
                )
                hung = len(pending)
            finally:
                if victim:
                    await asyncio.to_thread(cluster.thaw, victim)
                if tasks:
                    _, still = await asyncio.wait(tasks, timeout=10)
                    for task in still:
                        task.cancel()
            return victim, hung

    victim, hung = asyncio.run(main())
    check(cluster, reads, victim, topology, hung, f"async {api} {topology}", caplog.text)


# -- a transaction on the frozen replica ------------------------------------------------


def sync_transaction(lb: pgreplica.LoadBalancer, api: str, out: dict[str, Any]) -> None:
    ready: threading.Event = out["ready"]
    try:
        with lb.isolated():
            if api == "read":
                with lb.read() as conn, conn.transaction():
                    conn.execute("SELECT 1")
                    out["host"] = conn.host
                    ready.set()
                    out["row"] = conn.execute("SELECT 2 FROM pg_sleep(0.2)").fetchone()
            else:
                with lb.connection() as rconn:
                    rconn.read_only = True  # a read-only transaction goes to a replica
                    with rconn.transaction():
                        rconn.execute("SELECT 1")
                        out["host"] = rconn.host
                        ready.set()
                        out["row"] = rconn.execute("SELECT 2 FROM pg_sleep(0.2)").fetchone()
    except BaseException as exc:
        out["error"] = exc
    finally:
        out["finished"] = time.monotonic()
        ready.set()


async def async_transaction(
    alb: pgreplica.AsyncLoadBalancer, api: str, out: dict[str, Any]
) -> None:
    ready: asyncio.Event = out["ready"]
    try:
        with alb.isolated():
            if api == "read":
                async with alb.read() as conn, conn.transaction():
                    await conn.execute("SELECT 1")
                    out["host"] = conn.host
                    ready.set()
                    cur = await conn.execute("SELECT 2 FROM pg_sleep(0.2)")
                    out["row"] = await cur.fetchone()
            else:
                async with alb.connection() as rconn:
                    await rconn.set_read_only(True)
                    async with rconn.transaction():
                        await rconn.execute("SELECT 1")
                        out["host"] = rconn.host
                        ready.set()
                        cur = await rconn.execute("SELECT 2 FROM pg_sleep(0.2)")
                        out["row"] = await cur.fetchone()
    except BaseException as exc:
        out["error"] = exc
    finally:
        out["finished"] = time.monotonic()
        ready.set()


def check_transaction(cluster: LocalCluster, out: dict[str, Any], what: str) -> None:
    assert out.get("hung") is False, f"the transaction was still blocked {OVERALL}s after freeze"
    assert out.get("host") == label(cluster, 1), out.get("host")
    error = out.get("error")
    assert isinstance(error, psycopg.OperationalError), (
        f"expected an OperationalError, got {error!r} (row {out.get('row')!r})"
    )
    print(
        f"\n{what}: {type(error).__name__} {out['finished'] - out['frozen_at']:.3f}s"
        f" after the freeze: {str(error).strip()[:100]}"
    )


@pytest.mark.parametrize("api", ["read", "connection"])
def test_sync_transaction_on_a_frozen_replica_fails_promptly(
    healthy_cluster: LocalCluster, api: str
) -> None:
    cluster = healthy_cluster
    out: dict[str, Any] = {"ready": threading.Event()}
    with pgreplica.LoadBalancer(config=config_for(cluster, "only_replica")) as lb:
        wait_until(lambda: all_up(lb), what="every host up")
        worker = threading.Thread(target=sync_transaction, args=(lb, api, out), daemon=True)
        frozen = False
        try:
            worker.start()
            assert out["ready"].wait(10), "the transaction never started"
            cluster.freeze(1)
            frozen = True
            out["frozen_at"] = time.monotonic()
            worker.join(OVERALL)
            out["hung"] = worker.is_alive()
        finally:
            if frozen:
                cluster.thaw(1)
            worker.join(10)
    check_transaction(cluster, out, f"sync {api} transaction")


@pytest.mark.parametrize("api", ["read", "connection"])
def test_async_transaction_on_a_frozen_replica_fails_promptly(
    healthy_cluster: LocalCluster, api: str
) -> None:
    cluster = healthy_cluster
    out: dict[str, Any] = {}

    async def main() -> None:
        out["ready"] = asyncio.Event()
        async with pgreplica.AsyncLoadBalancer(config=config_for(cluster, "only_replica")) as alb:
            deadline = time.monotonic() + 10
            while not all_up(alb):
                assert time.monotonic() < deadline, "hosts never all up"
                await asyncio.sleep(0.01)
            task = asyncio.create_task(async_transaction(alb, api, out))
            frozen = False
            try:
                await asyncio.wait_for(out["ready"].wait(), 10)
                await asyncio.to_thread(cluster.freeze, 1)
                frozen = True
                out["frozen_at"] = time.monotonic()
                done, _ = await asyncio.wait([task], timeout=OVERALL)
                out["hung"] = not done
            finally:
                if frozen:
                    await asyncio.to_thread(cluster.thaw, 1)
                _, still = await asyncio.wait([task], timeout=10)
                for t in still:
                    t.cancel()

    asyncio.run(main())
    check_transaction(cluster, out, f"async {api} transaction")


# -- back in the read set after a short hang --------------------------------------------


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as balancer:
        wait_until(lambda: all_up(balancer), what="every host up")
        yield balancer


def test_replica_back_in_the_read_set_soon_after_a_short_hang(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    cluster = healthy_cluster
    victim = label(cluster, 1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        # Reads go on during the hang, so request-side failures happen too: they must
        # not push the replica's next probe further away.
        with lb.isolated():
            while not stop.is_set():
                try:
                    with lb.read() as conn:
                        conn.execute("SELECT 1").fetchone()
                except Exception as exc:
                    errors.append(exc)

    def landed_on_victim() -> bool:
        with lb.isolated(), lb.read() as conn:
            conn.execute("SELECT 1").fetchone()
            return conn.host == victim

    readers = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
    for t in readers:
        t.start()
    measured: dict[str, float] = {}
    try:
        time.sleep(0.2)
        cluster.freeze(1)
        try:
            frozen_at = time.monotonic()
            measured["out"] = wait_until(
                lambda: state_of(lb, victim) == "down", what="frozen replica marked down"
            )
            time.sleep(max(0.0, frozen_at + 1.5 - time.monotonic()))
        finally:
            cluster.thaw(1)
        thawed_at = time.monotonic()

        def back() -> bool:
            if "up" not in measured and state_of(lb, victim) == "up":
                measured["up"] = time.monotonic() - thawed_at
            return "up" in measured and landed_on_victim()

        measured["read"] = wait_until(back, timeout=10, what="thawed replica back in read set")
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    print(
        f"\nfrozen replica out after {measured['out']:.3f}s; after the thaw: up after"
        f" {measured['up']:.3f}s, first read on it after {measured['read']:.3f}s"
    )
    assert errors == []
    assert not any(t.is_alive() for t in readers)
