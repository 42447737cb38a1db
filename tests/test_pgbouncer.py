"""pgreplica through real PgBouncer processes, in session and in transaction pooling mode.

One PgBouncer per mode (tests/pgbouncer_server.py) stands in front of the primary and
both replicas of the session cluster, one ``[databases]`` entry per server, so every
connection pgreplica makes (pools, probes, caught-up checks) goes through it.
``inet_server_port()`` reports the port of the PostgreSQL server behind PgBouncer.

Transaction pooling needs ``transaction_pooling = true``: connections that never prepare
statements (``test_transaction_pooling_breaks_prepared_statements`` shows what happens
without it), and routing connections that refuse a session-level ``SET``, which would
leak to other clients (``test_transaction_pooling_refuses_session_state``); ``SET
LOCAL`` in a transaction works.
See docs/deployment.md, "PgBouncer in front of the servers".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgreplica
from pgbouncer_server import (  # noqa: F401  (fixtures)
    PgBouncer,
    UnpreparedLoadBalancer,
    pgbouncer_binary,
    pgbouncer_database,
    pgbouncer_factory,
    pgbouncer_session,
    pgbouncer_transaction,
)
from pgreplica import LoadBalancer
from pgreplica.health import HostStatus
from pgreplica.testing import LocalCluster, lsn_to_int

#: Without a pgbouncer binary every test is skipped before the cluster starts.
pytestmark = pytest.mark.usefixtures("pgbouncer_binary")

UP_TIMEOUT = 10.0
#: SQLSTATEs of a protocol-level prepared statement that is missing on the server
#: connection PgBouncer picked, or that another client prepared there under that name.
PREPARED_SQLSTATES = frozenset({"26000", "42P05"})


@pytest.fixture(params=["session", "transaction"])
def bouncer(request: pytest.FixtureRequest) -> PgBouncer:
    """The session's PgBouncer of each pool mode in turn."""
    found: PgBouncer = request.getfixturevalue(f"pgbouncer_{request.param}")
    return found


@pytest.fixture(scope="module")
def ryw_table(cluster: LocalCluster, pgbouncer_database: str) -> str:  # noqa: F811
    """A table in the PgBouncers' database, written by the tests."""
    dsn = cluster.dsn(0)
    dsn = f"{dsn[: dsn.rindex('/')]}/{pgbouncer_database}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS pgbouncer_ryw (id bigserial PRIMARY KEY, mode text)"
        )
    cluster.wait_replayed()
    return "pgbouncer_ryw"


def balancer(bouncer: PgBouncer, **options: Any) -> LoadBalancer:
    """A LoadBalancer whose primary and replicas are the PgBouncer DSNs; under
    transaction pooling its connections do not prepare statements."""
    cls = UnpreparedLoadBalancer if bouncer.pool_mode == "transaction" else LoadBalancer
    return cls(primary=bouncer.primary_dsn, replicas=bouncer.replica_dsns, **options)


def wait_up(lb: LoadBalancer, timeout: float = UP_TIMEOUT) -> list[HostStatus]:
    """Every host up (a replica restarted by the previous test may need a moment: after
    a failed server login PgBouncer waits ``server_login_retry`` before the next)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = lb.status()
        if all(s.state == "up" for s in statuses):
            return statuses
        if time.monotonic() > deadline:
            pytest.fail(f"hosts not up through PgBouncer within {timeout:g}s: {statuses}")
        time.sleep(0.05)


def server_of(label: str) -> int:
    """``127.0.0.1:6432/server2`` -> 2."""
    return int(label.rsplit("/server", 1)[1])


def replica_ports(cluster: LocalCluster) -> set[int]:
    return {cluster.port(i) for i in range(1, cluster.replicas + 1)}


def test_pgbouncer_s_default_startup_parameters_are_enough(
    pgbouncer_factory: Callable[..., PgBouncer],  # noqa: F811
) -> None:
    """pgreplica sends no startup ``options`` (PgBouncer refuses them unless told to
    ignore them): its probes bound themselves with SET LOCAL in their own query."""
    strict = pgbouncer_factory("session", ignore_startup_parameters="")
    with LoadBalancer(primary=strict.primary_dsn, replicas=strict.replica_dsns) as lb:
        assert [s.state for s in wait_up(lb)] == ["up"] * 3
        with lb.write() as conn:
            conn.execute("SELECT 1")


def test_roles_reads_writes_and_token(
    bouncer: PgBouncer, cluster: LocalCluster, ryw_table: str
) -> None:
    """Probes find the roles; reads go to the replicas, writes to the primary; the
    commit's WAL position becomes the token, and a replica that replayed it serves the
    next read."""
    with balancer(bouncer) as lb:
        statuses = wait_up(lb)
        roles = {server_of(s.host): s.role for s in statuses}
        assert roles == {0: "primary", 1: "replica", 2: "replica"}
        ports = Counter[int]()
        for _ in range(10):
            with lb.read() as conn:
                row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
                assert conn.on_replica and conn.reason == "replica"
            assert row is not None and row[1] is True
            ports[row[0]] += 1
        assert set(ports) == replica_ports(cluster)

        with lb.write() as conn:
            row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
            conn.execute(f"INSERT INTO {ryw_table} (mode) VALUES ('token')")
        assert row == (cluster.port(0), False)
        position = lb.token().get("main")
        assert 0 < position <= lsn_to_int(cluster.execute(0, "SELECT pg_current_wal_lsn()")[0][0])
        cluster.wait_replayed()
        with lb.read() as conn:
            assert conn.on_replica, conn.reason


def test_read_your_writes_under_replay_delay(
    bouncer: PgBouncer, healthy_cluster: LocalCluster, ryw_table: str
) -> None:
    """Both replicas replay 300 ms late: every read after a write sees it (on the
    primary, or on a replica once it has replayed the token), none is stale."""
    cluster = healthy_cluster
    with balancer(bouncer) as lb:
        wait_up(lb)
        cluster.lag(1, "300ms")
        cluster.lag(2, "300ms")
        try:
            stale = 0
            reasons = Counter[str]()
            for cycle in range(10):
                with lb.write() as conn:
                    cur = conn.execute(
                        f"INSERT INTO {ryw_table} (mode) VALUES (%s) RETURNING id",
                        [bouncer.pool_mode],
                    )
                    row = cur.fetchone()
                assert row is not None
                with lb.read() as conn:
                    cur = conn.execute(f"SELECT count(*) FROM {ryw_table} WHERE id = %s", row)
                    found = cur.fetchone()
                    reasons[conn.reason] += 1
                stale += found != (1,)
                if cycle % 3 == 2:
                    time.sleep(0.35)  # a replica has it now: reads may go back there
            assert stale == 0, reasons
            assert reasons["replicas_behind"] > 0, reasons  # the delay was real
        finally:
            cluster.lag(1, 0)
            cluster.lag(2, 0)


def test_caught_up_checks(bouncer: PgBouncer, cluster: LocalCluster, ryw_table: str) -> None:
    """With probes too rare to know, a read after a write asks a replica directly how
    far it has replayed (the caught-up check), through PgBouncer, more often than
    ``prepare_threshold`` on each replica's connection. (A commit that ends at a WAL
    page boundary leaves a token the replicas reach only with the next write: that
    read goes to the primary, hence "almost every time".)"""
    with balancer(bouncer, probe_interval=30.0) as lb:
        wait_up(lb)
        reasons = Counter[str]()
        for _ in range(12):
            with lb.write() as conn:
                conn.execute(f"INSERT INTO {ryw_table} (mode) VALUES (%s)", [bouncer.pool_mode])
            cluster.wait_replayed()
            with lb.read() as conn:
                conn.execute("SELECT 1").fetchone()
                reasons[conn.reason] += 1
        assert reasons["replica_checked"] >= 10, reasons
        assert set(reasons) <= {"replica_checked", "replicas_behind"}, reasons


def test_same_query_many_times(
    bouncer: PgBouncer, cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The same statements run far more often than psycopg's ``prepare_threshold``
    (5), on reads, writes and probes, from four threads, for more than a second: no
    error, no host marked down, and each statement returns its own row."""
    caplog.set_level(logging.WARNING, logger="pgreplica")
    ports = replica_ports(cluster)
    errors: list[BaseException] = []
    with balancer(bouncer) as lb:
        wait_up(lb)
        started = time.monotonic()

        def work(k: int) -> None:
            try:
                for i in range(20):
                    with lb.read() as conn:
                        row = conn.execute(
                            f"SELECT {k} AS k, %s::int, inet_server_port()", [i]
                        ).fetchone()
                    assert row is not None and row[:2] == (k, i) and row[2] in ports, row
                    # The write's token would send the next read to the primary until
                    # a replica replays it: keep it out of this thread's context.
                    with lb.isolated(), lb.write() as conn:
                        row = conn.execute(f"SELECT {k} AS k, %s::int", [i]).fetchone()
                    assert row == (k, i)
                    time.sleep(0.01)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Let the probes run more than prepare_threshold times on their connections.
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        statuses = lb.status()
    assert not errors, errors
    assert [s.state for s in statuses] == ["up"] * 3, statuses
    offline = [r.getMessage() for r in caplog.records if "host_offline" in r.getMessage()]
    assert not offline


def test_transaction_pooling_breaks_prepared_statements(
    pgbouncer_factory: Callable[..., PgBouncer],  # noqa: F811
) -> None:
    """Why transaction pooling needs ``transaction_pooling = true``: by default psycopg
    prepares a statement after 5 executions on a connection, under a name (``_pg3_0``)
    that every client connection uses; PgBouncer hands each transaction whichever
    server connection is free, so another client's statement of that name is already
    there (42P05), or this one's is not (26000)."""
    shared = pgbouncer_factory("transaction", default_pool_size="2")
    seen: list[str] = []
    stop = threading.Event()
    with LoadBalancer(primary=shared.primary_dsn, replicas=shared.replica_dsns) as lb:

        def reader(query: str) -> None:
            while not stop.is_set():
                try:
                    with lb.read() as conn:
                        conn.execute(query).fetchone()
                except psycopg.Error as exc:
                    if exc.sqlstate not in PREPARED_SQLSTATES:
                        raise
                    seen.append(f"read: {exc.sqlstate}")
                    stop.set()

        threads = [threading.Thread(target=reader, args=(f"SELECT {i} + 1",)) for i in range(4)]
        for thread in threads:
            thread.start()
        stop.wait(10.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert seen, "no prepared-statement failure through transaction pooling"


def test_routing_connection_session_pooling(
    pgbouncer_session: PgBouncer,  # noqa: F811
    cluster: LocalCluster,
    ryw_table: str,
) -> None:
    """Session pooling: a session ``SET`` runs on the connection it is routed to and is
    replayed on every server connection the routing connection takes later (replicas
    and the primary), in autocommit and in read-only transactions; closing the routing
    connection leaves nothing behind for the next client."""
    bouncer = pgbouncer_session
    ports = replica_ports(cluster)
    with balancer(bouncer) as lb:
        wait_up(lb)
        with lb.connection() as conn:
            conn.autocommit = True
            conn.execute("SET statement_timeout = '5s'")
            for _ in range(5):
                row = conn.execute(
                    "SELECT current_setting('statement_timeout'), inet_server_port()"
                ).fetchone()
                assert row is not None and row[0] == "5s" and row[1] in ports, row
                assert conn.reason == "replica"
            conn.execute(f"INSERT INTO {ryw_table} (mode) VALUES ('routing')")
            assert conn.reason == "write" and server_of(str(conn.host)) == 0
            with lb.primary():
                row = conn.execute("SHOW statement_timeout").fetchone()
            assert row == ("5s",) and server_of(str(conn.host)) == 0
            conn.autocommit = False
            conn.read_only = True
            row = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
            assert row == ("5s",) and conn.reason == "read_only_transaction"
            conn.commit()
        for index in range(cluster.replicas + 1):
            with psycopg.connect(bouncer.dsn(index), autocommit=True) as other:
                assert other.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_routing_connection_transaction_pooling(
    pgbouncer_transaction: PgBouncer,  # noqa: F811
    cluster: LocalCluster,
    ryw_table: str,
) -> None:
    """Transaction pooling: autocommit reads and writes, transactions (read-write on
    the primary, read-only on a replica) and ``SET LOCAL`` inside them work; nothing
    stays on the server connections."""
    bouncer = pgbouncer_transaction
    ports = replica_ports(cluster)
    with balancer(bouncer) as lb:
        wait_up(lb)
        with lb.connection() as conn:
            conn.autocommit = True
            for _ in range(8):
                row = conn.execute("SELECT inet_server_port()").fetchone()
                assert row is not None and row[0] in ports and conn.reason == "replica"
            cur = conn.execute(f"INSERT INTO {ryw_table} (mode) VALUES ('tx') RETURNING id")
            inserted = cur.fetchone()
            assert server_of(str(conn.host)) == 0
            row = conn.execute(f"SELECT count(*) FROM {ryw_table} WHERE id = %s", inserted)
            assert row.fetchone() == (1,)
            with conn.transaction():
                conn.execute("SET LOCAL statement_timeout = '5s'")
                row = conn.execute("SELECT current_setting('statement_timeout'), 1").fetchone()
                assert row == ("5s", 1) and server_of(str(conn.host)) == 0
            cluster.wait_replayed()
            with lb.read_only(), conn.transaction():
                conn.execute("SET LOCAL statement_timeout = '5s'")
                row = conn.execute(
                    "SELECT current_setting('statement_timeout'), inet_server_port()"
                ).fetchone()
                assert row is not None and row[0] == "5s" and row[1] in ports
            for _ in range(4):
                assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_transaction_pooling_refuses_session_state(
    pgbouncer_factory: Callable[..., PgBouncer],  # noqa: F811
) -> None:
    """A session ``SET`` through transaction pooling would stay on the server connection
    PgBouncer lent for that one statement, which serves other clients next: refused,
    with the reason, before it runs; nothing leaks. ``SET LOCAL`` works."""
    shared = pgbouncer_factory("transaction", default_pool_size="1")
    lb = UnpreparedLoadBalancer(primary=shared.primary_dsn, replicas=shared.replica_dsns)
    with lb:
        wait_up(lb)
        with lb.connection() as conn:
            conn.autocommit = True
            for statement in (
                "SET statement_timeout = '5s'",
                "SELECT set_config('statement_timeout', '5s', false)",
                "CREATE TEMP TABLE pgb_temp (a int)",
                "LISTEN pgb_channel",
                "PREPARE pgb_stmt AS SELECT 1",
            ):
                with pytest.raises(pgreplica.PgReplicaError, match="transaction_pooling"):
                    conn.execute(statement)
            conn.execute("SELECT 1")
            index = server_of(str(conn.host))
            with psycopg.connect(shared.dsn(index), autocommit=True) as other:
                assert other.execute("SHOW statement_timeout").fetchone() == ("0",)
            conn.autocommit = False
            conn.execute("SET LOCAL statement_timeout = '5s'")
            assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
            conn.commit()


def test_replica_killed_behind_pgbouncer(bouncer: PgBouncer, healthy_cluster: LocalCluster) -> None:
    """A replica crashes behind PgBouncer (PgBouncer stays up): readers see no error;
    reads move to the other replica (or the primary) and the host is marked down. Once
    restarted, it is up again through PgBouncer (after ``server_login_retry``).

    The balancer is closed only after that. Under session pooling a probe of the dead
    replica waits inside PgBouncer for a server connection: the prober's wait for the
    system identifier cancels the query and waits for the cancellation, which
    PgBouncer does not act on, and a balancer closed meanwhile leaves that connection
    open (a ResourceWarning, an error in this suite)."""
    cluster = healthy_cluster
    errors: list[BaseException] = []
    ports = Counter[int]()
    after_kill = Counter[int]()
    killed = threading.Event()
    stop = threading.Event()
    with balancer(bouncer) as lb:
        wait_up(lb)

        def reader() -> None:
            while not stop.is_set():
                try:
                    with lb.read() as conn:
                        row = conn.execute("SELECT inet_server_port()").fetchone()
                except BaseException as exc:
                    errors.append(exc)
                    return
                assert row is not None
                (after_kill if killed.is_set() else ports)[row[0]] += 1

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.3)
            cluster.kill(1)
            killed.set()
            time.sleep(1.5)
            statuses = {server_of(s.host): s.state for s in lb.status()}
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            cluster.start(1)
        wait_up(lb)
    assert not errors, errors
    assert ports[cluster.port(1)] > 0 and ports[cluster.port(2)] > 0, ports
    assert sum(after_kill.values()) > 100, after_kill
    assert statuses[1] in ("down", "half_open"), statuses
    assert statuses[0] == statuses[2] == "up", statuses
