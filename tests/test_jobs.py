"""pgreplica.jobs, the framework-free core, against the real local cluster: what
capture() puts in a job's headers, and where start_job() sends the job's reads with
and without replication lag. Every lag test has a control showing that a read ignoring
the job's token is stale, so a routing mistake would show as a stale read."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgreplica
from pgreplica import jobs
from pgreplica.context import current_state
from pgreplica.jobs import (
    ENV_SWITCH,
    PRIMARY,
    PRIMARY_NO_WAL,
    REPLICA,
    REPLICA_RETRIED,
    RETRY,
    DataConsistency,
    JobSpec,
    WaitPolicy,
    capture,
    start_job,
)
from pgreplica.lsn import CausalToken, parse_lsn
from pgreplica.testing import LocalCluster

TABLE_SQL = "CREATE TABLE IF NOT EXISTS job_rows (id text PRIMARY KEY, v int NOT NULL)"
INSERT_SQL = "INSERT INTO job_rows (id, v) VALUES (%s, 1)"
SELECT_SQL = "SELECT v FROM job_rows WHERE id = %s"
LAG = "500ms"
SHORT = WaitPolicy(tries=1, interval=0.05)


@pytest.fixture(autouse=True)
def _clean_outcomes(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs.reset_outcomes()
    monkeypatch.delenv(ENV_SWITCH, raising=False)


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    balancer = pgreplica.LoadBalancer(config=healthy_cluster.config())
    with balancer.isolated(), balancer.write() as conn:
        conn.execute(TABLE_SQL)
    healthy_cluster.wait_replayed()  # the table exists on the replicas too
    balancer.open()
    yield balancer
    balancer.close()


def lag_replicas(cluster: LocalCluster, delay: str = LAG) -> None:
    for replica in range(1, cluster.replicas + 1):
        cluster.lag(replica, delay)


def enqueue_after_write(lb: pgreplica.LoadBalancer) -> tuple[str, dict[str, str]]:
    """What the enqueuing code of a request does: write a row, then capture."""
    key = uuid.uuid4().hex
    with lb.isolated():
        with lb.write() as conn:
            conn.execute(INSERT_SQL, (key,))
        return key, capture(lb)


def read_row(lb: pgreplica.LoadBalancer, key: str) -> tuple[int | None, bool]:
    """(value or None when the row is missing, whether a replica served the read)."""
    with lb.read() as conn:
        row = conn.execute(SELECT_SQL, (key,)).fetchone()
        return (None if row is None else row[0]), conn.on_replica


def naive_read(lb: pgreplica.LoadBalancer, key: str) -> tuple[int | None, bool]:
    """The control: a read with no token, as a job without pgreplica.jobs would do."""
    with lb.isolated():
        return read_row(lb, key)


def primary_position(cluster: LocalCluster) -> int:
    return parse_lsn(cluster.execute(0, "SELECT pg_current_wal_insert_lsn()::text")[0][0])


# --------------------------------------------------------------------------- capture


def test_capture_after_a_write_is_the_writes_token(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    with lb.isolated():
        with lb.write() as conn:
            conn.execute(INSERT_SQL, (uuid.uuid4().hex,))
        written = lb.token()
        assert capture(lb) == written.as_dict()
        # Another context writes: this context's capture stays at its own write (no
        # query), while a context that did nothing gets the primary's newer position.
        with lb.isolated(), lb.write() as conn:
            conn.execute(INSERT_SQL, (uuid.uuid4().hex,))
        assert capture(lb) == written.as_dict()
        with lb.isolated():
            fresh = CausalToken.from_dict(capture(lb))
        assert fresh.get("main") > written.get("main")


def test_capture_after_a_pure_read_covers_what_was_read(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    key, _ = enqueue_after_write(lb)
    healthy_cluster.wait_replayed()
    with lb.isolated():
        with lb.read() as conn:
            assert conn.execute(SELECT_SQL, (key,)).fetchone() == (1,)
            assert conn.on_replica
            seen_at = parse_lsn(conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()[0])
        assert not lb.token()  # a pure read: nothing written, nothing adopted
        headers = capture(lb)
    captured = CausalToken.from_dict(headers).get("main")
    assert seen_at <= captured <= primary_position(healthy_cluster)
    # Enqueued after pure reads, a job still runs on a replica once one has caught up.
    decision = start_job(lb, "sticky", headers, enabled=True)
    assert decision.outcome == REPLICA
    with decision.scope:
        assert read_row(lb, key) == (1, True)


def test_capture_after_replica_reads_lets_jobs_use_lagging_replicas(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """Replicas paused behind the primary: code that only read from them enqueues a job
    with their replay position (what it saw), so the job may run on them; the same job
    enqueued by code that read nothing needs the primary's position and cannot."""
    key, _ = enqueue_after_write(lb)
    healthy_cluster.wait_replayed()
    healthy_cluster.pause(1)
    healthy_cluster.pause(2)
    with lb.isolated(), lb.write() as conn:  # another user's write the replicas lack
        conn.execute("CREATE TEMP TABLE jobs_lag_marker (x int)")
    with lb.isolated():
        with lb.read() as conn:
            assert conn.on_replica
            assert conn.execute(SELECT_SQL, (key,)).fetchone() == (1,)
        after_read = capture(lb)
    with lb.isolated():
        after_nothing = capture(lb)
    replica_seen = CausalToken.from_dict(after_read).get("main")
    assert replica_seen < CausalToken.from_dict(after_nothing).get("main")
    fast = start_job(lb, "sticky", after_read, enabled=True, wait=(0, 0.0))
    assert fast.outcome == REPLICA
    with fast.scope:
        assert read_row(lb, key) == (1, True)
    slow = start_job(lb, "sticky", after_nothing, enabled=True, wait=(0, 0.0))
    assert slow.outcome == PRIMARY


def test_capture_with_nothing_done_is_the_primarys_current_position(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    before = primary_position(healthy_cluster)
    with lb.isolated():
        headers = capture(lb)
    after = primary_position(healthy_cluster)
    assert set(headers) == {"main"}
    assert before <= CausalToken.from_dict(headers).get("main") <= after


def test_capture_covers_every_database_with_one_query_per_primary(
    healthy_cluster: LocalCluster,
) -> None:
    config = {
        "databases": {
            "main": {"primary": healthy_cluster.primary_dsn, "replicas": [healthy_cluster.dsn(1)]},
            "ci": {"primary": "main", "replicas": [healthy_cluster.dsn(2)]},
        }
    }
    with pgreplica.LoadBalancer(config=config) as lb, lb.isolated():
        headers = capture(lb)
        assert set(headers) == {"main", "ci"}
        assert headers["main"] == headers["ci"]  # one position read from their primary
        with lb.write() as conn:
            conn.execute("SELECT 1")
        assert capture(lb) == lb.token().as_dict()  # both recorded by the write


def test_capture_without_a_reachable_primary_gives_no_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lb = pgreplica.LoadBalancer(
        "postgresql://127.0.0.1:9/none", ["postgresql://127.0.0.1:10/none"], connect_timeout=0.3
    )
    try:
        with caplog.at_level(logging.WARNING, logger="pgreplica.jobs"), lb.isolated():
            assert capture(lb) == {}
        assert "job_capture_failed host=127.0.0.1:9/none" in caplog.text
        assert start_job(lb, "sticky", {}, enabled=True).outcome == PRIMARY_NO_WAL
    finally:
        lb.close()


# --------------------------------------------------------------------------- start_job


def test_always_runs_on_the_primary(lb: pgreplica.LoadBalancer) -> None:
    key, headers = enqueue_after_write(lb)
    decision = start_job(lb, DataConsistency.ALWAYS, headers, enabled=True)
    assert (decision.outcome, decision.use_primary, decision.retry) == (PRIMARY, True, False)
    with decision.scope:
        assert read_row(lb, key) == (1, False)


def test_sticky_and_delayed_without_lag_run_on_a_replica(lb: pgreplica.LoadBalancer) -> None:
    for kind in ("sticky", "delayed"):
        key, headers = enqueue_after_write(lb)
        decision = start_job(lb, kind, headers, enabled=True)
        assert decision.outcome == REPLICA, kind
        assert decision.token == CausalToken.from_dict(headers)
        with decision.scope:
            assert read_row(lb, key) == (1, True)


def test_sticky_with_lag_runs_on_the_primary(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    lag_replicas(healthy_cluster)
    key, headers = enqueue_after_write(lb)
    assert naive_read(lb, key) == (None, True)  # control: a replica read is stale
    decision = start_job(lb, "sticky", headers, wait=SHORT, enabled=True)
    assert decision.outcome == PRIMARY
    assert decision.waited >= 0.04  # it did wait (SHORT) before giving up on replicas
    with decision.scope:
        assert read_row(lb, key) == (1, False)


def test_sticky_waits_for_a_replica_with_the_default_policy(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    lag_replicas(healthy_cluster)
    key, headers = enqueue_after_write(lb)
    assert naive_read(lb, key) == (None, True)
    decision = start_job(lb, "sticky", headers, enabled=True)  # 3 x 0.5 s
    assert decision.outcome == REPLICA  # the stale control above: it waited for one
    with decision.scope:
        assert read_row(lb, key) == (1, True)


def test_delayed_with_lag_retries_once_then_uses_primary_or_a_caught_up_replica(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    lag_replicas(healthy_cluster)
    key, headers = enqueue_after_write(lb)
    assert naive_read(lb, key) == (None, True)

    first = start_job(lb, "delayed", headers, 0, wait=SHORT, enabled=True)
    assert (first.outcome, first.retry, first.use_primary) == (RETRY, True, True)
    assert first.headers() == headers  # what the retry must carry

    # The retry, while the replicas are still behind: the primary, never a second retry.
    behind = start_job(lb, "delayed", first.headers(), 1, wait=WaitPolicy(0), enabled=True)
    assert (behind.outcome, behind.retry) == (PRIMARY, False)
    with behind.scope:
        assert read_row(lb, key) == (1, False)

    # The retry once a replica has replayed the write.
    time.sleep(0.6)
    later = start_job(lb, "delayed", first.headers(), 1, wait=SHORT, enabled=True)
    assert later.outcome == REPLICA_RETRIED
    with later.scope:
        assert read_row(lb, key) == (1, True)


def test_delayed_that_cannot_retry_acts_as_sticky(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    lag_replicas(healthy_cluster)
    key, headers = enqueue_after_write(lb)
    decision = start_job(lb, "delayed", headers, wait=SHORT, enabled=True, can_retry=False)
    assert decision.outcome == PRIMARY
    with decision.scope:
        assert read_row(lb, key) == (1, False)


def test_a_write_inside_a_replica_job_sends_later_reads_to_the_primary(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """No primary pin is needed: the write advances the job's token, and reads go to
    the primary until a replica has replayed the write."""
    _, headers = enqueue_after_write(lb)
    decision = start_job(lb, "sticky", headers, enabled=True)
    assert decision.outcome == REPLICA
    with decision.scope:
        lag_replicas(healthy_cluster)  # from now on, replicas replay 500 ms late
        key = uuid.uuid4().hex
        with lb.write() as conn:
            conn.execute(INSERT_SQL, (key,))
        state = current_state()
        assert state.token.get("main") > decision.token.get("main")
        assert not state.use_primary
        assert read_row(lb, key) == (1, False)
        # Control: with only the job's original token, a replica serves a stale read.
        with lb.isolated(), lb.causal(decision.token):
            assert read_row(lb, key) == (None, True)


def test_no_token_in_the_message_runs_on_the_primary(
    lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = enqueue_after_write(lb)
    assert start_job(lb, "sticky", None, enabled=True).outcome == PRIMARY_NO_WAL
    assert start_job(lb, "delayed", {}, enabled=True).outcome == PRIMARY_NO_WAL
    with caplog.at_level(logging.WARNING, logger="pgreplica.jobs"):
        bad = start_job(lb, "sticky", {"main": "not-an-lsn"}, enabled=True)
    assert bad.outcome == PRIMARY_NO_WAL
    assert "job_data_consistency_bad_header" in caplog.text
    with bad.scope:
        assert read_row(lb, key) == (1, False)


def test_a_database_without_replicas_runs_on_the_primary_without_retry(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    with pgreplica.LoadBalancer(healthy_cluster.primary_dsn, []) as primary_only:
        _, headers = enqueue_after_write(primary_only)
        for kind in ("sticky", "delayed"):
            decision = start_job(primary_only, kind, headers, enabled=True)
            assert (decision.outcome, decision.waited) == (PRIMARY, 0.0)


def test_the_first_jobs_of_a_fresh_worker_find_the_replicas(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """Threads starting jobs on a balancer nobody opened yet all wait for its first
    probes: none decides "primary" (or a needless retry) for lack of a known replica."""
    _, headers = enqueue_after_write(lb)
    healthy_cluster.wait_replayed()
    fresh = pgreplica.LoadBalancer(config=healthy_cluster.config())
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def job() -> None:
        barrier.wait()
        outcomes.append(
            start_job(fresh, "sticky", headers, wait=WaitPolicy(0), enabled=True).outcome
        )

    threads = [threading.Thread(target=job) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        fresh.close()
    assert outcomes == [REPLICA] * 8


def test_wait_policy_is_configurable(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    lag_replicas(healthy_cluster)
    _, headers = enqueue_after_write(lb)
    none = start_job(lb, "sticky", headers, wait=WaitPolicy(0), enabled=True)
    assert none.outcome == PRIMARY
    two = start_job(lb, "sticky", headers, wait=(2, 0.1), enabled=True)
    assert two.outcome == PRIMARY
    # Two sleeps of 0.1 s happened; without tries there is no sleep at all (only lower
    # bounds: an upper bound would measure the machine, not the policy).
    assert two.waited >= 0.2 > none.waited

    assert WaitPolicy().total == 1.5
    with pytest.raises(pgreplica.ConfigError, match=r"wait\.tries"):
        WaitPolicy(-1)
    with pytest.raises(pgreplica.ConfigError, match=r"wait\.interval"):
        WaitPolicy(1, float("nan"))
    with pytest.raises(pgreplica.ConfigError, match="refresh: wait"):
        JobSpec.of("refresh", "sticky", wait="soon")


# --------------------------------------------------------------------------- controls


def test_flag_percentages_with_a_deterministic_random_source(
    lb: pgreplica.LoadBalancer,
) -> None:
    rolls = iter([0.10, 0.70, 0.499, 0.50])
    assert [jobs.flag_enabled(50, "j", lambda: next(rolls)) for _ in range(4)] == [
        True,
        False,
        True,
        False,
    ]
    assert jobs.flag_enabled(1, "j", lambda: 0.009)
    assert not jobs.flag_enabled(1, "j", lambda: 0.01)
    seen: list[str] = []
    assert jobs.flag_enabled(lambda name: seen.append(name) is None, "refresh")
    assert seen == ["refresh"]

    key, headers = enqueue_after_write(lb)
    never = start_job(lb, "sticky", headers, flag=0, enabled=True, rand=lambda: 0.0)
    assert never.outcome == PRIMARY
    always = start_job(lb, "sticky", headers, flag=100, enabled=True, rand=lambda: 0.999)
    assert always.outcome == REPLICA
    rolls = iter([0.2, 0.8])
    half = [
        start_job(lb, "sticky", headers, flag=50, enabled=True, rand=lambda: next(rolls)).outcome
        for _ in range(2)
    ]
    assert half == [REPLICA, PRIMARY]
    with never.scope:
        assert read_row(lb, key) == (1, False)

    with pytest.raises(pgreplica.ConfigError, match="refresh: flag"):
        JobSpec.of("refresh", "sticky", flag=150)
    assert not JobSpec.of("refresh", "sticky", flag=0).wants_token
    assert JobSpec.of("refresh", "sticky", flag=1).wants_token
    assert not JobSpec.of("refresh", "always").wants_token


def test_global_switch_defaults_to_off(
    lb: pgreplica.LoadBalancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = enqueue_after_write(lb)
    assert not jobs.jobs_enabled()
    assert start_job(lb, "sticky", headers).outcome == PRIMARY
    monkeypatch.setenv(ENV_SWITCH, "true")
    assert start_job(lb, "sticky", headers).outcome == REPLICA
    assert start_job(lb, "sticky", headers, enabled=False).outcome == PRIMARY
    monkeypatch.setenv(ENV_SWITCH, "off")
    assert start_job(lb, "delayed", headers).outcome == PRIMARY
    monkeypatch.setenv(ENV_SWITCH, "maybe")
    with pytest.raises(pgreplica.ConfigError, match=ENV_SWITCH):
        start_job(lb, "sticky", headers)


def test_outcomes_are_counted_and_logged(
    lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    _, headers = enqueue_after_write(lb)
    with caplog.at_level(logging.INFO, logger="pgreplica.jobs"):
        start_job(lb, "sticky", headers, job="refresh", enabled=True)
        start_job(lb, "sticky", headers, job="refresh", enabled=True)
        start_job(lb, "always", headers, job="mail", enabled=True)
        start_job(lb, "delayed", None, job="stats", enabled=True)
    assert jobs.outcomes() == {REPLICA: 2, PRIMARY: 1, PRIMARY_NO_WAL: 1}
    assert jobs.outcomes("refresh") == {REPLICA: 2}
    lines = [r.getMessage() for r in caplog.records if r.name == "pgreplica.jobs"]
    assert len(lines) == 4
    assert lines[0].startswith(
        "job_data_consistency task=refresh consistency=sticky outcome=replica"
    )
    assert lines[3].startswith(
        "job_data_consistency task=stats consistency=delayed outcome=primary_no_wal"
    )
    jobs.reset_outcomes()
    assert jobs.outcomes() == {}


def test_the_scope_starts_fresh_and_restores_the_state_of_before(
    lb: pgreplica.LoadBalancer,
) -> None:
    _, headers = enqueue_after_write(lb)
    decision = start_job(lb, "sticky", headers, enabled=True)
    assert decision.outcome == REPLICA
    outer_token = CausalToken({"main": 1})
    with lb.isolated(), lb.causal(outer_token), lb.primary():
        before = current_state()
        with decision.scope as state:
            assert state.token == decision.token  # not merged with the outer token
            assert not state.use_primary and not state.written
            assert jobs.current_decision() is decision
            with lb.write() as conn:  # a job that writes and leaks a pin
                conn.execute("SELECT 1")
            lb.primary().__enter__()
        assert current_state() is before
        assert jobs.current_decision() is None


def test_consistency_names_and_errors() -> None:
    assert DataConsistency.parse(" Sticky ") is DataConsistency.STICKY
    with pytest.raises(pgreplica.ConfigError, match="refresh: data_consistency"):
        DataConsistency.parse("eventual", job="refresh")
    assert jobs.primary_decision("refresh").outcome == PRIMARY


def test_asyncio_capture_and_start(healthy_cluster: LocalCluster) -> None:
    async def main() -> tuple[Any, ...]:
        async with pgreplica.AsyncLoadBalancer(config=healthy_cluster.config()) as alb:
            key = uuid.uuid4().hex
            with alb.isolated():
                async with alb.write() as conn:
                    await conn.execute(TABLE_SQL)
                    await conn.execute(INSERT_SQL, (key,))
                headers = await jobs.acapture(alb)
                assert headers == alb.token().as_dict()
            decision = await jobs.astart_job(alb, "sticky", headers, enabled=True)
            async with decision.scope, alb.read() as conn:
                row = await (await conn.execute(SELECT_SQL, (key,))).fetchone()
                return decision.outcome, row, conn.on_replica

    assert asyncio.run(main()) == (REPLICA, (1,), True)


def test_a_replica_that_fails_the_direct_check_is_skipped(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """Direct checks tolerate a dead replica: the other one answers."""
    healthy_cluster.lag(1, LAG)
    key, headers = enqueue_after_write(lb)
    healthy_cluster.kill(2)
    try:
        # A wait well past the 500 ms lag: the surviving replica catches up within it.
        decision = start_job(lb, "sticky", headers, wait=(10, 0.3), enabled=True)
    except psycopg.Error as exc:  # pragma: no cover - the assertion message matters
        raise AssertionError(f"start_job raised {exc!r}") from exc
    assert decision.outcome == REPLICA
    with decision.scope:
        assert read_row(lb, key) == (1, True)
