"""The causal token follows what the server did, tokens cannot hurt the service, and
every path keeps the same health verdict (issue: real deployments).

Stale-read tests pause WAL replay on both replicas: a read whose token did not advance
goes to a replica that lacks the row, so the test fails on code that guesses."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterator

import psycopg
import pytest

import pgreplica
from pgreplica import jobs
from pgreplica.balancer import UNKNOWN_POSITION
from pgreplica.config import Dsn
from pgreplica.context import current_state, record_write
from pgreplica.health import Backoff, BreakerState, Host, Prober
from pgreplica.lsn import CausalToken
from pgreplica.testing import LocalCluster

SCHEMA = """
CREATE TABLE IF NOT EXISTS st_items (id serial PRIMARY KEY, v text NOT NULL);
CREATE OR REPLACE FUNCTION st_writer(text) RETURNS int LANGUAGE plpgsql VOLATILE AS
    $$ BEGIN INSERT INTO st_items (v) VALUES ($1); RETURN 1; END $$;
CREATE OR REPLACE FUNCTION st_lying_writer(text) RETURNS int LANGUAGE plpgsql STABLE AS
    $$ BEGIN RETURN st_writer($1); END $$;
"""


@pytest.fixture(scope="module")
def schema(cluster: LocalCluster) -> None:
    cluster.execute(0, SCHEMA)
    cluster.wait_replayed()


@pytest.fixture
def lb(healthy_cluster: LocalCluster, schema: None) -> Iterator[pgreplica.LoadBalancer]:
    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as balancer, balancer.isolated():
        yield balancer


@pytest.fixture
def paused(healthy_cluster: LocalCluster, schema: None) -> Iterator[None]:
    """Both replicas stop replaying: they stay in the read set (within the lag bounds)
    but lack every write made from now on."""
    healthy_cluster.wait_replayed()
    healthy_cluster.pause(1)
    healthy_cluster.pause(2)
    yield
    healthy_cluster.resume(1)
    healthy_cluster.resume(2)


def nonce() -> str:
    return secrets.token_hex(8)


def count(lb: pgreplica.LoadBalancer, value: str) -> int:
    with lb.read() as conn:
        row = conn.execute("SELECT count(*) FROM st_items WHERE v = %s", (value,)).fetchone()
    assert row is not None
    return int(row[0])


# -- the token follows the server --------------------------------------------------------


def test_stable_function_that_writes_in_autocommit_advances_the_token(
    lb: pgreplica.LoadBalancer, paused: None
) -> None:
    value = nonce()
    with lb.connection() as conn:
        conn.autocommit = True
        conn.execute("SELECT st_lying_writer(%s)", (value,))
        assert conn.reason == "read_only_retry"
        row = conn.execute("SELECT count(*) FROM st_items WHERE v = %s", (value,)).fetchone()
        assert row is not None and row[0] == 1
    assert count(lb, value) == 1


def test_stable_function_that_writes_in_a_transaction_advances_the_token(
    lb: pgreplica.LoadBalancer, paused: None
) -> None:
    value = nonce()
    with lb.connection() as conn:  # autocommit off: psycopg's default
        conn.execute("SELECT st_lying_writer(%s)", (value,))
        conn.commit()
    assert count(lb, value) == 1


def test_read_only_transaction_on_the_primary_does_not_advance_the_token(
    lb: pgreplica.LoadBalancer,
) -> None:
    with lb.connection() as conn:
        conn.execute("SELECT count(*) FROM st_items")
        conn.commit()
    assert not lb.token()


def test_set_config_beside_a_write_is_not_replayed_as_session_state(
    lb: pgreplica.LoadBalancer, paused: None
) -> None:
    value = nonce()
    with lb.connection() as conn:
        conn.autocommit = True
        conn.execute("SELECT set_config('app.user', '7', false), st_writer(%s)", (value,))
        # later statements: no "read-only transaction" error, no repeated write
        for _ in range(3):
            row = conn.execute(
                "SELECT count(*), current_setting('app.user') FROM st_items WHERE v = %s",
                (value,),
            ).fetchone()
            assert row == (1, "7")
    assert count(lb, value) == 1


def test_a_batch_committed_before_an_exception_is_in_the_token(
    lb: pgreplica.LoadBalancer, paused: None
) -> None:
    value = nonce()
    with pytest.raises(RuntimeError), lb.write() as conn:
        conn.execute("INSERT INTO st_items (v) VALUES (%s)", (value,))
        conn.commit()  # a batch job committing as it goes
        raise RuntimeError("the second batch failed")
    assert count(lb, value) == 1


def test_a_unit_that_committed_itself_reads_its_position_outside_a_transaction(
    lb: pgreplica.LoadBalancer, paused: None, caplog: pytest.LogCaptureFixture
) -> None:
    value = nonce()
    with caplog.at_level(logging.WARNING, logger="psycopg.pool"), lb.write() as conn:
        conn.execute("INSERT INTO st_items (v) VALUES (%s)", (value,))
        conn.commit()  # nothing left open when the unit ends
    assert "rolling back" not in caplog.text  # no BEGIN for the position read
    assert count(lb, value) == 1
    with caplog.at_level(logging.WARNING, logger="psycopg.pool"), lb.write():
        pass
    assert "rolling back" not in caplog.text


def test_capture_after_reading_the_primary_covers_what_was_read(
    lb: pgreplica.LoadBalancer,
) -> None:
    with lb.write() as conn:
        conn.execute("INSERT INTO st_items (v) VALUES (%s)", (nonce(),))
    own = lb.token().get("main")
    with lb.isolated():  # someone else writes newer data
        with lb.write() as conn:
            conn.execute("INSERT INTO st_items (v) VALUES (%s)", (nonce(),))
        newer = lb.token().get("main")
    assert newer > own
    with lb.primary(), lb.read() as conn:
        conn.execute("SELECT count(*) FROM st_items")
    header = jobs.capture(lb)
    assert CausalToken.from_dict(header).get("main") >= newer


# -- tokens that cannot hurt the service -------------------------------------------------


def test_a_token_from_the_future_is_bounded_after_one_probe(lb: pgreplica.LoadBalancer) -> None:
    forged = CausalToken({"main": 1 << 60})
    with lb.causal(forged):
        deadline = time.monotonic() + 10
        on_replica = False
        while not on_replica and time.monotonic() < deadline:
            with lb.read() as conn:
                conn.execute("SELECT 1")
                on_replica = conn.on_replica
            time.sleep(0.05)
        assert on_replica, "a forged token kept every read on the primary"
        route = lb._router.route("main")
        state = current_state()
        assert lb._router.required(route, state.token, state.grown_at) < 1 << 60


def test_an_unknown_position_sends_reads_to_the_primary_until_a_probe(
    lb: pgreplica.LoadBalancer, paused: None
) -> None:
    value = nonce()
    with lb.write() as conn:
        conn.execute("INSERT INTO st_items (v) VALUES (%s)", (value,))
    route = lb._router.route("main")
    record_write(CausalToken({"main": UNKNOWN_POSITION}))
    with lb.read() as conn:
        assert not conn.on_replica
    # once bounded by a probe, the replicas (paused, behind) still cannot serve it
    time.sleep(0.3)
    assert (
        lb._router.required(route, current_state().token, current_state().grown_at)
        < UNKNOWN_POSITION
    )
    assert count(lb, value) == 1


# -- smaller faults ------------------------------------------------------------------------


def host(primary: bool = False) -> Host:
    return Host(Dsn("host=h port=1 dbname=d"), configured_primary=primary, backoff=Backoff())


def test_a_promoted_replica_proves_no_position() -> None:
    replica = host()
    replica.record_probe(True, 1000, 1000, 0.0)
    replica.record_probe(False, 5000, None, None)
    assert replica.replay_lsn == 0 and replica.role == "promoted"
    primary = host(primary=True)
    primary.record_probe(False, 5000, None, None)
    assert primary.replay_lsn == 5000


def test_request_failures_do_not_lengthen_the_backoff() -> None:
    replica = host()
    assert replica.record_failure("OperationalError", "refused", rand=0.0) is True
    retry_at, failures = replica.retry_at, replica.failures
    for _ in range(20):
        replica.record_failure("OperationalError", "refused", rand=0.0, probe=False)
    assert replica.retry_at == retry_at and replica.failures == failures
    assert replica.state is BreakerState.OPEN


def test_first_round_waits_for_every_host_not_for_a_count() -> None:
    fast, slow = host(), host()
    prober = Prober(
        [fast, slow],
        interval=0.1,
        timeout=0.5,
        connect_timeout=1,
        statement_timeout=0.1,
        application_name="t",
        on_change=lambda: None,
    )
    prober._first_done(fast)
    prober._first_done(fast)
    assert not prober.first_round.is_set()
    prober._first_done(slow)
    assert prober.first_round.is_set()


def test_idle_cluster_replicas_serve_bounded_staleness_reads(
    scratch_cluster: LocalCluster,
) -> None:
    # No commit since the replica started: no replay timestamp, nothing to replay.
    balancer = pgreplica.LoadBalancer(config=scratch_cluster.config())
    with balancer, balancer.read(max_staleness=5) as conn:
        conn.execute("SELECT 1")
        assert conn.on_replica, conn.reason


def test_async_close_waits_for_pool_renewals(healthy_cluster: LocalCluster, schema: None) -> None:
    async def main() -> None:
        alb = pgreplica.AsyncLoadBalancer(config=healthy_cluster.config())
        await alb.open()
        replica = alb._router.route("main").replicas[0]
        alb._renew_pool(replica)  # a renewal in flight when close() starts
        await alb.close()
        assert not alb._background
        assert not alb._pools

    asyncio.run(main())


# -- one health verdict for every path -----------------------------------------------------


def test_routing_connection_writes_fail_fast_when_the_primary_is_down(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    primary = lb._router.route("main").primary
    with lb.connection() as conn:
        conn.autocommit = True
        conn.execute("INSERT INTO st_items (v) VALUES (%s)", (nonce(),))
        healthy_cluster.kill(0)
        deadline = time.monotonic() + 10
        while primary.up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not primary.up
        with pytest.raises(pgreplica.PrimaryUnavailable):
            conn.execute("INSERT INTO st_items (v) VALUES (%s)", (nonce(),))
    with pytest.raises(pgreplica.PrimaryUnavailable), lb.connection() as conn2:
        conn2.execute("INSERT INTO st_items (v) VALUES (%s)", (nonce(),))
    with pytest.raises(pgreplica.PrimaryUnavailable), lb.write() as conn3:
        conn3.execute("SELECT 1")


def test_primary_errors_are_psycopg_operational_errors() -> None:
    assert issubclass(pgreplica.PrimaryUnavailable, psycopg.OperationalError)


def test_a_replica_of_another_cluster_never_serves_reads(
    cluster: LocalCluster, scratch_cluster: LocalCluster
) -> None:
    # A wrong DSN: the "replica" streams from another primary. Its positions say
    # nothing about this primary's writes.
    foreign = scratch_cluster.replica_dsns[0]
    with pgreplica.LoadBalancer(primary=cluster.primary_dsn, replicas=[foreign]) as balancer:
        route = balancer._router.route("main")
        assert route.replicas[0].system_identifier != route.primary.system_identifier
        for _ in range(20):
            with balancer.read(max_staleness=60) as conn:
                conn.execute("SELECT 1")
                assert not conn.on_replica


def test_a_write_whose_position_cannot_be_read_is_never_an_error(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    broken = psycopg.connect(healthy_cluster.primary_dsn, autocommit=True)
    broken.close()  # the connection the write ran on is gone when its position is read
    with lb.isolated(), lb.connection() as conn:
        conn._capture_lsn(broken)  # asks a fresh pooled connection instead
        position = lb.token().get("main")
        assert 0 < position < UNKNOWN_POSITION
    primary = lb._router.route("main").primary
    # and no fresh connection can be had either (its pool closed, the primary held
    # down: the breaker keeps it so for at least 0.1 s, far longer than this takes)
    lb._pools[primary].close()
    primary.record_failure("OperationalError", "injected", rand=0.0)
    with lb.isolated(), lb.connection() as conn:
        conn._capture_lsn(broken)
        assert lb.token().get("main") == UNKNOWN_POSITION
