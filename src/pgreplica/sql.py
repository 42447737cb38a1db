"""Statement classification on PostgreSQL's own grammar (libpg_query, through pglast).

``classify(sql)`` says whether a statement may run on a replica (``target`` is
``"replica"``) or must run on the primary, and why (``reason``, a short stable word).
Anything it cannot prove read-only goes to the primary: a statement that does not parse,
a function whose volatility is unknown, a write hidden in a CTE or a multi-statement
string.

The parse tree is libpg_query's JSON: walking it is several times faster than building
Python node objects, and results are cached by statement text, so a parametrised ORM
statement is parsed once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from pglast import parser as pg_parser

from pgreplica._builtins import BUILTIN_FUNCTIONS, VOLATILE_BUILTINS

__all__ = [
    "Classification",
    "classify",
    "could_write",
    "function_verdict",
    "resolve_functions",
]

REPLICA = "replica"
PRIMARY = "primary"

#: Volatile built-ins that read, or only touch the session, and run on a hot standby.
SAFE_VOLATILE = frozenset(
    {
        "clock_timestamp",
        "current_query",
        "gen_random_uuid",
        "pg_backend_memory_contexts",
        "pg_blocking_pids",
        "pg_control_checkpoint",
        "pg_control_init",
        "pg_control_recovery",
        "pg_control_system",
        "pg_current_logfile",
        "pg_database_size",
        "pg_get_backend_memory_contexts",
        "pg_get_wal_replay_pause_state",
        "pg_indexes_size",
        "pg_is_in_recovery",
        "pg_is_wal_replay_paused",
        "pg_jit_available",
        "pg_last_wal_receive_lsn",
        "pg_last_wal_replay_lsn",
        "pg_last_xact_replay_timestamp",
        "pg_lock_status",
        "pg_notification_queue_usage",
        "pg_relation_size",
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "pg_table_size",
        "pg_tablespace_size",
        "pg_total_relation_size",
        "random",
        "random_normal",
        "setseed",
        "timeofday",
    }
)
SAFE_VOLATILE_PREFIXES = ("pg_stat_get_", "pg_stat_", "pg_ls_")
#: Not volatile, yet refused during recovery, or meant for the primary's own state.
PRIMARY_ONLY = frozenset({"pg_walfile_name", "pg_walfile_name_offset"})
PRIMARY_ONLY_PREFIXES = ("pg_stat_reset",)

#: Functions that write, lock or assign a transaction id: primary, with their reason.
WRITE_FUNCTIONS = {
    "nextval": "sequence_function",
    "setval": "sequence_function",
    "currval": "sequence_function",
    "lastval": "sequence_function",
    "txid_current": "transaction_id",
    "txid_current_if_assigned": "transaction_id",
    "pg_current_xact_id": "transaction_id",
    "pg_current_xact_id_if_assigned": "transaction_id",
    "pg_notify": "notify",
    "pg_export_snapshot": "transaction_id",
}
ADVISORY_PREFIXES = ("pg_advisory_", "pg_try_advisory_")

_WRITE_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_READ_ONLY_UTILITY = {
    "VariableShowStmt": "show",
    "ExplainStmt": "explain",
}
_SESSION_KINDS = {
    "PrepareStmt": "prepare",
    "ExecuteStmt": "execute",
    "DeallocateStmt": "deallocate",
    "ListenStmt": "listen",
    "UnlistenStmt": "listen",
    "NotifyStmt": "notify",
    "DiscardStmt": "session_set",
    "LockStmt": "lock",
    "CallStmt": "call",
    "DoStmt": "do",
    "RefreshMatViewStmt": "maintenance",
    "VacuumStmt": "maintenance",
    "CheckPointStmt": "maintenance",
    "ReindexStmt": "maintenance",
    "ClusterStmt": "maintenance",
    "TruncateStmt": "write",
    "CreateTableAsStmt": "select_into",
    "DeclareCursorStmt": "cursor",
    "FetchStmt": "cursor",
    "ClosePortalStmt": "cursor",
    "LoadStmt": "session_set",
}
_SET_CONFIG = ("set_config", "pg_catalog.set_config")
# A name stops at "%" too: with "[^)]+" a statement of many "%(" and no ")" took
# quadratic time (100 s for 160 kB).
_PLACEHOLDER = re.compile(r"%(?:\(([^)%]+)\))?([sbt%])")


@dataclass(frozen=True)
class Classification:
    """Where a statement may run, and why.

    ``kind`` tells a routing connection how the statement affects its state:
    ``query``, ``begin``, ``commit``, ``rollback``, ``savepoint``, ``set`` (session
    level), ``set_local``, ``set_transaction``, ``empty``, or the reason for other
    session statements. ``functions`` lists the functions the statement calls
    (lower case, schema-qualified when written so); ``unresolved`` those whose
    volatility the static tables do not know (user functions).
    """

    target: str
    reason: str
    kind: str = "query"
    functions: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()
    read_only: bool = False
    """For ``begin``: the transaction was declared READ ONLY."""
    base_reason: str = ""
    """The reason the statement would have if its unresolved functions are read-only."""
    relations: tuple[str, ...] = ()
    """Relations a read reads (schema-qualified when written so, CTE names left out):
    the catalog tells unlogged tables and views (:func:`resolve_catalog`)."""
    operators: tuple[str, ...] = ()
    """Operators a read uses: a user-defined one runs a function of its own."""
    effects: tuple[tuple[str, str], ...] = ()
    """Session state a standby cannot hold that the statement starts (``("+", key)``)
    or ends (``("-", key)``): ``isolation`` (serializable by default), ``read_write``
    (read-write by default), ``temp:<name>`` (a temporary object), ``listen:<channel>``.
    A key ``temp:*``, ``listen:*`` or ``*`` ends every key of its kind, or all."""

    @property
    def replica(self) -> bool:
        return self.target == REPLICA


EMPTY = Classification(REPLICA, "empty", kind="empty")
SELECT = Classification(REPLICA, "select")
_SELECT_PREFIX = '"stmts":[{"stmt":{"SelectStmt":'
_MARKERS = (
    '"FuncCall"',
    '"RangeVar"',
    '"A_Expr"',
    '"lockingClause"',
    '"intoClause"',
    '"InsertStmt"',
    '"UpdateStmt"',
    '"DeleteStmt"',
    '"MergeStmt"',
)
UNPARSABLE = Classification(PRIMARY, "unparsable", kind="query")


def classify(sql: str | bytes) -> Classification:
    """Classify one SQL string (psycopg ``%s`` placeholders are accepted)."""
    if isinstance(sql, bytes):
        sql = sql.decode("utf-8", "replace")
    return _classify_cached(sql)


@lru_cache(maxsize=8192)
def _classify_cached(sql: str) -> Classification:
    try:
        text = _parse_json(sql)
    except Exception:
        return UNPARSABLE
    if _plain_select(text):
        return SELECT
    try:
        return _classify_tree(json.loads(text))
    except RecursionError:
        # Nested deeper than the JSON decoder or the walk follows: unproven, so primary.
        return UNPARSABLE


def _classify_tree(tree: dict[str, Any]) -> Classification:
    statements = [entry.get("stmt") or {} for entry in tree.get("stmts", ())]
    if not statements:
        return EMPTY
    results = [_statement(stmt) for stmt in statements]
    if len(results) == 1:
        return results[0]
    functions = tuple(dict.fromkeys(f for r in results for f in r.functions))
    unresolved = tuple(dict.fromkeys(f for r in results for f in r.unresolved))
    writes = [r for r in results if not r.replica and r.reason != "unknown_function"]
    if writes:
        return Classification(PRIMARY, "multi_statement", "multi", functions, unresolved)
    relations = tuple(dict.fromkeys(n for r in results for n in r.relations))
    operators = tuple(dict.fromkeys(n for r in results for n in r.operators))
    if unresolved:
        return Classification(
            PRIMARY,
            "unknown_function",
            "multi",
            functions,
            unresolved,
            base_reason="select",
            relations=relations,
            operators=operators,
        )
    return Classification(
        REPLICA, "select", "multi", functions, relations=relations, operators=operators
    )


def _parse_json(sql: str) -> str:
    # psycopg placeholders become $n first; "%" alone (modulo) is left alone, and a
    # placeholder-looking text inside a string literal stays a string literal.
    text: str = pg_parser.parse_sql_json(to_numbered_placeholders(sql) if "%" in sql else sql)
    return text


def _plain_select(text: str) -> bool:
    """One SELECT whose tree has no function call, locking, INTO or write node.

    Node names appear in the parser's JSON only as keys (string values have their
    quotes escaped), so absence of a marker is proof. A marker that shows up inside a
    string constant only sends the statement to the full walk."""
    return (
        text.startswith(_SELECT_PREFIX, text.find('"stmts"'))
        and text.count('{"stmt":') == 1
        and not any(marker in text for marker in _MARKERS)
    )


def to_numbered_placeholders(sql: str) -> str:
    """psycopg's ``%s`` / ``%(name)s`` placeholders as ``$n``, and ``%%`` as ``%``."""
    names: dict[str, int] = {}
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(2) == "%":
            return "%"
        name = match.group(1)
        if name is not None:
            if name not in names:
                count += 1
                names[name] = count
            return f"${names[name]}"
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(replace, sql)


def _statement(stmt: dict[str, Any]) -> Classification:
    ((node_type, node),) = stmt.items()
    effects = _session_effects(node_type, node)
    if effects:
        result = _statement_of(node_type, node)
        if any(op == "+" for op, _ in effects):
            # Session state a standby refuses or cannot hold: it runs on the primary
            # only (never replayed on replicas), and the connection stays there.
            if node_type == "VariableSetStmt":
                return Classification(PRIMARY, "session_primary", "set_primary", effects=effects)
            return replace(result, target=PRIMARY, effects=effects)
        return replace(result, effects=effects)
    return _statement_of(node_type, node)


def _persistence_of(node: dict[str, Any], *path: str) -> tuple[str, str]:
    for key in path:
        node = node.get(key) or {}
    return str(node.get("relpersistence", "")), str(node.get("relname", ""))


def _session_effects(node_type: str, node: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What the statement does to session state a standby cannot hold."""
    if node_type == "VariableSetStmt":
        return _setting_effects(node)
    if node_type == "DiscardStmt":
        target = node.get("target")
        if target == "DISCARD_ALL":
            return (("-", "*"),)
        return (("-", "temp:*"),) if target == "DISCARD_TEMP" else ()
    if node_type == "ListenStmt":
        return (("+", f"listen:{node.get('conditionname', '')}"),)
    if node_type == "UnlistenStmt":
        return (("-", f"listen:{node.get('conditionname') or '*'}"),)
    if node_type == "DropStmt" and node.get("removeType") in _DROPPED_TEMP_KINDS:
        names = []
        for obj in node.get("objects") or ():
            parts = [
                (i.get("String") or {}).get("sval", "")
                for i in (obj.get("List") or {}).get("items") or ()
            ]
            if parts and (len(parts) == 1 or parts[-2].startswith("pg_temp")):
                names.append(("-", f"temp:{parts[-1]}"))
        return tuple(names)
    path = _TEMP_RELATION_PATHS.get(node_type)
    if path is None:
        return ()
    persistence, name = _persistence_of(node, *path)
    return (("+", f"temp:{name}"),) if persistence == "t" else ()


_DROPPED_TEMP_KINDS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_SEQUENCE"})
_TEMP_RELATION_PATHS: dict[str, tuple[str, ...]] = {
    "CreateStmt": ("relation",),
    "CreateTableAsStmt": ("into", "rel"),
    "SelectStmt": ("intoClause", "rel"),
    "ViewStmt": ("view",),
    "CreateSeqStmt": ("sequence",),
}
#: Session defaults a standby cannot honour, and the transaction setting each one sets.
_DEFAULT_MODES = {
    "default_transaction_isolation": "isolation",
    "default_transaction_read_only": "read_write",
}
_MODE_SETTING = {"isolation": "transaction_isolation", "read_write": "transaction_read_only"}
_MODE_OF_OPTION = {"transaction_isolation": "isolation", "transaction_read_only": "read_write"}


def _setting_effects(node: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    if node.get("is_local"):
        return ()
    kind = node.get("kind")
    name = str(node.get("name", "")).lower()
    if kind == "VAR_RESET_ALL":
        return (("-", "isolation"), ("-", "read_write"), ("-", "settings"))
    if kind == "VAR_SET_MULTI" and name == "session characteristics":
        effects = []
        for option in node.get("args") or ():
            elem = option.get("DefElem") or {}
            mode = _MODE_OF_OPTION.get(str(elem.get("defname")))
            if mode is not None:
                refused = not _standby_accepts(_MODE_SETTING[mode], [elem.get("arg") or {}])
                effects.append(("+" if refused else "-", mode))
        return tuple(effects)
    mode = _DEFAULT_MODES.get(name)
    if mode is None:
        return ()
    if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
        return (("-", mode),)
    refused = not _standby_accepts(_MODE_SETTING[mode], node.get("args") or [])
    return (("+" if refused else "-", mode),)


def _statement_of(node_type: str, node: dict[str, Any]) -> Classification:
    if node_type == "SelectStmt":
        return _query(node_type, node, "select")
    if node_type in _WRITE_NODES:
        return _with_functions(Classification(PRIMARY, "write"), node)
    if node_type == "TransactionStmt":
        return _transaction(node)
    if node_type == "VariableSetStmt":
        return _variable_set(node)
    if node_type == "ExplainStmt":
        return _explain(node)
    if node_type == "CopyStmt":
        if node.get("is_from"):
            return Classification(PRIMARY, "copy_from")
        query = node.get("query")
        if query is None:
            return Classification(REPLICA, "copy_to")
        ((inner_type, inner),) = query.items()
        return _query(inner_type, inner, "copy_to")
    if node_type == "PrepareStmt":
        query = node.get("query") or {}
        ((inner_type, inner),) = query.items()
        result = _query(inner_type, inner, "prepare")
        return replace(
            result,
            reason=result.reason if not result.replica else "prepare",
            kind="prepare",
            base_reason="prepare",
        )
    if node_type == "DeclareCursorStmt":
        query = node.get("query") or {}
        ((inner_type, inner),) = query.items()
        result = _query(inner_type, inner, "cursor")
        return replace(result, kind="cursor", base_reason="cursor")
    if node_type in _READ_ONLY_UTILITY:
        return Classification(REPLICA, _READ_ONLY_UTILITY[node_type], "query")
    if node_type in _SESSION_KINDS:
        kind = _SESSION_KINDS[node_type]
        return Classification(PRIMARY, kind, kind)
    return Classification(PRIMARY, "ddl", "ddl")


def _query(node_type: str, node: dict[str, Any], read_reason: str) -> Classification:
    """A query that may be read-only: SELECT (with CTEs, set operations, subqueries)."""
    if node_type != "SelectStmt":
        if node_type in _WRITE_NODES:
            return _with_functions(Classification(PRIMARY, "write"), node)
        return Classification(PRIMARY, "ddl", "ddl")
    found = _scan(node)
    if found.into:
        return Classification(PRIMARY, "select_into", functions=tuple(found.functions))
    if found.write:
        return Classification(PRIMARY, "writable_cte", functions=tuple(found.functions))
    if found.locking:
        return Classification(PRIMARY, "locking", functions=tuple(found.functions))
    result = _with_functions(Classification(REPLICA, read_reason), node, found)
    if result.replica or result.base_reason:
        return found.with_names(result)
    return result


class _Found:
    __slots__ = (
        "ctes",
        "functions",
        "into",
        "locking",
        "operators",
        "relations",
        "set_config_session",
        "write",
    )

    def __init__(self) -> None:
        self.write = False
        self.locking = False
        self.into = False
        self.set_config_session = False
        self.functions: list[str] = []
        self.relations: list[str] = []
        self.operators: list[str] = []
        self.ctes: set[str] = set()

    def with_names(self, result: Classification) -> Classification:
        """``result`` with the relations (not CTEs) and operators the query uses."""
        relations = tuple(dict.fromkeys(r for r in self.relations if r not in self.ctes))
        operators = tuple(dict.fromkeys(self.operators))
        return replace(result, relations=relations, operators=operators)


def _scan(node: Any) -> _Found:
    found = _Found()
    _visit(node, found)
    return found


def _visit(node: Any, found: _Found) -> None:
    """Depth-first walk of the JSON tree, noting what makes a query unsafe."""
    if type(node) is dict:
        for key, value in node.items():
            if key == "FuncCall":
                name = _function_name(value)
                found.functions.append(name)
                if name in _SET_CONFIG and (
                    not _is_local_true(value) or _sets_transaction_mode(value)
                ):
                    found.set_config_session = True
            elif key == "RangeVar":
                schema = value.get("schemaname")
                name = value.get("relname", "")
                found.relations.append(f"{schema}.{name}" if schema else name)
            elif key == "A_Expr":
                parts = [p.get("String", {}).get("sval", "") for p in value.get("name", ())]
                if parts:
                    found.operators.append(".".join(parts))
            elif key == "CommonTableExpr":
                found.ctes.add(value.get("ctename", ""))
            elif key in _WRITE_NODES:
                found.write = True
            elif key == "lockingClause":
                found.locking = found.locking or bool(value)
            elif key == "intoClause":
                found.into = True
            kind = type(value)
            if kind is dict or kind is list:
                _visit(value, found)
    else:
        for value in node:
            kind = type(value)
            if kind is dict or kind is list:
                _visit(value, found)


def _function_name(call: dict[str, Any]) -> str:
    parts = [p.get("String", {}).get("sval", "") for p in call.get("funcname", ())]
    # The parser folds unquoted names to lower case; a quoted "Random" stays itself and
    # is not the built-in random().
    return ".".join(parts)


def _sets_transaction_mode(call: dict[str, Any]) -> bool:
    """set_config('transaction_read_only' | 'transaction_isolation' | ..., ..., true)."""
    args = call.get("args") or []
    first = (args[0].get("A_Const") or {}).get("sval") if args else None
    name = (first or {}).get("sval", "") if isinstance(first, dict) else ""
    return not args or not first or str(name).lower().startswith("transaction_")


def _is_local_true(call: dict[str, Any]) -> bool:
    args = call.get("args") or []
    if len(args) != 3:
        return False
    const = args[2].get("A_Const") or {}
    boolval = const.get("boolval")
    return isinstance(boolval, dict) and boolval.get("boolval") is True


def _with_functions(
    result: Classification, node: dict[str, Any], found: _Found | None = None
) -> Classification:
    """Apply what the statement's function calls imply to a classification."""
    if found is None:
        found = _scan(node)
    functions = tuple(dict.fromkeys(found.functions))
    if not functions:
        return result
    if found.set_config_session:
        others = [f for f in functions if f not in _SET_CONFIG and function_verdict(f) != "read"]
        if others or found.write or found.locking or found.into or not result.replica:
            # Session state set next to something else (a write, a user function):
            # not a plain setting to replay on every connection; it runs once, on the
            # primary, as a statement that may write.
            return Classification(PRIMARY, "set_config_mixed", result.kind, functions)
        return Classification(PRIMARY, "set_config", result.kind, functions)
    unresolved = []
    for name in functions:
        if name in _SET_CONFIG:
            continue  # session-level calls were handled above; local ones are read-safe
        verdict = function_verdict(name)
        if verdict is None:
            unresolved.append(name)
        elif verdict != "read" and result.replica:
            return Classification(
                PRIMARY, verdict, result.kind, functions, base_reason=result.reason
            )
    if not result.replica:
        return Classification(result.target, result.reason, result.kind, functions)
    if unresolved:
        return Classification(
            PRIMARY,
            "unknown_function",
            result.kind,
            functions,
            tuple(unresolved),
            base_reason=result.reason,
        )
    return Classification(result.target, result.reason, result.kind, functions)


def function_verdict(name: str) -> str | None:
    """``"read"`` for a function safe on a replica, a reason word for one that is not,
    or None when only the catalog can tell (not a built-in)."""
    schema, _, bare = name.rpartition(".")
    if schema not in ("", "pg_catalog"):
        return None
    if bare in WRITE_FUNCTIONS:
        return WRITE_FUNCTIONS[bare]
    if bare.startswith(ADVISORY_PREFIXES):
        return "advisory_lock"
    if bare not in BUILTIN_FUNCTIONS:
        return None
    if bare in PRIMARY_ONLY or bare.startswith(PRIMARY_ONLY_PREFIXES):
        return "volatile_function"
    if bare not in VOLATILE_BUILTINS or bare in SAFE_VOLATILE:
        return "read"
    if bare.startswith(SAFE_VOLATILE_PREFIXES):
        return "read"
    return "volatile_function"


def _transaction(node: dict[str, Any]) -> Classification:
    kind = node.get("kind", "")
    if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
        read_only = _read_only_option(node.get("options") or [])
        return Classification(PRIMARY, "transaction_control", "begin", read_only=read_only)
    mapping = {
        "TRANS_STMT_COMMIT": "commit",
        "TRANS_STMT_ROLLBACK": "rollback",
        "TRANS_STMT_SAVEPOINT": "savepoint",
        "TRANS_STMT_RELEASE": "savepoint",
        "TRANS_STMT_ROLLBACK_TO": "savepoint",
    }
    return Classification(PRIMARY, "transaction_control", mapping.get(kind, "two_phase"))


def _standby_accepts(name: str, args: list[dict[str, Any]]) -> bool:
    """False for the transaction modes a hot standby refuses (read-write, serializable)."""
    if name not in ("transaction_read_only", "transaction_isolation"):
        return True
    const = (args[0].get("A_Const") or {}) if args else {}
    if "sval" in const:
        value = str((const["sval"] or {}).get("sval", "")).lower()
    elif "ival" in const:
        value = str((const["ival"] or {}).get("ival", 0))
    elif "boolval" in const:
        value = "on" if (const["boolval"] or {}).get("boolval") else "off"
    else:
        return False
    if name == "transaction_read_only":
        return value in ("on", "true", "1", "yes")
    return value != "serializable"


def _read_only_option(options: list[dict[str, Any]]) -> bool:
    for option in options:
        elem = option.get("DefElem") or {}
        if elem.get("defname") == "transaction_read_only":
            value = ((elem.get("arg") or {}).get("A_Const") or {}).get("ival") or {}
            return bool(value.get("ival"))
    return False


def _variable_set(node: dict[str, Any]) -> Classification:
    name = str(node.get("name", "")).lower()
    if node.get("kind") == "VAR_SET_MULTI" and name == "transaction":
        read_only = _read_only_option(node.get("args") or [])
        return Classification(
            PRIMARY, "transaction_control", "set_transaction", read_only=read_only
        )
    if not _standby_accepts(name, node.get("args") or []):
        # SET [LOCAL] transaction_read_only = off or transaction_isolation = serializable
        # is SET TRANSACTION in other words, which a standby refuses.
        return Classification(PRIMARY, "transaction_control", "set_transaction")
    if node.get("is_local"):
        return Classification(REPLICA, "set_local", "set_local")
    return Classification(PRIMARY, "session_set", "set")


def _explain(node: dict[str, Any]) -> Classification:
    options = node.get("options") or []
    analyze = False
    for option in options:
        elem = option.get("DefElem") or {}
        if elem.get("defname") == "analyze":
            arg = elem.get("arg")
            analyze = arg is None or _truthy(arg)
    query = node.get("query") or {}
    ((inner_type, inner),) = query.items()
    inner_result = _statement({inner_type: inner})
    if analyze and not inner_result.replica:
        return Classification(
            PRIMARY,
            "explain_analyze_write"
            if inner_result.reason != "unknown_function"
            else "unknown_function",
            "query",
            inner_result.functions,
            inner_result.unresolved,
            base_reason="explain",
        )
    return Classification(REPLICA, "explain", "query")


def _truthy(arg: dict[str, Any]) -> bool:
    const = arg.get("A_Const") or {}
    if "boolval" in const:
        return bool((const["boolval"] or {}).get("boolval"))
    if "ival" in const:
        return bool((const["ival"] or {}).get("ival"))
    if "Integer" in arg:  # EXPLAIN (ANALYZE 0): an option value, not a constant
        return bool((arg["Integer"] or {}).get("ival"))
    text = str(((const.get("sval") or {}).get("sval")) or arg.get("String", {}).get("sval", "on"))
    return text.lower() in ("on", "true", "1", "yes")


#: Reasons of statements that cannot change data on the primary, by PostgreSQL's rules.
_NO_WRITE_REASONS = frozenset(
    {
        "transaction_control",
        "session_set",
        "set_local",
        "show",
        "listen",
        "prepare",
        "deallocate",
        "cursor",
        "empty",
        "explain",
        "select",
        "copy_to",
        "set_config",
        "session_primary",
    }
)


def could_write(c: Classification) -> bool:
    """Whether a statement run on the primary may have written data: anything but a
    read that calls only built-ins known not to write. A user function may write
    whatever its declared volatility, so it counts as a possible write (the caller
    then asks the server where its WAL stands)."""
    if c.reason not in _NO_WRITE_REASONS:
        return True
    return any(f not in _SET_CONFIG and function_verdict(f) != "read" for f in c.functions)


#: Reasons that come only from the functions a statement calls.
FUNCTION_REASONS = frozenset(
    {
        "volatile_function",
        "unknown_function",
        "sequence_function",
        "advisory_lock",
        "transaction_id",
        "notify",
    }
)


def resolve_functions(
    result: Classification,
    catalog: dict[str, str],
    read_only: frozenset[str] = frozenset(),
    write: frozenset[str] = frozenset(),
) -> Classification | list[str]:
    """Refine a static classification with the database's catalog and the configured
    function lists.

    ``catalog`` maps a function name as written to its worst ``provolatile``
    (``v``, ``s``, ``i``) or ``""`` when no such function exists. Returns the refined
    classification, or the names the catalog must be asked about first.
    """
    if not result.functions:
        return result
    for name in result.functions:
        if name in write or name.rpartition(".")[2] in write:
            return Classification(PRIMARY, "write_function", result.kind, result.functions)
    if result.replica or result.reason not in FUNCTION_REASONS or not result.base_reason:
        return result
    missing = []
    verdicts = []
    for name in result.functions:
        if name in _SET_CONFIG:
            continue
        verdict = function_verdict(name)
        listed = name in read_only or name.rpartition(".")[2] in read_only
        if listed and verdict in (None, "volatile_function"):
            continue  # declared read-only by configuration (never a sequence or lock)
        if verdict is None:
            volatility = catalog.get(name)
            if volatility is None:
                missing.append(name)
                continue
            verdict = (
                "read"
                if volatility in ("s", "i")
                else ("volatile_function" if volatility == "v" else "unknown_function")
            )
        verdicts.append(verdict)
    if missing:
        return missing
    for verdict in verdicts:
        if verdict != "read":
            return Classification(
                PRIMARY, verdict, result.kind, result.functions, base_reason=result.base_reason
            )
    return Classification(REPLICA, result.base_reason, result.kind, result.functions)


#: Views inside views followed at most this deep; deeper ones go to the primary.
MAX_VIEW_DEPTH = 8
RelationRow = tuple[str, str, str, "str | None"]
"""(schema, relkind, relpersistence, view definition or None) of one relation."""
OperatorRow = tuple[str, str, str]
"""(operator schema, its function as ``schema.name``, the function's provolatile)."""


@dataclass
class Catalog:
    """What a database's catalog said about the names statements use (cached per
    database; an empty tuple: no such user object)."""

    functions: dict[str, str]
    relations: dict[str, tuple[RelationRow, ...]]
    operators: dict[str, tuple[OperatorRow, ...]]


@dataclass
class Missing:
    """Names the catalog must be asked about before a statement can be placed."""

    functions: list[str] = field(default_factory=list)
    relations: list[str] = field(default_factory=list)
    operators: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.functions or self.relations or self.operators)

    def add(self, other: Missing) -> None:
        self.functions.extend(other.functions)
        self.relations.extend(other.relations)
        self.operators.extend(other.operators)


def resolve_catalog(
    result: Classification,
    catalog: Catalog,
    read_only: frozenset[str] = frozenset(),
    write: frozenset[str] = frozenset(),
    _depth: int = 0,
) -> Classification | Missing:
    """Refine a static classification with what the catalog says of the functions,
    operators and relations a read uses: a user operator runs its function (volatile:
    the primary), an unlogged table cannot be read during recovery, and a view does
    what its definition does (a view that locks rows, calls ``nextval`` or a volatile
    function goes where its definition would). Returns the classification, or the
    names to look up first."""
    resolved = resolve_functions(result, catalog.functions, read_only, write)
    if isinstance(resolved, list):
        return Missing(functions=resolved)
    if not resolved.replica or not (result.relations or result.operators):
        return resolved
    missing = Missing()
    for name in result.operators:
        rows = catalog.operators.get(name)
        if rows is None:
            missing.operators.append(name)
            continue
        for _, function, volatility in _matching(rows, name):
            verdict = _operator_verdict(function, volatility, read_only, write)
            if verdict != "read":
                return _primary(resolved, verdict)
    for name in result.relations:
        relations = catalog.relations.get(name)
        if relations is None:
            missing.relations.append(name)
            continue
        for _, _, persistence, definition in _matching(relations, name):
            if persistence == "u":
                return _primary(resolved, "unlogged_relation")
            if definition is None:
                continue
            if _depth >= MAX_VIEW_DEPTH:
                return _primary(resolved, "view_too_deep")
            inner = resolve_catalog(classify(definition), catalog, read_only, write, _depth + 1)
            if isinstance(inner, Missing):
                missing.add(inner)
            elif not inner.replica:
                reason = (
                    inner.reason if inner.reason.startswith("view_") else f"view_{inner.reason}"
                )
                return _primary(resolved, reason)
    return missing if missing else resolved


def _primary(result: Classification, reason: str) -> Classification:
    return replace(result, target=PRIMARY, reason=reason, base_reason=result.reason)


def _matching(rows: tuple[Any, ...], name: str) -> list[Any]:
    """The catalog rows a name as written can mean: a qualified name its schema's, an
    unqualified one every schema's (the worst of them decides)."""
    schema, _, _ = name.rpartition(".")
    return [row for row in rows if row[0] == schema] if schema else list(rows)


def _operator_verdict(
    function: str, volatility: str, read_only: frozenset[str], write: frozenset[str]
) -> str:
    bare = function.rpartition(".")[2]
    if function in write or bare in write:
        return "write_function"
    if function in read_only or bare in read_only:
        return "read"
    verdict = function_verdict(function)
    if verdict is not None:
        return verdict  # a built-in behind the operator (an advisory lock, nextval)
    return "volatile_operator" if volatility == "v" else "read"
