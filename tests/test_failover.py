"""Replicas killed, hung, paused and promoted mid-workload: no error reaches the caller,
no stale read is returned, and the host leaves and later rejoins the read set."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pgreplica
from pgreplica.testing import LocalCluster
from pgreplica.workload import Tally, gathered, prepare, threaded, wait_until


def label(cluster: LocalCluster, index: int) -> str:
    return f"127.0.0.1:{cluster.port(index)}/postgres"


def state_of(lb: pgreplica.LoadBalancer, host: str) -> str:
    return next(s.state for s in lb.status() if s.host == host)


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    balancer = pgreplica.LoadBalancer(config=healthy_cluster.config())
    prepare(balancer, range(100, 132))
    healthy_cluster.wait_replayed()
    yield balancer
    balancer.close()


def run_during(
    lb: pgreplica.LoadBalancer, keys: range, seconds: float, fault: Callable[[], None], **kw: Any
) -> Tally:
    """Run the write-then-read workload for ``seconds`` while ``fault`` runs."""
    result: dict[str, Tally] = {}
    until = time.monotonic() + seconds
    worker = threading.Thread(
        target=lambda: result.setdefault("t", threaded(lb, keys, until=until, **kw))
    )
    worker.start()
    try:
        fault()
    finally:
        worker.join()
    return result["t"]


def test_killed_replica_leaves_and_rejoins_without_caller_errors(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    victim = label(healthy_cluster, 2)

    def fault() -> None:
        time.sleep(0.5)
        healthy_cluster.kill(2)
        wait_until(lambda: state_of(lb, victim) == "down", what="killed replica marked down")
        time.sleep(0.5)
        healthy_cluster.start(2)
        wait_until(lambda: state_of(lb, victim) == "up", timeout=15, what="replica back up")

    with caplog.at_level(logging.INFO, logger="pgreplica"):
        tally = run_during(lb, range(100, 104), 4.0, fault)
        # reads without a token: share between both replicas again once it is back
        ports = set()
        for _ in range(40):
            with lb.read(max_staleness=60) as conn:
                ports.add(conn.host)
    assert tally.errors == [] and tally.stale == 0
    assert tally.cycles > 100
    assert victim in ports
    assert f"host_offline host={victim}" in caplog.text
    assert f"host_online host={victim}" in caplog.text


def test_reads_in_flight_on_a_killed_replica_fall_back_once(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # A read unit holds a pooled connection to replica 1; the server dies under it.
    victim = label(healthy_cluster, 1)
    with lb.isolated(), caplog.at_level(logging.WARNING, logger="pgreplica"):
        for _ in range(50):
            with lb.read() as conn:
                if conn.host != victim:
                    continue
                healthy_cluster.kill(1)
                row = conn.execute("SELECT inet_server_port()").fetchone()
                assert row[0] == healthy_cluster.port(2)
                assert conn.reason == "fallback_replica"
                break
        else:
            raise AssertionError("no read was routed to replica 1")
    assert "db_routing_fallback host=" + victim in caplog.text
    assert "S3cr3t" not in caplog.text
    assert state_of(lb, victim) == "down"


def test_hung_replica_leaves_the_read_set_and_callers_see_no_error(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    victim = label(healthy_cluster, 1)
    measured: dict[str, float] = {}

    def fault() -> None:
        time.sleep(0.5)
        healthy_cluster.freeze(1)
        measured["out"] = wait_until(
            lambda: state_of(lb, victim) == "down", what="hung replica out of the read set"
        )
        time.sleep(1.0)
        healthy_cluster.thaw(1)
        wait_until(lambda: state_of(lb, victim) == "up", timeout=15, what="thawed replica back")

    tally = run_during(lb, range(104, 108), 4.0, fault)
    print(f"hung replica out of the read set after {measured['out']:.2f}s")
    assert tally.errors == [] and tally.stale == 0
    assert tally.cycles > 50


def test_promoted_replica_leaves_the_read_set(
    scratch_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="pgreplica"),
        pgreplica.LoadBalancer(config=scratch_cluster.config()) as lb,
    ):
        prepare(lb, range(200, 204))
        victim = label(scratch_cluster, 1)

        def fault() -> None:
            time.sleep(0.5)
            scratch_cluster.promote(1)
            wait_until(
                lambda: any(s.role == "promoted" for s in lb.status()), what="promotion seen"
            )

        tally = run_during(lb, range(200, 204), 2.5, fault)
        assert tally.errors == [] and tally.stale == 0
        for _ in range(10):
            with lb.read(max_staleness=3600) as conn:
                assert conn.host != victim
        status = {s.host: s for s in lb.status()}
        assert status[victim].role == "promoted"
    assert f"replica_promoted host={victim}: out of the read set" in caplog.text


def test_every_replica_down_reads_go_to_the_primary(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    def fault() -> None:
        time.sleep(0.3)
        healthy_cluster.kill(1)
        healthy_cluster.kill(2)
        wait_until(
            lambda: all(s.state == "down" for s in lb.status() if s.role == "replica"),
            what="both replicas down",
        )
        time.sleep(0.5)

    tally = run_during(lb, range(108, 112), 2.0, fault)
    assert tally.errors == [] and tally.stale == 0
    with lb.read() as conn:
        assert conn.reason == "no_healthy_replica"


def test_recovery_conflict_is_retried_once_elsewhere(
    healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # Replica 1 cancels conflicting queries at once; an exclusive lock taken on the
    # primary then cancels a query reading that table on the replica.
    healthy_cluster.execute(1, "ALTER SYSTEM SET max_standby_streaming_delay = 0")
    healthy_cluster.execute(1, "SELECT pg_reload_conf()")
    healthy_cluster.execute(0, "CREATE TABLE IF NOT EXISTS conflict_t AS SELECT 1 AS x")
    healthy_cluster.wait_replayed()
    config = {
        "databases": {
            "main": {"primary": healthy_cluster.primary_dsn, "replicas": [healthy_cluster.dsn(1)]}
        }
    }
    victim = label(healthy_cluster, 1)

    def lock_on_primary() -> None:
        time.sleep(0.5)
        healthy_cluster.execute(0, "BEGIN; LOCK TABLE conflict_t IN ACCESS EXCLUSIVE MODE; COMMIT")

    try:
        with pgreplica.LoadBalancer(config=config) as lb, caplog.at_level(logging.WARNING):
            locker = threading.Thread(target=lock_on_primary)
            with lb.read() as conn:
                assert conn.host == victim
                locker.start()
                row = conn.execute("SELECT count(*) FROM conflict_t, pg_sleep(2)").fetchone()
                assert row == (1,)
                assert not conn.on_replica and conn.reason.startswith("fallback_")
            locker.join()
            assert f"db_routing_fallback host={victim}" in caplog.text
            assert "reason=recovery_conflict" in caplog.text
            assert state_of(lb, victim) == "up"  # a conflict is not a sick host
    finally:
        healthy_cluster.execute(1, "ALTER SYSTEM RESET max_standby_streaming_delay")
        healthy_cluster.execute(1, "SELECT pg_reload_conf()")


def test_primary_killed_and_restarted(scratch_cluster: LocalCluster) -> None:
    with pgreplica.LoadBalancer(config=scratch_cluster.config()) as lb:
        prepare(lb, range(300, 301))
        primary = label(scratch_cluster, 0)
        with lb.isolated():
            for _ in range(3):  # fill the primary's pool
                with lb.write() as conn:
                    conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 300")
        # replication is asynchronous: what the replica is to serve must reach it first
        scratch_cluster.wait_replayed()
        scratch_cluster.kill(0)
        wait_until(lambda: state_of(lb, primary) == "down", what="primary marked down")
        with lb.isolated():
            # the breaker is open: refused without a connection attempt
            with pytest.raises(pgreplica.PrimaryUnavailable, match="fail fast"), lb.write():
                pass
            with lb.read() as conn:  # the replica keeps serving reads
                assert conn.on_replica
                assert conn.execute("SELECT v FROM rw_counters WHERE id = 300").fetchone()[0] >= 3
        scratch_cluster.start(0)
        wait_until(lambda: state_of(lb, primary) == "up", timeout=15, what="primary back")
        with lb.isolated():
            # no write fails on a connection left over from before the restart
            for _ in range(5):
                with lb.write() as conn:
                    conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 300")
                with lb.read() as conn:
                    assert conn.execute("SELECT v FROM rw_counters WHERE id = 300").fetchone()[0]


def test_async_balancer_survives_a_replica_kill(healthy_cluster: LocalCluster) -> None:
    victim = label(healthy_cluster, 2)

    async def main() -> tuple[Tally, set[str]]:
        async with pgreplica.AsyncLoadBalancer(config=healthy_cluster.config()) as alb:
            until = time.monotonic() + 3.0
            work = asyncio.ensure_future(gathered(alb, range(120, 126), until=until))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(healthy_cluster.kill, 2)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(healthy_cluster.start, 2)
            tally = await work
            deadline = time.monotonic() + 15
            while any(s.state != "up" for s in alb.status()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            hosts = set()
            for _ in range(20):
                async with alb.read(max_staleness=60) as conn:
                    hosts.add(conn.host)
            return tally, hosts

    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as lb:
        prepare(lb, range(120, 126))
    tally, hosts = asyncio.run(main())
    assert tally.errors == [] and tally.stale == 0
    assert tally.cycles > 100
    assert victim in hosts  # back in the read set
