"""The visibility file: which tables, columns and rows may leave the database.

Parsing and checking its shape (every column ``public`` or ``private``, row filters that
are one SQL boolean expression, column defaults that are one SQL expression) in either
of its two formats; matching it with the live catalog is :mod:`pgreplica.dump.catalog`'s
job (for an export) and :mod:`pgreplica.dump.check`'s (for ``--check-visibility``); the
catalog's foreign keys are read here only to compare them with crates.io's
``dependencies`` (:func:`dependency_warnings`).

The two formats give the same :class:`Visibility`:

* pgreplica's, one ``[tables.NAME]`` section per table::

    [tables.users]
    columns = { id = "public", name = "public", email = "private" }
    filter = "NOT is_banned"

* crates.io's (``dump-db.toml``), one top-level table per table::

    [users]
    filter = "NOT is_banned"
    dependencies = ["teams"]
    [users.columns]
    id = "public"
    email = "private"
    [users.column_defaults]
    email = "''"
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pglast

from pgreplica.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    import psycopg

PUBLIC = "public"
PRIVATE = "private"

AUTO = "auto"
PGREPLICA = "pgreplica"
CRATES_IO = "crates-io"
FORMATS = (AUTO, CRATES_IO, PGREPLICA)
"""The values of ``--visibility-format``: ``auto`` tells the two formats apart."""

_TABLE_KEYS = ("columns", "filter", "dependencies", "column_defaults", "on_filtered_parent")
ON_FILTERED_PARENT = ("null", "drop")
"""The values of ``on_filtered_parent``: export the reference as NULL, or drop the row."""
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+")


class VisibilityError(ConfigError):
    """The visibility file is malformed or does not match the database's catalog."""

    __module__ = "pgreplica"


def did_you_mean(word: str, *candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``candidates`` (tried in order: the
    first group with a close match wins), or ``""``."""
    for group in candidates:
        close = difflib.get_close_matches(word, list(group), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def _qualify(key: str) -> tuple[str, str]:
    """``schema.table`` or ``table`` (in ``public``) -> (schema, table)."""
    schema, _, name = key.partition(".") if "." in key else ("public", "", key)
    return schema, name


@dataclass(frozen=True)
class TableRule:
    """What may leave the database from one table: classified columns and a row filter."""

    schema: str
    name: str
    columns: Mapping[str, str]
    """Column name -> ``"public"`` or ``"private"``."""
    filter: str | None = None
    """A SQL boolean expression over the table's columns (private ones included)."""
    dependencies: tuple[str, ...] | None = None
    """Tables this one declares it depends on (``schema.table``), crates.io's
    ``dependencies``; ``None`` when the table has no ``dependencies`` key. Only compared
    with the foreign keys, which alone set the import order."""
    column_defaults: dict[str, str] = field(default_factory=dict)
    """Private column -> SQL expression giving its value on import (for private
    ``NOT NULL`` columns that an import keeps), crates.io's ``column_defaults``."""
    format: str = PGREPLICA
    """The visibility file's format, for naming settings the way the file writes them."""
    on_filtered_parent: Mapping[str, str] = field(default_factory=dict)
    """Foreign key (its constraint name, or the column of a one-column key) -> ``"null"``
    or ``"drop"``: what the export does with a row whose parent row it leaves out.
    Matched with the catalog's foreign keys by :mod:`pgreplica.dump.catalog`."""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def setting(self) -> str:
        """How the visibility file names this table (``tables.users``, or ``users`` in
        crates.io's format)."""
        key = self.name if self.schema == "public" else self.qualified
        key = key if _PLAIN_KEY.fullmatch(key) else f'"{key}"'
        return key if self.format == CRATES_IO else f"tables.{key}"

    @property
    def all_private(self) -> bool:
        """Every column is private: the table was reviewed and is not exported."""
        return all(level == PRIVATE for level in self.columns.values())

    def unmatched_columns(self, names: Collection[str]) -> tuple[list[str], list[str]]:
        """Compare with the table's real columns ``names`` (in table order).

        Returns the real columns the file does not classify, and the classified columns
        that do not exist, each named as its setting, with a "did you mean" hint for a
        likely misspelling (``tables.users.columns.gh_logn (did you mean gh_login?)``).
        """
        unclassified = [name for name in names if name not in self.columns]
        unknown = [
            f"{self.setting}.columns.{column}" + did_you_mean(column, unclassified, names)
            for column in self.columns
            if column not in names
        ]
        return unclassified, unknown


def column_mismatch(unclassified: Collection[str], unknown: Collection[str]) -> str:
    """The one message naming every unclassified and every unknown column."""
    parts: list[str] = []
    if unclassified:
        parts.append(
            f"{len(unclassified)} column(s) not classified as public or private: "
            + ", ".join(unclassified)
            + " (nothing is exported by default: classify every column of an exported table)"
        )
    if unknown:
        parts.append("classified columns that do not exist: " + ", ".join(unknown))
    return "; ".join(parts)


_FOREIGN_KEYS_SQL = """
SELECT cn.nspname || '.' || c.relname, pn.nspname || '.' || p.relname, con.conname
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = con.confrelid
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f' AND con.conrelid = ANY(%s)
ORDER BY 1, 2, 3
"""


def dependency_warnings(
    rules: Iterable[TableRule],
    foreign_keys: Iterable[tuple[str, str, str]],
    exported: Collection[str],
) -> list[str]:
    """Where the declared ``dependencies`` disagree with the foreign keys.

    ``foreign_keys`` are ``(child, parent, constraint)`` by ``schema.table``; ``exported``
    the tables the export holds. A declared dependency that is not a foreign key parent,
    and an exported foreign key parent that is not declared, are each one warning: the
    import order follows the foreign keys whatever the file says. Tables that declare
    nothing (``dependencies is None``) or are not exported are not compared.
    """
    parents: dict[str, dict[str, str]] = {}
    for child, parent, constraint in foreign_keys:
        parents.setdefault(child, {}).setdefault(parent, constraint)
    warnings: list[str] = []
    for rule in rules:
        if rule.dependencies is None or rule.qualified not in exported:
            continue
        own = parents.get(rule.qualified, {})
        for dependency in rule.dependencies:
            if dependency not in own:
                warnings.append(
                    f"{rule.setting}.dependencies lists {dependency}, but {rule.qualified} has "
                    "no foreign key to it (ignored: the import order follows the foreign keys)"
                )
        for parent, constraint in sorted(own.items()):
            if parent != rule.qualified and parent in exported and parent not in rule.dependencies:
                warnings.append(
                    f"{rule.setting}.dependencies does not list {parent}, which "
                    f"{rule.qualified} references (foreign key {constraint}); the import order "
                    "follows the foreign keys"
                )
    return warnings


def catalog_dependency_warnings(
    conn: psycopg.Connection[Any], tables: Mapping[int, TableRule]
) -> list[str]:
    """:func:`dependency_warnings` for exported tables by oid, with the foreign keys of
    the live catalog (read on ``conn``, in the caller's snapshot)."""
    if all(rule.dependencies is None for rule in tables.values()):
        return []
    rows = conn.execute(_FOREIGN_KEYS_SQL, (list(tables),)).fetchall()
    exported = {rule.qualified for rule in tables.values()}
    return dependency_warnings(tables.values(), rows, exported)


@dataclass(frozen=True)
class Visibility:
    """A parsed visibility file: which tables, columns and rows may be exported."""

    source: str
    tables: tuple[TableRule, ...]
    """Every table the file lists, the fully private ones included."""
    sha256: str = ""
    format: str = PGREPLICA
    """``"pgreplica"`` or ``"crates-io"``: the format the file was read in."""

    @property
    def exported(self) -> tuple[TableRule, ...]:
        """The tables with at least one public column."""
        return tuple(rule for rule in self.tables if not rule.all_private)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, format: str = AUTO) -> Visibility:
        """Read and check a visibility TOML file (shape only: the catalog comes later).

        ``format`` is ``"auto"`` (tell the formats apart), ``"pgreplica"`` or
        ``"crates-io"``.
        """
        file = Path(path)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            raise VisibilityError(str(file), "visibility file not found") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise VisibilityError(str(file), f"not valid TOML ({exc})") from None
        return cls.from_dict(
            data, source=file.name, sha256=hashlib.sha256(raw).hexdigest(), format=format
        )

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "visibility",
        sha256: str = "",
        format: str = AUTO,
    ) -> Visibility:
        """Build from a mapping shaped like the TOML file, in either format::

        [tables.users]                      [users]
        columns = { id = "public" }         filter = "NOT is_banned"
        filter = "NOT is_banned"            [users.columns]
                                            id = "public"
        """

        def fail(setting: str, problem: str) -> VisibilityError:
            return VisibilityError(f"{source}: {setting}", problem)

        if format not in FORMATS:
            raise VisibilityError(
                "--visibility-format", f"expected one of {', '.join(FORMATS)}, got {format!r}"
            )
        fmt = _detect(data, source) if format == AUTO else format
        if fmt == PGREPLICA:
            unknown = set(data) - {"tables"}
            if unknown:
                raise fail(sorted(unknown)[0], "unknown setting (expected [tables.NAME] sections)")
            tables = data.get("tables")
            if not isinstance(tables, Mapping) or not tables:
                raise fail("tables", "missing: declare each exported table as [tables.NAME]")
            prefix = "tables."
        else:
            tables = data
            if not tables:
                raise VisibilityError(
                    source,
                    "no table: declare each table as [NAME.columns] (crates.io's format) or "
                    "[tables.NAME] (pgreplica's)",
                )
            prefix = ""
        rules: list[TableRule] = []
        seen: set[tuple[str, str]] = set()
        for key, entry in tables.items():
            schema, name = _qualify(key)
            where = f"{prefix}{key}"
            if not name or "\n" in key or "\r" in key:
                raise fail(where, "expected a table name such as users or schema.table")
            if (schema, name) in seen:
                raise fail(where, f"table {schema}.{name} is listed twice")
            seen.add((schema, name))
            rules.append(_table_rule(schema, name, entry, fmt, f"{source}: {where}"))
        return cls(source, tuple(rules), sha256, fmt)


def _detect(data: Mapping[str, Any], source: str) -> str:
    """pgreplica's format is one ``tables`` table of tables; anything else is read as
    crates.io's (one top-level table per table). A ``tables`` next to other tables is
    ambiguous, unless ``tables`` is itself shaped like a crates.io table."""
    if "tables" not in data or _crates_io_entry(data["tables"]):
        return CRATES_IO
    others = sorted(key for key in data if key != "tables")
    if others:
        raise VisibilityError(
            f"{source}: {others[0]}",
            "mixes the two visibility formats, [tables.NAME] sections (pgreplica's) and "
            "[NAME.columns] sections (crates.io's): write every table one way (a table "
            "named 'tables' in crates.io's format needs --visibility-format crates-io)",
        )
    return PGREPLICA


def _crates_io_entry(value: object) -> bool:
    """``value`` reads as one crates.io table: ``columns`` maps names to levels.

    In pgreplica's format ``tables.columns`` would be a table named ``columns``, whose own
    ``columns`` is a table, not a level."""
    if not isinstance(value, Mapping):
        return False
    columns = value.get("columns")
    return isinstance(columns, Mapping) and not any(
        isinstance(level, Mapping) for level in columns.values()
    )


def _table_rule(schema: str, name: str, entry: object, fmt: str, where: str) -> TableRule:
    """One table's rule, in either format (``where`` names its section in the file)."""

    def fail(setting: str, problem: str) -> VisibilityError:
        return VisibilityError(f"{where}{setting}", problem)

    if not isinstance(entry, Mapping):
        raise fail("", "expected a table with columns = { ... } and an optional filter")
    extra = sorted(set(entry) - set(_TABLE_KEYS))
    if extra:
        hint = did_you_mean(extra[0], _TABLE_KEYS)
        if not hint and _crates_io_entry(entry[extra[0]]):
            hint = ' (a table outside the public schema is written ["schema.table".columns])'
        raise fail(
            f".{extra[0]}",
            f"unknown setting (columns, filter, dependencies, column_defaults){hint}",
        )
    columns = entry.get("columns")
    if not isinstance(columns, Mapping) or not columns:
        raise fail(".columns", 'missing: classify every column, e.g. { id = "public" }')
    for column, level in columns.items():
        if level not in (PUBLIC, PRIVATE):
            raise fail(f".columns.{column}", f'expected "public" or "private", got {level!r}')
    row_filter = entry.get("filter")
    if row_filter is not None:
        _check_filter(row_filter, f"{where}.filter")
    dependencies = _dependencies(entry.get("dependencies"), f"{where}.dependencies")
    defaults = entry.get("column_defaults", {})
    if not isinstance(defaults, Mapping):
        raise fail(".column_defaults", "expected a table such as { token = \"''\" }")
    for column, expression in defaults.items():
        setting = f"{where}.column_defaults.{column}"
        if column not in columns:
            raise VisibilityError(
                setting, "not a classified column of the table" + did_you_mean(column, columns)
            )
        if columns[column] != PRIVATE:
            raise VisibilityError(
                setting, "the column is public: only private columns take a default on import"
            )
        _check_expression(expression, setting)
    modes = entry.get("on_filtered_parent", {})
    if not isinstance(modes, Mapping) or any(m not in ON_FILTERED_PARENT for m in modes.values()):
        raise fail(
            ".on_filtered_parent",
            'expected a table such as { created_by = "drop" } (values "null" or "drop")',
        )
    return TableRule(
        schema,
        name,
        dict(columns),
        row_filter,
        dependencies,
        dict(defaults),
        format=fmt,
        on_filtered_parent=dict(modes),
    )


def _dependencies(value: object, setting: str) -> tuple[str, ...] | None:
    """crates.io's ``dependencies``, as ``schema.table`` names (``None`` without the key:
    nothing declared, nothing compared with the foreign keys)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(item, str) and item and _qualify(item)[1] and "\n" not in item for item in value
    ):
        raise VisibilityError(setting, 'expected a list of table names, e.g. ["crates", "users"]')
    return tuple(dict.fromkeys(".".join(_qualify(item)) for item in value))


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


def _check_expression(text: object, setting: str) -> None:
    """A column default is pasted into the import's DDL: it must be one SQL expression,
    bare and in parentheses, and nothing else."""

    def fail(problem: str) -> VisibilityError:
        return VisibilityError(setting, problem)

    if not isinstance(text, str) or not text.strip():
        raise fail('expected a SQL expression as text, such as "\'\'" or "now()"')
    if ";" in text:
        raise fail("must not contain ';' (one expression, not statements)")
    allowed = {"targetList", "op", "all", "limitOption", "groupDistinct"}
    for wrapped in (f"SELECT {text}", f"SELECT (\n{text}\n)"):
        try:
            statements = pglast.parse_sql(wrapped)
        except pglast.parser.ParseError as exc:
            raise fail(f"not a SQL expression ({exc})") from None
        stmt = statements[0].stmt if len(statements) == 1 else None
        if (
            not isinstance(stmt, pglast.ast.SelectStmt)
            or stmt.op != pglast.enums.SetOperation.SETOP_NONE
            or len(stmt.targetList or ()) != 1
            or any(
                getattr(stmt, slot) not in (None, False)
                for slot in getattr(stmt, "__slots__", ())
                if slot not in allowed
            )
        ):
            raise fail("must be a single SQL expression")
