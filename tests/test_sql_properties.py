"""Property tests for pgreplica.sql.classify().

* Any text at all: classify() never raises and always names a target.
* Statements from a small SQL grammar (built-in functions, volatile or not, user
  functions, CTEs some of which write, row-locking clauses, subqueries, set operations,
  several statements in one string): classify() never raises; a statement holding a
  write, a row lock or a user function never goes to a replica; and every statement it
  sends to a replica runs on a real hot standby without a read-only or recovery error
  (other errors, such as a random function given the wrong arguments, are expected).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgreplica._builtins import BUILTIN_FUNCTIONS, VOLATILE_BUILTINS
from pgreplica.sql import classify
from pgreplica.testing import LocalCluster

SCHEMA = Path(__file__).parent / "data" / "routing_schema.sql"

PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- (a) any text ----------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(st.one_of(st.text(), st.binary()))
def test_classify_never_raises_on_any_text(text: str | bytes) -> None:
    result = classify(text)
    assert result.target in ("replica", "primary")
    assert result.reason


@PROPERTY_SETTINGS
@given(st.text(alphabet="SELECT *FROM(),;%s'\"$-/\n1tx", max_size=40))
def test_classify_never_raises_on_sql_like_text(text: str) -> None:
    assert classify(text).target in ("replica", "primary")


# -- (b) a small SQL grammar -----------------------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """SQL text, and whether it holds something that must run on the primary."""

    sql: str
    primary: bool = False

    def __add__(self, other: Fragment) -> Fragment:
        return Fragment(self.sql + other.sql, self.primary or other.primary)


def join(parts: list[Fragment], separator: str) -> Fragment:
    return Fragment(separator.join(p.sql for p in parts), any(p.primary for p in parts))


#: Built-ins whose lower-case name is their name (the others need quotes, and then are
#: not what an unquoted call resolves to).
BUILTINS = sorted(name for name in BUILTIN_FUNCTIONS if name == name.lower())
VOLATILE = sorted(name for name in VOLATILE_BUILTINS if name == name.lower())
#: Untyped arguments for any function: few, small and cheap (pg_sleep(-1) returns at once).
ARGUMENTS = ["", "NULL", "0", "-1", "'a'", "x", "name", "0, 0", "NULL, NULL", "'a', 0"]
#: Sample values by argument type, for calls that match a real built-in signature.
LITERALS = {
    "int2": ["0", "1"],
    "int4": ["0", "1", "2"],
    "int8": ["0", "3"],
    "float4": ["0", "0.5"],
    "float8": ["0", "0.5"],
    "numeric": ["0", "1.5"],
    "text": ["'a'", "'search_path'", "'t'", "x::text"],
    "varchar": ["'a'"],
    "bpchar": ["'a'"],
    "name": ["'t'", "'postgres'"],
    "bool": ["true", "false"],
    "timestamptz": ["now()", "'2024-02-29 12:00+00'"],
    "timestamp": ["'2024-02-29 12:00'"],
    "date": ["current_date"],
    "interval": ["'1 hour'"],
    "jsonb": ["'{\"a\": [1, 2]}'"],
    "json": ["'[1, \"b\"]'"],
    "regclass": ["'t'", "'shop_book'"],
    "oid": ["0", "'t'::regclass::oid"],
    "bytea": ["'\\x0102'"],
    "_text": ["ARRAY['a', 'b']"],
    "_int4": ["ARRAY[1, 2]"],
    "inet": ["'127.0.0.1'"],
}
SIGNATURES_SQL = """
    SELECT p.proname, p.proargtypes::oid[] FROM pg_proc p
    WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind = 'f' AND p.pronargs <= 3
    ORDER BY p.proname, p.oid
"""
COLUMNS = ["id", "x", "name", "1", "'lit'", "NULL", "now()", "x % 3"]
#: FROM items, all with the columns id, x and name.
SOURCES = [
    "t",
    "t",
    "(SELECT id, x, name FROM t) AS s",
    "(VALUES (1, 2, 'v')) AS v(id, x, name)",
    "generate_series(1, 2) AS g(id) JOIN t USING (id)",
]

Signature = tuple[str, tuple[tuple[str, str], ...]]
"""A built-in's name and its arguments' (type name, SQL type)."""


def signatures(conn: psycopg.Connection[Any]) -> list[Signature]:
    """Built-ins (names from BUILTIN_FUNCTIONS) whose arguments all have sample values.

    The pg_sleep family is left out: its sample arguments would only hit the timeout."""
    types = {
        oid: (typname, sqltype)
        for oid, typname, sqltype in conn.execute(
            "SELECT oid, typname::text, format_type(oid, NULL) FROM pg_type"
        )
    }
    result: list[Signature] = []
    for name, argtypes in conn.execute(SIGNATURES_SQL):
        args = tuple(types[oid] for oid in argtypes)
        if (
            name in BUILTIN_FUNCTIONS
            and name == name.lower()
            and not name.startswith("pg_sleep")
            and all(typname in LITERALS for typname, _ in args)
        ):
            result.append((name, args))
    return result


def typed_call(signature: Signature) -> st.SearchStrategy[Fragment]:
    """Calls of a built-in with sample values cast to its argument types."""
    name, args = signature
    values = [
        st.sampled_from(LITERALS[typname]).map(lambda v, t=sqltype: f"({v})::{t}")
        for typname, sqltype in args
    ]
    return st.tuples(st.sampled_from(["", "pg_catalog."]), *values).map(
        lambda parts: Fragment(f"{parts[0]}{name}({', '.join(parts[1:])})")
    )


def untyped_call(schema: str, name: str, quote: bool, args: str) -> Fragment:
    """A call of a built-in with arguments that may not fit (name quoted or not)."""
    quoted = f'"{name}"' if quote else name
    return Fragment(f"{schema}{quoted}({args})")


def grammar(known: list[Signature]) -> st.SearchStrategy[Fragment]:
    """Statements: one to three, joined with "; "."""
    any_builtin_call = st.builds(
        untyped_call,
        st.sampled_from(["", "", "pg_catalog."]),
        st.one_of(st.sampled_from(BUILTINS), st.sampled_from(VOLATILE)),
        st.booleans(),
        st.sampled_from(ARGUMENTS),
    )
    signature_call = st.sampled_from(known).flatmap(typed_call)
    user_call = st.builds(
        lambda schema, name, args: Fragment(f"{schema}app_{name}({args})", primary=True),
        st.sampled_from(["", "public.", "reporting."]),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
        st.sampled_from(ARGUMENTS),
    )
    column = st.sampled_from(COLUMNS).map(Fragment)
    locking = st.builds(
        lambda strength, wait: Fragment(f" FOR {strength}{wait}", primary=True),
        st.sampled_from(["UPDATE", "NO KEY UPDATE", "SHARE", "KEY SHARE", "UPDATE OF t"]),
        st.sampled_from(["", " SKIP LOCKED", " NOWAIT"]),
    )
    writing_cte_body = st.sampled_from(
        [
            "INSERT INTO audit_log (msg) VALUES ('property') RETURNING id",
            "UPDATE t SET x = x WHERE false RETURNING id",
            "DELETE FROM jobs WHERE false RETURNING id",
            "INSERT INTO t (id) SELECT 1000 WHERE false RETURNING id",
        ]
    ).map(lambda sql: Fragment(sql, primary=True))

    @st.composite
    def select(draw: st.DrawFn, depth: int = 0, scalar: bool = False) -> Fragment:
        """A SELECT, possibly with CTEs, subqueries, set operations and row locks; a
        scalar one has one column, at most one row and no set operation."""
        ctes: list[Fragment] = []
        if depth == 0 and draw(st.integers(0, 3)) == 0:
            for i in range(draw(st.integers(1, 2))):
                body = draw(st.one_of(writing_cte_body, select(depth + 1)))
                ctes.append(Fragment(f"c{i} AS (") + body + Fragment(")"))
        items: list[Fragment] = []
        for _ in range(1 if scalar else draw(st.integers(1, 3))):
            kind = draw(st.integers(0, 9))
            if kind < 2:
                items.append(draw(column))
            elif kind < 6:
                items.append(draw(signature_call))
            elif kind < 8:
                items.append(draw(any_builtin_call))
            elif kind < 9 or depth >= 2:
                items.append(draw(user_call))
            else:
                items.append(Fragment("(") + draw(select(depth + 1, scalar=True)) + Fragment(")"))
        source = draw(st.sampled_from(SOURCES))
        if ctes and draw(st.booleans()):
            source = "c0"
        core = Fragment("SELECT ") + join(items, ", ") + Fragment(f" FROM {source}")
        if depth < 2 and draw(st.integers(0, 4)) == 0:
            sub = draw(select(depth + 1))
            core = core + Fragment(" WHERE EXISTS (") + sub + Fragment(")")
        if scalar or draw(st.integers(0, 5)) == 0:
            core = core + Fragment(" LIMIT 1")
        if draw(st.integers(0, 9)) == 0:
            core = core + draw(locking)
        if depth < 2 and not scalar and draw(st.integers(0, 5)) == 0:
            other = draw(select(depth + 1))
            operator = draw(st.sampled_from([" UNION ", " UNION ALL ", " EXCEPT "]))
            core = Fragment("(") + core + Fragment(f"){operator}(") + other + Fragment(")")
        if ctes:
            core = Fragment("WITH ") + join(ctes, ", ") + Fragment(" ") + core
        return core

    statement = st.one_of(
        select(),
        # Plain EXPLAIN runs nothing: it may go to a replica whatever it explains.
        select().map(lambda f: Fragment(f"EXPLAIN {f.sql}")),
        select().map(lambda f: Fragment("EXPLAIN ANALYZE ") + f),
        st.just(Fragment("SET LOCAL statement_timeout = '1s'")),
        st.just(Fragment("SHOW search_path")),
    )
    several = st.lists(statement, min_size=2, max_size=3).map(lambda parts: join(parts, "; "))
    return st.one_of(select(), select(), statement, several)


def is_recovery_error(exc: psycopg.Error) -> bool:
    """A read-only transaction error, or one saying that the server is in recovery."""
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return True
    text = " ".join(m or "" for m in (exc.diag.message_primary, exc.diag.message_hint))
    return re.search(r"during recovery|recovery is in progress|hot standby", text) is not None


@dataclass
class Replica:
    conn: psycopg.Connection[Any]
    statements: st.SearchStrategy[Fragment]


@pytest.fixture(scope="module")
def replica(cluster: LocalCluster) -> Iterator[Replica]:
    """An autocommit connection to replica 1, with routing_schema.sql replayed there, and
    the statement grammar built on the built-in signatures found in its catalog."""
    cluster.execute(0, SCHEMA.read_text(encoding="utf-8"))
    cluster.wait_replayed()
    options = "-c statement_timeout=1s -c search_path=routing,public"
    with psycopg.connect(
        cluster.dsn(1), autocommit=True, connect_timeout=10, options=options
    ) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        known = signatures(conn)
        assert len(known) > 500
        yield Replica(conn, grammar(known))


@PROPERTY_SETTINGS
@given(st.data())
def test_generated_statements_routed_to_a_replica_run_there(
    replica: Replica, data: st.DataObject
) -> None:
    fragment = data.draw(replica.statements, label="statement")
    result = classify(fragment.sql)
    assert result.target in ("replica", "primary")
    if fragment.primary:
        assert result.target == "primary", (fragment.sql, result)
    if result.target != "replica":
        return
    conn = replica.conn
    conn.execute("BEGIN READ ONLY")
    try:
        with conn.cursor() as cur:
            cur.execute(fragment.sql)
            while cur.nextset():
                pass
    except psycopg.Error as exc:
        assert not is_recovery_error(exc), (fragment.sql, result, exc)
    finally:
        conn.execute("ROLLBACK")
