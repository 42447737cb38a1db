"""Routing, read-your-writes and scopes, on the real local cluster."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgreplica
from pgreplica.testing import LocalCluster
from pgreplica.workload import gathered, prepare, threaded, wait_until
from secrets_registry import register_secret

register_secret("S3cr3t-pw", "test DSN password")


def host_state(lb: pgreplica.LoadBalancer, port: int) -> str:
    return next(s.state for s in lb.status() if s.host.startswith(f"127.0.0.1:{port}/"))


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    balancer = pgreplica.LoadBalancer(config=healthy_cluster.config())
    prepare(balancer, range(64))
    healthy_cluster.wait_replayed()  # the table exists on the replicas before any read
    yield balancer
    balancer.close()


def test_reads_go_to_replicas_and_writes_to_primary(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    replica_ports = {healthy_cluster.port(1), healthy_cluster.port(2)}
    seen = set()
    for _ in range(20):
        with lb.read() as conn:
            port = conn.execute("SELECT inet_server_port()").fetchone()[0]
            assert conn.on_replica and conn.reason == "replica"
            seen.add(port)
    assert seen == replica_ports  # both replicas take reads
    with lb.write() as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == healthy_cluster.port(0)
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False


def test_commit_advances_token_once_and_only_on_commit(lb: pgreplica.LoadBalancer) -> None:
    with lb.isolated():
        assert not lb.token()
        with lb.write() as conn:
            conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 0")
            assert not lb.token()  # not before the commit
        after = lb.token().get("main")
        with lb.write() as conn:
            current = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        assert after > 0
        assert pgreplica.parse_lsn(current) >= after
        before_failure = lb.token()
        with pytest.raises(psycopg.errors.DivisionByZero), lb.write() as conn:
            conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 0")
            conn.execute("SELECT 1/0")
        assert lb.token() == before_failure or lb.token().covers(before_failure)


def test_read_your_writes_under_lag_threads(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    healthy_cluster.lag(1, "300ms")
    tally = threaded(lb, range(0, 4), cycles=500)
    assert tally.errors == []
    assert tally.cycles == 2000
    assert tally.stale == 0
    # The replica without lag serves reads; the lagging one never serves a stale one.
    assert tally.hosts[f"127.0.0.1:{healthy_cluster.port(2)}/postgres"] > 0


def test_read_your_writes_all_replicas_lagging_goes_to_primary(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")
    tally = threaded(lb, range(4, 8), cycles=100)
    assert tally.errors == [] and tally.stale == 0
    assert tally.reasons["replicas_behind"] == tally.cycles
    # Reads that carry no token still use the replicas.
    with lb.isolated(), lb.read() as conn:
        assert conn.on_replica


def test_read_your_writes_asyncio_tasks_with_lag(healthy_cluster: LocalCluster) -> None:
    healthy_cluster.lag(2, "300ms")

    async def main() -> Any:
        async with pgreplica.AsyncLoadBalancer(config=healthy_cluster.config()) as alb:
            return await gathered(alb, range(8, 16), cycles=250)

    tally = asyncio.run(main())
    assert tally.errors == []
    assert tally.cycles == 2000 and tally.stale == 0
    assert tally.replica_reads > 0


def test_paused_replay_never_serves_stale_reads(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    result: dict[str, Any] = {}
    until = time.monotonic() + 3.0
    worker = threading.Thread(
        target=lambda: result.setdefault("tally", threaded(lb, range(16, 20), until=until))
    )
    worker.start()
    time.sleep(0.5)
    healthy_cluster.pause(1)
    time.sleep(1.0)
    healthy_cluster.pause(2)
    time.sleep(1.0)
    healthy_cluster.resume(1)
    healthy_cluster.resume(2)
    worker.join()
    tally = result["tally"]
    assert tally.errors == [] and tally.stale == 0
    assert tally.cycles > 100


def test_max_wait_lets_a_lagging_replica_serve(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    healthy_cluster.lag(1, "200ms")
    healthy_cluster.lag(2, "200ms")
    tally = threaded(lb, range(20, 22), cycles=10, read_kwargs={"max_wait": 3.0})
    assert tally.errors == [] and tally.stale == 0
    assert tally.replica_reads == tally.cycles


def test_max_staleness_ignores_the_token_within_the_bound(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    healthy_cluster.pause(1)
    healthy_cluster.pause(2)
    with lb.isolated():
        with lb.write() as conn:
            conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 30")
        time.sleep(1.2)  # the replicas' last replayed commit is now > 1 s old
        wait_until(lambda: all(s.lag_bytes for s in lb.status() if s.role == "replica"))
        with lb.read(max_staleness=0.5) as conn:
            assert not conn.on_replica
        with lb.read(max_staleness=60) as conn:
            assert conn.on_replica
        with lb.read() as conn:  # the token still protects ordinary reads
            assert not conn.on_replica and conn.reason == "replicas_behind"


def test_scopes_nest_restore_and_keep_own_writes(lb: pgreplica.LoadBalancer) -> None:
    adopted = pgreplica.CausalToken({"main": 1})
    with lb.isolated():
        with lb.primary():
            with lb.read() as conn:
                assert conn.reason == "primary_scope"
            with lb.causal(adopted):
                assert lb.token().get("main") == 1
                with lb.write() as conn:
                    conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 31")
                written = lb.token()
            # the adopted token is dropped, the context's own write is kept
            assert lb.token() == written
        with lb.read() as conn:
            assert conn.reason != "primary_scope"
        assert lb.token() == written
    assert lb.token() != written  # isolated() restored the outer state


def test_context_isolation_between_tasks_and_threads(lb: pgreplica.LoadBalancer) -> None:
    async def writer(done: asyncio.Event) -> pgreplica.CausalToken:
        with lb.write() as conn:
            conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 32")
        done.set()
        return lb.token()

    async def other(done: asyncio.Event) -> pgreplica.CausalToken:
        await done.wait()
        return lb.token()

    async def main() -> tuple[pgreplica.CausalToken, pgreplica.CausalToken]:
        done = asyncio.Event()
        return await asyncio.gather(writer(done), other(done))

    written, untouched = contextvars.Context().run(asyncio.run, main())
    assert written and not untouched

    tokens: dict[str, pgreplica.CausalToken] = {}

    def thread_write() -> None:
        with lb.write() as conn:
            conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 33")
        tokens["writer"] = lb.token()

    def thread_read() -> None:
        tokens["reader"] = lb.token()

    t = threading.Thread(target=thread_write)
    t.start()
    t.join()
    t = threading.Thread(target=thread_read)
    t.start()
    t.join()
    assert tokens["writer"] and not tokens["reader"]


def test_a_write_through_a_read_connection_runs_on_the_primary(
    lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    sql = "UPDATE rw_counters SET v = v + 1 WHERE id = 34 RETURNING v"
    with caplog.at_level(logging.WARNING, logger="pgreplica"), lb.isolated():
        with lb.read() as conn:
            assert conn.on_replica
            host = conn.host
            row = conn.execute(sql).fetchone()
            assert not conn.on_replica and conn.reason == "read_only_retry"
        token = lb.token()
        assert token  # it wrote: the context's reads must see it
        with lb.read() as conn:
            row2 = conn.execute("SELECT v FROM rw_counters WHERE id = 34").fetchone()
    assert row is not None and row2 == row
    assert "standby_refused database=main" in caplog.text and "sqlstate=25006" in caplog.text
    state = next(s.state for s in lb.status() if s.host == host)
    assert state == "up"  # never marked down for a statement it refused
    assert "host_offline" not in caplog.text
    # learned: the same statement goes to the primary at once, without a refusal
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pgreplica"), lb.isolated(), lb.read() as conn:
        conn.execute(sql)
        assert not conn.on_replica and conn.reason == "standby_refused"
    assert "db_routing_fallback" not in caplog.text


def test_a_write_inside_a_read_transaction_is_a_routing_error(lb: pgreplica.LoadBalancer) -> None:
    with lb.read() as conn:
        assert conn.on_replica
        host = conn.host
        with pytest.raises(pgreplica.RoutingError) as info, conn.transaction():
            conn.execute("UPDATE rw_counters SET v = 0 WHERE id = 36 /* in a transaction */")
    assert info.value.host == host
    assert isinstance(info.value, psycopg.errors.ReadOnlySqlTransaction)


def test_tokens_round_trip_through_a_signed_cookie(lb: pgreplica.LoadBalancer) -> None:
    key = b"cookie-key"
    with lb.isolated():
        with lb.write() as conn:
            conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 35 RETURNING v")
        cookie = lb.token().sign(key)
    # another request, another context: adopt the verified token
    with lb.isolated(), lb.causal(pgreplica.CausalToken.verify(cookie, key)), lb.read() as conn:
        assert conn.execute("SELECT v FROM rw_counters WHERE id = 35").fetchone()[0] >= 1
    with pytest.raises(pgreplica.TokenError):
        pgreplica.CausalToken.verify(cookie.replace("main=0", "main=1"), key)


def test_several_databases_share_a_primary_with_their_own_replicas(
    healthy_cluster: LocalCluster,
) -> None:
    config = {
        "databases": {
            "main": {"primary": healthy_cluster.primary_dsn, "replicas": [healthy_cluster.dsn(1)]},
            "ci": {"primary": "main", "replicas": [healthy_cluster.dsn(2)]},
        }
    }
    with pgreplica.LoadBalancer(config=config) as lb, lb.isolated():
        with lb.read(database="ci") as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone()[0] == healthy_cluster.port(
                2
            )
        with lb.read() as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone()[0] == healthy_cluster.port(
                1
            )
        with lb.write(database="ci") as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone()[0] == healthy_cluster.port(
                0
            )
        token = lb.token()
        # one primary: a write through ci is a write the main replicas must have seen
        assert token.get("ci") == token.get("main") > 0
        with pytest.raises(pgreplica.ConfigError, match="no database 'nope'"):
            lb.read(database="nope").__enter__()


def test_kill_switch_opens_no_replica_connection(
    healthy_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGREPLICA_ENABLED", "false")
    app = f"killswitch-{uuid.uuid4().hex[:8]}"
    with pgreplica.LoadBalancer(config=healthy_cluster.config(), application_name=app) as lb:
        assert not lb.settings.enabled
        for _ in range(5):
            with lb.read() as conn:
                assert not conn.on_replica and conn.reason == "no_replicas"
        with lb.write() as conn:
            conn.execute("SELECT 1")
        assert [s.role for s in lb.status()] == ["primary"]
        for index in (1, 2):
            rows = healthy_cluster.execute(
                index, f"SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{app}%'"
            )
            assert rows[0][0] == 0
        rows = healthy_cluster.execute(
            0, f"SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{app}%'"
        )
        assert rows[0][0] > 0  # the check above would see connections if there were any


def test_primary_down_writes_fail_fast_and_replicas_keep_serving(
    healthy_cluster: LocalCluster,
) -> None:
    dead_primary = "postgresql://postgres:S3cr3t-pw@127.0.0.1:1/postgres"
    with pgreplica.LoadBalancer(
        primary=dead_primary, replicas=[healthy_cluster.dsn(1), healthy_cluster.dsn(2)]
    ) as lb:
        lb.open()
        with pytest.raises(pgreplica.PrimaryUnavailable) as info, lb.write():
            pass
        assert isinstance(info.value, psycopg.OperationalError)
        assert "S3cr3t-pw" not in str(info.value)
        with lb.read() as conn:
            assert conn.on_replica
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # a read that needs a position no replica has, with the primary down: clear error
        with (
            lb.causal(pgreplica.CausalToken({"main": 2**62})),
            pytest.raises(pgreplica.HostUnavailable),
        ):
            lb.read().__enter__()


def test_status_reports_roles_and_lag(lb: pgreplica.LoadBalancer) -> None:
    with lb.read():
        pass
    status = lb.status()
    assert [s.role for s in status] == ["primary", "replica", "replica"]
    for s in status:
        assert s.state == "up"
        assert s.replay_lsn is not None
    for s in status[1:]:
        assert s.lag_bytes is not None and s.lag_bytes < 8 * 1024 * 1024


def test_each_routed_unit_logs_where_and_why_at_debug(
    lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="pgreplica.routing"), lb.isolated():
        with lb.read() as conn:
            host = conn.host
        with lb.write():
            pass
    assert f"routed_to={host} reason=replica database=main" in caplog.text
    assert "reason=write database=main" in caplog.text
