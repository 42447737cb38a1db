"""The dump's plan: the visibility file matched with the live catalog.

Reads tables, columns, keys, indexes and foreign keys from the catalog inside the dump's
snapshot, refuses what cannot be exported safely, orders tables parents first, checks
each child of a filtered parent against the parent's exported keys, and prepares the DDL
of ``schema.sql``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgreplica.dump._util import DumpError, _first_line, quote_ident, quote_literal
from pgreplica.dump.visibility import (
    ON_FILTERED_PARENT,
    PUBLIC,
    TableRule,
    Visibility,
    VisibilityError,
    catalog_dependency_warnings,
    column_mismatch,
    did_you_mean,
)

_BUILTIN_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_SAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_CATALOG_SEARCH_PATH = "SET LOCAL search_path = pg_catalog, pg_temp"
NULL, DROP = ON_FILTERED_PARENT


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
class _Check:
    """A foreign key whose parent rows may be missing from the export (left out by a
    filter, or orphans of a ``NOT VALID`` key): a row whose parent is not exported is
    dropped (``"drop"``), or exported with the reference NULL (``"null"``)."""

    fk: _ForeignKey
    mode: str


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
    """The effective row filter, one boolean expression over the table's columns (recorded
    as ``row_filter``): its own filter, and for each checked foreign key that drops,
    ``fk IN (SELECT key FROM parent WHERE <parent's condition>)``. :meth:`select_sql`
    runs the same checks as joins."""
    fks: list[_ForeignKey] = field(default_factory=list)
    checks: list[_Check] = field(default_factory=list)
    """The foreign keys checked against the parent's exported keys (set by the plan)."""
    related: dict[int, _Table] = field(default_factory=dict, repr=False, compare=False)
    """Every table of the plan by OID: the parents whose exported keys the checks read."""
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
        """The export query: the public columns, the row filter, and each checked foreign
        key ``LEFT JOIN``ed to the parent's exported keys, computed once per query."""
        outputs = [c.name for c in self.exported]
        expressions, tail = _relation(self.related, self, outputs, "_pgr_0", _Names())
        columns = ", ".join(
            quote_ident(name) if expression is None else f"{expression} AS {quote_ident(name)}"
            for name, expression in zip(outputs, expressions, strict=True)
        )
        return f"SELECT {columns} FROM {self.sql_name} AS _pgr_0{tail}"

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
            if row is None:
                names = [n for (s, n), r in relations.items() if s == rule.schema and r[3] in "rp"]
                what += did_you_mean(rule.name, names)
            missing.append(f"{rule.setting}: {rule.qualified} {what}")
            continue
        if rule.all_private:
            continue  # reviewed, and nothing of it leaves: not exported, not "unlisted"
        oid, _, _, _, _, pages, reltuples = row
        estimate = int(reltuples) if reltuples is not None and reltuples >= 0 else None
        tables[oid] = _Table(oid, rule.schema, rule.name, rule, [], int(pages), estimate)
    if missing:
        raise VisibilityError(source, "listed tables not in the database: " + "; ".join(missing))
    listed = {(r.schema, r.name) for r in visibility.tables}
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
        missing_columns, stray = table.rule.unmatched_columns([c.name for c in table.columns])
        unclassified += [f"{table.qualified}.{c}" for c in missing_columns]
        unknown += stray  # named next to the unclassified ones: a misspelling shows as both
        for column in table.columns:
            column.public = table.rule.columns.get(column.name) == PUBLIC
    if unclassified or unknown:
        raise VisibilityError(source, column_mismatch(unclassified, unknown))
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
    warnings += catalog_dependency_warnings(conn, {t.oid: t.rule for t in tables.values()})

    ordered = _order_and_filter(tables, source)

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


def _order_and_filter(tables: dict[int, _Table], source: str = "visibility") -> list[_Table]:
    """Order tables parents first and decide which foreign keys each table checks.

    A child row whose parent row is not exported would break its foreign key on import.
    So a foreign key is checked when its parent may lose rows (its own filter, or a
    checked key of its own that drops) or may export a referenced column as NULL, and
    when it is ``NOT VALID`` on the source (its rows may already be orphans). A checked
    key compares the child's columns with the parent's exported keys, computed once per
    query (see :func:`_relation`), and on a miss drops the row or exports the reference
    as NULL: ``on_filtered_parent`` in the visibility file, by default NULL when every
    column of the key is nullable and drop otherwise. A cycle of foreign keys that needs
    any of this is refused: the exported keys of a cycle depend on themselves.
    """
    modes = _fk_modes(tables, source)
    components = _strongly_connected(tables)
    drops: set[int] = set()
    nulled: dict[int, set[str]] = {}
    for component in components:  # parents first
        members = set(component)
        checks: dict[int, list[_Check]] = {}
        for oid in component:
            checks[oid] = [
                _Check(fk, modes[(oid, fk.name)])
                for fk in tables[oid].fks
                if not fk.validated
                or (
                    fk.parent not in members
                    and (fk.parent in drops or not nulled[fk.parent].isdisjoint(fk.parent_columns))
                )
            ]
        needs = any(tables[oid].rule.filter is not None or checks[oid] for oid in component)
        cyclic = len(component) > 1 or any(
            fk.parent == component[0] for fk in tables[component[0]].fks
        )
        if needs and cyclic:
            names = " -> ".join(sorted(tables[oid].qualified for oid in component))
            raise DumpError(
                f"foreign keys form a cycle ({names}) through a filtered table: rows kept by "
                "the filter could reference rows it drops, and the checks cannot follow a "
                "cycle; export the cycle without row filters, or leave it out"
            )
        for oid in component:
            table = tables[oid]
            table.checks = checks[oid]
            table.related = tables
            if table.rule.filter is not None or any(c.mode == DROP for c in table.checks):
                drops.add(oid)
            nulled[oid] = {
                column for c in table.checks if c.mode == NULL for column in c.fk.child_columns
            }
    for table in tables.values():
        table.condition = _condition(tables, table, 0)
    return [
        tables[oid]
        for component in components
        for oid in sorted(component, key=lambda o: tables[o].qualified)
    ]


def _fk_modes(tables: dict[int, _Table], source: str) -> dict[tuple[int, str], str]:
    """(child OID, constraint) -> ``"null"`` or ``"drop"`` for every foreign key: the
    table's ``on_filtered_parent``, matched by constraint name or by the column of a
    one-column key, or the default (NULL when every column of the key is nullable)."""
    modes: dict[tuple[int, str], str] = {}
    for table in tables.values():
        nullable = {c.name for c in table.columns if not c.not_null}
        chosen: dict[str, str] = {}
        for key, mode in table.rule.on_filtered_parent.items():
            setting = f"{source}: {table.rule.setting}.on_filtered_parent.{key}"
            matches = [fk for fk in table.fks if fk.name == key] or [
                fk for fk in table.fks if fk.child_columns == (key,)
            ]
            if not matches:
                names = [fk.name for fk in table.fks]
                single = [fk.child_columns[0] for fk in table.fks if len(fk.child_columns) == 1]
                raise VisibilityError(
                    setting,
                    f"{table.qualified} has no foreign key {key} to an exported table (name "
                    "the constraint, or the column of a one-column key)"
                    + did_you_mean(key, names, single),
                )
            if len(matches) > 1:
                raise VisibilityError(
                    setting,
                    f"column {key} is in several foreign keys ("
                    + ", ".join(fk.name for fk in matches)
                    + "): name the constraint instead",
                )
            fk = matches[0]
            if mode == NULL and not nullable.issuperset(fk.child_columns):
                strict = ", ".join(c for c in fk.child_columns if c not in nullable)
                raise VisibilityError(
                    setting,
                    f'"null" needs nullable columns, and {strict} of foreign key {fk.name} '
                    'is NOT NULL: such a row can only be dropped ("drop")',
                )
            if chosen.setdefault(fk.name, mode) != mode:
                raise VisibilityError(setting, f"foreign key {fk.name} is given two settings")
        for fk in table.fks:
            default = NULL if nullable.issuperset(fk.child_columns) else DROP
            modes[(table.oid, fk.name)] = chosen.get(fk.name, default)
    return modes


def _own_filter(text: str) -> str:
    return f"(\n{text}\n)" if "--" in text else f"({text})"


def _reference_ok(table: _Table, check: _Check, alias: str, present: str) -> str:
    """The row's reference holds in the export: ``present`` (its parent key is exported),
    or a column of the key is NULL (``MATCH SIMPLE``: the constraint does not apply)."""
    columns = check.fk.child_columns
    if check.mode == NULL and len(columns) == 1:
        return present  # NULL stays NULL either way
    not_null = {c.name for c in table.columns if c.not_null}
    parts = [f"{alias}.{quote_ident(c)} IS NULL" for c in columns if c not in not_null]
    return f"({' OR '.join([*parts, present])})" if parts else present


class _Names:
    """Numbers for the aliases of one query, so that every join and table is distinct."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return self.count


def _relation(
    tables: dict[int, _Table], table: _Table, outputs: list[str], alias: str, names: _Names
) -> tuple[list[str | None], str]:
    """What the export holds of ``table`` read as ``alias``: an expression for each of
    ``outputs`` (``None`` for the column as it is, or a ``CASE`` that exports it as NULL
    when its parent is not exported), and the ``FROM`` tail (joins, ``WHERE``).

    Each checked foreign key is a ``LEFT JOIN`` to the parent's exported keys::

        LEFT JOIN (SELECT key FROM parent AS _pgr_1 ... WHERE <parent's filter>)
             AS _pgr_k1 (_pgr_k1_1) ON _pgr_k1._pgr_k1_1 = _pgr_0.fk

    an uncorrelated subquery that PostgreSQL runs once and hash-joins, whatever its size
    (a correlated ``EXISTS`` re-ran the parent's filter for every child row, and a hashed
    ``IN`` subplan falls back to a scan per row when the keys exceed ``work_mem``). The
    parent's keys are unique, so the join never repeats a row. A key that drops makes
    ``_pgr_k1._pgr_k1_1 IS NOT NULL`` part of the ``WHERE``; one that nulls wraps its
    columns in ``CASE WHEN ... THEN fk END`` (and is left out when none is selected).
    """
    where = [] if table.rule.filter is None else [_own_filter(table.rule.filter)]
    joins: list[str] = []
    kept_when: dict[str, list[str]] = {}
    for check in table.checks:
        fk = check.fk
        if check.mode == NULL and set(fk.child_columns).isdisjoint(outputs):
            continue
        n = names.next()
        keys = [f"_pgr_k{n}_{i}" for i in range(1, len(fk.parent_columns) + 1)]
        parent = tables[fk.parent]
        expressions, tail = _relation(tables, parent, list(fk.parent_columns), f"_pgr_{n}", names)
        selected = ", ".join(
            f"_pgr_{n}.{quote_ident(c)}" if e is None else e
            for c, e in zip(fk.parent_columns, expressions, strict=True)
        )
        on = " AND ".join(
            f"_pgr_k{n}.{k} = {alias}.{quote_ident(c)}"
            for k, c in zip(keys, fk.child_columns, strict=True)
        )
        joins.append(
            f" LEFT JOIN (SELECT {selected} FROM {parent.sql_name} AS _pgr_{n}{tail})"
            f" AS _pgr_k{n} ({', '.join(keys)}) ON {on}"
        )
        ok = _reference_ok(table, check, alias, f"_pgr_k{n}.{keys[0]} IS NOT NULL")
        if check.mode == DROP:
            where.append(ok)
        else:
            for column in fk.child_columns:
                kept_when.setdefault(column, []).append(ok)
    expressions_out: list[str | None] = [
        f"CASE WHEN {' AND '.join(kept_when[c])} THEN {alias}.{quote_ident(c)} END"
        if c in kept_when
        else None
        for c in outputs
    ]
    tail = "".join(joins) + (f" WHERE {' AND '.join(where)}" if where else "")
    return expressions_out, tail


def _condition(tables: dict[int, _Table], table: _Table, depth: int) -> str:
    """The rows of ``table`` (read as ``_pgr_<depth>``) that the export holds, as one
    boolean expression with uncorrelated ``IN`` subqueries: the same rows as
    :func:`_relation`'s joins, written to be read (``row_filter`` in metadata.json)."""
    alias = f"_pgr_{depth}"
    parts = [] if table.rule.filter is None else [_own_filter(table.rule.filter)]
    for check in table.checks:
        if check.mode == DROP:
            parts.append(_reference_ok(table, check, alias, _in_kept(tables, check, alias, depth)))
    return " AND ".join(parts)


def _in_kept(tables: dict[int, _Table], check: _Check, alias: str, depth: int) -> str:
    """``fk IN (SELECT key FROM parent WHERE <parent's condition>)``, the key as exported."""
    fk = check.fk
    parent = tables[fk.parent]
    inner = f"_pgr_{depth + 1}"
    selected: list[str] = []
    for column in fk.parent_columns:
        kept_when = [
            _reference_ok(parent, c, inner, _in_kept(tables, c, inner, depth + 1))
            for c in parent.checks
            if c.mode == NULL and column in c.fk.child_columns
        ]
        value = f"{inner}.{quote_ident(column)}"
        selected.append(
            f"CASE WHEN {' AND '.join(kept_when)} THEN {value} END" if kept_when else value
        )
    nested = _condition(tables, parent, depth + 1)
    where = f" WHERE {nested}" if nested else ""
    columns = [f"{alias}.{quote_ident(c)}" for c in fk.child_columns]
    left = columns[0] if len(columns) == 1 else f"({', '.join(columns)})"
    return f"{left} IN (SELECT {', '.join(selected)} FROM {parent.sql_name} AS {inner}{where})"


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
        if not table.condition and not table.checks:
            continue
        try:
            conn.execute(f"EXPLAIN {table.select_sql()}")
        except psycopg.Error as exc:
            own = f" {table.rule.setting}.filter" if table.rule.filter else ""
            raise VisibilityError(
                f"{vis.source}:{own or ' ' + table.rule.setting}",
                f"the row filter of {table.qualified} does not compile: {_first_line(exc)}",
            ) from None
