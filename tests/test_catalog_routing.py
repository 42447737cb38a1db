"""Routing that reads the catalog: views do what their definitions do, user operators
run their functions, unlogged tables cannot be read during recovery
(tests/data/catalog_corpus.sql, each entry checked on a real hot standby)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgreplica
from conftest import Database

DATA = Path(__file__).parent / "data"
SCHEMA = (DATA / "catalog_schema.sql").read_text(encoding="utf-8")
_ENTRY = re.compile(r"^-- expect: (\S+) (\S+)\n(.*?)(?=^-- expect:|\Z)", re.M | re.S)
ENTRIES = [
    (target, reason, sql.strip())
    for target, reason, sql in _ENTRY.findall(
        (DATA / "catalog_corpus.sql").read_text(encoding="utf-8")
    )
]
IDS = [re.sub(r"\W+", "_", sql)[:48] for _, _, sql in ENTRIES]


def test_the_corpus_covers_every_catalog_reason() -> None:
    reasons = {reason for _, reason, _ in ENTRIES}
    assert {
        "view_locking",
        "view_sequence_function",
        "view_advisory_lock",
        "view_unlogged_relation",
        "unlogged_relation",
        "volatile_operator",
    } <= reasons
    assert len(ENTRIES) >= 18


@pytest.fixture(scope="module")
def catalog_db(routing_database: Database) -> Database:
    """A database of its own: other tests never meet these views and tables."""
    routing_database.execute(0, SCHEMA)
    routing_database.cluster.wait_replayed()
    return routing_database


@pytest.fixture
def lb(catalog_db: Database) -> Iterator[pgreplica.LoadBalancer]:
    catalog_db.cluster.heal()
    with pgreplica.LoadBalancer(config=catalog_db.config()) as balancer, balancer.isolated():
        yield balancer


def standby(db: Database) -> psycopg.Connection[Any]:
    options = "-c search_path=cat,public -c statement_timeout=10s"
    return psycopg.connect(db.dsn(1), autocommit=True, options=options)


@pytest.mark.parametrize(("target", "reason", "sql"), ENTRIES, ids=IDS)
def test_classify_reads_the_catalog(
    lb: pgreplica.LoadBalancer, target: str, reason: str, sql: str
) -> None:
    result = lb.classify(sql)
    assert (result.target, result.reason) == (target, reason), sql


@pytest.mark.parametrize(("target", "reason", "sql"), ENTRIES, ids=IDS)
def test_each_entry_is_labelled_by_what_a_standby_does(
    catalog_db: Database, target: str, reason: str, sql: str
) -> None:
    """Replica entries run on a hot standby; primary entries fail there, or succeed
    and leave an advisory lock on the standby, which excludes nobody on the primary."""
    with standby(catalog_db) as conn:
        conn.execute("SELECT pg_advisory_unlock_all()")
        try:
            conn.execute(sql).fetchall()
        except psycopg.Error as exc:
            assert target == "primary", f"{sql!r} failed on the standby: {exc!r}"
            return
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ).fetchone()
        locks = row[0] if row else 0
        if target == "replica":
            assert locks == 0
        else:
            assert locks > 0, f"{sql!r} ran on the standby without a refusal or a lock"


def test_the_routing_connection_sends_catalog_primaries_to_the_primary(
    lb: pgreplica.LoadBalancer, catalog_db: Database
) -> None:
    primary_port = f":{catalog_db.cluster.port(0)}/"
    with lb.connection() as rc:
        rc.autocommit = True
        rc.execute("SET search_path = cat, public")
        for target, _, sql in ENTRIES:
            rc.execute(sql).fetchall()  # never an error, never a refusal
            on_primary = primary_port in (rc.host or "")
            assert on_primary == (target == "primary") or rc.reason == "replicas_behind", (
                sql,
                rc.host,
                rc.reason,
            )
        # the advisory lock taken through an operator is held on the primary session
        rc.execute("SELECT 7 @@@ 8")
        with lb.primary():  # the same primary session, where the lock must be
            held = rc.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid() AND classid = 7 AND objid = 8"
            ).fetchone()
            rc.execute("SELECT pg_advisory_unlock_all()")
        assert held == (1,)


def test_a_view_changed_after_it_was_cached_needs_a_refresh(
    lb: pgreplica.LoadBalancer, catalog_db: Database
) -> None:
    catalog_db.execute(0, "CREATE OR REPLACE VIEW cat.changing AS SELECT 1::bigint AS n")
    catalog_db.cluster.wait_replayed()
    assert lb.classify("SELECT n FROM cat.changing").replica
    catalog_db.execute(
        0, "CREATE OR REPLACE VIEW cat.changing AS SELECT nextval('cat.ticket') AS n"
    )
    lb.refresh_functions()
    assert lb.classify("SELECT n FROM cat.changing").reason == "view_sequence_function"


def test_a_stable_function_that_locks_is_named_in_a_warning(
    lb: pgreplica.LoadBalancer, catalog_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    catalog_db.execute(
        0,
        "CREATE OR REPLACE FUNCTION cat.lying_lock() RETURNS boolean LANGUAGE sql STABLE"
        " AS $$ SELECT pg_try_advisory_lock(77) $$",
    )
    with caplog.at_level(logging.WARNING, logger="pgreplica"):
        result = lb.classify("SELECT cat.lying_lock()")
    assert result.replica  # as declared: the user's to fix, with write_functions
    assert "function_volatility_suspect database=main function=cat.lying_lock" in caplog.text
    fixed = pgreplica.LoadBalancer(
        config={**catalog_db.config(), "write_functions": ["lying_lock"]}
    )
    with fixed:
        assert fixed.classify("SELECT cat.lying_lock()").reason == "write_function"
