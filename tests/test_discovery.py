"""Databases without fixed roles (``hosts = [...]`` or a libpq multi-host DSN): the
prober finds the primary, follows a failover (the new primary takes writes without a
restart), refuses writes while no host or more than one host claims the role, and the
read-your-writes workload sees 0 stale reads throughout. Real servers: the promotion,
the kill and the split brain are done to a scratch cluster."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest

import pgreplica
from pgreplica.config import Dsn, Settings
from pgreplica.testing import LocalCluster
from pgreplica.workload import wait_until

TABLE = "CREATE TABLE IF NOT EXISTS disc_items (id bigint PRIMARY KEY)"


def test_hosts_and_multi_host_dsns_parse_into_discovered_databases() -> None:
    settings = Settings.from_dict(
        {
            "databases": {
                "main": {"hosts": ["host=a port=5432", "postgresql://u:pw@b:5433,c:5434/app"]},
                "url": {"primary": "postgresql://u@h1:5432,h2:5432/app"},
                "ci": {"primary": "main", "replicas": ["host=d"]},
            }
        }
    )
    main = settings.databases["main"]
    assert main.discover
    assert [d.label for d in (main.primary, *main.replicas)] == [
        "a:5432/",
        "b:5433/app",
        "c:5434/app",
    ]
    assert "pw" not in repr(main) and "pw" in main.replicas[0].conninfo
    url = settings.databases["url"]
    assert url.discover and [d.label for d in (url.primary, *url.replicas)] == [
        "h1:5432/app",
        "h2:5432/app",
    ]
    assert settings.databases["ci"].primary_from == "main"
    assert Dsn("host=a,b port=1,2 dbname=x").hosts()[1].label == "b:2/x"
    patroni = Settings.from_dict(
        {"databases": {"main": {"hosts": ["host=a"], "patroni": "http://db1:8008/"}}}
    )
    assert patroni.databases["main"].patroni == ("http://db1:8008",)

    bad = [
        ({"hosts": ["host=a"], "primary": "host=b"}, "either hosts"),
        ({"hosts": []}, "non-empty list"),
        ({"hosts": ["host=a", "host=a"]}, "listed twice"),
        ({"hosts": ["host=a,b,c port=1,2"]}, "3 hosts but 2 ports"),
        ({"primary": "host=a,b", "replicas": ["host=c"]}, "multi-host primary"),
        ({"hosts": ["host=a"], "rollout": 5}, "rollout needs a shared primary"),
        ({"hosts": ["host=a"], "patroni": ["db1:8008"]}, "expected http://host:port"),
        ({"primary": "host=a", "patroni": "http://db1:8008"}, "needs hosts"),
    ]
    for entry, message in bad:
        with pytest.raises(pgreplica.ConfigError, match=message):
            Settings.from_dict({"databases": {"main": entry}})


def test_the_prober_finds_the_primary_whatever_the_order(cluster: LocalCluster) -> None:
    cluster.execute(0, TABLE)
    cluster.wait_replayed()
    hosts = [cluster.dsn(2), cluster.dsn(0), cluster.dsn(1)]
    with pgreplica.LoadBalancer(config={"databases": {"main": {"hosts": hosts}}}) as lb:
        route = lb._router.route("main")
        assert route.primary.label == Dsn(cluster.dsn(0)).label
        assert route.primary_problem is None
        assert {h.label for h in route.replicas} == {
            Dsn(cluster.dsn(1)).label,
            Dsn(cluster.dsn(2)).label,
        }
        with lb.write() as conn:
            conn.execute("SELECT 1")
            assert conn.execute("SELECT inet_server_port()").fetchone()[0] == cluster.port(0)
        with lb.read() as conn:
            port = conn.execute("SELECT inet_server_port()").fetchone()[0]
        assert port in (cluster.port(1), cluster.port(2))
        assert {s.role for s in lb.status()} == {"primary", "replica"}


class Workload:
    """Threads that write a row and read it back, in a loop, recording every outcome:
    acknowledged ids, stale reads, errors by reason, and when writes failed."""

    def __init__(self, lb: pgreplica.LoadBalancer, ports: dict[int, str]) -> None:
        self.lb = lb
        self.ports = ports
        self.acked: list[tuple[int, str]] = []
        self.stale = 0
        self.read_errors: list[str] = []
        self.write_errors: list[tuple[float, str, float]] = []
        self.write_ok: list[tuple[float, str]] = []
        self.reads_on: dict[str, int] = {}
        self._stop = threading.Event()
        self._next = iter(range(10**9))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(3)]

    def __enter__(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, index: int) -> None:
        lb = self.lb
        while not self._stop.is_set():
            with self._lock:
                item = next(self._next) * 10 + index
            with lb.isolated():
                started = time.monotonic()
                try:
                    with lb.write() as conn:
                        conn.execute("INSERT INTO disc_items VALUES (%s)", (item,))
                        port = conn.execute("SELECT inet_server_port()").fetchone()[0]
                except pgreplica.HostUnavailable as exc:
                    self.write_errors.append((started, exc.reason, time.monotonic() - started))
                    time.sleep(0.02)
                    continue
                except Exception as exc:  # in flight on the primary that died
                    self.write_errors.append((started, type(exc).__name__, 0.0))
                    time.sleep(0.02)
                    continue
                where = self.ports.get(port, str(port))
                self.acked.append((item, where))
                self.write_ok.append((time.monotonic(), where))
                try:
                    with lb.read() as conn:
                        row = conn.execute(
                            "SELECT id FROM disc_items WHERE id = %s", (item,)
                        ).fetchone()
                        port = conn.execute("SELECT inet_server_port()").fetchone()[0]
                except pgreplica.HostUnavailable as exc:
                    self.read_errors.append(exc.reason)
                    continue
                except psycopg.OperationalError as exc:  # in flight on the server killed
                    self.read_errors.append(type(exc).__name__)
                    continue
                self.stale += row is None
                where = self.ports.get(port, str(port))
                self.reads_on[where] = self.reads_on.get(where, 0) + 1


def test_a_failover_a_split_brain_and_back(
    scratch_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = scratch_cluster
    cluster.execute(0, TABLE)
    cluster.wait_replayed()
    ports = {cluster.port(0): "node0", cluster.port(1): "node1"}
    hosts = [Dsn(cluster.dsn(0)), Dsn(cluster.dsn(1))]
    config = {"databases": {"main": {"hosts": [h.conninfo for h in hosts]}}, "probe_interval": 0.1}
    caplog.set_level(logging.INFO, logger="pgreplica")
    with pgreplica.LoadBalancer(config=config) as lb:
        route = lb._router.route("main")
        with Workload(lb, ports) as load:
            time.sleep(1.0)
            killed_at = time.monotonic()
            cluster.kill(0)
            wait_until(lambda: route.primary_problem == "no_primary", timeout=10, what="gap")
            time.sleep(0.5)  # writes fail fast during the gap
            cluster.promote(1)
            promoted_at = time.monotonic()
            wait_until(
                lambda: any(p == "node1" for _, p in load.write_ok), timeout=20, what="failover"
            )
            first_write = min(t for t, p in load.write_ok if p == "node1")
            time.sleep(1.0)
            cluster.start(0)  # the old primary comes back, not demoted: split brain
            wait_until(lambda: route.primary_problem == "split_brain", timeout=20, what="split")
            time.sleep(0.5)
            cluster.kill(0)  # fenced at last
            wait_until(lambda: route.primary_problem is None, timeout=20, what="resolved")
            time.sleep(1.0)
        assert route.primary.label == hosts[1].label
    gap_errors = [e for e in load.write_errors if e[0] > killed_at and e[1] == "no_primary"]
    split_errors = [e for e in load.write_errors if e[1] == "split_brain"]
    print(
        f"first write on the new primary: {first_write - promoted_at:.3f} s after it was"
        f" promoted ({first_write - killed_at:.2f} s after the kill, 0.5 s of it waiting);"
        f" writes acked {len(load.acked)}, stale reads {load.stale},"
        f" write errors {len(load.write_errors)}, reads on {load.reads_on}"
    )
    assert load.stale == 0
    assert gap_errors and max(e[2] for e in gap_errors) < 1.0  # fail fast
    assert split_errors and max(e[2] for e in split_errors) < 1.0
    assert "primary_changed database=main" in caplog.text
    assert "split_brain database=main" in caplog.text
    # Every write acknowledged by the new primary is there; what the old primary had
    # acknowledged but not yet shipped is replication's loss, reported, not pgreplica's.
    present = {r[0] for r in cluster.execute(1, "SELECT id FROM disc_items")}
    assert {i for i, where in load.acked if where == "node1"} <= present
    lost = [i for i, where in load.acked if i not in present]
    print(f"acknowledged by the old primary and lost by asynchronous replication: {len(lost)}")


def test_a_demoted_primary_rejoins_as_a_replica_once_it_qualifies() -> None:
    """The router's decision from probe results (no server can be demoted here without
    a rewind): an old primary that comes back in recovery on the new timeline joins
    the read set; while it is behind, or on the old timeline, it does not."""
    from pgreplica.balancer import Router

    settings = Settings.from_dict(
        {"databases": {"main": {"hosts": ["host=a", "host=b", "host=c"]}}}
    )
    router = Router(settings)
    route = router.route("main")
    a, b, c = route.members
    assert route.primary_problem == "no_primary"  # nothing probed yet
    sysid = "7300000000000000001"
    a.record_probe(False, 5000, None, None, timeline=1, system_identifier=sysid, flush_lsn=5000)
    b.record_probe(True, 5000, 5000, 0.0, timeline=1, system_identifier=sysid)
    c.record_probe(True, 5000, 5000, 0.0, timeline=1, system_identifier=sysid)
    router.refresh()
    assert route.primary is a and route.primary_problem is None
    assert set(route.read_set) == {b, c}
    # a fails; b is promoted (timeline 2)
    a.record_failure("OperationalError", "killed")
    router.refresh()
    assert route.primary_problem == "no_primary" and route.primary is a
    far = 50_000_000  # beyond max_lag_bytes (8 MiB) from what a will have replayed
    b.record_probe(False, far, None, None, timeline=2, system_identifier=sysid, flush_lsn=far)
    c.record_probe(True, far, far, 0.0, timeline=2, system_identifier=sysid)
    router.refresh()
    assert route.primary is b and route.primary_problem is None
    assert b.configured_primary and not a.configured_primary
    assert set(route.read_set) == {c}
    # a comes back demoted, on the new timeline but far behind: not yet
    a.record_probe(True, 100, 100, 3600.0, timeline=2, system_identifier=sysid)
    router.refresh()
    assert a in route.replicas and a not in route.read_set
    # caught up, but still on the old timeline (not following the new primary): no
    a.record_probe(True, far, far, 0.0, timeline=1, system_identifier=sysid)
    router.refresh()
    assert a not in route.read_set
    # caught up on the new timeline: it reads again
    a.record_probe(True, far, far, 0.0, timeline=2, system_identifier=sysid)
    router.refresh()
    assert set(route.read_set) == {a, c}


def test_an_asyncio_balancer_finds_the_primary_for_every_kind_of_unit(
    cluster: LocalCluster,
) -> None:
    """The same discovery through AsyncLoadBalancer: write units, read units and the
    routing connection go where the probes found the roles."""
    import asyncio

    cluster.execute(0, TABLE)
    cluster.wait_replayed()
    hosts = [cluster.dsn(1), cluster.dsn(0), cluster.dsn(2)]
    replicas = {cluster.port(1), cluster.port(2)}

    async def scenario() -> tuple[int, int, int, int]:
        config = {"databases": {"main": {"hosts": hosts}}}
        async with pgreplica.AsyncLoadBalancer(config=config) as alb:
            async with alb.write() as conn:
                cur = await conn.execute("SELECT inet_server_port()")
                written = (await cur.fetchone())[0]
            cluster.wait_replayed()
            async with alb.read() as conn:
                cur = await conn.execute("SELECT inet_server_port()")
                read = (await cur.fetchone())[0]
            async with alb.connection() as conn:
                await conn.set_autocommit(True)
                cur = await conn.execute("SELECT inet_server_port()")
                routed_read = (await cur.fetchone())[0]
                cur = await conn.execute(
                    "INSERT INTO disc_items VALUES (-1) ON CONFLICT DO NOTHING"
                    " RETURNING inet_server_port()"
                )
                row = await cur.fetchone()
                routed_write = row[0] if row else cluster.port(0)
            return written, read, routed_read, routed_write

    written, read, routed_read, routed_write = asyncio.run(scenario())
    assert written == cluster.port(0) and routed_write == cluster.port(0)
    assert read in replicas and routed_read in replicas
