"""lb.connection(): per-statement routing on the real cluster, with psycopg's usage
patterns (cursors, server-side cursors, COPY, executemany, pipeline, transactions)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import psycopg
import pytest

import pgreplica
from pgreplica.testing import LocalCluster

SCHEMA = """
CREATE TABLE IF NOT EXISTS rc_items (id serial PRIMARY KEY, v text NOT NULL, n int DEFAULT 0);
CREATE OR REPLACE FUNCTION rc_stable(int) RETURNS int LANGUAGE sql STABLE AS 'SELECT $1 + 1';
CREATE OR REPLACE FUNCTION rc_volatile_reader(int) RETURNS int LANGUAGE sql VOLATILE
    AS 'SELECT $1 + 2';
CREATE OR REPLACE FUNCTION rc_writer(text) RETURNS int LANGUAGE plpgsql VOLATILE AS
    $$ BEGIN INSERT INTO rc_items (v) VALUES ($1); RETURN 1; END $$;
CREATE OR REPLACE FUNCTION rc_lying_writer(text) RETURNS int LANGUAGE plpgsql STABLE AS
    $$ BEGIN RETURN rc_writer($1); END $$;
"""


@pytest.fixture(scope="module")
def schema(cluster: LocalCluster) -> None:
    cluster.execute(0, SCHEMA)
    cluster.wait_replayed()


@pytest.fixture
def lb(healthy_cluster: LocalCluster, schema: None) -> Iterator[pgreplica.LoadBalancer]:
    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as balancer, balancer.isolated():
        yield balancer


def port(conn: pgreplica.RoutingConnection) -> int:
    row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None
    return int(row[0])


def test_autocommit_routes_each_statement(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    primary, replicas = healthy_cluster.port(0), {healthy_cluster.port(1), healthy_cluster.port(2)}
    with lb.connection() as conn:
        conn.autocommit = True
        assert port(conn) in replicas and conn.reason == "replica"
        conn.execute("INSERT INTO rc_items (v) VALUES (%s)", ("a",))
        assert conn.reason == "write" and conn.host.endswith(f":{primary}/postgres")
        # read-your-writes: the next read sees the insert wherever it runs
        count = conn.execute("SELECT count(*) FROM rc_items WHERE v = 'a'").fetchone()
        assert count is not None and count[0] >= 1
        row = conn.execute("SELECT nextval('rc_items_id_seq'), inet_server_port()").fetchone()
        assert row is not None and row[1] == primary and conn.reason == "sequence_function"
        with lb.isolated():  # no token: nothing makes the replica wait for our insert
            row = conn.execute("SELECT rc_stable(1), inet_server_port()").fetchone()
        assert row is not None and row[1] in replicas  # STABLE user function: replica
        row = conn.execute("SELECT rc_volatile_reader(1), inet_server_port()").fetchone()
        assert row is not None and row[1] == primary and conn.reason == "volatile_function"
        conn.execute("SELECT id FROM rc_items LIMIT 1 FOR UPDATE")
        assert conn.reason == "locking"


def test_every_statement_class_succeeds_where_it_lands(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    primary = healthy_cluster.port(0)
    cases = [
        ("SELECT count(*) FROM rc_items", "replica"),
        (
            "WITH w AS (INSERT INTO rc_items (v) VALUES ('cte') RETURNING id) SELECT * FROM w",
            "primary",
        ),
        ("SELECT * FROM rc_items LIMIT 1 FOR NO KEY UPDATE", "primary"),
        ("SELECT pg_advisory_xact_lock(42)", "primary"),
        ("SELECT txid_current()", "primary"),
        ("SELECT set_config('application_name', 'x', false)", "primary"),
        ("SELECT set_config('work_mem', '8MB', true)", "replica"),
        ("EXPLAIN SELECT 1", "replica"),
        ("EXPLAIN ANALYZE INSERT INTO rc_items (v) VALUES ('explained')", "primary"),
        ("SHOW work_mem", "replica"),
        (
            "SELECT random(), clock_timestamp(), gen_random_uuid(), pg_last_wal_replay_lsn()",
            "replica",
        ),
        ("UPDATE rc_items SET n = n + 1 WHERE v = 'a'", "primary"),
        ("DELETE FROM rc_items WHERE v = 'never'", "primary"),
        ("CREATE TEMP TABLE rc_tmp (x int)", "primary"),
        ("SELECT * FROM rc_tmp", "primary"),  # where the temporary table lives
        ("DROP TABLE rc_tmp", "primary"),  # and then the connection is free again
        ("NOTIFY rc_channel", "primary"),
        ("VACUUM rc_items", "primary"),
        ("ANALYZE rc_items", "primary"),
        ("DO $$ BEGIN PERFORM 1; END $$", "primary"),
        ("SELECT 1; SELECT 2", "replica"),
        ("SELECT 1; UPDATE rc_items SET n = 0 WHERE false", "primary"),
    ]
    with lb.connection() as conn:
        conn.autocommit = True
        for sql, expected in cases:
            conn.execute(sql)  # nothing fails with "cannot execute ... read-only"
            landed = "primary" if conn.host.endswith(f":{primary}/postgres") else "replica"
            if expected == "replica":  # or the primary, when no replica has our writes yet
                assert conn.reason in ("replica", "replicas_behind"), (sql, conn.reason)
            else:
                assert landed == "primary", (sql, conn.host, conn.reason)


def test_transactions_pin_one_host(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    primary, replicas = healthy_cluster.port(0), {healthy_cluster.port(1), healthy_cluster.port(2)}
    with lb.connection() as conn:  # autocommit off, as psycopg: a transaction per unit
        assert port(conn) == primary  # any transaction pins the primary...
        conn.execute("INSERT INTO rc_items (v) VALUES ('tx')")
        assert port(conn) == primary and conn.reason == "pinned"
        conn.commit()
        # The commit advanced the token; once the replicas have replayed it a read-only
        # transaction may use one (before that, the primary would be right too).
        healthy_cluster.wait_replayed()
        with lb.read_only():  # ...unless it is read-only
            assert port(conn) in replicas and conn.reason == "read_only_transaction"
            assert port(conn) in replicas and conn.reason == "pinned"
            conn.commit()
        conn.read_only = True
        assert port(conn) in replicas
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO rc_items (v) VALUES ('refused')")
        conn.rollback()
        conn.read_only = None
    with lb.connection() as conn:
        conn.autocommit = True
        conn.execute("BEGIN READ ONLY")
        first = port(conn)
        assert first in replicas
        assert port(conn) == first
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        assert port(conn) == primary
        conn.execute("ROLLBACK")
        with conn.transaction():
            conn.execute("INSERT INTO rc_items (v) VALUES ('in transaction()')")
            assert port(conn) == primary
            with conn.transaction():  # a savepoint on the same host
                assert port(conn) == primary


def test_commit_advances_the_token_and_rollback_does_not(lb: pgreplica.LoadBalancer) -> None:
    with lb.connection() as conn:
        before = lb.token()
        conn.execute("INSERT INTO rc_items (v) VALUES ('rolled back')")
        conn.rollback()
        assert lb.token() == before
        conn.execute("INSERT INTO rc_items (v) VALUES ('committed')")
        assert lb.token() == before  # not before the commit
        conn.commit()
        assert lb.token().get("main") > before.get("main")


def test_session_set_applies_to_every_server_connection(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    primary = healthy_cluster.port(0)
    with lb.connection() as conn:
        conn.autocommit = True
        port(conn)  # a replica connection is held
        conn.execute("SET statement_timeout = '4321ms'")
        seen = {}
        for sql in ("SHOW statement_timeout", "SELECT current_setting('statement_timeout')"):
            row = conn.execute(sql).fetchone()
            seen[conn.host] = row[0] if row else None
        conn.execute("INSERT INTO rc_items (v) VALUES ('set')")  # takes the primary
        row = conn.execute(
            "SELECT current_setting('statement_timeout'), inet_server_port() FROM rc_items"
            " WHERE v = 'set' LIMIT 1 FOR SHARE"
        ).fetchone()
        assert row is not None and row[1] == primary and row[0] == "4321ms"
        assert set(seen.values()) == {"4321ms"}
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '1s'")
            row = conn.execute("SHOW statement_timeout").fetchone()
            assert row is not None and row[0] == "1s"
        row = conn.execute("SHOW statement_timeout").fetchone()
        assert row is not None and row[0] == "4321ms"  # SET LOCAL stayed in its transaction
    # the pool's connections do not keep the session setting
    with lb.read() as plain:
        assert plain.execute("SHOW statement_timeout").fetchone() == ("0",)
    with lb.write() as plain:
        assert plain.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_psycopg_patterns_run_unchanged(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    primary = healthy_cluster.port(0)
    with lb.connection() as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rc_items (v, n) VALUES (%s, %s)", [(f"many{i}", i) for i in range(5)]
            )
            assert conn.reason == "write"
            cur.execute("SELECT v FROM rc_items WHERE v LIKE %s ORDER BY n", ("many%",))
            assert [r[0] for r in cur.fetchall()][:5] == [f"many{i}" for i in range(5)]
            assert cur.description is not None and cur.description[0].name == "v"
            assert cur.rowcount >= 5
            rows = list(cur.stream("SELECT generate_series(1, 3)"))
            assert rows == [(1,), (2,), (3,)]
        with conn.cursor() as cur:
            with cur.copy("COPY rc_items (v, n) FROM STDIN") as copy:
                for i in range(3):
                    copy.write_row((f"copied{i}", i))
            assert conn.host.endswith(f":{primary}/postgres")
            with cur.copy(
                "COPY (SELECT v FROM rc_items WHERE v LIKE 'copied%' ORDER BY v) TO STDOUT"
            ) as copy:
                copied = [row[0] for row in copy.rows()]
            assert conn.reason == "replica" and copied[:3] == ["copied0", "copied1", "copied2"]
        with conn.transaction(), conn.cursor("rc_server_side") as named:
            named.execute("SELECT generate_series(1, 100)")
            assert named.fetchmany(3) == [(1,), (2,), (3,)]
            assert len(named.fetchall()) == 97
        with conn.pipeline():
            conn.execute("INSERT INTO rc_items (v) VALUES ('piped')")
            cur = conn.execute("SELECT count(*) FROM rc_items WHERE v = 'piped'")
        row = cur.fetchone()
        assert row is not None and row[0] >= 1
        from psycopg import sql

        query = sql.SQL("SELECT count(*) FROM {} WHERE v = {}").format(
            sql.Identifier("rc_items"), sql.Literal("piped")
        )
        row = conn.execute(query).fetchone()
        assert row is not None and row[0] >= 1


def test_misclassified_write_on_replica_is_retried_on_the_primary(
    lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    # rc_lying_writer is declared STABLE but calls a writer: the replica refuses it, nothing
    # happened there, and the primary runs it instead.
    with caplog.at_level(logging.WARNING, logger="pgreplica"), lb.connection() as conn:
        conn.autocommit = True
        conn.execute("SELECT rc_lying_writer('liar')")
        assert conn.reason == "read_only_retry"
        with lb.primary():
            row = conn.execute("SELECT count(*) FROM rc_items WHERE v = 'liar'").fetchone()
        assert row is not None and row[0] >= 1 and conn.reason == "primary_scope"
    assert "reason=read_only_retry" in caplog.text


def test_configured_function_lists(healthy_cluster: LocalCluster, schema: None) -> None:
    config = {
        **healthy_cluster.config(),
        "read_only_functions": ["rc_volatile_reader"],
        "write_functions": ["rc_stable"],
    }
    with pgreplica.LoadBalancer(config=config) as lb:
        assert lb.classify("SELECT rc_volatile_reader(1)").target == "replica"
        assert lb.classify("SELECT rc_stable(1)").reason == "write_function"
        assert lb.classify("SELECT rc_missing_function(1)").reason == "unknown_function"
        assert pgreplica.classify("SELECT rc_stable(1)").reason == "unknown_function"


def test_read_your_writes_through_routing_connections_under_lag(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    healthy_cluster.lag(1, "300ms")
    stale: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def worker(key: int) -> None:
        try:
            with lb.isolated(), lb.connection() as conn:
                conn.autocommit = True
                conn.execute(
                    "INSERT INTO rc_items (id, v, n) VALUES (%s, 'rw', 0)"
                    " ON CONFLICT (id) DO UPDATE SET n = 0",
                    (key,),
                )
                for _ in range(150):
                    row = conn.execute(
                        "UPDATE rc_items SET n = n + 1 WHERE id = %s RETURNING n", (key,)
                    ).fetchone()
                    assert row is not None
                    seen = conn.execute("SELECT n FROM rc_items WHERE id = %s", (key,)).fetchone()
                    assert seen is not None
                    if seen[0] < row[0]:
                        stale.append((seen[0], row[0]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(100000 + k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and stale == []


def test_replica_killed_under_a_routing_connection(
    healthy_cluster: LocalCluster, schema: None, caplog: pytest.LogCaptureFixture
) -> None:
    # A slow prober, so that the statement itself meets the dead connection.
    lb = pgreplica.LoadBalancer(config=healthy_cluster.config(), probe_interval=30)
    with lb, lb.connection() as conn, caplog.at_level(logging.WARNING, logger="pgreplica"):
        conn.autocommit = True
        held = port(conn)  # the routing connection now holds this replica's connection
        victim = 1 if held == healthy_cluster.port(1) else 2
        assert held == healthy_cluster.port(victim)
        healthy_cluster.kill(victim)
        row = conn.execute("SELECT count(*), inet_server_port() FROM rc_items").fetchone()
        assert row is not None and row[1] != held
        assert conn.reason in ("fallback_replica", "fallback_primary")
    assert f"db_routing_fallback host=127.0.0.1:{held}/postgres" in caplog.text


def test_async_routing_connection(healthy_cluster: LocalCluster, schema: None) -> None:
    primary = healthy_cluster.port(0)

    async def main() -> None:
        async with pgreplica.AsyncLoadBalancer(config=healthy_cluster.config()) as alb:
            conn = await alb.connection()
            await conn.set_autocommit(True)
            cur = await conn.execute("SELECT inet_server_port()")
            row = await cur.fetchone()
            assert row is not None and row[0] != primary
            await conn.execute("INSERT INTO rc_items (v) VALUES ('async')")
            assert conn.reason == "write"
            async with conn.transaction():
                cur = await conn.execute("SELECT inet_server_port()")
                assert (await cur.fetchone()) == (primary,)
            async with conn.cursor() as acur:
                await acur.execute("SELECT count(*) FROM rc_items WHERE v = 'async'")
                row = await acur.fetchone()
                assert row is not None and row[0] >= 1
            await conn.close()

    asyncio.run(main())


def test_connection_attributes_behave_like_psycopg(lb: pgreplica.LoadBalancer) -> None:
    conn = lb.connection()
    assert conn.autocommit is False and not conn.closed
    conn.execute("SELECT 1")
    with pytest.raises(psycopg.ProgrammingError, match="autocommit"):
        conn.autocommit = True  # inside a transaction, as psycopg says
    conn.rollback()
    conn.autocommit = True
    conn.close()
    assert conn.closed
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


def test_classifications_are_cached_by_text(lb: pgreplica.LoadBalancer) -> None:
    first = lb.classify("SELECT v FROM rc_items WHERE id = %s")
    assert lb.classify("SELECT v FROM rc_items WHERE id = %s") is first
    with_function = lb.classify("SELECT rc_stable(id) FROM rc_items")
    assert with_function.target == "replica"  # resolved from the catalog once...
    assert lb.classify("SELECT rc_stable(id) FROM rc_items") is with_function  # ...then cached
