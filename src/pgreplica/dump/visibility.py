"""The visibility file: which tables, columns and rows may leave the database.

Parsing and checking its shape (every column ``public`` or ``private``, row filters that
are one SQL boolean expression); matching it with the live catalog is
:mod:`pgreplica.dump.catalog`'s job.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pglast

from pgreplica.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PUBLIC = "public"
PRIVATE = "private"


class VisibilityError(ConfigError):
    """The visibility file is malformed or does not match the database's catalog."""

    __module__ = "pgreplica"


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
