"""``pgreplica dump --check-visibility``: the visibility file against the catalog, for CI.

An export refuses a file that does not match the database, but only when it runs. This
check compares the file with the live catalog of a healthy replica (or of the primary
with ``--allow-primary``), or with a schema file (``pg_dump --schema-only``), and
names **every** mismatch at once: tables of the file's schemas that it does not list,
columns it does not classify, and listed tables and classified columns that do not
exist (with a "did you mean" for a likely misspelling). It exports nothing and writes
no file. Against a database it then builds the export's plan in the same read-only
snapshot (``EXPLAIN`` only, no row read), so a file that passes is one the export
accepts: keys public, row filters that compile, no filtered foreign key cycle.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pglast
from pglast import ast
from pglast.enums import AlterTableType, ConstrType, ObjectType

from pgreplica.config import Settings
from pgreplica.dump._util import APPLICATION_NAME, DumpError, _connect
from pgreplica.dump.catalog import _build_plan
from pgreplica.dump.progress import _Reporter
from pgreplica.dump.source import _choose_source
from pgreplica.dump.visibility import (
    PUBLIC,
    Visibility,
    VisibilityError,
    dependency_warnings,
    did_you_mean,
)

_RELATIONS_SQL = """
SELECT n.nspname, c.relname, c.relkind::text, c.relispartition,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s)
"""
_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence"}


@dataclass
class _Relation:
    kind: str
    """``relkind``: ``r`` table, ``p`` partitioned table, ``v`` view, ..."""
    partition: bool
    columns: list[str]

    @property
    def table(self) -> bool:
        return self.kind in ("r", "p")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of :func:`check_visibility` or :func:`check_schema`."""

    visibility: str
    """The visibility file's name."""
    against: str
    """What it was compared with: ``host:port/dbname (replica)``, or the schema file."""
    problems: tuple[str, ...]
    """Every mismatch, one line each; empty when the file matches."""
    warnings: tuple[str, ...] = ()
    tables: int = 0
    exported: int = 0
    columns: int = 0
    public: int = 0
    format: str = "pgreplica"

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: ``visibility: OK ...``, or how many problems there are."""
        if not self.ok:
            return (
                f"{self.visibility} does not match {self.against}: {len(self.problems)} problem(s)"
            )
        return (
            f"visibility: OK ({self.visibility}, {self.format} format, matches {self.against}: "
            f"{self.tables} tables, {self.exported} exported, {self.tables - self.exported} "
            f"fully private; {self.columns} columns, {self.public} public)"
        )

    def report(self) -> str:
        """The summary, then one indented line per problem."""
        return "\n".join([self.summary(), *(f"  {problem}" for problem in self.problems)])


def _compare(
    visibility: Visibility, relations: Mapping[tuple[str, str], _Relation]
) -> tuple[list[str], dict[str, list[str]]]:
    """Every mismatch between the file and ``relations`` (the relations of the file's
    schemas), and the real columns of the listed tables that exist."""
    problems: list[str] = []
    found: dict[str, list[str]] = {}
    listed = {(rule.schema, rule.name) for rule in visibility.tables}
    unlisted = sorted(
        (schema, name)
        for (schema, name), relation in relations.items()
        if relation.table and not relation.partition and (schema, name) not in listed
    )
    for schema, name in unlisted:
        columns = relations[(schema, name)].columns
        problems.append(
            f"table {schema}.{name} is not listed (columns: {', '.join(columns) or 'none'}): "
            "list it, with every column private to keep it out of the export"
        )
    unclassified: list[str] = []
    unknown: list[str] = []
    for rule in visibility.tables:
        relation = relations.get((rule.schema, rule.name))
        if relation is None:
            same_schema = [n for (s, n), r in relations.items() if s == rule.schema and r.table]
            problems.append(
                f"{rule.setting}: table {rule.qualified} does not exist"
                + did_you_mean(rule.name, [n for s, n in unlisted if s == rule.schema], same_schema)
            )
            continue
        if not relation.table:
            kind = _KINDS.get(relation.kind, f"not a table (relkind {relation.kind!r})")
            problems.append(f"{rule.setting}: {rule.qualified} is {kind}, not a table")
            continue
        found[rule.qualified] = relation.columns
        missing, stray = rule.unmatched_columns(relation.columns)
        unclassified += [f"{rule.qualified}.{column}" for column in missing]
        unknown += stray
    problems += [f"column {column} is not classified" for column in unclassified]
    problems += [f"classified column that does not exist: {column}" for column in unknown]
    return problems, found


def _result(
    visibility: Visibility,
    against: str,
    problems: Iterable[str],
    warnings: Iterable[str],
    found: Mapping[str, list[str]],
) -> CheckResult:
    rules = [rule for rule in visibility.tables if rule.qualified in found]
    return CheckResult(
        visibility=visibility.source,
        against=against,
        problems=tuple(problems),
        warnings=tuple(warnings),
        tables=len(rules),
        exported=sum(not rule.all_private for rule in rules),
        columns=sum(len(rule.columns) for rule in rules),
        public=sum(level == PUBLIC for rule in rules for level in rule.columns.values()),
        format=visibility.format,
    )


def check_visibility(
    settings: Settings,
    visibility: Visibility,
    *,
    database: str | None = None,
    allow_primary: bool = False,
    stderr: TextIO | None = None,
) -> CheckResult:
    """Compare ``visibility`` with the live catalog of a healthy replica of ``database``
    (the primary only with ``allow_primary``, announced on ``stderr``), in one read-only
    snapshot. Nothing is exported and nothing is written."""
    source = _choose_source(
        settings, database, allow_primary, _Reporter(io.StringIO(), quiet=True, tty=True)
    )
    if source.role == "primary" and stderr is not None:
        stderr.write(
            f"pgreplica: warning: checking the PRIMARY {source.label} (--allow-primary): "
            f"{source.reason}\n"
        )
    against = f"{source.label} ({source.role})"
    schemas = sorted({rule.schema for rule in visibility.tables})
    with _connect(source.conninfo, APPLICATION_NAME, settings) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        relations = {
            (schema, name): _Relation(kind, partition, list(columns))
            for schema, name, kind, partition, columns in conn.execute(
                _RELATIONS_SQL, (schemas,)
            ).fetchall()
        }
        problems, found = _compare(visibility, relations)
        warnings: list[str] = []
        if not problems:
            # What the export itself would refuse: private keys, filters that do not
            # compile, filtered foreign key cycles. EXPLAIN only: no row is read.
            try:
                warnings = _build_plan(conn, visibility).warnings
            except (VisibilityError, DumpError) as exc:
                problems.append(str(exc))
        conn.execute("ROLLBACK")
    return _result(visibility, against, problems, warnings, found)


def check_schema(visibility: Visibility, schema: str | os.PathLike[str]) -> CheckResult:
    """Compare ``visibility`` with the tables a schema file creates, without a database.

    The file is SQL as ``pg_dump --schema-only`` writes it: ``CREATE TABLE`` (with
    ``INHERITS``, ``PARTITION OF`` / ``ATTACH PARTITION``, ``LIKE`` of a table created
    earlier), ``ALTER TABLE ... ADD/DROP COLUMN``, renames, ``SET SCHEMA`` and ``DROP``;
    other statements are skipped, psql meta-commands (``\\connect``, ``\\restrict``) too.
    Only tables and columns are compared (and the foreign keys with ``dependencies``):
    the row filters and keys are checked by the export, or by the check on a database.
    """
    path = Path(schema)
    relations, foreign_keys = _SchemaReader(path).read()
    wanted = {rule.schema for rule in visibility.tables}
    problems, found = _compare(
        visibility, {key: rel for key, rel in relations.items() if key[0] in wanted}
    )
    exported = {rule.qualified for rule in visibility.exported if rule.qualified in found}
    warnings = (
        dependency_warnings(visibility.tables, foreign_keys, exported) if not problems else []
    )
    return _result(visibility, path.name, problems, warnings, found)


class _SchemaReader:
    """Tables, their columns and foreign keys from a ``pg_dump --schema-only`` file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.relations: dict[tuple[str, str], _Relation] = {}
        self.foreign_keys: list[tuple[str, str, str]] = []
        self.search_schema = "public"

    def fail(self, problem: str) -> VisibilityError:
        return VisibilityError(f"--schema {self.path.name}", problem)

    def read(self) -> tuple[dict[tuple[str, str], _Relation], list[tuple[str, str, str]]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise self.fail(f"cannot read it ({exc})") from None
        # psql meta-commands are not SQL; pg_dump writes \connect and \restrict lines.
        sql = "\n".join("" if line.startswith("\\") else line for line in text.splitlines())
        try:
            statements = pglast.parse_sql(sql)
        except pglast.parser.ParseError as exc:
            raise self.fail(f"not SQL that can be read ({exc})") from None
        for raw in statements:
            self._statement(raw.stmt)
        return self.relations, self.foreign_keys

    def _name(self, rangevar: Any) -> tuple[str, str]:
        return (str(rangevar.schemaname or self.search_schema), str(rangevar.relname))

    def _find(self, rangevar: Any) -> _Relation | None:
        return self.relations.get(self._name(rangevar))

    def _foreign_key(self, child: tuple[str, str], constraint: Any, column: str = "") -> None:
        parent = self._name(constraint.pktable)
        columns = [str(c.sval) for c in constraint.fk_attrs or ()] or [column]
        name = constraint.conname or f"{child[1]}_{'_'.join(columns)}_fkey"  # as PostgreSQL
        self.foreign_keys.append((".".join(child), ".".join(parent), name))

    def _statement(self, stmt: Any) -> None:
        if isinstance(stmt, ast.VariableSetStmt) and stmt.name == "search_path":
            self._search_path([getattr(a.val, "sval", "") for a in stmt.args or ()])
        elif isinstance(stmt, ast.SelectStmt):
            self._set_config(stmt)
        elif isinstance(stmt, ast.CreateForeignTableStmt):
            self._create(stmt.base, "f")
        elif isinstance(stmt, ast.CreateStmt):
            if getattr(stmt.relation, "relpersistence", "p") != "t":  # not TEMP
                self._create(stmt, "p" if stmt.partspec else "r")
        elif isinstance(stmt, ast.ViewStmt):
            self.relations[self._name(stmt.view)] = _Relation("v", False, [])
        elif isinstance(stmt, ast.CreateTableAsStmt):
            kind = "m" if stmt.objtype == ObjectType.OBJECT_MATVIEW else "r"
            if kind == "r":
                raise self.fail("CREATE TABLE ... AS: its columns cannot be read from the file")
            into: Any = stmt.into
            self.relations[self._name(into.rel)] = _Relation(kind, False, [])
        elif isinstance(stmt, ast.AlterTableStmt):
            self._alter(stmt)
        elif isinstance(stmt, ast.RenameStmt):
            self._rename(stmt)
        elif isinstance(stmt, ast.AlterObjectSchemaStmt) and stmt.relation is not None:
            relation = self.relations.pop(self._name(stmt.relation), None)
            if relation is not None:
                self.relations[(str(stmt.newschema), str(stmt.relation.relname))] = relation
        elif isinstance(stmt, ast.DropStmt) and stmt.removeType in (
            ObjectType.OBJECT_TABLE,
            ObjectType.OBJECT_VIEW,
            ObjectType.OBJECT_MATVIEW,
            ObjectType.OBJECT_FOREIGN_TABLE,
        ):
            for names in stmt.objects or ():
                parts = [n.sval for n in names]
                key = (parts[-2], parts[-1]) if len(parts) > 1 else (self.search_schema, parts[0])
                self.relations.pop(key, None)

    def _search_path(self, schemas: list[str]) -> None:
        first = next((s.strip().strip('"') for s in schemas if s.strip()), "")
        self.search_schema = first if first and first != "$user" else "public"

    def _set_config(self, stmt: Any) -> None:
        """pg_dump's ``SELECT pg_catalog.set_config('search_path', '', false);``."""
        for target in stmt.targetList or ():
            call = target.val
            names: Any = getattr(call, "funcname", None) or ()
            if not isinstance(call, ast.FuncCall) or names[-1].sval != "set_config":
                continue
            args = [getattr(getattr(a, "val", None), "sval", None) for a in call.args or ()]
            if len(args) >= 2 and args[0] == "search_path" and isinstance(args[1], str):
                self._search_path(args[1].split(","))

    def _create(self, stmt: Any, kind: str) -> None:
        key = self._name(stmt.relation)
        if stmt.ofTypename is not None:
            raise self.fail(f"CREATE TABLE {'.'.join(key)} OF a type: its columns are not read")
        columns: list[str] = []
        partition = stmt.partbound is not None
        for parent in stmt.inhRelations or ():  # INHERITS, or PARTITION OF
            inherited = self._find(parent)
            if inherited is None:
                raise self.fail(
                    f"{'.'.join(key)} inherits {'.'.join(self._name(parent))}, "
                    "which the file does not create before it"
                )
            columns += [c for c in inherited.columns if c not in columns]
        for element in stmt.tableElts or ():
            if isinstance(element, ast.ColumnDef):
                if element.colname not in columns:
                    columns.append(str(element.colname))
                for constraint in element.constraints or ():
                    if constraint.contype == ConstrType.CONSTR_FOREIGN:
                        self._foreign_key(key, constraint, str(element.colname))
            elif isinstance(element, ast.TableLikeClause):
                like = self._find(element.relation)
                if like is None:
                    raise self.fail(f"{'.'.join(key)} is LIKE a table the file does not create")
                columns += [c for c in like.columns if c not in columns]
            elif (
                isinstance(element, ast.Constraint) and element.contype == ConstrType.CONSTR_FOREIGN
            ):
                self._foreign_key(key, element)
        self.relations[key] = _Relation(kind, partition, columns)

    def _alter(self, stmt: Any) -> None:
        if stmt.objtype not in (ObjectType.OBJECT_TABLE, ObjectType.OBJECT_FOREIGN_TABLE):
            return
        key = self._name(stmt.relation)
        relation = self.relations.get(key)
        if relation is None:
            return
        for cmd in stmt.cmds or ():
            if cmd.subtype == AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                if cmd.def_.colname not in relation.columns:
                    relation.columns.append(str(cmd.def_.colname))
                for constraint in cmd.def_.constraints or ():
                    if constraint.contype == ConstrType.CONSTR_FOREIGN:
                        self._foreign_key(key, constraint, str(cmd.def_.colname))
            elif cmd.subtype == AlterTableType.AT_DropColumn and cmd.name in relation.columns:
                relation.columns.remove(cmd.name)
            elif cmd.subtype == AlterTableType.AT_AddConstraint and isinstance(
                cmd.def_, ast.Constraint
            ):
                if cmd.def_.contype == ConstrType.CONSTR_FOREIGN:
                    self._foreign_key(key, cmd.def_)
            elif cmd.subtype in (
                AlterTableType.AT_AttachPartition,
                AlterTableType.AT_DetachPartition,
            ) and isinstance(cmd.def_, ast.PartitionCmd):
                child = self._find(cmd.def_.name)
                if child is not None:
                    child.partition = cmd.subtype == AlterTableType.AT_AttachPartition

    def _rename(self, stmt: Any) -> None:
        if stmt.relation is None:
            return
        key = self._name(stmt.relation)
        relation = self.relations.get(key)
        if relation is None:
            return
        if stmt.renameType == ObjectType.OBJECT_COLUMN and stmt.subname in relation.columns:
            relation.columns[relation.columns.index(stmt.subname)] = stmt.newname
        elif stmt.renameType in (
            ObjectType.OBJECT_TABLE,
            ObjectType.OBJECT_VIEW,
            ObjectType.OBJECT_MATVIEW,
            ObjectType.OBJECT_FOREIGN_TABLE,
        ):
            self.relations[(key[0], stmt.newname)] = self.relations.pop(key)
