"""Protecting the primary (``fallback_limit``): when every replica fails, reads fall back
to the primary only up to the limit; the rest fail fast with a clear error. On the real
local cluster, the replicas cut off by :class:`pgreplica.testing.FaultProxy`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

import pgreplica
from pgreplica.testing import FaultProxy, LocalCluster
from pgreplica.workload import wait_until

SLEEP_SQL = "SELECT pg_sleep(0.3), inet_server_port()"
COUNT_SQL = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(0.3)%%' AND pid <> pg_backend_pid()"
)


@contextlib.contextmanager
def cut_off_replicas(cluster: LocalCluster) -> Iterator[tuple[dict[str, object], list[FaultProxy]]]:
    """A configuration whose two replicas are reached through proxies."""
    with (
        FaultProxy(("127.0.0.1", cluster.port(1))) as p1,
        FaultProxy(("127.0.0.1", cluster.port(2))) as p2,
    ):
        replicas = [p1.dsn(cluster.replica_dsns[0]), p2.dsn(cluster.replica_dsns[1])]
        yield (
            {"databases": {"main": {"primary": cluster.primary_dsn, "replicas": replicas}}},
            [
                p1,
                p2,
            ],
        )


class Peak(threading.Thread):
    """The most fallback reads seen running on the primary at once (its own view)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.conn.execute(COUNT_SQL).fetchone()[0])
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.conn.close()


class Outcome:
    """What concurrent reads met: served (the port), refused by fallback_limit, other."""

    def __init__(self) -> None:
        self.served: list[int] = []
        self.refused: list[pgreplica.HostUnavailable] = []
        self.other: list[BaseException] = []
        self.peak = 0


def concurrent_reads(
    lb: pgreplica.LoadBalancer, dsn: str, count: int, api: str = "read"
) -> Outcome:
    """``count`` threads each run one slow read, through ``lb.read()`` or a routing
    connection in autocommit (``api="connection"``); the primary's own count of them
    running at once is sampled meanwhile (``Outcome.peak``)."""
    out = Outcome()

    def read() -> None:
        try:
            if api == "connection":
                with lb.connection() as rconn:
                    rconn.autocommit = True
                    out.served.append(rconn.execute(SLEEP_SQL).fetchone()[1])
                return
            with lb.read() as conn:
                out.served.append(conn.execute(SLEEP_SQL).fetchone()[1])
        except pgreplica.HostUnavailable as exc:
            (out.refused if exc.reason == "fallback_limit" else out.other).append(exc)
        except BaseException as exc:
            out.other.append(exc)

    peak = Peak(dsn)
    peak.start()
    try:
        threads = [threading.Thread(target=read) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        peak.close()
    out.peak = peak.peak
    return out


def all_replicas_down(lb: pgreplica.LoadBalancer | pgreplica.AsyncLoadBalancer) -> bool:
    return all(s.state != "up" for s in lb.status() if s.role == "replica")


def test_fallback_reads_are_capped_when_every_replica_is_down(
    healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgreplica")
    with cut_off_replicas(healthy_cluster) as (config, proxies):
        config.update(fallback_limit=2, fallback_wait=0.05)
        with pgreplica.LoadBalancer(config=config) as lb:
            for p in proxies:
                p.reset(refuse=True)
            wait_until(lambda: all_replicas_down(lb), what="both replicas down")
            out = concurrent_reads(lb, healthy_cluster.primary_dsn, 8)
            assert out.other == []
            assert len(out.served) >= 2 and set(out.served) == {healthy_cluster.port(0)}
            assert len(out.refused) >= 1 and len(out.served) + len(out.refused) == 8
            assert out.peak <= 2, f"{out.peak} fallback reads ran on the primary at once"
            message = str(out.refused[0])
            assert "fallback_limit" in message and "'main'" in message
            assert "password" not in message.lower()
            assert "db_fallback_limited database=main limit=2" in caplog.text

            # reads in lb.primary() are the application's choice: not limited
            results: list[int] = []

            def primary_read() -> None:
                with lb.primary(), lb.read() as conn:
                    results.append(conn.execute(SLEEP_SQL).fetchone()[1])

            threads = [threading.Thread(target=primary_read) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert len(results) == 4

            # the places are given back: with replicas up again, reads go there
            for p in proxies:
                p.heal()
            wait_until(lambda: not all_replicas_down(lb), timeout=15, what="a replica back")
            assert lb._fallback_reads.get("main", 0) == 0
            with lb.read() as conn:
                assert conn.on_replica


def test_routing_connection_fallback_reads_are_capped(healthy_cluster: LocalCluster) -> None:
    """lb.connection() in autocommit: a read statement on the primary because no
    replica can take it holds a place while it runs; over the limit it fails fast.
    Writes and transactions are never limited."""
    with cut_off_replicas(healthy_cluster) as (config, proxies):
        config.update(fallback_limit=2, fallback_wait=0.05)
        with pgreplica.LoadBalancer(config=config) as lb:
            for p in proxies:
                p.reset(refuse=True)
            wait_until(lambda: all_replicas_down(lb), what="both replicas down")
            out = concurrent_reads(lb, healthy_cluster.primary_dsn, 8, api="connection")
            assert out.other == []
            assert len(out.served) >= 2 and set(out.served) == {healthy_cluster.port(0)}
            assert len(out.refused) >= 1 and len(out.served) + len(out.refused) == 8
            assert out.peak <= 2, f"{out.peak} fallback reads ran on the primary at once"
            assert lb._fallback_reads.get("main", 0) == 0  # every place given back

            # a transaction, a write and lb.primary() are not fallback reads
            done: list[str] = []

            def unlimited(kind: str) -> None:
                with lb.connection() as rconn:
                    if kind == "transaction":
                        rconn.execute(SLEEP_SQL)  # not autocommit: a transaction
                    elif kind == "primary":
                        rconn.autocommit = True
                        with lb.primary():
                            rconn.execute(SLEEP_SQL)
                    else:
                        rconn.autocommit = True
                        rconn.execute("SELECT pg_sleep(0.3) FROM pg_advisory_xact_lock(1)")
                done.append(kind)

            kinds = ["transaction", "primary", "write"] * 2
            threads = [threading.Thread(target=unlimited, args=(k,)) for k in kinds]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert sorted(done) == sorted(kinds)


def test_async_routing_connection_fallback_reads_are_capped(
    healthy_cluster: LocalCluster,
) -> None:
    with cut_off_replicas(healthy_cluster) as (config, proxies):
        config.update(fallback_limit=1, fallback_wait=0.0)

        async def main() -> list[str]:
            async with pgreplica.AsyncLoadBalancer(config=config) as alb:
                for p in proxies:
                    p.reset(refuse=True)
                deadline = time.monotonic() + 10
                while not all_replicas_down(alb) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert all_replicas_down(alb)

                async def read() -> str:
                    try:
                        async with alb.connection() as rconn:
                            await rconn.set_autocommit(True)
                            await rconn.execute(SLEEP_SQL)
                        return "served"
                    except pgreplica.HostUnavailable as exc:
                        return exc.reason

                outcomes = await asyncio.gather(*(read() for _ in range(5)))
                assert alb._fallback_reads.get("main", 0) == 0
                return list(outcomes)

        outcomes = asyncio.run(main())
    assert (outcomes.count("served"), outcomes.count("fallback_limit")) == (1, 4), outcomes


def test_async_fallback_reads_are_capped(healthy_cluster: LocalCluster) -> None:
    with cut_off_replicas(healthy_cluster) as (config, proxies):
        config.update(fallback_limit=1, fallback_wait=0.0)

        async def main() -> tuple[int, int, list[BaseException]]:
            async with pgreplica.AsyncLoadBalancer(config=config) as alb:
                for p in proxies:
                    p.reset(refuse=True)
                deadline = time.monotonic() + 10
                while not all_replicas_down(alb) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert all_replicas_down(alb)

                async def read() -> str:
                    try:
                        async with alb.read() as conn:
                            await conn.execute(SLEEP_SQL)
                        return "served"
                    except pgreplica.HostUnavailable as exc:
                        return exc.reason

                outcomes = await asyncio.gather(*(read() for _ in range(5)))
                return outcomes.count("served"), outcomes.count("fallback_limit"), []

        served, refused, _ = asyncio.run(main())
    assert (served, refused) == (1, 4)


def test_no_limit_by_default(healthy_cluster: LocalCluster) -> None:
    main = pgreplica.DatabaseConfig(name="main", primary="host=x")
    assert pgreplica.Settings(databases={"main": main}).fallback_limit == 0
    with (
        cut_off_replicas(healthy_cluster) as (config, proxies),
        pgreplica.LoadBalancer(config=config) as lb,
    ):
        for p in proxies:
            p.reset(refuse=True)
        wait_until(lambda: all_replicas_down(lb), what="both replicas down")
        out = concurrent_reads(lb, healthy_cluster.primary_dsn, 6)
        assert (len(out.served), out.refused, out.other) == (6, [], [])
        assert out.peak >= 3  # the count of running fallback reads sees them


@pytest.mark.parametrize(
    ("key", "value"), [("fallback_limit", -1), ("fallback_limit", 1.5), ("fallback_wait", -1)]
)
def test_bad_fallback_settings_are_refused(key: str, value: object) -> None:
    with pytest.raises(pgreplica.ConfigError, match=key):
        pgreplica.Settings(
            databases={"main": pgreplica.DatabaseConfig(name="main", primary="host=x")},
            **{key: value},  # type: ignore[arg-type]
        )


def test_fallback_limit_from_the_environment() -> None:
    settings = pgreplica.Settings.from_dict(
        {"databases": {"main": {"primary": "host=x"}}},
        environ={"PGREPLICA_FALLBACK_LIMIT": "3", "PGREPLICA_FALLBACK_WAIT": "20ms"},
    )
    assert (settings.fallback_limit, settings.fallback_wait) == (3, 0.02)
