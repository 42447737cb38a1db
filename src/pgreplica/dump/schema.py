"""The schema around the exported columns: what ``schema.sql`` and ``import.sql`` need so
that the imported database works.

Read on the dump's connection, inside its snapshot, once the plan
(:mod:`pgreplica.dump.catalog`) is built: the extensions that exported column types,
operator classes and functions belong to (found through ``pg_depend``), the user functions
that exported indexes, defaults and CHECK constraints call, enum and domain types, column
defaults with their sequences, CHECK and exclusion constraints, comments, and (opt-in)
views and all functions. What cannot be carried is left out with a warning that names it
and says why; nothing is carried half-working.

The SQL of the statements is produced here; :mod:`pgreplica.dump.output` arranges it into
the files of each import mode and layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pglast
import psycopg
from pglast.visitors import Visitor

from pgreplica.dump._util import quote_ident, quote_literal
from pgreplica.dump.catalog import _Plan, _Table
from pgreplica.errors import ConfigError

FIDELITIES = ("full", "minimal")
IMPORT_MODES = ("empty", "existing")
LAYOUTS = ("pgreplica", "crates-io")

_FIRST_NORMAL_OID = 16384
"""Objects below this OID were made by initdb: built in, present in every database."""
_CATALOG_SEARCH_PATH = "SET LOCAL search_path = pg_catalog, pg_temp"
_CARRIED_LANGUAGES = ("sql", "plpgsql")
_INTEGER_TYPES = ("smallint", "integer", "bigint")
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")
_SAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class _OutputOptions:
    """What the dump's schema and import script hold (the keyword arguments of
    :func:`pgreplica.dump.dump`)."""

    fidelity: str = "full"
    keep_private_columns: bool = False
    views: bool = False
    functions: bool = False
    import_mode: str = "empty"
    layout: str = "pgreplica"
    app_commit: str | None = None
    load_triggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for setting, value, allowed in (
            ("fidelity", self.fidelity, FIDELITIES),
            ("import_mode", self.import_mode, IMPORT_MODES),
            ("layout", self.layout, LAYOUTS),
        ):
            if value not in allowed:
                raise ConfigError(setting, f"expected one of {', '.join(allowed)}, got {value!r}")
        if self.fidelity == "minimal":
            for setting, on in (
                ("keep_private_columns", self.keep_private_columns),
                ("views", self.views),
                ("functions", self.functions),
            ):
                if on:
                    raise ConfigError(setting, "needs fidelity='full' (--schema full)")
        if self.load_triggers and self.import_mode != "existing":
            raise ConfigError(
                "load_triggers", "only applies to import_mode='existing' (--import existing)"
            )
        if self.app_commit is not None and not re.fullmatch(r"[\x21-\x7e]{1,200}", self.app_commit):
            raise ConfigError("app_commit", "expected a commit id (printable, no spaces)")


_Ref = tuple[str, int, int]
"""An object as ``pg_depend`` names it: (catalog, OID, sub-id)."""


@dataclass
class _Needs:
    """What the dump must create for an object to work in the imported database."""

    extensions: set[int] = field(default_factory=set)
    types: set[int] = field(default_factory=set)
    functions: set[int] = field(default_factory=set)
    sequences: set[int] = field(default_factory=set)
    views: set[int] = field(default_factory=set)

    def add(self, other: _Needs) -> None:
        self.extensions |= other.extensions
        self.types |= other.types
        self.functions |= other.functions
        self.sequences |= other.sequences
        self.views |= other.views


@dataclass
class _ColumnInfo:
    table: int
    attnum: int
    name: str
    not_null: bool
    type_sql: str
    type_oid: int
    identity: str
    generated: str
    collation: str | None
    collation_oid: int
    default_oid: int | None
    default_sql: str | None
    public: bool = False
    load_default: str | None = None
    """``column_defaults`` from the visibility rule: the value while loading."""
    final_default: str | None = None
    """The default the column keeps (the source's, if it can be carried)."""


@dataclass
class _Sequence:
    oid: int
    name: str
    type_sql: str
    start: int
    increment: int
    maximum: int
    minimum: int
    cache: int
    cycle: bool
    identity: bool = False
    columns: list[tuple[_Table, _ColumnInfo]] = field(default_factory=list)

    def options(self) -> str:
        return (
            f"INCREMENT BY {self.increment} MINVALUE {self.minimum} MAXVALUE {self.maximum} "
            f"START WITH {self.start} CACHE {self.cache}{' CYCLE' if self.cycle else ' NO CYCLE'}"
        )


@dataclass
class _Schema:
    """The statements of the dump's schema, grouped by when they run."""

    options: _OutputOptions
    schemas: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    domain_constraints: list[str] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    owned_by: list[str] = field(default_factory=list)
    after_load: list[str] = field(default_factory=list)
    """Statements that need the rows: NOT VALID domain constraints, final defaults."""
    post_data: list[str] = field(default_factory=list)
    setvals: list[str] = field(default_factory=list)
    existing_setvals: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    column_defaults: list[tuple[_Table, str, str]] = field(default_factory=list)
    """(table, column, SQL) from the visibility rules, for loading into an existing database."""
    load_triggers: list[tuple[_Table, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def check_function_bodies_off(self) -> bool:
        return bool(self.functions)


# ---------------------------------------------------------------------- catalog queries

_EXTENSION_MEMBERS_SQL = """
SELECT d.classid::regclass::text, d.objid::int8, d.refobjid::int8
FROM pg_depend d
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
"""
_EXTENSIONS_SQL = """
SELECT e.oid::int8, e.extname, n.nspname, e.extversion,
       ARRAY(SELECT d.refobjid::int8 FROM pg_depend d
             WHERE d.classid = 'pg_extension'::regclass AND d.objid = e.oid
               AND d.refclassid = 'pg_extension'::regclass)
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
"""
_DEPENDS_SQL = """
SELECT d.objid::int8, d.objsubid::int, d.refclassid::regclass::text, d.refobjid::int8,
       d.refobjsubid::int
FROM pg_depend d
WHERE d.classid = %s::regclass AND d.objid = ANY(%s) AND d.deptype IN ('n', 'a')
"""
_ALL_COLUMNS_SQL = """
SELECT a.attrelid::int8, a.attnum::int, a.attname, a.attnotnull,
       format_type(a.atttypid, a.atttypmod), a.atttypid::int8,
       a.attidentity::text, a.attgenerated::text,
       CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0
            THEN format('%%I.%%I', cn.nspname, co.collname) END,
       a.attcollation::int8, ad.oid::int8, pg_get_expr(ad.adbin, ad.adrelid)
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""
_TYPES_SQL = """
SELECT t.oid::int8, t.typtype::text, t.typelem::int8, t.typlen::int, t.typbasetype::int8,
       format('%%I.%%I', n.nspname, t.typname), n.nspname,
       format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault,
       CASE WHEN t.typtype = 'd' AND t.typcollation <> bt.typcollation AND t.typcollation <> 0
            THEN format('%%I.%%I', cn.nspname, co.collname) END,
       ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid
             ORDER BY e.enumsortorder)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
LEFT JOIN pg_collation co ON co.oid = t.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE t.oid = ANY(%s)
"""
_DOMAIN_CONSTRAINTS_SQL = """
SELECT c.oid::int8, c.contypid::int8, c.conname, pg_get_constraintdef(c.oid), c.convalidated
FROM pg_constraint c WHERE c.contypid = ANY(%s) ORDER BY c.contypid, c.conname
"""
_FUNCTIONS_SQL = """
SELECT p.oid::int8, n.nspname, p.proname, l.lanname, p.prokind::text,
       format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)),
       CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END,
       p.prosrc, p.prosqlbody IS NOT NULL
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE p.oid = ANY(%s)
"""
_FUNCTIONS_BY_NAME_SQL = """
SELECT p.oid::int8, n.nspname, p.proname FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = ANY(%s)
"""
_USER_FUNCTIONS_SQL = """
SELECT p.oid::int8 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = ANY(%s) AND p.oid >= 16384 AND p.prokind = 'f'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                  AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY n.nspname, p.proname, p.oid
"""
_RELATIONS_SQL = """
SELECT c.oid::int8, c.relkind::text, format('%%I.%%I', n.nspname, c.relname), n.nspname,
       c.relname, c.reloptions
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = ANY(%s)
"""
_SEQUENCES_SQL = """
SELECT s.seqrelid::int8, format('%%I.%%I', n.nspname, c.relname), format_type(s.seqtypid, NULL),
       s.seqstart, s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle
FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE s.seqrelid = ANY(%s)
"""
_OWNED_SEQUENCES_SQL = """
SELECT d.objid::int8, d.refobjid::int8, d.refobjsubid::int, d.deptype::text
FROM pg_depend d JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S'
WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
  AND d.refobjid = ANY(%s) AND d.deptype IN ('a', 'i')
"""
_INDEXES_SQL = """
SELECT i.indexrelid::int8, i.indrelid::int8, format('%%I.%%I', n.nspname, ic.relname),
       pg_get_indexdef(i.indexrelid), ic.relam::int8
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
WHERE i.indrelid = ANY(%s)
ORDER BY i.indrelid, ic.relname
"""
_CONSTRAINTS_SQL = """
SELECT c.oid::int8, c.conname, c.contype::text, c.conrelid::int8,
       coalesce(c.conkey, '{}')::int[], pg_get_constraintdef(c.oid), c.conindid::int8
FROM pg_constraint c
WHERE c.conrelid = ANY(%s) AND c.contype IN ('p', 'u', 'f', 'c', 'x')
ORDER BY c.conrelid, c.contype, c.conname
"""
_TRIGGERS_SQL = """
SELECT t.tgrelid::int8, t.tgname FROM pg_trigger t
WHERE t.tgrelid = ANY(%s) AND NOT t.tgisinternal
"""
_VIEWS_SQL = """
SELECT c.oid::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('v', 'm')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname
"""
_VIEW_DEPENDS_SQL = """
SELECT r.ev_class::int8, d.refclassid::regclass::text, d.refobjid::int8, d.refobjsubid::int
FROM pg_rewrite r JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
WHERE r.ev_class = ANY(%s) AND d.deptype = 'n' AND d.refobjid <> r.ev_class
"""
_VIEW_DEFINITIONS_SQL = """
SELECT c.oid::int8, pg_get_viewdef(c.oid),
       ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
             AND NOT a.attisdropped ORDER BY a.attnum)
FROM pg_class c WHERE c.oid = ANY(%s)
"""
_COMMENTS_SQL = """
SELECT d.classoid::regclass::text, d.objoid::int8, d.objsubid::int, d.description
FROM pg_description d WHERE d.objoid = ANY(%s)
"""


# ---------------------------------------------------------------------- function bodies


class _BodyReferences(Visitor):
    """Relations and functions named in a SQL statement."""

    def __init__(self) -> None:
        super().__init__()
        self.relations: set[tuple[str | None, str]] = set()
        self.calls: set[tuple[str, ...]] = set()
        self.ctes: set[str] = set()

    def visit_RangeVar(self, ancestors: Any, node: Any) -> None:
        self.relations.add((node.schemaname, node.relname))

    def visit_FuncCall(self, ancestors: Any, node: Any) -> None:
        self.calls.add(tuple(str(part.sval) for part in node.funcname))

    def visit_CommonTableExpr(self, ancestors: Any, node: Any) -> None:
        self.ctes.add(node.ctename)


def _body_references(language: str, definition: str, source: str) -> _BodyReferences:
    """What a SQL or PL/pgSQL function body names (best effort: dynamic SQL is invisible).

    Raises ValueError when the body cannot be read.
    """
    refs = _BodyReferences()
    if language == "sql":
        refs(pglast.parse_sql(source))
        return refs
    tree = json.loads(pglast.parser.parse_plpgsql_json(definition))
    for query, mode in _plpgsql_queries(tree):
        if mode == 0:
            text = query
        else:
            if mode >= 3:  # an assignment: "target := expression"
                match = re.match(r"\s*[^:=]*?:?=(?!=)", query)
                query = query[match.end() :] if match else query
            text = f"SELECT {query}"
        refs(pglast.parse_sql(text))
    return refs


def _plpgsql_queries(node: Any) -> Iterable[tuple[str, int]]:
    if isinstance(node, dict):
        expr = node.get("PLpgSQL_expr")
        if isinstance(expr, dict) and isinstance(expr.get("query"), str):
            yield expr["query"], int(expr.get("parseMode", 0))
        for value in node.values():
            yield from _plpgsql_queries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _plpgsql_queries(value)


# ---------------------------------------------------------------------- the collector


@dataclass
class _Function:
    oid: int
    schema: str
    name: str
    language: str
    kind: str
    signature: str
    definition: str | None
    source: str
    sql_body: bool

    @property
    def label(self) -> str:
        return f"function {self.signature}"


@dataclass
class _Type:
    oid: int
    kind: str
    element: int
    length: int
    base: int
    name: str
    schema: str
    base_sql: str
    not_null: bool
    default: str | None
    collation: str | None
    labels: list[str]
    constraints: list[tuple[int, str, str, bool]] = field(default_factory=list)


class _Collector:
    """Walks ``pg_depend`` from what the dump creates to what that needs."""

    def __init__(self, conn: psycopg.Connection[Any], plan: _Plan, options: _OutputOptions):
        self.conn = conn
        self.plan = plan
        self.options = options
        self.tables = {t.oid: t for t in plan.tables}
        self.full = options.fidelity == "full"
        self.members: dict[tuple[str, int], int] = {}
        self.extensions: dict[int, tuple[str, str, str, list[int]]] = {}
        self.columns: dict[int, dict[int, _ColumnInfo]] = {}
        self.created: dict[int, set[int]] = {}
        self.types: dict[int, _Type] = {}
        self.functions: dict[int, _Function] = {}
        self.function_verdicts: dict[int, _Needs | str] = {}
        self.type_verdicts: dict[int, _Needs | str] = {}
        self.function_edges: dict[int, set[int]] = {}
        self.view_verdicts: dict[int, _Needs | str] = {}
        self.view_edges: dict[int, set[int]] = {}
        self.relations: dict[int, tuple[str, str, str, str, list[str] | None]] = {}
        self.by_name: dict[str, list[tuple[int, str]]] = {}
        self.depends_cache: dict[tuple[str, int], list[tuple[int, _Ref]]] = {}
        self.needs = _Needs()
        self.left_out: list[dict[str, str]] = []
        self.warnings: list[str] = []

    # -- plumbing

    def fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def depends(self, catalog: str, oids: Iterable[int]) -> None:
        """Load the pg_depend rows of these objects (normal and automatic) into the cache."""
        wanted = [oid for oid in set(oids) if (catalog, oid) not in self.depends_cache]
        for oid in wanted:
            self.depends_cache[(catalog, oid)] = []
        if not wanted:
            return
        for objid, subid, refcatalog, refobjid, refsubid in self.fetch(
            _DEPENDS_SQL, catalog, wanted
        ):
            self.depends_cache[(catalog, objid)].append((subid, (refcatalog, refobjid, refsubid)))

    def refs(self, catalog: str, oid: int, subid: int | None = None) -> list[_Ref]:
        self.depends(catalog, [oid])
        return [
            ref
            for sub, ref in self.depends_cache[(catalog, oid)]
            if (subid is None or sub == subid)
            and ref[0] != "pg_namespace"
            and not (ref[0] == catalog and ref[1] == oid)
        ]

    def describe(self, ref: _Ref) -> str:
        row = self.fetch("SELECT pg_describe_object(%s::regclass, %s, %s)", *ref)
        return str(row[0][0]) if row and row[0][0] else f"{ref[0]} {ref[1]}"

    def load_types(self, oids: Iterable[int]) -> None:
        wanted = [oid for oid in set(oids) if oid not in self.types]
        if not wanted:
            return
        for row in self.fetch(_TYPES_SQL, wanted):
            self.types[row[0]] = _Type(*row)
        domains = [oid for oid in wanted if oid in self.types and self.types[oid].kind == "d"]
        if domains:
            for con_oid, typid, name, definition, validated in self.fetch(
                _DOMAIN_CONSTRAINTS_SQL, domains
            ):
                self.types[typid].constraints.append((con_oid, name, definition, validated))

    def load_functions(self, oids: Iterable[int]) -> None:
        wanted = [oid for oid in set(oids) if oid not in self.functions]
        if wanted:
            for row in self.fetch(_FUNCTIONS_SQL, wanted):
                self.functions[row[0]] = _Function(*row)

    def load_relations(self, oids: Iterable[int]) -> None:
        wanted = [oid for oid in set(oids) if oid not in self.relations]
        if wanted:
            for oid, kind, qualified, schema, name, reloptions in self.fetch(
                _RELATIONS_SQL, wanted
            ):
                self.relations[oid] = (kind, qualified, schema, name, reloptions)

    # -- what an object needs

    def need_all(self, refs: Iterable[_Ref], skip: Iterable[_Ref] = ()) -> _Needs | str:
        needs = _Needs()
        skipped = set(skip)
        for ref in refs:
            if ref in skipped:
                continue
            got = self.need(ref)
            if isinstance(got, str):
                return got
            needs.add(got)
        return needs

    def need(self, ref: _Ref) -> _Needs | str:
        catalog, oid, subid = ref
        if oid < _FIRST_NORMAL_OID:
            return _Needs()
        extension = self.members.get((catalog, oid))
        if extension is not None:
            return _Needs(extensions={extension})
        if catalog in ("pg_namespace", "pg_language"):
            return _Needs()
        if catalog == "pg_extension":
            return _Needs(extensions={oid})
        if catalog == "pg_type":
            return self.type_needs(oid)
        if catalog == "pg_proc":
            return self.function_needs(oid)
        if catalog == "pg_class":
            return self.relation_needs(oid, subid)
        return f"{self.describe(ref)} is not created by the dump"

    def type_needs(self, oid: int) -> _Needs | str:
        if oid < _FIRST_NORMAL_OID:
            return _Needs()
        extension = self.members.get(("pg_type", oid))
        if extension is not None:
            return _Needs(extensions={extension})
        verdict = self.type_verdicts.get(oid)
        if verdict is None:
            self.type_verdicts[oid] = _Needs(types={oid})  # provisional: a domain's own
            verdict = self.judge_type(oid)  # constraints depend on the domain
            self.type_verdicts[oid] = verdict
        return verdict

    def judge_type(self, oid: int) -> _Needs | str:
        self.load_types([oid])
        info = self.types.get(oid)
        if info is None:
            return f"type {oid} does not exist"
        if info.element and info.length == -1:  # an array: what its element needs
            return self.type_needs(info.element)
        if info.kind == "e":
            return _Needs(types={oid})
        if info.kind == "d":
            needs = _Needs(types={oid})
            base = self.type_needs(info.base)
            if isinstance(base, str):
                return base
            needs.add(base)
            own = self.need_all(self.refs("pg_type", oid), skip=[("pg_type", info.base, 0)])
            if isinstance(own, str):
                return f"domain {info.name}: {own}"
            needs.add(own)
            for con_oid, name, _, _ in info.constraints:
                got = self.need_all(self.refs("pg_constraint", con_oid))
                if isinstance(got, str):
                    return f"constraint {name} of domain {info.name}: {got}"
                needs.add(got)
            return needs
        kinds = {"c": "a composite type", "r": "a range type", "m": "a multirange type"}
        return f"type {info.name} is {kinds.get(info.kind, 'a base type')} the dump does not create"

    def function_needs(self, oid: int) -> _Needs | str:
        verdict = self.function_verdicts.get(oid)
        if verdict is not None:
            return verdict
        self.function_verdicts[oid] = _Needs(functions={oid})  # provisional: recursion
        verdict = self.judge_function(oid)
        self.function_verdicts[oid] = verdict
        if not isinstance(verdict, str):
            self.function_edges[oid] = verdict.functions - {oid}
        return verdict

    def judge_function(self, oid: int) -> _Needs | str:
        self.load_functions([oid])
        function = self.functions.get(oid)
        if function is None:
            return f"function {oid} does not exist"
        if function.kind != "f" or function.definition is None:
            kinds = {"a": "an aggregate", "w": "a window function", "p": "a procedure"}
            return f"{function.signature} is {kinds.get(function.kind, 'not a function')}"
        if function.language not in _CARRIED_LANGUAGES:
            return (
                f"{function.label} is written in {function.language} (only SQL and PL/pgSQL "
                "functions are carried)"
            )
        needs = _Needs(functions={oid})
        got = self.need_all(self.refs("pg_proc", oid))
        if isinstance(got, str):
            return f"{function.label} needs {got}"
        needs.add(got)
        if function.sql_body:
            return needs  # BEGIN ATOMIC: pg_depend already lists what it uses
        try:
            body = _body_references(function.language, function.definition, function.source)
        except (pglast.parser.ParseError, ValueError) as exc:
            return f"the body of {function.label} cannot be read ({exc})"
        for schema, name in sorted(body.relations, key=lambda r: (r[0] or "", r[1])):
            if schema is None and name in body.ctes:
                continue
            if schema in _SYSTEM_SCHEMAS or (schema is None and name.startswith("pg_")):
                continue
            if not any(
                t.name == name and (schema is None or t.schema == schema)
                for t in self.tables.values()
            ):
                shown = f"{schema}.{name}" if schema else name
                return f"{function.label} reads {shown}, which is not an exported table"
        for call in sorted(body.calls):
            got = self.call_needs(call)
            if isinstance(got, str):
                return f"{function.label} calls {got}"
            needs.add(got)
        return needs

    def call_needs(self, call: tuple[str, ...]) -> _Needs | str:
        name = call[-1]
        schema = call[0] if len(call) > 1 else None
        if schema in _SYSTEM_SCHEMAS:
            return _Needs()
        if name not in self.by_name:
            self.by_name[name] = [
                (oid, nsp) for oid, nsp, _ in self.fetch(_FUNCTIONS_BY_NAME_SQL, [name])
            ]
        candidates = [(oid, nsp) for oid, nsp in self.by_name[name] if schema in (None, nsp)]
        if any(oid < _FIRST_NORMAL_OID for oid, _ in candidates):
            return _Needs()
        needs = _Needs()
        for oid, _ in candidates:
            got = self.need(("pg_proc", oid, 0))
            if isinstance(got, str):
                return got
            needs.add(got)
        return needs

    def relation_needs(self, oid: int, subid: int) -> _Needs | str:
        table = self.tables.get(oid)
        if table is not None:
            if subid == 0 or subid in self.created.get(oid, set()):
                return _Needs()
            column = self.columns[oid].get(subid)
            what = "private" if column is not None and not column.public else "not exported"
            name = column.name if column is not None else str(subid)
            return f"column {table.qualified}.{name} is {what}"
        self.load_relations([oid])
        kind, qualified, _, _, _ = self.relations.get(oid, ("?", str(oid), "", "", None))
        if kind == "S":
            return _Needs(sequences={oid})
        if kind in ("i", "I"):  # the parent's key under a foreign key: exported with it
            return _Needs()
        if kind in ("v", "m") and self.options.views:
            return self.view_needs(oid)
        kinds = {"r": "table", "p": "table", "v": "view", "m": "materialized view"}
        return f"{kinds.get(kind, 'relation')} {qualified} is not exported"

    def view_needs(self, oid: int) -> _Needs | str:
        verdict = self.view_verdicts.get(oid)
        if verdict is not None:
            return verdict
        self.view_verdicts[oid] = _Needs(views={oid})
        rows = self.fetch(_VIEW_DEPENDS_SQL, [oid])
        needs = _Needs(views={oid})
        result: _Needs | str = needs
        for _, catalog, refobjid, refsubid in rows:
            got = self.need((catalog, refobjid, refsubid))
            if isinstance(got, str):
                result = got
                break
            needs.add(got)
        self.view_verdicts[oid] = result
        if not isinstance(result, str):
            self.view_edges[oid] = result.views - {oid}
        return result

    def leave_out(self, what: str, reason: str, *, warn: bool = True) -> None:
        self.left_out.append({"object": what, "reason": reason})
        if warn:
            self.warnings.append(f"{what} left out of schema.sql: {reason}")


def _collect_schema(conn: psycopg.Connection[Any], plan: _Plan, options: _OutputOptions) -> _Schema:
    """Read what the dump's schema needs, inside the snapshot, and adjust the plan.

    Leaves out of ``plan.post_data`` the indexes whose functions or types cannot be
    carried, drops the plan's warnings about types it now creates and adds its own to
    ``plan.warnings``, and names the CSV files after the layout. Runs with the catalog
    search path, like the plan, so that every name in the generated SQL is qualified.
    """
    conn.execute(_CATALOG_SEARCH_PATH)
    try:
        schema = _collect(_Collector(conn, plan, options))
        plan.warnings.extend(w for w in schema.warnings if w not in plan.warnings)
        return schema
    finally:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
            conn.execute("SET LOCAL search_path TO DEFAULT")


def _collect(c: _Collector) -> _Schema:
    plan, options = c.plan, c.options
    schema = _Schema(options)
    oids = list(c.tables)

    for catalog, objid, extension in c.fetch(_EXTENSION_MEMBERS_SQL):
        c.members[(catalog, objid)] = extension
    for oid, name, namespace, version, requires in c.fetch(_EXTENSIONS_SQL):
        c.extensions[oid] = (name, namespace, version, list(requires))

    _name_files(plan, options)

    # Columns: which are created, their types, defaults and fills.
    for row in c.fetch(_ALL_COLUMNS_SQL, oids):
        table = c.tables[row[0]]
        info = _ColumnInfo(*row[:12])
        info.public = any(col.name == info.name and col.public for col in table.columns)
        c.columns.setdefault(table.oid, {})[info.attnum] = info
    for table in plan.tables:
        c.created[table.oid] = {col.attnum for col in c.columns[table.oid].values() if col.public}
        rule_defaults = _column_defaults(table)
        for name, sql in rule_defaults.items():
            found = next((x for x in c.columns[table.oid].values() if x.name == name), None)
            if found is None:
                c.warnings.append(
                    f"column_defaults of {table.qualified} names no column {name}: ignored"
                )
            elif found.public:
                c.warnings.append(
                    f"column_defaults of {table.qualified}.{name} ignored: the column is public, "
                    "its values are in the dump"
                )
            else:
                found.load_default = sql
                schema.column_defaults.append((table, name, sql))
        if c.full and options.keep_private_columns:
            c.created[table.oid] |= {
                col.attnum for col in c.columns[table.oid].values() if not col.public
            }

    # Column types (the plan writes a domain column with its base type in minimal mode).
    type_verdicts: dict[str, bool] = {}
    type_needs: dict[tuple[int, int], _Needs] = {}
    for table in plan.tables:
        for column in _created_columns(c, table):
            where = f"{table.qualified}.{column.name}"
            got = c.type_needs(column.type_oid if c.full else _plan_type(c, column.type_oid))
            if not isinstance(got, str) and column.collation is not None:
                collation = c.need(("pg_collation", column.collation_oid, 0))
                got = collation if isinstance(collation, str) else _merged(got, collation)
            type_verdicts[where] = not isinstance(got, str)
            if isinstance(got, str):
                if not column.public:
                    c.created[table.oid].discard(column.attnum)
                    c.leave_out(f"private column {where}", got)
                continue
            type_needs[(table.oid, column.attnum)] = got
    # The plan warned about every user type it does not create; keep the warnings about
    # those that are still not created (a type of no extension, a composite...).
    plan.warnings[:] = [
        w
        for w in plan.warnings
        if not (
            (m := re.match(r"type .+? \(column (.+)\) is not created by import\.sql", w))
            and type_verdicts.get(m.group(1))
        )
    ]

    # Defaults. A kept private column needs a value while loading (column_defaults or its
    # own default); dropping one can break another's default (a generated column): repeat.
    while True:
        verdicts: dict[tuple[int, int], _Needs | str] = {}
        dropped: list[tuple[_Table, _ColumnInfo, str]] = []
        for table in plan.tables:
            for column in _created_columns(c, table):
                if column.public and column.generated:
                    continue  # created as a plain column: its values are in the dump
                got = _default_needs(c, table, column)
                verdicts[(table.oid, column.attnum)] = got
                if column.public:
                    continue
                if column.generated and isinstance(got, str):
                    dropped.append((table, column, got))
                elif (
                    column.not_null
                    and not column.generated
                    and not column.identity
                    and column.load_default is None
                    and (column.default_sql is None or isinstance(got, str))
                ):
                    reason = "NOT NULL without a default"
                    if isinstance(got, str):
                        reason = f"NOT NULL, and its default cannot be carried ({got})"
                    dropped.append(
                        (
                            table,
                            column,
                            f"{reason}: give it one in the visibility file's column_defaults "
                            f"({table.rule.setting}.column_defaults)",
                        )
                    )
        if not dropped:
            break
        for table, column, reason in dropped:
            c.created[table.oid].discard(column.attnum)
            c.leave_out(f"private column {table.qualified}.{column.name}", reason)
    for (table_oid, attnum), needs in type_needs.items():
        if attnum in c.created[table_oid]:
            c.needs.add(needs)
    for (table_oid, attnum), got in verdicts.items():
        column = c.columns[table_oid][attnum]
        if isinstance(got, str):
            if c.full and column.default_sql is not None:
                c.leave_out(f"default of {c.tables[table_oid].qualified}.{column.name}", got)
            continue
        column.final_default = column.default_sql
        if c.full:
            c.needs.add(got)

    # Sequences: created for the defaults and identity columns (full fidelity), and set
    # past the exported values after loading (full fidelity, or an existing database).
    owned: dict[int, tuple[int, int, str]] = {}
    for seq, table_oid, attnum, deptype in c.fetch(_OWNED_SEQUENCES_SQL, oids):
        owned[seq] = (table_oid, attnum, deptype)
    users: dict[int, list[tuple[_Table, _ColumnInfo]]] = {}
    for table in plan.tables:
        for column in _created_columns(c, table):
            if column.identity:
                for seq, owner in owned.items():
                    if owner == (table.oid, column.attnum, "i"):
                        users.setdefault(seq, []).append((table, column))
            elif column.final_default is not None and column.default_oid is not None:
                refs = [r for r in c.refs("pg_attrdef", column.default_oid) if r[0] == "pg_class"]
                c.load_relations(r[1] for r in refs)
                for ref in refs:
                    if c.relations.get(ref[1], ("",))[0] == "S":
                        users.setdefault(ref[1], []).append((table, column))
    wanted_sequences = set(users) | (c.needs.sequences if c.full else set())
    sequences: dict[int, _Sequence] = {}
    if wanted_sequences:
        for row in c.fetch(_SEQUENCES_SQL, sorted(wanted_sequences)):
            sequences[row[0]] = _Sequence(*row)
    for seq_oid, columns in users.items():
        if seq_oid in sequences:
            sequences[seq_oid].columns = columns
            sequences[seq_oid].identity = any(col.identity for _, col in columns)

    # Indexes: the plan keeps those on public columns; leave out those it cannot carry.
    index_names: dict[int, str] = {}
    kept_indexes: list[tuple[int, int]] = []
    for index_oid, table_oid, name, definition, am in c.fetch(_INDEXES_SQL, oids):
        statement = definition.replace(" ON ONLY ", " ON ", 1) + ";"
        index_names[index_oid] = name
        if statement not in plan.post_data:
            continue
        got = c.need_all([*c.refs("pg_class", index_oid), ("pg_am", am, 0)])
        if isinstance(got, str):
            plan.post_data.remove(statement)
            c.leave_out(f"index {name} of {c.tables[table_oid].qualified}", got)
            continue
        c.needs.add(got)
        kept_indexes.append((index_oid, table_oid))

    # Constraints: keys and foreign keys as the plan has them; CHECK and exclusion
    # constraints on public columns in full fidelity.
    fk_names = {(fk.child, fk.name) for fk in plan.foreign_keys}
    kept_constraints: dict[int, tuple[str, _Table]] = {}
    checks: list[str] = []
    for con_oid, name, kind, table_oid, conkey, definition, conindid in c.fetch(
        _CONSTRAINTS_SQL, oids
    ):
        table = c.tables[table_oid]
        public_attnums = {col.attnum for col in c.columns[table_oid].values() if col.public}
        private = [c.columns[table_oid][n].name for n in conkey if n not in public_attnums]
        refs = c.refs("pg_constraint", con_oid)
        if conindid:
            refs += c.refs("pg_class", conindid)
        if (kind in ("p", "u") and not private) or (kind == "f" and (table_oid, name) in fk_names):
            got = c.need_all(refs)
            if isinstance(got, str):
                c.warnings.append(
                    f"constraint {name} of {table.qualified} needs {got}: import.sql may fail"
                )
            else:
                c.needs.add(got)
            kept_constraints[con_oid] = (name, table)
            continue
        if kind not in ("c", "x") or not c.full:
            continue
        label = f"{'CHECK' if kind == 'c' else 'exclusion'} constraint {name} of {table.qualified}"
        if private:
            c.leave_out(label, f"uses private column(s) {', '.join(private)}", warn=False)
            continue
        got = c.need_all(refs)
        if isinstance(got, str):
            c.leave_out(label, got)
            continue
        c.needs.add(got)
        kept_constraints[con_oid] = (name, table)
        checks.append(
            f"ALTER TABLE ONLY {table.sql_name} ADD CONSTRAINT {quote_ident(name)} {definition};"
        )

    # Load triggers (existing-database import): they must exist on an exported table.
    if options.load_triggers:
        triggers = {(t, n) for t, n in c.fetch(_TRIGGERS_SQL, oids)}
        for spec in options.load_triggers:
            table_key, _, trigger = spec.rpartition(".")
            on = _find_table(plan, table_key)
            if on is None or not trigger:
                raise ConfigError(
                    "load_triggers", f"{spec!r}: expected TABLE.TRIGGER on an exported table"
                )
            if (on.oid, trigger) not in triggers:
                raise ConfigError(
                    "load_triggers", f"{spec!r}: {on.qualified} has no trigger {trigger!r}"
                )
            schema.load_triggers.append((on, trigger))

    # Functions and views, opt-in.
    view_oids: list[int] = []
    if c.full and options.functions:
        for (oid,) in c.fetch(_USER_FUNCTIONS_SQL, sorted({t.schema for t in plan.tables})):
            got = c.function_needs(oid)
            if isinstance(got, str):
                c.load_functions([oid])
                c.leave_out(c.functions[oid].label, got)
            else:
                c.needs.add(got)
    if c.full and options.views:
        for (oid,) in c.fetch(_VIEWS_SQL, sorted({t.schema for t in plan.tables})):
            got = c.view_needs(oid)
            c.load_relations([oid])
            kind, qualified = c.relations[oid][0], c.relations[oid][1]
            if isinstance(got, str):
                c.leave_out(f"{'materialized view' if kind == 'm' else 'view'} {qualified}", got)
            else:
                c.needs.add(got)
        view_oids = _topological(c.needs.views, c.view_edges)

    # What the needed functions and types need in turn is already in c.needs (each
    # verdict carries its closure). Now write the statements, dependencies first.
    needs = c.needs
    c.load_types(needs.types)
    c.load_functions(needs.functions)
    function_oids = _topological(needs.functions, c.function_edges)
    schemas = {t.schema for t in plan.tables}
    schemas |= {c.types[o].schema for o in needs.types}
    schemas |= {c.functions[o].schema for o in needs.functions}
    schemas |= {c.extensions[o][1] for o in needs.extensions if o in c.extensions}
    if sequences:
        c.load_relations(sequences)
        schemas |= {c.relations[o][2] for o in sequences}
    if view_oids:
        schemas |= {c.relations[o][2] for o in view_oids}
    schema.schemas = [
        f"CREATE SCHEMA IF NOT EXISTS {quote_ident(s)};"
        for s in sorted(schemas - {"public", *_SYSTEM_SCHEMAS})
    ]
    extension_oids = _topological(
        _with_required(needs.extensions, c.extensions),
        {o: set(c.extensions[o][3]) for o in c.extensions},
    )
    for oid in extension_oids:
        name, namespace, _, _ = c.extensions[oid]
        schema.extensions.append(
            f"CREATE EXTENSION IF NOT EXISTS {quote_ident(name)} "
            f"WITH SCHEMA {quote_ident(namespace)};"
        )
    enums = sorted((c.types[o] for o in needs.types if c.types[o].kind == "e"), key=_type_key)
    for type_info in enums:
        labels = ", ".join(quote_literal(label) for label in type_info.labels)
        schema.types.append(f"CREATE TYPE {type_info.name} AS ENUM ({labels});")
    domain_oids = _topological(
        {o for o in needs.types if c.types[o].kind == "d"},
        {o: {c.types[o].base} for o in needs.types if c.types[o].kind == "d"},
    )
    for oid in domain_oids:
        type_info = c.types[oid]
        collate = f" COLLATE {type_info.collation}" if type_info.collation else ""
        schema.types.append(f"CREATE DOMAIN {type_info.name} AS {type_info.base_sql}{collate};")
        if type_info.not_null:
            schema.domain_constraints.append(f"ALTER DOMAIN {type_info.name} SET NOT NULL;")
        if type_info.default is not None:
            schema.domain_constraints.append(
                f"ALTER DOMAIN {type_info.name} SET DEFAULT {type_info.default};"
            )
        for _, name, definition, validated in type_info.constraints:
            statement = (
                f"ALTER DOMAIN {type_info.name} ADD CONSTRAINT {quote_ident(name)} {definition};"
            )
            (schema.domain_constraints if validated else schema.after_load).append(statement)
    for oid in function_oids:
        definition = c.functions[oid].definition
        assert definition is not None
        schema.functions.append(definition.rstrip().rstrip(";") + ";")

    for seq in sorted(sequences.values(), key=lambda s: s.name):
        if seq.identity or not c.full:
            continue
        schema.sequences.append(f"CREATE SEQUENCE {seq.name} AS {seq.type_sql} {seq.options()};")
        table_oid, attnum, deptype = owned.get(seq.oid, (0, 0, ""))
        if deptype == "a" and attnum in c.created.get(table_oid, set()):
            column_name = c.columns[table_oid][attnum].name
            schema.owned_by.append(
                f"ALTER SEQUENCE {seq.name} OWNED BY {c.tables[table_oid].sql_name}."
                f"{quote_ident(column_name)};"
            )

    if c.full:
        for table in plan.tables:
            schema.tables.append(_create_table(c, table, sequences, owned))
            for column in _created_columns(c, table):
                if column.load_default is None or column.public:
                    continue
                action = (
                    f"SET DEFAULT {column.final_default}"
                    if column.final_default is not None
                    else "DROP DEFAULT"
                )
                schema.after_load.append(
                    f"ALTER TABLE ONLY {table.sql_name} ALTER COLUMN {quote_ident(column.name)} "
                    f"{action};"
                )
    else:
        schema.tables = [s for s in plan.pre_data if s.startswith("CREATE TABLE ")]
    schema.post_data = [*plan.post_data, *checks]

    for seq in sorted(sequences.values(), key=lambda s: s.name):
        statement = _setval(seq)
        if statement is not None:
            if c.full:
                schema.setvals.append(statement)
            schema.existing_setvals.append(_setval(seq, guarded=True) or "")

    definitions = {oid: (d, cols) for oid, d, cols in c.fetch(_VIEW_DEFINITIONS_SQL, view_oids)}
    for oid in view_oids:
        kind, qualified, _, _, reloptions = c.relations[oid]
        body = definitions[oid][0].rstrip().rstrip(";")
        with_options = f" WITH ({', '.join(reloptions)})" if reloptions else ""
        if kind == "m":
            schema.views.append(
                f"CREATE MATERIALIZED VIEW {qualified}{with_options} AS\n{body}\nWITH DATA;"
            )
        else:
            schema.views.append(f"CREATE VIEW {qualified}{with_options} AS\n{body};")

    if c.full:
        schema.comments = _comments(
            c, sequences, kept_indexes, index_names, kept_constraints, view_oids, definitions
        )

    schema.warnings = c.warnings
    schema.metadata = {
        "fidelity": options.fidelity,
        "import": options.import_mode,
        "layout": options.layout,
        "keep_private_columns": options.keep_private_columns,
        "extensions": [c.extensions[o][0] for o in extension_oids],
        "functions": [c.functions[o].signature for o in function_oids],
        "types": [c.types[o].name for o in needs.types if o in c.types],
        "sequences": [
            {
                "name": seq.name,
                "increment": seq.increment,
                "columns": [
                    {"schema": t.schema, "table": t.name, "column": col.name}
                    for t, col in _integer_columns(seq)
                ],
            }
            for seq in sorted(sequences.values(), key=lambda s: s.name)
            if _integer_columns(seq) and (c.full or options.import_mode == "existing")
        ],
        "private_columns_kept": [
            f"{t.qualified}.{col.name}"
            for t in plan.tables
            for col in _created_columns(c, t)
            if not col.public
        ],
        "views": [c.relations[o][1] for o in view_oids],
        "left_out": c.left_out,
    }
    return schema


# ---------------------------------------------------------------------- helpers


def _column_defaults(table: _Table) -> Mapping[str, str]:
    """``column_defaults`` of the table's visibility rule (SQL for private columns)."""
    value = getattr(table.rule, "column_defaults", None) or {}
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _name_files(plan: _Plan, options: _OutputOptions) -> None:
    """crates.io's layout names a table's file ``data/<table>.csv`` (public schema)."""
    if options.layout != "crates-io":
        return
    used: set[str] = set()
    for table in plan.tables:
        base = table.name if table.schema == "public" else table.qualified
        base = _SAFE_FILE_CHARS.sub("_", base)
        name, n = f"data/{base}.csv", 1
        while name.lower() in used:
            n += 1
            name = f"data/{base}_{n}.csv"
        used.add(name.lower())
        table.file = name


def _find_table(plan: _Plan, key: str) -> _Table | None:
    schema, _, name = key.rpartition(".")
    schema = schema or "public"
    return next((t for t in plan.tables if (t.schema, t.name) == (schema, name)), None)


def _merged(a: _Needs, b: _Needs) -> _Needs:
    out = _Needs()
    out.add(a)
    out.add(b)
    return out


def _plan_type(c: _Collector, type_oid: int) -> int:
    """The type the plan writes for a column: a domain's base type."""
    c.load_types([type_oid])
    info = c.types.get(type_oid)
    return info.base if info is not None and info.kind == "d" else type_oid


def _type_key(info: _Type) -> str:
    return info.name


def _with_required(
    oids: set[int], extensions: Mapping[int, tuple[str, str, str, list[int]]]
) -> set[int]:
    out: set[int] = set()
    todo = list(oids)
    while todo:
        oid = todo.pop()
        if oid in out or oid not in extensions or oid < _FIRST_NORMAL_OID:
            continue
        out.add(oid)
        todo += extensions[oid][3]
    return out


def _topological(nodes: Iterable[int], edges: Mapping[int, Iterable[int]]) -> list[int]:
    """``nodes`` ordered so that each comes after the nodes it depends on (stable by OID)."""
    wanted = set(nodes)
    done: set[int] = set()
    order: list[int] = []

    def visit(node: int, path: set[int]) -> None:
        if node in done or node in path:
            return
        path.add(node)
        for dependency in sorted(edges.get(node, ())):
            if dependency in wanted:
                visit(dependency, path)
        path.discard(node)
        done.add(node)
        order.append(node)

    for node in sorted(wanted):
        visit(node, set())
    return order


def _default_needs(c: _Collector, table: _Table, column: _ColumnInfo) -> _Needs | str:
    if column.default_oid is None:
        return _Needs()
    own = ("pg_class", table.oid, column.attnum)
    return c.need_all(c.refs("pg_attrdef", column.default_oid), skip=[own])


def _created_columns(c: _Collector, table: _Table) -> list[_ColumnInfo]:
    return [
        col
        for attnum, col in sorted(c.columns[table.oid].items())
        if attnum in c.created[table.oid]
    ]


def _create_table(
    c: _Collector,
    table: _Table,
    sequences: Mapping[int, _Sequence],
    owned: Mapping[int, tuple[int, int, str]],
) -> str:
    lines = []
    for column in _created_columns(c, table):
        parts = [quote_ident(column.name), column.type_sql]
        if column.collation is not None:
            parts.append(f"COLLATE {column.collation}")
        if column.identity:
            seq = next(
                (
                    sequences[s]
                    for s, owner in owned.items()
                    if owner == (table.oid, column.attnum, "i") and s in sequences
                ),
                None,
            )
            how = "ALWAYS" if column.identity == "a" else "BY DEFAULT"
            options = f" (SEQUENCE NAME {seq.name} {seq.options()})" if seq is not None else ""
            parts.append(f"GENERATED {how} AS IDENTITY{options}")
        elif column.generated == "s" and not column.public and column.final_default is not None:
            parts.append(f"GENERATED ALWAYS AS ({column.final_default}) STORED")
        else:
            default = column.load_default if not column.public else None
            default = default or column.final_default
            if column.generated == "s":
                default = None
                if column.public:
                    c.warnings.append(
                        f"generated column {table.qualified}.{column.name} is created as a "
                        "plain column: its values are loaded from the dump"
                    )
            if default is not None:
                parts.append(f"DEFAULT {default}")
        if column.not_null:
            parts.append("NOT NULL")
        lines.append("    " + " ".join(parts))
    body = ",\n".join(lines)
    return f"CREATE TABLE {table.sql_name} (\n{body}\n);"


def _integer_columns(seq: _Sequence) -> list[tuple[_Table, _ColumnInfo]]:
    return [(t, col) for t, col in seq.columns if col.type_sql in _INTEGER_TYPES]


def _setval(seq: _Sequence, *, guarded: bool = False) -> str | None:
    """``setval`` to the exported maximum (the minimum for a descending sequence), so that
    the next value is a new one; an empty table leaves the sequence at its start."""
    columns = _integer_columns(seq)
    if not columns:
        return None
    pick, compare = ("max", ">=") if seq.increment > 0 else ("min", "<=")
    values = " UNION ALL ".join(
        f"SELECT {pick}({quote_ident(col.name)})::bigint FROM {table.sql_name}"
        for table, col in columns
    )
    name = quote_literal(seq.name)
    target = f"to_regclass({name})" if guarded else f"{name}::regclass"
    statement = (
        f"SELECT pg_catalog.setval({target}, CASE WHEN m {compare} {seq.start} THEN m "
        f"ELSE {seq.start} END, coalesce(m {compare} {seq.start}, false))\n"
        f"FROM (SELECT {pick}(v) FROM ({values}) AS x(v)) AS s(m)"
    )
    if guarded:
        statement += f"\nWHERE to_regclass({name}) IS NOT NULL"
    return statement + ";"


def _comments(
    c: _Collector,
    sequences: Mapping[int, _Sequence],
    kept_indexes: Sequence[tuple[int, int]],
    index_names: Mapping[int, str],
    kept_constraints: Mapping[int, tuple[str, _Table]],
    view_oids: Sequence[int],
    view_definitions: Mapping[int, tuple[str, list[str]]],
) -> list[str]:
    wanted = [
        *c.tables,
        *c.needs.types,
        *c.needs.functions,
        *(s for s in sequences if not sequences[s].identity),
        *(oid for oid, _ in kept_indexes),
        *kept_constraints,
        *view_oids,
    ]
    c.load_types(c.needs.types)
    statements: list[tuple[str, str]] = []
    for catalog, oid, subid, text in c.fetch(_COMMENTS_SQL, wanted):
        target: str | None = None
        if catalog == "pg_class" and oid in c.tables:
            table = c.tables[oid]
            if subid == 0:
                target = f"TABLE {table.sql_name}"
            elif subid in c.created[oid]:
                name = c.columns[oid][subid].name
                target = f"COLUMN {table.sql_name}.{quote_ident(name)}"
        elif catalog == "pg_class" and oid in sequences and subid == 0:
            target = f"SEQUENCE {sequences[oid].name}"
        elif catalog == "pg_class" and oid in index_names and subid == 0:
            target = f"INDEX {index_names[oid]}"
        elif catalog == "pg_class" and oid in view_oids:
            kind, qualified = c.relations[oid][0], c.relations[oid][1]
            if subid == 0:
                target = f"{'MATERIALIZED VIEW' if kind == 'm' else 'VIEW'} {qualified}"
            elif 0 < subid <= len(view_definitions[oid][1]):
                target = f"COLUMN {qualified}.{quote_ident(view_definitions[oid][1][subid - 1])}"
        elif catalog == "pg_type" and oid in c.types and oid in c.needs.types:
            info = c.types[oid]
            target = f"{'DOMAIN' if info.kind == 'd' else 'TYPE'} {info.name}"
        elif catalog == "pg_proc" and oid in c.needs.functions:
            target = f"FUNCTION {c.functions[oid].signature}"
        elif catalog == "pg_constraint" and oid in kept_constraints:
            name, table = kept_constraints[oid]
            target = f"CONSTRAINT {quote_ident(name)} ON {table.sql_name}"
        if target is not None:
            statements.append((target, f"COMMENT ON {target} IS {quote_literal(text)};"))
    return [statement for _, statement in sorted(statements)]
