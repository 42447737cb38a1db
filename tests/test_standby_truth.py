"""Routing that follows what a standby does, not only what the parser sees: statements
a standby refuses run on the primary and are remembered; session state a standby
cannot hold keeps a routing connection on the primary while it is in force."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psycopg
import pytest

import pgreplica
from conftest import Database
from pgreplica.testing import LocalCluster

SCHEMA = """
DROP TABLE IF EXISTS ts_shadow, ts_unlogged;
CREATE TABLE ts_shadow (v text);
INSERT INTO ts_shadow VALUES ('regular');
CREATE UNLOGGED TABLE ts_unlogged (v text);
INSERT INTO ts_unlogged VALUES ('unlogged');
CREATE SEQUENCE IF NOT EXISTS ts_seq;
CREATE OR REPLACE VIEW ts_next AS SELECT nextval('ts_seq') AS n;
CREATE OR REPLACE FUNCTION ts_stable_next() RETURNS bigint LANGUAGE sql STABLE
    AS $$ SELECT nextval('ts_seq') $$;
CREATE TABLE IF NOT EXISTS ts_log (a int, b int);
CREATE OR REPLACE FUNCTION ts_log_pair(int, int) RETURNS int LANGUAGE plpgsql VOLATILE
    AS $$ BEGIN INSERT INTO ts_log VALUES ($1, $2); RETURN 1; END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
                   WHERE o.oprname = '#!#' AND n.nspname = 'public') THEN
        CREATE OPERATOR public.#!# (LEFTARG = int, RIGHTARG = int, FUNCTION = ts_log_pair);
    END IF;
END $$;
"""


@pytest.fixture
def db(healthy_cluster: LocalCluster, routing_database: Database) -> Database:
    """A database of its own: other tests never meet these views and tables."""
    routing_database.execute(0, SCHEMA)
    healthy_cluster.wait_replayed()
    return routing_database


@pytest.fixture
def lb(db: Database) -> Iterator[pgreplica.LoadBalancer]:
    with pgreplica.LoadBalancer(config=db.config()) as balancer, balancer.isolated():
        yield balancer


def replica_rollbacks(db: Database) -> int:
    """Transactions the replicas rolled back (a refused statement is one)."""
    total = 0
    for index in (1, 2):
        with psycopg.connect(db.dsn(index), autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_stat_force_next_flush(), xact_rollback FROM pg_stat_database"
                " WHERE datname = current_database()"
            ).fetchone()
        assert row is not None
        total += int(row[1])
    return total


# -- refusals: the server's truth, remembered ------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT v FROM ts_unlogged", "unlogged"),  # 0A000: unlogged during recovery
        ("SELECT s.v FROM ts_shadow s JOIN ts_unlogged u ON true", "regular"),
        ("SELECT n > 0 FROM ts_next", True),  # 25006: a view calling nextval
        ("SELECT 3 OPERATOR(public.#!#) 4", 1),  # 25006: an operator whose function inserts
    ],
)
def test_a_refused_read_runs_on_the_primary_and_is_remembered(
    lb: pgreplica.LoadBalancer,
    db: Database,
    caplog: pytest.LogCaptureFixture,
    sql: str,
    expected: object,
) -> None:
    with caplog.at_level(logging.WARNING, logger="pgreplica"):
        with lb.read() as conn:
            assert conn.on_replica
            assert conn.execute(sql).fetchone() == (expected,)
            assert not conn.on_replica and conn.reason == "read_only_retry"
        assert "standby_refused database=main" in caplog.text
        caplog.clear()
        before = replica_rollbacks(db)
        with lb.read() as conn:
            assert conn.execute(sql).fetchone() == (expected,)
            assert conn.reason == "standby_refused"
        with lb.connection() as rc:
            rc.autocommit = True
            assert rc.execute(sql).fetchone() == (expected,)
            assert rc.reason == "standby_refused"
        assert lb.classify(sql).reason == "standby_refused"
    assert "db_routing_fallback" not in caplog.text  # no second refusal
    assert replica_rollbacks(db) == before  # the replicas were not asked


def test_the_routing_connection_learns_refusals_too(
    lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    # declared STABLE, calls nextval: the catalog cannot tell, the standby refuses it
    sql = "SELECT ts_stable_next() > 0"
    with caplog.at_level(logging.WARNING, logger="pgreplica"), lb.connection() as rc:
        rc.autocommit = True
        assert rc.execute(sql).fetchone() == (True,)
        assert rc.reason == "read_only_retry"
        first = lb.token()
        assert first  # it ran on the primary and may have written: the token advanced
        assert rc.execute(sql).fetchone() == (True,)
        assert rc.reason == "standby_refused"
    assert caplog.text.count("db_routing_fallback") == 1
    assert "function_volatility_suspect database=main function=public.ts_stable_next" in (
        caplog.text
    )


def test_a_refusal_inside_a_read_transaction_is_a_routing_error(
    lb: pgreplica.LoadBalancer,
) -> None:
    with (
        lb.read() as conn,
        pytest.raises(pgreplica.RoutingError, match="refused"),
        conn.transaction(),
    ):
        conn.execute("SELECT v FROM ts_unlogged /* in a transaction */")


# -- session state a standby cannot hold ---------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize(
    ("setting", "reset"),
    [
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
        ),
        ("SET default_transaction_isolation = 'serializable'", "RESET ALL"),
        ("SET default_transaction_read_only = off", "RESET default_transaction_read_only"),
        ("SET default_transaction_isolation = 'serializable'", "DISCARD ALL"),
    ],
)
def test_a_session_default_a_standby_refuses_keeps_the_connection_on_the_primary(
    lb: pgreplica.LoadBalancer, setting: str, reset: str, autocommit: bool
) -> None:
    with lb.connection() as rc:
        rc.autocommit = autocommit
        assert rc.execute("SELECT v FROM ts_shadow").fetchone() == ("regular",)
        rc.commit()
        first = rc.reason
        rc.execute(setting)
        rc.commit()
        for _ in range(3):
            assert rc.execute("SELECT v FROM ts_shadow").fetchone() == ("regular",)
            assert rc.reason == "session_primary" or rc.reason == "pinned"
            rc.commit()
        rc.autocommit = True  # DISCARD ALL cannot run in a transaction block
        rc.execute(reset)
        rc.autocommit = autocommit
        # back on replicas, which never got the setting: no "serializable mode in a
        # hot standby" error
        with lb.read_only():
            for _ in range(3):
                assert rc.execute("SELECT v FROM ts_shadow").fetchone() == ("regular",)
                rc.commit()
        assert rc.reason in (first, "read_only_transaction", "replica")


def test_a_temporary_table_that_shadows_a_table_is_read_where_it_lives(
    lb: pgreplica.LoadBalancer,
) -> None:
    with lb.connection() as rc:
        rc.autocommit = True
        assert rc.execute("SELECT v FROM ts_shadow").fetchone() == ("regular",)
        assert rc.reason == "replica"
        rc.execute("CREATE TEMP TABLE ts_shadow (v text)")
        rc.execute("INSERT INTO ts_shadow VALUES ('temporary')")
        for _ in range(3):
            assert rc.execute("SELECT v FROM ts_shadow").fetchone() == ("temporary",)
            assert rc.reason == "session_primary"
        rc.execute("DROP TABLE ts_shadow")  # the temporary one: the regular one is back
        assert rc.execute("SELECT v FROM ts_shadow").fetchone() == ("regular",)
        assert rc.reason == "replica"
        rc.execute("SELECT 1 INTO TEMP ts_other")
        assert rc.execute("SELECT v FROM ts_shadow").fetchone() == ("regular",)
        assert rc.reason == "session_primary"
        rc.execute("DISCARD TEMP")
        rc.execute("SELECT v FROM ts_shadow")
        assert rc.reason == "replica"
    # the pooled primary connection was given back without the temporary table
    with lb.write() as conn:
        row = conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'ts_other'").fetchone()
        assert row == (0,)


def test_listen_keeps_the_connection_where_notifications_arrive(
    lb: pgreplica.LoadBalancer,
) -> None:
    with lb.connection() as rc:
        rc.autocommit = True
        rc.execute("LISTEN ts_channel")
        rc.execute("SELECT v FROM ts_shadow")
        assert rc.reason == "session_primary"
        rc.execute("UNLISTEN *")
        rc.execute("SELECT v FROM ts_shadow")
        assert rc.reason == "replica"
