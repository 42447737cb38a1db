"""The fault-injecting proxy (:class:`pgreplica.testing.FaultProxy`) on real servers, and
pgreplica behind it: network faults on a replica never reach the caller."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Iterator

import psycopg
import pytest

import pgreplica
from pgreplica import health
from pgreplica.config import Dsn
from pgreplica.testing import FaultProxy, LocalCluster
from pgreplica.workload import Tally, prepare, sync_cycles, threaded, wait_until


@pytest.fixture
def primary_proxy(healthy_cluster: LocalCluster) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", healthy_cluster.port(0))) as proxy:
        yield proxy


def connect(proxy: FaultProxy, cluster: LocalCluster, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(cluster.primary_dsn), autocommit=True, **kwargs)


def in_thread(target: object) -> tuple[threading.Thread, list[object]]:
    """Run ``target()`` in a thread: (thread, [result or exception])."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(target())  # type: ignore[operator]
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_passes_traffic_through(primary_proxy: FaultProxy, healthy_cluster: LocalCluster) -> None:
    with connect(primary_proxy, healthy_cluster) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (healthy_cluster.port(0),)
    assert primary_proxy.accepted == 1
    assert f"{primary_proxy.port}" in repr(primary_proxy)
    assert "password" not in repr(primary_proxy)


def test_delay_slows_every_round_trip(
    primary_proxy: FaultProxy, healthy_cluster: LocalCluster
) -> None:
    with connect(primary_proxy, healthy_cluster) as conn:
        primary_proxy.delay(0.1)
        t0 = time.monotonic()
        conn.execute("SELECT 1").fetchone()
        assert time.monotonic() - t0 >= 0.2  # 0.1 s each way
        primary_proxy.heal()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_bandwidth_limits_a_large_result(
    primary_proxy: FaultProxy, healthy_cluster: LocalCluster
) -> None:
    with connect(primary_proxy, healthy_cluster) as conn:
        primary_proxy.bandwidth(1_000_000)
        t0 = time.monotonic()
        (text,) = conn.execute("SELECT repeat('x', 500000)").fetchone()
        assert len(text) == 500000
        assert time.monotonic() - t0 >= 0.4  # 500 kB at 1 MB/s


def test_blackhole_holds_established_and_new_connections_until_healed(
    primary_proxy: FaultProxy, healthy_cluster: LocalCluster
) -> None:
    conn = connect(primary_proxy, healthy_cluster)
    primary_proxy.blackhole()
    thread, out = in_thread(lambda: conn.execute("SELECT 1").fetchone())
    thread.join(0.5)
    assert thread.is_alive() and out == []  # no answer on the established connection
    new, new_out = in_thread(lambda: connect(primary_proxy, healthy_cluster, connect_timeout=1))
    new.join(3)
    assert isinstance(new_out[0], psycopg.OperationalError)  # a new one times out
    primary_proxy.heal()  # the partition ends: the held query goes through
    thread.join(3)
    assert out == [(1,)]
    primary_proxy.blackhole()
    thread, out = in_thread(lambda: conn.execute("SELECT 2").fetchone())
    thread.join(0.5)
    assert thread.is_alive() and out == []
    primary_proxy.reset()  # the hung query now fails at once
    thread.join(3)
    assert isinstance(out[0], psycopg.OperationalError)
    conn.close()
    primary_proxy.heal()
    with connect(primary_proxy, healthy_cluster) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_drop_and_reset(primary_proxy: FaultProxy, healthy_cluster: LocalCluster) -> None:
    conn = connect(primary_proxy, healthy_cluster)
    primary_proxy.drop()
    with pytest.raises(psycopg.OperationalError):
        connect(primary_proxy, healthy_cluster, connect_timeout=2)
    assert conn.execute("SELECT 1").fetchone() == (1,)  # drop spares established ones
    primary_proxy.reset()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    primary_proxy.heal()
    with connect(primary_proxy, healthy_cluster) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_bad_fault_values_are_refused(primary_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="delay"):
        primary_proxy.delay(-1)
    with pytest.raises(ValueError, match="bandwidth"):
        primary_proxy.bandwidth(0)


# -- pgreplica behind the proxy ---------------------------------------------------------


@pytest.mark.parametrize("fault", ["blackhole", "reset", "delay", "drop"])
@pytest.mark.parametrize("api", ["read", "connection"])
def test_network_faults_on_a_replica_never_reach_the_caller(
    healthy_cluster: LocalCluster, api: str, fault: str
) -> None:
    # replica 1 is reached through the proxy, replica 2 directly; 4 threads write and
    # read back while the network to replica 1 fails
    cluster = healthy_cluster
    with FaultProxy(("127.0.0.1", cluster.port(1))) as proxy:
        config = {
            "databases": {
                "main": {
                    "primary": cluster.primary_dsn,
                    "replicas": [proxy.dsn(cluster.replica_dsns[0]), cluster.replica_dsns[1]],
                }
            }
        }
        with pgreplica.LoadBalancer(config=config) as lb:
            rows = range(740, 744)
            prepare(lb, range(740, 745))
            cluster.wait_replayed()
            stop = threading.Event()
            result: list[Tally] = []
            work = threading.Thread(
                target=lambda: result.append(threaded(lb, rows, stop=stop, api=api)), daemon=True
            )
            work.start()
            try:
                time.sleep(0.5)
                if fault == "delay":
                    proxy.delay(1.0)  # slower than probe_timeout: as good as hung
                else:
                    getattr(proxy, fault)()
                time.sleep(0.2)
                # reads complete while the network to the replica fails, here too
                during = sync_cycles(lb, 744, cycles=20, api=api)
                time.sleep(2.3)
                states = {s.host: s.state for s in lb.status()}
            finally:
                proxy.heal()
                wait_until(
                    lambda: all(s.state == "up" for s in lb.status()),
                    timeout=15,
                    what="the replica back",
                )
                stop.set()
                work.join(15)
    assert result, "a read never finished"
    tally = result[0]
    assert tally.errors == []
    assert tally.stale == 0
    assert tally.worst_read < 1.5, f"a read took {tally.worst_read:.2f}s"
    assert during.cycles == 20 and during.errors == [] and during.stale == 0
    faulty = next(state for host, state in states.items() if f":{proxy.port}/" in host)
    if fault in ("blackhole", "delay"):
        assert faulty in ("down", "half_open"), states  # out of the read set
    print(f"\n{api} {fault}: {tally.cycles} reads, worst {tally.worst_read:.3f}s, {states}")


@pytest.mark.parametrize(
    "when", ["as the connection opens", "while the first query is slow", "while it hangs"]
)
def test_a_prober_stopped_mid_probe_closes_the_connection_it_just_opened(
    primary_proxy: FaultProxy, healthy_cluster: LocalCluster, when: str
) -> None:
    """A host's probing stops (the balancer closes, or DNS drops the host) just as a
    new probe connection opens, or while the first query on it is slow or hangs: it
    is closed, not left open for the garbage collector (a ResourceWarning that once
    failed an unrelated test)."""
    opened: list[psycopg.AsyncConnection[tuple[object, ...]]] = []

    class Prober(health.Prober):
        async def _connect(self, host: health.Host) -> psycopg.AsyncConnection[tuple[object, ...]]:
            conn = await super()._connect(host)
            opened.append(conn)
            if when == "as the connection opens":
                self.remove_host(host)
            elif when == "while the first query is slow":
                primary_proxy.delay(0.2)  # answered, and cancelled, but slowly
            else:
                primary_proxy.blackhole()  # the first query never gets an answer
            return conn

    dsn = Dsn(primary_proxy.dsn(healthy_cluster.primary_dsn))
    host = health.Host(dsn, configured_primary=True, backoff=health.Backoff())
    prober = Prober(
        [host],
        interval=0.1,
        timeout=30,
        connect_timeout=5,
        statement_timeout=30,
        application_name="t",
        on_change=lambda: None,
    )

    async def main() -> None:
        task = asyncio.ensure_future(prober.run())
        deadline = time.monotonic() + 10
        while not opened and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the first query is in flight
        prober.stop()
        await asyncio.wait_for(task, 10)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(main())
        assert len(opened) == 1, "the prober never connected through the proxy"
        assert opened[0].closed
        opened.clear()
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
