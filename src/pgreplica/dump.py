"""``pgreplica dump``: a consistent, deny-by-default export that runs on a replica.

An export job is a long read that belongs on a replica, and one that quietly runs on the
primary is a bug nobody notices until the primary is slow (crates.io's database dump ran
on the primary for weeks because of a misspelt variable, and could not have run on the
replica anyway: it created views and asked for SERIALIZABLE). So this tool:

* picks a healthy replica of the configured database with the prober (up, in recovery,
  in the read set) and never falls back to the primary unless ``--allow-primary`` is
  given, and then says so on stderr; a database without replicas is an error naming the
  setting, not a silent switch;
* reads everything in ONE snapshot: ``BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY``
  (SERIALIZABLE is refused on a hot standby), shared with ``--jobs`` workers through
  ``pg_export_snapshot()`` / ``SET TRANSACTION SNAPSHOT``, each worker on its own
  connection to the same replica; nothing is created on the server;
* exports only what a visibility file declares: every column of every exported table is
  ``public`` or ``private`` (an unclassified column is an error, checked against the live
  catalog before any row is read), private columns are never selected, tables may have a
  row filter, and tables not listed are not exported (a warning names them);
* keeps foreign keys intact: a child of a filtered parent gets a semi-join on the
  parent's filter (transitively), keys must be public, and a foreign key cycle through a
  filtered table is refused;
* writes ``schema.sql``, one CSV per table, ``import.sql`` (psql) and ``metadata.json``,
  to a directory or a ``.tar.gz``, and can re-import a dump into a scratch database to
  prove it loads with every foreign key valid (``--verify``).

See ``docs/dump.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import selectors
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pglast
import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from pgreplica.balancer import Router
from pgreplica.config import Settings
from pgreplica.errors import ConfigError, HostUnavailable, PgReplicaError
from pgreplica.health import Host, Prober, ProberThread

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "APPLICATION_NAME",
    "DumpError",
    "DumpResult",
    "TableRule",
    "VerifyResult",
    "Visibility",
    "VisibilityError",
    "add_arguments",
    "dump",
    "import_dump",
    "run",
    "verify",
]

APPLICATION_NAME = "pgreplica-dump"
"""``application_name`` of every dump connection (the prober's end in ``-prober``)."""
VERIFY_APPLICATION_NAME = "pgreplica-verify"
FORMAT_VERSION = 1
PUBLIC = "public"
PRIVATE = "private"
_BUILTIN_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_SAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_COPY_LINE = re.compile(
    r"\A\\copy\s+(?P<target>.+?)\s+FROM\s+'(?P<file>[^']+)'\s+WITH\s+\(FORMAT csv, HEADER\)\s*\Z"
)
_PROGRESS_EVERY_ROWS = 4096
_CATALOG_SEARCH_PATH = "SET LOCAL search_path = pg_catalog, pg_temp"
_SESSION_SETUP = (
    # As pg_dump does: a role's timeouts must not kill a long export half way through.
    "SET statement_timeout = 0",
    "SET lock_timeout = 0",
    "SET idle_in_transaction_session_timeout = 0",
)


class DumpError(PgReplicaError):
    """The dump (or its verification) cannot go on; the message says why."""

    __module__ = "pgreplica"


class VisibilityError(ConfigError):
    """The visibility file is malformed or does not match the database's catalog."""

    __module__ = "pgreplica"


# ---------------------------------------------------------------------- visibility file


@dataclass(frozen=True)
class TableRule:
    """What may leave the database from one table: classified columns and a row filter."""

    schema: str
    name: str
    columns: Mapping[str, str]
    """Column name -> ``"public"`` or ``"private"``."""
    filter: str | None = None
    """A SQL boolean expression over the table's columns (private ones included)."""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def setting(self) -> str:
        """How the visibility file names this table (``tables.users``)."""
        key = self.name if self.schema == "public" else self.qualified
        return f"tables.{key}" if re.fullmatch(r"[A-Za-z0-9_.-]+", key) else f'tables."{key}"'


@dataclass(frozen=True)
class Visibility:
    """A parsed visibility file: which tables, columns and rows may be exported."""

    source: str
    tables: tuple[TableRule, ...]
    sha256: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Visibility:
        """Read and check a visibility TOML file (shape only: the catalog comes later)."""
        file = Path(path)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            raise VisibilityError(str(file), "visibility file not found") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise VisibilityError(str(file), f"not valid TOML ({exc})") from None
        return cls.from_dict(data, source=file.name, sha256=hashlib.sha256(raw).hexdigest())

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "visibility", sha256: str = ""
    ) -> Visibility:
        """Build from a mapping shaped like the TOML file::

        [tables.users]
        columns = { id = "public", name = "public", email = "private" }
        filter = "NOT is_banned"
        """

        def fail(setting: str, problem: str) -> VisibilityError:
            return VisibilityError(f"{source}: {setting}", problem)

        unknown = set(data) - {"tables"}
        if unknown:
            raise fail(sorted(unknown)[0], "unknown setting (expected [tables.NAME] sections)")
        tables = data.get("tables")
        if not isinstance(tables, Mapping) or not tables:
            raise fail("tables", "missing: declare each exported table as [tables.NAME]")
        rules: list[TableRule] = []
        seen: set[tuple[str, str]] = set()
        for key, entry in tables.items():
            schema, _, name = key.partition(".") if "." in key else ("public", "", key)
            where = f"tables.{key}"
            if not name or "\n" in key or "\r" in key:
                raise fail(where, "expected a table name such as users or schema.table")
            if (schema, name) in seen:
                raise fail(where, f"table {schema}.{name} is listed twice")
            seen.add((schema, name))
            if not isinstance(entry, Mapping):
                raise fail(where, "expected a table with columns = { ... } and an optional filter")
            extra = set(entry) - {"columns", "filter"}
            if extra:
                raise fail(f"{where}.{sorted(extra)[0]}", "unknown setting (columns, filter)")
            columns = entry.get("columns")
            if not isinstance(columns, Mapping) or not columns:
                raise fail(
                    f"{where}.columns", 'missing: classify every column, e.g. { id = "public" }'
                )
            for column, level in columns.items():
                if level not in (PUBLIC, PRIVATE):
                    raise fail(
                        f"{where}.columns.{column}",
                        f'expected "public" or "private", got {level!r}',
                    )
            row_filter = entry.get("filter")
            if row_filter is not None:
                _check_filter(row_filter, f"{source}: {where}.filter")
            rules.append(TableRule(schema, name, dict(columns), row_filter))
        return cls(source, tuple(rules), sha256)


def _check_filter(text: object, setting: str) -> None:
    """A row filter must be one SQL boolean expression and nothing else.

    It runs inside a read-only snapshot (on a standby it cannot write at all), but it is
    pasted into ``COPY (SELECT ... WHERE <filter>)``: a filter that closes the
    parenthesis and adds a ``UNION`` could export columns nobody classified. So it must
    parse as a plain ``WHERE`` expression both bare and in parentheses, with no ``;``.
    """

    def fail(problem: str) -> VisibilityError:
        return VisibilityError(setting, problem)

    if not isinstance(text, str) or not text.strip():
        raise fail("expected a SQL expression such as NOT is_private")
    if ";" in text:
        raise fail("must not contain ';' (one expression, not statements)")
    for wrapped in (f"SELECT 1 WHERE {text}", f"SELECT 1 WHERE (\n{text}\n)"):
        try:
            statements = pglast.parse_sql(wrapped)
        except pglast.parser.ParseError as exc:
            raise fail(f"not a SQL expression ({exc})") from None
        stmt = statements[0].stmt if len(statements) == 1 else None
        if not isinstance(stmt, pglast.ast.SelectStmt) or not _only_where(stmt):
            raise fail("must be a single boolean expression (no UNION, ORDER BY, LIMIT, ...)")


def _only_where(stmt: pglast.ast.SelectStmt) -> bool:
    allowed = {"targetList", "whereClause", "op", "all", "limitOption", "groupDistinct"}
    if stmt.op != pglast.enums.SetOperation.SETOP_NONE or stmt.whereClause is None:
        return False
    return all(
        getattr(stmt, slot) in (None, False)
        for slot in getattr(stmt, "__slots__", ())
        if slot not in allowed
    )


# ---------------------------------------------------------------------- catalog and plan


@dataclass
class _Column:
    name: str
    attnum: int
    type_sql: str
    not_null: bool
    public: bool = False


@dataclass
class _ForeignKey:
    name: str
    child: int
    parent: int
    child_columns: tuple[str, ...]
    parent_columns: tuple[str, ...]
    definition: str
    validated: bool


@dataclass
class _Table:
    oid: int
    schema: str
    name: str
    rule: TableRule
    columns: list[_Column]
    pages: int
    estimate: int | None
    file: str = ""
    condition: str = ""
    """The effective row filter: the table's own filter and the semi-joins on parents."""
    fks: list[_ForeignKey] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql_name(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def exported(self) -> list[_Column]:
        return [c for c in self.columns if c.public]

    def column_list(self) -> str:
        return ", ".join(quote_ident(c.name) for c in self.exported)

    def select_sql(self) -> str:
        where = f" WHERE {self.condition}" if self.condition else ""
        return f"SELECT {self.column_list()} FROM {self.sql_name} AS _pgr_0{where}"

    def copy_sql(self) -> str:
        return f"COPY ({self.select_sql()}) TO STDOUT WITH (FORMAT csv, HEADER)"


@dataclass
class _Plan:
    tables: list[_Table]
    """Parents before children."""
    foreign_keys: list[_ForeignKey]
    pre_data: list[str]
    post_data: list[str]
    unlisted: list[str]
    warnings: list[str]


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (always: the same name whatever its case)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_TABLES_SQL = """
SELECT c.oid::int8, n.nspname, c.relname, c.relkind::text, c.relispartition,
       c.relpages::int8, c.reltuples::float8
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s)
"""
_COLUMNS_SQL = """
SELECT a.attrelid::int8, a.attnum::int, a.attname, a.attnotnull,
       CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod)
            ELSE format_type(a.atttypid, a.atttypmod) END,
       elem.oid::int8, elem.typtype::text, elem_ns.nspname, elem.typname
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type elem ON elem.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype
                                     WHEN t.typelem <> 0 AND t.typlen = -1 THEN t.typelem
                                     ELSE t.oid END
JOIN pg_namespace elem_ns ON elem_ns.oid = elem.typnamespace
WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""
_ENUMS_SQL = """
SELECT t.oid::int8, format('%%I.%%I', n.nspname, t.typname),
       array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
JOIN pg_enum e ON e.enumtypid = t.oid
WHERE t.oid = ANY(%s)
GROUP BY t.oid, n.nspname, t.typname
ORDER BY 2
"""
_CONSTRAINTS_SQL = """
SELECT con.conname, con.contype::text, con.conrelid::int8, con.confrelid::int8,
       ARRAY(SELECT attname FROM unnest(con.conkey) WITH ORDINALITY k(num, i)
             JOIN pg_attribute ON attrelid = con.conrelid AND attnum = k.num ORDER BY k.i),
       ARRAY(SELECT attname FROM unnest(con.confkey) WITH ORDINALITY k(num, i)
             JOIN pg_attribute ON attrelid = con.confrelid AND attnum = k.num ORDER BY k.i),
       pg_get_constraintdef(con.oid), con.convalidated
FROM pg_constraint con
WHERE con.conrelid = ANY(%s) AND con.contype IN ('p', 'u', 'f')
ORDER BY con.conrelid, con.contype, con.conname
"""
_INDEXES_SQL = """
SELECT i.indrelid::int8, ic.relname, pg_get_indexdef(i.indexrelid),
       ARRAY(SELECT DISTINCT a.attname FROM pg_attribute a
             WHERE a.attrelid = i.indrelid AND a.attnum > 0 AND (
                   a.attnum = ANY(i.indkey::int2[])
                   OR EXISTS (SELECT 1 FROM pg_depend d
                              WHERE d.classid = 'pg_class'::regclass
                                AND d.objid = i.indexrelid
                                AND d.refclassid = 'pg_class'::regclass
                                AND d.refobjid = i.indrelid
                                AND d.refobjsubid = a.attnum)))
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = ANY(%s) AND i.indisvalid
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                  WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x'))
ORDER BY i.indrelid, ic.relname
"""


def _build_plan(conn: psycopg.Connection[Any], visibility: Visibility) -> _Plan:
    """Match the visibility file with the live catalog, inside the dump's snapshot.

    Every problem is found here, before a single row is read: tables that do not exist,
    unclassified or unknown columns, private key columns, foreign key cycles through a
    filtered table, and filters that do not compile (each is planned with ``EXPLAIN``).
    """
    source = visibility.source
    conn.execute(_CATALOG_SEARCH_PATH)  # so that the catalog's SQL names every schema
    schemas = sorted({r.schema for r in visibility.tables})
    relations: dict[tuple[str, str], tuple[Any, ...]] = {}
    for row in conn.execute(_TABLES_SQL, (schemas,)).fetchall():
        relations[(row[1], row[2])] = row

    tables: dict[int, _Table] = {}
    missing: list[str] = []
    for rule in visibility.tables:
        row = relations.get((rule.schema, rule.name))
        if row is None or row[3] not in ("r", "p"):
            what = "does not exist" if row is None else f"is not a table (relkind {row[3]!r})"
            missing.append(f"{rule.setting}: {rule.qualified} {what}")
            continue
        oid, _, _, _, _, pages, reltuples = row
        estimate = int(reltuples) if reltuples is not None and reltuples >= 0 else None
        tables[oid] = _Table(oid, rule.schema, rule.name, rule, [], int(pages), estimate)
    if missing:
        raise VisibilityError(source, "listed tables not in the database: " + "; ".join(missing))
    listed = {(t.schema, t.name) for t in tables.values()}
    unlisted = sorted(
        f"{schema}.{name}"
        for (schema, name), row in relations.items()
        if row[3] in ("r", "p") and not row[4] and (schema, name) not in listed
    )

    oids = list(tables)
    user_types: list[tuple[_Column, _Table, int, str, str]] = []
    for attrelid, attnum, name, not_null, type_sql, elem_oid, typtype, nsp, typname in conn.execute(
        _COLUMNS_SQL, (oids,)
    ).fetchall():
        table = tables[attrelid]
        if "\n" in name or "\r" in name:
            raise DumpError(f"column {table.qualified}.{name!r}: line breaks in names are refused")
        column = _Column(name, attnum, type_sql, not_null)
        table.columns.append(column)
        if nsp not in _BUILTIN_SCHEMAS:
            user_types.append((column, table, elem_oid, typtype, f"{nsp}.{typname}"))

    unclassified: list[str] = []
    unknown: list[str] = []
    for table in tables.values():
        levels = table.rule.columns
        names = {c.name for c in table.columns}
        for column in table.columns:
            level = levels.get(column.name)
            if level is None:
                unclassified.append(f"{table.qualified}.{column.name}")
            column.public = level == PUBLIC
        unknown += [f"{table.rule.setting}.columns.{c}" for c in levels if c not in names]
    if unclassified:
        raise VisibilityError(
            source,
            f"{len(unclassified)} column(s) not classified as public or private: "
            + ", ".join(unclassified)
            + " (nothing is exported by default: classify every column of an exported table)",
        )
    if unknown:
        raise VisibilityError(source, "classified columns that do not exist: " + ", ".join(unknown))
    enum_types: set[int] = set()
    other_types: dict[str, str] = {}
    for column, table, type_oid, typtype, type_name in user_types:
        if not column.public:
            continue
        if typtype == "e":
            enum_types.add(type_oid)
        else:
            other_types.setdefault(type_name, f"{table.qualified}.{column.name}")
    for table in tables.values():
        if not table.exported:
            raise VisibilityError(
                f"{source}: {table.rule.setting}", "no public column: nothing to export"
            )

    keys: list[tuple[_Table, str, str, list[str]]] = []  # primary keys and unique constraints
    foreign_keys: list[_ForeignKey] = []
    warnings: list[str] = []
    problems: list[str] = []
    for conname, contype, conrelid, confrelid, cols, fcols, definition, validated in conn.execute(
        _CONSTRAINTS_SQL, (oids,)
    ).fetchall():
        table = tables[conrelid]
        public = {c.name for c in table.exported}
        if contype in ("p", "u"):
            hidden = [c for c in cols if c not in public]
            if contype == "p" and hidden:
                problems.append(
                    f"primary key {conname} of {table.qualified} uses private column(s) "
                    + ", ".join(hidden)
                )
            elif not hidden:
                keys.append((table, conname, definition, cols))
            continue
        parent = tables.get(confrelid)
        if parent is None:
            warnings.append(
                f"foreign key {conname} of {table.qualified} references a table that is not "
                "exported: left out of schema.sql"
            )
            continue
        hidden = [f"{table.qualified}.{c}" for c in cols if c not in public]
        parent_public = {c.name for c in parent.exported}
        hidden += [f"{parent.qualified}.{c}" for c in fcols if c not in parent_public]
        if hidden:
            problems.append(f"foreign key {conname} uses private column(s) {', '.join(hidden)}")
            continue
        fk = _ForeignKey(
            conname,
            table.oid,
            parent.oid,
            tuple(cols),
            tuple(fcols),
            definition.replace(" NOT VALID", ""),
            bool(validated),
        )
        table.fks.append(fk)
        foreign_keys.append(fk)
    if problems:
        raise VisibilityError(
            source,
            "keys must be public (a key that is private cannot be exported, and a dump "
            "without it cannot keep its foreign keys): " + "; ".join(problems),
        )

    ordered = _order_and_filter(tables)

    used_files: set[str] = set()
    for table in ordered:
        base = _SAFE_FILE_CHARS.sub("_", table.qualified)
        name, n = f"data/{base}.csv", 1
        while name.lower() in used_files:
            n += 1
            name = f"data/{base}_{n}.csv"
        used_files.add(name.lower())
        table.file = name

    pre_data: list[str] = []
    for schema in sorted({t.schema for t in ordered} - {"public"}):
        pre_data.append(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)};")
    if enum_types:
        for _, type_name, labels in conn.execute(_ENUMS_SQL, (list(enum_types),)).fetchall():
            values = ", ".join(quote_literal(label) for label in labels)
            pre_data.append(f"CREATE TYPE {type_name} AS ENUM ({values});")
    for type_name, where in sorted(other_types.items()):
        warnings.append(
            f"type {type_name} (column {where}) is not created by import.sql: create it, "
            "or its extension, in the target database first"
        )
    for table in ordered:
        columns = ",\n".join(
            f"    {quote_ident(c.name)} {c.type_sql}{' NOT NULL' if c.not_null else ''}"
            for c in table.exported
        )
        pre_data.append(f"CREATE TABLE {table.sql_name} (\n{columns}\n);")

    post_data: list[str] = []
    for table, conname, definition, _ in keys:
        post_data.append(
            f"ALTER TABLE ONLY {table.sql_name} ADD CONSTRAINT {quote_ident(conname)} {definition};"
        )
    for relid, _, definition, columns in conn.execute(_INDEXES_SQL, (oids,)).fetchall():
        table = tables[relid]
        if set(columns) <= {c.name for c in table.exported}:
            post_data.append(definition.replace(" ON ONLY ", " ON ", 1) + ";")
    for fk in foreign_keys:
        post_data.append(
            f"ALTER TABLE ONLY {tables[fk.child].sql_name} ADD CONSTRAINT "
            f"{quote_ident(fk.name)} {fk.definition};"
        )
    conn.execute("SET LOCAL search_path TO DEFAULT")  # filters run with the usual one
    _check_filters(conn, ordered, visibility)
    return _Plan(ordered, foreign_keys, pre_data, post_data, unlisted, warnings)


def _order_and_filter(tables: dict[int, _Table]) -> list[_Table]:
    """Order tables parents first and give each its effective row filter.

    A child row whose parent row is filtered out would break its foreign key on import,
    so a child of a filtered parent only keeps rows whose parent row is exported::

        (fk IS NULL OR EXISTS (SELECT 1 FROM parent AS _pgr_1
                               WHERE _pgr_1.key = _pgr_0.fk AND <parent's condition>))

    where the parent's condition holds its own filter and, transitively, its own
    semi-joins. A foreign key that is ``NOT VALID`` on the source gets the semi-join
    too (its rows may already be orphans). A cycle of foreign keys that needs any of this
    cannot be expressed with finitely nested semi-joins: it is refused.
    """
    components = _strongly_connected(tables)
    conditioned: set[int] = set()
    for component in components:  # parents first
        members = set(component)
        needs = any(
            tables[oid].rule.filter is not None
            or any(
                not fk.validated or (fk.parent in conditioned and fk.parent not in members)
                for fk in tables[oid].fks
            )
            for oid in component
        )
        cyclic = len(component) > 1 or any(
            fk.parent == component[0] for fk in tables[component[0]].fks
        )
        if needs and cyclic:
            names = " -> ".join(sorted(tables[oid].qualified for oid in component))
            raise DumpError(
                f"foreign keys form a cycle ({names}) through a filtered table: rows kept by "
                "the filter could reference rows it drops, and semi-joins cannot follow a "
                "cycle; export the cycle without row filters, or leave it out"
            )
        if needs:
            conditioned.update(component)
    for table in tables.values():
        table.condition = _condition(tables, table, 0, conditioned)
    return [
        tables[oid]
        for component in components
        for oid in sorted(component, key=lambda o: tables[o].qualified)
    ]


def _condition(tables: dict[int, _Table], table: _Table, depth: int, conditioned: set[int]) -> str:
    alias = f"_pgr_{depth}"
    parts: list[str] = []
    if table.rule.filter is not None:
        text = table.rule.filter
        parts.append(f"(\n{text}\n)" if "--" in text else f"({text})")
    for fk in table.fks:
        if fk.parent not in conditioned and fk.validated:
            continue
        parent = tables[fk.parent]
        inner = f"_pgr_{depth + 1}"
        match = [
            f"{inner}.{quote_ident(p)} = {alias}.{quote_ident(c)}"
            for c, p in zip(fk.child_columns, fk.parent_columns, strict=True)
        ]
        nested = _condition(tables, parent, depth + 1, conditioned)
        if nested:
            match.append(nested)
        exists = f"EXISTS (SELECT 1 FROM {parent.sql_name} AS {inner} WHERE {' AND '.join(match)})"
        by_name = {c.name: c for c in table.columns}
        nullable = [
            f"{alias}.{quote_ident(c)} IS NULL" for c in fk.child_columns if not by_name[c].not_null
        ]
        parts.append(f"({' OR '.join([*nullable, exists])})" if nullable else exists)
    return " AND ".join(parts)


def _strongly_connected(tables: dict[int, _Table]) -> list[list[int]]:
    """Tarjan's algorithm on child -> parent edges: components come parents first."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    result: list[list[int]] = []
    counter = 0

    def visit(oid: int) -> None:
        nonlocal counter
        index[oid] = low[oid] = counter
        counter += 1
        stack.append(oid)
        on_stack.add(oid)
        for fk in tables[oid].fks:
            if fk.parent not in index:
                visit(fk.parent)
                low[oid] = min(low[oid], low[fk.parent])
            elif fk.parent in on_stack:
                low[oid] = min(low[oid], index[fk.parent])
        if low[oid] == index[oid]:
            component: list[int] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == oid:
                    break
            result.append(component)

    for oid in sorted(tables, key=lambda o: tables[o].qualified):
        if oid not in index:
            visit(oid)
    return result


def _check_filters(conn: psycopg.Connection[Any], tables: list[_Table], vis: Visibility) -> None:
    """Plan every table's query (EXPLAIN reads no row): a bad filter fails now, by name."""
    for table in tables:
        if not table.condition:
            continue
        try:
            conn.execute(f"EXPLAIN {table.select_sql()}")
        except psycopg.Error as exc:
            own = f" {table.rule.setting}.filter" if table.rule.filter else ""
            raise VisibilityError(
                f"{vis.source}:{own or ' ' + table.rule.setting}",
                f"the row filter of {table.qualified} does not compile: {_first_line(exc)}",
            ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------------- choosing the host


@dataclass(frozen=True)
class _Source:
    conninfo: str
    label: str
    role: str
    """``replica``, or ``primary`` (only with ``--allow-primary``)."""
    reason: str = ""


def _choose_source(
    settings: Settings, database: str | None, allow_primary: bool, report: _Reporter
) -> _Source:
    """The replica to dump from: up, in recovery and in the read set, per the prober.

    Only the replicas are probed (the primary receives nothing from a dump unless it is
    allowed and needed). Without a healthy replica this is an error that names the
    problem, unless ``allow_primary``: then the primary, announced on stderr.
    """
    config = settings.database(database)  # ConfigError naming an unknown database
    name = config.name
    advice = (
        "the dump runs on a replica and never falls back to the primary; "
        "pass --allow-primary to dump from the primary"
    )
    error: PgReplicaError
    if not settings.enabled:
        problem = "PGREPLICA_ENABLED=false switches replicas off"
        error = ConfigError("PGREPLICA_ENABLED", f"false switches replicas off: {advice}")
    elif not config.replicas:
        problem = f"no replicas configured for {name!r}"
        error = ConfigError(f"databases.{name}.replicas", f"{problem}: {advice}")
    else:
        settings = settings.with_options(application_name=APPLICATION_NAME)
        chosen, states = _probe_replicas(settings, Router(settings), name)
        if chosen is not None:
            return _Source(chosen.dsn.conninfo, chosen.label, "replica")
        problem = f"no healthy replica of database {name!r} ({'; '.join(states)})"
        error = HostUnavailable(f"{problem}: {advice}", reason="no_healthy_replica")
    if not allow_primary:
        raise error
    report.warning(f"dumping from the PRIMARY {config.primary.label} (--allow-primary): {problem}")
    return _Source(config.primary.conninfo, config.primary.label, "primary", problem)


def _probe_replicas(settings: Settings, router: Router, name: str) -> tuple[Host | None, list[str]]:
    """Probe the replicas of database ``name`` once each (the balancer's prober, without
    the primary); return the most advanced one in the read set, and every replica's state."""
    route = router.route(name)
    prober = Prober(
        list(route.replicas),
        interval=settings.probe_interval,
        timeout=settings.probe_timeout,
        connect_timeout=settings.connect_timeout,
        statement_timeout=settings.probe_statement_timeout,
        application_name=settings.application_name,
        on_change=router.refresh,
    )
    runner = ProberThread(prober)
    runner.start()
    try:
        deadline = time.monotonic() + settings.connect_timeout + settings.probe_timeout + 1
        while not prober.first_round.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        runner.stop()
    router.refresh()
    states = [
        f"{h.label} {h.status().state}" + (f": {h.last_error}" if h.last_error else "")
        for h in route.replicas
    ]
    if not route.read_set:
        return None, states
    return max(route.read_set, key=lambda h: h.replay_lsn), states


# ---------------------------------------------------------------------- progress


class _Reporter:
    """Progress and warnings on stderr: bars on a terminal, JSON lines otherwise."""

    def __init__(self, stream: TextIO, *, quiet: bool, tty: bool | None = None) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._tables: dict[str, list[Any]] = {}  # name -> [rows, estimate, bytes, done, secs]
        self._drawn = 0
        self._last_draw = 0.0

    def _emit(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, **fields}, sort_keys=False) + "\n")
        self.stream.flush()

    def warning(self, message: str) -> None:
        with self._lock:
            if self.tty:
                self.stream.write(f"pgreplica: warning: {message}\n")
                self.stream.flush()
            else:
                self._emit("warning", message=message)

    def start(self, tables: Sequence[_Table]) -> None:
        with self._lock:
            for t in tables:
                self._tables[t.qualified] = [0, t.estimate, 0, False, 0.0]
            if self.tty and not self.quiet:
                self._draw(force=True)

    def advance(self, table: str, rows: int, nbytes: int) -> None:
        if self.quiet or not self.tty:
            return
        with self._lock:
            state = self._tables[table]
            state[0], state[2] = rows, nbytes
            self._draw()

    def finish(self, table: _Table) -> None:
        with self._lock:
            state = self._tables[table.qualified]
            state[:] = [table.rows, table.estimate, table.bytes, True, table.seconds]
            if self.quiet:
                return
            if self.tty:
                self._draw(force=True)
            else:
                self._emit(
                    "table",
                    table=table.qualified,
                    rows=table.rows,
                    bytes=table.bytes,
                    seconds=round(table.seconds, 3),
                    file=table.file,
                )

    def done(self, result: DumpResult) -> None:
        if self.quiet:
            return
        with self._lock:
            summary = (
                f"{len(result.tables)} tables, {sum(result.tables.values())} rows, "
                f"{result.bytes / 1e6:.1f} MB in {result.seconds:.2f}s -> {result.out}"
            )
            if self.tty:
                self.stream.write(f"pgreplica dump: {summary} (from {result.host})\n")
                self.stream.flush()
            else:
                self._emit(
                    "done",
                    tables=len(result.tables),
                    rows=sum(result.tables.values()),
                    bytes=result.bytes,
                    seconds=round(result.seconds, 3),
                    out=str(result.out),
                    host=result.host,
                    role=result.role,
                )

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        height = max(3, shutil.get_terminal_size((80, 24)).lines - 2)
        items = list(self._tables.items())
        if len(items) > height:
            running = [(n, s) for n, s in items if not s[3] and s[0]]
            finished = sum(1 for _, s in items if s[3])
            items = running[: height - 1]
            lines = [f"  {finished}/{len(self._tables)} tables done"]
        else:
            lines = []
        width = max((len(n) for n, _ in items), default=0)
        for name, (rows, estimate, nbytes, done, secs) in items:
            if done:
                fraction: float | None = 1.0
            elif estimate:
                fraction = min(rows / estimate, 0.99)
            else:
                fraction = None
            bar = (
                "[" + "#" * round(20 * fraction) + "-" * (20 - round(20 * fraction)) + "]"
                f" {fraction:4.0%}"
                if fraction is not None
                else "[" + "?" * 20 + "]     "
            )
            tail = f" {secs:.1f}s" if done else ""
            lines.append(f"  {name:<{width}} {bar} {rows:>12,} rows {nbytes / 1e6:8.1f} MB{tail}")
        out = self.stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F")
        for line in lines:
            out.write(line + "\x1b[K\n")
        self._drawn = len(lines)
        out.flush()


# ---------------------------------------------------------------------- the dump


@dataclass(frozen=True)
class DumpResult:
    """What a dump wrote: where, from which host, and the row count of every table."""

    out: Path
    host: str
    role: str
    tables: Mapping[str, int]
    bytes: int
    seconds: float
    metadata: Mapping[str, Any]


def _connect(conninfo: str, application_name: str, settings: Settings) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        conninfo,
        autocommit=True,
        application_name=application_name,
        connect_timeout=max(1, round(settings.connect_timeout)),
    )
    try:
        for statement in _SESSION_SETUP:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


_SNAPSHOT_SQL = """
SELECT pg_is_in_recovery(), pg_export_snapshot(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END)::text,
       pg_last_xact_replay_timestamp(),
       current_setting('server_version'), current_setting('server_version_num')::int,
       clock_timestamp()
"""
_LSN_SQL = """
SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END)::text
"""


def _prepare_out(out: Path) -> tuple[bool, Path]:
    """(is a tarball, parent directory); refuse to overwrite anything."""
    tarball = out.name.endswith((".tar.gz", ".tgz"))
    if out.exists() and (tarball or not out.is_dir() or any(out.iterdir())):
        raise DumpError(f"{out} already exists: not overwriting it")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise DumpError(f"{parent} does not exist: create it first")
    return tarball, parent


def dump(
    settings: Settings,
    visibility: Visibility,
    out: str | os.PathLike[str],
    *,
    database: str | None = None,
    jobs: int = 1,
    allow_primary: bool = False,
    stderr: TextIO | None = None,
    quiet: bool = False,
    tty: bool | None = None,
) -> DumpResult:
    """Export the tables of ``visibility`` from a replica of ``database`` into ``out``.

    ``out`` is a new (or empty) directory, or a ``.tar.gz`` file. Nothing is written
    until the host is chosen and the catalog matches the visibility file; a failure
    later removes what was written.
    """
    if jobs < 1:
        raise ConfigError("--jobs", f"must be at least 1, got {jobs}")
    started = time.monotonic()
    report = _Reporter(stderr or sys.stderr, quiet=quiet, tty=tty)
    target = Path(out)
    tarball, parent = _prepare_out(target)
    source = _choose_source(settings, database, allow_primary, report)
    db_name = settings.database(database).name

    with contextlib.ExitStack() as stack:
        leader = stack.enter_context(_connect(source.conninfo, APPLICATION_NAME, settings))
        lsn_before = leader.execute(_LSN_SQL).fetchone()
        leader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = leader.execute(_SNAPSHOT_SQL).fetchone()
        assert row is not None and lsn_before is not None
        in_recovery, snapshot, lsn, replay_ts, version, version_num, taken_at = row
        if source.role == "replica" and not in_recovery:
            raise DumpError(
                f"{source.label} was chosen as a replica but is not in recovery (promoted?): "
                "not dumping from a primary without --allow-primary"
            )
        plan = _build_plan(leader, visibility)
        for message in plan.warnings:
            report.warning(message)
        if plan.unlisted:
            report.warning(
                f"tables not listed in {visibility.source}, not exported: "
                + ", ".join(plan.unlisted)
            )

        staging = Path(tempfile.mkdtemp(prefix=".pgreplica-dump-", dir=parent))
        stack.callback(shutil.rmtree, staging, True)
        (staging / "data").mkdir()
        report.start(plan.tables)
        _copy_all(leader, source, settings, snapshot, plan, staging, jobs, report)
        leader.execute("COMMIT")

        (staging / "schema.sql").write_text(_schema_sql(plan, db_name, source), encoding="utf-8")
        (staging / "import.sql").write_text(_import_sql(plan, db_name, source), encoding="utf-8")
        metadata = _metadata(
            plan,
            visibility,
            source,
            db_name,
            jobs,
            lsn=lsn,
            lsn_before=lsn_before[0],
            replay_ts=replay_ts,
            version=version,
            version_num=version_num,
            taken_at=taken_at,
        )
        (staging / "metadata.json").write_text(
            json.dumps(metadata, indent=2) + "\n", encoding="utf-8"
        )
        if tarball:
            _write_tarball(staging, target)
        else:
            if target.exists():
                target.rmdir()  # empty, checked above
            staging.rename(target)
    result = DumpResult(
        out=target,
        host=source.label,
        role=source.role,
        tables={t.qualified: t.rows for t in plan.tables},
        bytes=sum(t.bytes for t in plan.tables),
        seconds=time.monotonic() - started,
        metadata=metadata,
    )
    report.done(result)
    return result


def _copy_all(
    leader: psycopg.Connection[Any],
    source: _Source,
    settings: Settings,
    snapshot: str,
    plan: _Plan,
    staging: Path,
    jobs: int,
    report: _Reporter,
) -> None:
    """COPY every table, each by one worker; workers share the leader's snapshot.

    The leader is worker 0; the others open their own connection to the same host and
    import the snapshot before their first table. The first failure cancels the rest.
    """
    work: queue.SimpleQueue[_Table] = queue.SimpleQueue()
    for table in sorted(plan.tables, key=lambda t: -t.pages):  # biggest first
        work.put(table)
    count = min(jobs, len(plan.tables))
    connections: list[psycopg.Connection[Any]] = [leader]
    lock = threading.Lock()
    failed = threading.Event()
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        conn = leader
        own: psycopg.Connection[Any] | None = None
        try:
            if number:
                conn = own = _connect(source.conninfo, APPLICATION_NAME, settings)
                with lock:
                    connections.append(conn)
                    if failed.is_set():
                        return
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute("SET TRANSACTION SNAPSHOT " + quote_literal(snapshot))
            while not failed.is_set():
                try:
                    table = work.get_nowait()
                except queue.Empty:
                    break
                _copy_table(conn, table, staging / table.file, report, failed)
                report.finish(table)
            if number and not failed.is_set():
                conn.execute("COMMIT")
        except BaseException as exc:
            with lock:
                first = not failed.is_set()
                failed.set()
                errors.append(exc)
                others = [c for c in connections if c is not conn]
            if first:
                for other in others:
                    with contextlib.suppress(Exception):
                        other.cancel_safe(timeout=5)
        finally:
            if own is not None:
                own.close()

    threads = [
        threading.Thread(target=worker, args=(n,), name=f"pgreplica-dump-{n}", daemon=True)
        for n in range(1, count)
    ]
    for thread in threads:
        thread.start()
    try:
        worker(0)
    finally:
        for thread in threads:
            thread.join()
    if errors:
        error = errors[0]
        if isinstance(error, psycopg.Error) and error.sqlstate in ("40001", "57P04"):
            raise DumpError(
                f"the replica {source.label} cancelled the export to replay WAL "
                f"({_first_line(error)}): enable hot_standby_feedback or raise "
                "max_standby_streaming_delay on the replica, then retry"
            ) from error
        raise error


def _copy_table(
    conn: psycopg.Connection[Any],
    table: _Table,
    path: Path,
    report: _Reporter,
    failed: threading.Event,
) -> None:
    started = time.monotonic()
    name = table.qualified

    def progress(rows: int, nbytes: int) -> None:
        if failed.is_set():
            raise DumpError("cancelled: another worker failed")
        report.advance(name, rows, nbytes)

    with path.open("wb", buffering=1 << 20) as fh:
        table.rows, table.bytes = copy_out(conn, table.copy_sql(), fh.write, progress)
    table.seconds = time.monotonic() - started


def copy_out(
    conn: psycopg.Connection[Any],
    statement: str,
    write: Callable[[bytes | memoryview], object],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Run ``COPY ... TO STDOUT`` and hand every chunk to ``write``: (rows, bytes).

    This drives libpq directly (``PQgetCopyData`` in non-blocking mode, waiting on the
    socket between bursts) instead of iterating a psycopg ``Copy``: the per-row Python
    cost is a third of that, which is most of the client's time in an export. Waiting in
    ``select`` lets the other workers' threads run. ``rows`` is the server's count (the
    command tag); ``progress(rows so far, bytes so far)`` is called every few thousand
    rows and may raise to stop.
    """
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    with conn.lock:
        pgconn.send_query(statement.encode(encoding))
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_OUT:
            _drain_results(pgconn)
            if result is None:
                raise DumpError(f"no result for {statement[:60]}")
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        rows = nbytes = 0
        # An exception in here leaves the connection mid-COPY: the callers close it.
        with selectors.DefaultSelector() as selector:
            selector.register(pgconn.socket, selectors.EVENT_READ)
            while True:
                size, data = pgconn.get_copy_data(1)
                if size > 0:
                    write(data)
                    nbytes += size
                    rows += 1
                    if progress is not None and rows % _PROGRESS_EVERY_ROWS == 0:
                        progress(rows - 1, nbytes)  # the first chunk is the header
                elif size == 0:
                    selector.select(timeout=1.0)
                    pgconn.consume_input()
                else:
                    break
        result = pgconn.get_result()
        _drain_results(pgconn)
        if result is None or result.status != pq.ExecStatus.COMMAND_OK:
            if result is None:
                raise DumpError(f"no result for {statement[:60]}")
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        return result.command_tuples or 0, nbytes


def _drain_results(pgconn: pq.abc.PGconn) -> None:
    while pgconn.get_result() is not None:
        pass


def _header(kind: str, plan: _Plan, db_name: str, source: _Source) -> list[str]:
    return [
        f"-- pgreplica dump: {kind} of database {db_name!r} from {source.label} ({source.role})",
        f"-- {len(plan.tables)} tables: only the columns classified public; generated from the"
        " catalog.",
    ]


def _schema_sql(plan: _Plan, db_name: str, source: _Source) -> str:
    lines = _header("schema", plan, db_name, source)
    lines += ["", "-- Tables", *plan.pre_data, "", "-- Keys, indexes, foreign keys"]
    lines += plan.post_data
    return "\n".join(lines) + "\n"


def _import_sql(plan: _Plan, db_name: str, source: _Source) -> str:
    lines = _header("import script", plan, db_name, source)
    lines += [
        "-- Loads everything into an EMPTY database in one transaction. Run it from the",
        "-- dump's directory (\\copy paths are relative to the current directory):",
        "--     psql -X -v ON_ERROR_STOP=1 -d TARGET -f import.sql",
        "-- Tables are created bare and loaded, then get their keys and indexes, and the",
        "-- foreign keys last: creating a foreign key checks every row.",
        "\\set ON_ERROR_STOP on",
        "BEGIN;",
        *plan.pre_data,
    ]
    for table in plan.tables:
        lines.append(
            f"\\copy {table.sql_name} ({table.column_list()}) FROM '{table.file}' "
            "WITH (FORMAT csv, HEADER)"
        )
    lines += [*plan.post_data, "COMMIT;"]
    return "\n".join(lines) + "\n"


def _metadata(
    plan: _Plan,
    visibility: Visibility,
    source: _Source,
    db_name: str,
    jobs: int,
    *,
    lsn: str | None,
    lsn_before: str | None,
    replay_ts: dt.datetime | None,
    version: str,
    version_num: int,
    taken_at: dt.datetime,
) -> dict[str, Any]:
    from pgreplica import __version__

    def iso(value: dt.datetime | None) -> str | None:
        return value.astimezone(dt.timezone.utc).isoformat() if value is not None else None

    return {
        "format": FORMAT_VERSION,
        "tool": "pgreplica dump",
        "pgreplica_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "snapshot_taken_at": iso(taken_at),
        "database": db_name,
        "host": source.label,
        "role": source.role,
        "primary_because": source.reason or None,
        "postgresql_version": version,
        "server_version_num": version_num,
        "replay_lsn": lsn,
        "replay_lsn_before_snapshot": lsn_before,
        "replay_timestamp": iso(replay_ts),
        "isolation": "REPEATABLE READ, READ ONLY",
        "jobs": jobs,
        "visibility": {"file": visibility.source, "sha256": visibility.sha256},
        "tables": [
            {
                "name": t.qualified,
                "file": t.file,
                "columns": [c.name for c in t.exported],
                "filter": t.rule.filter,
                "row_filter": t.condition or None,
                "rows": t.rows,
                "bytes": t.bytes,
            }
            for t in plan.tables
        ],
        "foreign_keys": [
            {
                "name": fk.name,
                "table": next(t.qualified for t in plan.tables if t.oid == fk.child),
                "columns": list(fk.child_columns),
                "references": next(t.qualified for t in plan.tables if t.oid == fk.parent),
                "referenced_columns": list(fk.parent_columns),
            }
            for fk in plan.foreign_keys
        ],
        "unlisted_tables": plan.unlisted,
        "warnings": plan.warnings,
    }


def _write_tarball(staging: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        with tarfile.open(partial, "w:gz") as tar:
            for path in sorted(staging.rglob("*")):
                tar.add(path, arcname=path.relative_to(staging).as_posix(), recursive=False)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------- import and verify


def import_dump(conn: psycopg.Connection[Any], directory: str | os.PathLike[str]) -> None:
    """Run a dump's ``import.sql`` on ``conn`` the way psql would, without psql.

    Understands exactly what ``pgreplica dump`` writes: SQL statements ending with ``;``
    at the end of a line, ``\\set`` (ignored) and ``\\copy ... FROM 'file'`` (sent as
    ``COPY ... FROM STDIN`` with the file's bytes). ``conn`` should be in autocommit
    mode: the script has its own ``BEGIN`` and ``COMMIT``.
    """
    root = Path(directory).resolve()
    script = (root / "import.sql").read_text(encoding="utf-8")
    statement: list[str] = []
    start = 0
    for number, line in enumerate(script.splitlines(), 1):
        if not statement:
            start = number
            if not line.strip() or line.startswith("--"):
                continue
            if line.startswith("\\"):
                _meta_command(conn, root, line, number)
                continue
        statement.append(line)
        if line.rstrip().endswith(";"):
            text = "\n".join(statement)
            statement = []
            try:
                conn.execute(text.encode())
            except psycopg.Error as exc:
                raise DumpError(
                    f"import.sql line {start}: {text.splitlines()[0][:80]}: {_first_line(exc)}"
                ) from None
    if statement:
        raise DumpError(f"import.sql line {start}: statement without a final ';'")


def _meta_command(conn: psycopg.Connection[Any], root: Path, line: str, number: int) -> None:
    if line.startswith("\\set "):
        return
    match = _COPY_LINE.match(line)
    if match is None:
        raise DumpError(f"import.sql line {number}: unsupported psql command {line.split()[0]}")
    path = (root / match["file"]).resolve()
    if root not in path.parents:
        raise DumpError(f"import.sql line {number}: {match['file']} is outside the dump")
    try:
        with (
            path.open("rb") as fh,
            conn.cursor() as cur,
            cur.copy(
                f"COPY {match['target']} FROM STDIN WITH (FORMAT csv, HEADER)".encode()
            ) as copy,
        ):
            while data := fh.read(1 << 20):
                copy.write(data)
    except FileNotFoundError:
        raise DumpError(f"import.sql line {number}: {match['file']} is missing") from None
    except psycopg.Error as exc:
        raise DumpError(
            f"import.sql line {number}: loading {match['file']}: {_first_line(exc)}"
        ) from None


@dataclass(frozen=True)
class VerifyResult:
    """Row counts as loaded, and the number of foreign keys created (so validated)."""

    tables: Mapping[str, int]
    foreign_keys: int
    database: str
    host: str


@contextlib.contextmanager
def _opened_dump(path: Path) -> Iterator[Path]:
    """A dump directory, or a ``.tar.gz`` unpacked into a temporary one."""
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise DumpError(f"{path}: no such dump (a directory or a .tar.gz)")
    with tempfile.TemporaryDirectory(prefix="pgreplica-verify-") as tmp:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if (
                        name.is_absolute()
                        or ".." in name.parts
                        or not (member.isfile() or member.isdir())
                    ):
                        raise DumpError(f"{path}: unexpected member {member.name!r}")
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # pragma: no cover - old Pythons; members were checked above
                    tar.extractall(tmp)
        except tarfile.TarError as exc:
            raise DumpError(f"{path}: not a readable tarball ({exc})") from None
        yield Path(tmp)


def verify(
    path: str | os.PathLike[str],
    settings: Settings,
    *,
    database: str | None = None,
    out: TextIO | None = None,
) -> VerifyResult:
    """Import a dump into a fresh scratch database on the primary and check it.

    The scratch database ``pgreplica_verify_<random>`` is created from ``template0``
    on the primary of ``database`` and dropped afterwards. The import creates the
    foreign keys after loading, which checks every row; then each table's row count must
    match ``metadata.json``. Raises :class:`DumpError` with the reason otherwise.
    """
    out = out or sys.stdout
    config = settings.database(database)
    with _opened_dump(Path(path)) as root:
        try:
            metadata = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
            expected = {t["name"]: int(t["rows"]) for t in metadata["tables"]}
            fk_expected = len(metadata["foreign_keys"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DumpError(f"{path}: no readable metadata.json ({exc})") from None
        scratch = f"pgreplica_verify_{secrets.token_hex(6)}"
        admin = _connect(config.primary.conninfo, VERIFY_APPLICATION_NAME, settings)
        try:
            admin.execute(f"CREATE DATABASE {quote_ident(scratch)} TEMPLATE template0")
            try:
                loaded, fks = _load_and_count(config.primary.conninfo, scratch, root, settings)
            finally:
                admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(scratch)} WITH (FORCE)")
        finally:
            admin.close()
    problems = []
    for name, rows in expected.items():
        got = loaded.get(name)
        status = "ok" if got == rows else "MISMATCH"
        print(f"{name}: {got} rows loaded, {rows} in metadata.json: {status}", file=out)
        if got != rows:
            problems.append(f"{name} has {got} rows, metadata.json says {rows}")
    extra = sorted(set(loaded) - set(expected))
    if extra:
        problems.append(f"import.sql created tables not in metadata.json: {', '.join(extra)}")
    print(f"foreign keys: {fks} created and validated ({fk_expected} in metadata.json)", file=out)
    if fks != fk_expected:
        problems.append(f"{fks} foreign keys created, metadata.json lists {fk_expected}")
    if problems:
        raise DumpError("verify failed: " + "; ".join(problems))
    print(
        f"verify: OK ({len(expected)} tables, {sum(expected.values())} rows, {fks} foreign "
        f"keys; scratch database {scratch} on {config.primary.label}, dropped)",
        file=out,
    )
    return VerifyResult(loaded, fks, scratch, config.primary.label)


def _load_and_count(
    conninfo: str, scratch: str, root: Path, settings: Settings
) -> tuple[dict[str, int], int]:
    with _connect(
        make_conninfo(conninfo, dbname=scratch), VERIFY_APPLICATION_NAME, settings
    ) as conn:
        try:
            import_dump(conn, root)
        except DumpError as exc:
            raise DumpError(f"verify failed: {exc}") from None
        counts: dict[str, int] = {}
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, name in tables:
            row = conn.execute(
                f"SELECT count(*) FROM {quote_ident(schema)}.{quote_ident(name)}"
            ).fetchone()
            assert row is not None
            counts[f"{schema}.{name}"] = int(row[0])
        fk_row = conn.execute(
            "SELECT count(*) FILTER (WHERE convalidated), count(*) FROM pg_constraint "
            "WHERE contype = 'f'"
        ).fetchone()
        assert fk_row is not None
        if fk_row[0] != fk_row[1]:
            raise DumpError(f"verify failed: {fk_row[1] - fk_row[0]} foreign keys not validated")
        return counts, int(fk_row[0])


# ---------------------------------------------------------------------- command line


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pgreplica dump``."""
    parser.add_argument(
        "--config", help="pgreplica TOML file (default: $PGREPLICA_CONFIG or the environment)"
    )
    parser.add_argument("--database", help="configured database to dump (default: the first)")
    parser.add_argument(
        "--visibility", metavar="FILE", help="TOML file classifying every exported column"
    )
    parser.add_argument("--out", metavar="DIR|FILE.tar.gz", help="new directory, or a .tar.gz file")
    parser.add_argument(
        "--jobs", type=_positive, default=1, metavar="N", help="parallel connections (1)"
    )
    parser.add_argument(
        "--allow-primary",
        action="store_true",
        help="dump from the primary when no replica is healthy (announced on stderr)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress output (warnings still shown)"
    )
    parser.add_argument(
        "--verify",
        metavar="DIR|FILE.tar.gz",
        help="import a dump into a scratch database on the primary and check it",
    )


def run(args: argparse.Namespace) -> int:
    """``pgreplica dump``: export, or with ``--verify`` check an export."""
    # The prober logs replicas going down; the dump's own error already says so.
    health = logging.getLogger("pgreplica.health")
    level = health.level
    health.setLevel(logging.ERROR)
    try:
        return _run(args)
    finally:
        health.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_env() if args.config is None else Settings.from_toml(args.config)
    if args.verify is not None:
        if args.out is not None or args.visibility is not None:
            raise ConfigError("--verify", "takes no --out or --visibility")
        verify(args.verify, settings, database=args.database)
        return 0
    for option, value in (("--visibility", args.visibility), ("--out", args.out)):
        if value is None:
            raise ConfigError(option, "required (or --verify DIR to check a dump)")
    dump(
        settings,
        Visibility.load(args.visibility),
        args.out,
        database=args.database,
        jobs=args.jobs,
        allow_primary=args.allow_primary,
        quiet=args.quiet,
    )
    return 0
