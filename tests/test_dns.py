"""Replicas from DNS (``replicas_dns``): a DNS server on loopback changes its SRV answer
while threads read; hosts join after their first good probe, leave the read set at
once, and a failed or empty answer keeps the replicas as they are. 0 read errors."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest

import pgreplica
from pgreplica.testing import LocalCluster
from pgreplica.workload import wait_until

pytest.importorskip("dns", reason="dnspython is not installed (pip install '.[dev]')")

from dns_server import DnsServer

NAME = "_postgresql._tcp.replicas.test"


def srv(cluster: LocalCluster, *indexes: int) -> list[tuple[str, str]]:
    return [("SRV", f"0 0 {cluster.port(i)} 127.0.0.1.") for i in indexes]


class Readers:
    """Threads reading through the balancer: when each read started, and which server
    answered it."""

    def __init__(self, lb: pgreplica.LoadBalancer, cluster: LocalCluster) -> None:
        self.lb = lb
        self.names = {cluster.port(i): f"node{i}" for i in range(3)}
        self.served: list[tuple[float, str]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(3)]

    def __enter__(self) -> Readers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()  # reads in flight when a host leaves may end there
            try:
                with self.lb.isolated(), self.lb.read() as conn:
                    port = conn.execute("SELECT inet_server_port()").fetchone()[0]
                self.served.append((started, self.names[port]))
            except BaseException as exc:
                self.errors.append(exc)
            time.sleep(0.002)

    def since(self, moment: float) -> Counter[str]:
        return Counter(where for at, where in list(self.served) if at > moment)


def test_replicas_follow_the_dns_answer(
    healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = healthy_cluster
    caplog.set_level(logging.INFO, logger="pgreplica")
    with DnsServer() as server:
        server.set(NAME, srv(cluster, 1))
        config = {
            "databases": {"main": {"primary": cluster.dsn(0), "replicas_dns": NAME}},
            "dns_servers": [f"127.0.0.1:{server.port}"],
            "dns_interval": "200ms",
        }
        with pgreplica.LoadBalancer(config=config) as lb:
            route = lb._router.route("main")
            wait_until(lambda: len(route.read_set) == 1, timeout=10, what="replica 1 from DNS")
            with Readers(lb, cluster) as readers:
                time.sleep(0.5)
                assert set(readers.since(0)) == {"node1"}

                server.set(NAME, srv(cluster, 1, 2))  # a replica joins
                wait_until(lambda: len(route.read_set) == 2, timeout=10, what="replica 2 joins")
                joined = time.monotonic()
                time.sleep(0.5)
                assert set(readers.since(joined)) == {"node1", "node2"}

                server.set(NAME, srv(cluster, 2))  # replica 1 leaves
                wait_until(
                    lambda: (
                        [h.label for h in route.replicas] == [route.read_set[0].label]
                        and len(route.replicas) == 1
                    ),
                    timeout=10,
                    what="replica 1 leaves",
                )
                left = time.monotonic()
                time.sleep(0.5)
                assert set(readers.since(left)) == {"node2"}, (
                    readers.since(left),
                    [h.label for h in route.read_set],
                    [h.label for h in route.replicas],
                )

                server.fail = True  # the DNS server fails: the replicas stay
                failing = time.monotonic()
                time.sleep(1.0)
                server.fail = False
                server.set(NAME, [])  # an empty answer: the replicas stay
                time.sleep(1.0)
                assert set(readers.since(failing)) == {"node2"}
                assert len(route.replicas) == 1

                # the primary listed as a replica by mistake is not a replica
                server.set(NAME, srv(cluster, 0, 2))
                time.sleep(1.0)
                assert all(h is not route.primary for h in route.replicas)
            assert readers.errors == [], readers.errors[:3]
            assert len(readers.served) > 100
    assert "dns_replicas database=main" in caplog.text
    assert "dns_lookup_failed database=main" in caplog.text


def test_bad_dns_settings_are_named() -> None:
    primary = "host=p dbname=app"
    with pytest.raises(pgreplica.ConfigError, match="expected a DNS name"):
        pgreplica.Settings.from_dict(
            {"databases": {"main": {"primary": primary, "replicas_dns": "bad name!"}}}
        )
    with pytest.raises(pgreplica.ConfigError, match="expected an IP address"):
        pgreplica.Settings.from_dict(
            {"databases": {"main": {"primary": primary}}, "dns_servers": ["consul:8600"]}
        )
    with pytest.raises(pgreplica.ConfigError, match="need a fixed primary"):
        pgreplica.Settings.from_dict(
            {"databases": {"main": {"hosts": ["host=a"], "replicas_dns": "x.test"}}}
        )
    settings = pgreplica.Settings.from_dict(
        {
            "databases": {"main": {"primary": primary, "replicas_dns": NAME}},
            "dns_servers": "10.0.0.2, 127.0.0.1:8600",
        }
    )
    assert settings.dns_servers == ("10.0.0.2", "127.0.0.1:8600")
    assert settings.databases["main"].replicas_dns == NAME


def test_an_asyncio_balancer_follows_the_dns_answer(healthy_cluster: LocalCluster) -> None:
    import asyncio

    cluster = healthy_cluster
    with DnsServer() as server:
        server.set(NAME, srv(cluster, 2))
        config = {
            "databases": {"main": {"primary": cluster.dsn(0), "replicas_dns": NAME}},
            "dns_servers": [f"127.0.0.1:{server.port}"],
            "dns_interval": "200ms",
        }

        async def scenario() -> list[int]:
            async with pgreplica.AsyncLoadBalancer(config=config) as alb:
                route = alb._router.route("main")
                deadline = time.monotonic() + 10
                while len(route.read_set) != 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                server.set(NAME, srv(cluster, 1))  # 2 leaves, 1 joins
                wanted = [f"127.0.0.1:{cluster.port(1)}/postgres"]
                while time.monotonic() < deadline and [h.label for h in route.read_set] != wanted:
                    await asyncio.sleep(0.05)
                ports = []
                for _ in range(5):
                    async with alb.read() as conn:
                        cur = await conn.execute("SELECT inet_server_port()")
                        ports.append((await cur.fetchone())[0])
                return ports

        assert asyncio.run(scenario()) == [cluster.port(1)] * 5
