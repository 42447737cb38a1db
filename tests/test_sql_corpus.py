"""The routing corpus (tests/data/routing_corpus.sql) against classify() and real servers.

Each corpus entry names the target and reason classify() must give. Entries whose
target is the replica are then run on a real hot standby (replica 1 of the session
cluster, with tests/data/routing_schema.sql loaded on the primary and replayed) and
must succeed there; a sample of the primary-targeted ones must fail there with a
read-only or recovery error, which is what makes the labels matter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest

from pgreplica.sql import classify
from pgreplica.testing import LocalCluster

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "routing_corpus.sql"
SCHEMA = DATA / "routing_schema.sql"
MIN_ENTRIES = 170

TARGETS = frozenset({"replica", "primary"})
REASONS = frozenset(
    {
        "select",
        "write",
        "locking",
        "writable_cte",
        "select_into",
        "copy_from",
        "copy_to",
        "call",
        "do",
        "explain",
        "explain_analyze_write",
        "listen",
        "notify",
        "prepare",
        "execute",
        "deallocate",
        "maintenance",
        "lock",
        "sequence_function",
        "advisory_lock",
        "transaction_id",
        "set_config",
        "volatile_function",
        "unknown_function",
        "transaction_control",
        "session_set",
        "set_local",
        "show",
        "cursor",
        "ddl",
        "multi_statement",
        "unparsable",
        "empty",
    }
)

_HEADER = re.compile(r"-- expect: (?P<target>\S+) (?P<reason>\S+)")
_PARAMS = re.compile(r"-- params: (?P<json>.+)")


class CorpusError(ValueError):
    """The corpus file is malformed."""


@dataclass(frozen=True)
class Entry:
    line: int
    target: str
    reason: str
    sql: str
    params: list[Any] | dict[str, Any] | None = None

    @property
    def id(self) -> str:
        words = "_".join(self.sql.split()[:4]) or "empty"
        return f"L{self.line}-{re.sub(r'[^A-Za-z0-9_]+', '', words)[:40]}"


def parse_corpus(text: str, source: str = "corpus") -> list[Entry]:
    """Entries of a corpus text (format: see the head of routing_corpus.sql).

    Raises :class:`CorpusError` on a malformed header or params line, an unknown
    target or reason, params that are not a JSON list or object, or a statement
    before the first header.
    """
    entries: list[Entry] = []
    current: dict[str, Any] | None = None
    body: list[str] = []
    previous_was_header = False

    def close() -> None:
        if current is not None:
            entries.append(Entry(sql="\n".join(body).strip(), **current))

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        where = f"{source}:{number}"
        if line.startswith("--#"):
            continue
        if line.startswith("-- expect"):
            match = _HEADER.fullmatch(line)
            if match is None:
                raise CorpusError(f"{where}: malformed header {line!r}")
            if match["target"] not in TARGETS:
                raise CorpusError(f"{where}: unknown target {match['target']!r}")
            if match["reason"] not in REASONS:
                raise CorpusError(f"{where}: unknown reason {match['reason']!r}")
            close()
            current = {"line": number, "target": match["target"], "reason": match["reason"]}
            body = []
            previous_was_header = True
            continue
        if line.startswith("-- params"):
            match = _PARAMS.fullmatch(line)
            if match is None or not previous_was_header or current is None:
                raise CorpusError(f"{where}: params line must follow a header: {line!r}")
            try:
                params = json.loads(match["json"])
            except ValueError as exc:
                raise CorpusError(f"{where}: params are not JSON: {exc}") from None
            if not isinstance(params, (list, dict)):
                raise CorpusError(f"{where}: params must be a JSON list or object")
            current["params"] = params
            previous_was_header = False
            continue
        previous_was_header = False
        if current is None:
            if line.strip():
                raise CorpusError(f"{where}: statement text before the first header")
            continue
        body.append(line)
    close()
    return entries


ENTRIES = parse_corpus(CORPUS.read_text(encoding="utf-8"), CORPUS.name)
REPLICA_ENTRIES = [e for e in ENTRIES if e.target == "replica"]
PRIMARY_ENTRIES = [e for e in ENTRIES if e.target == "primary"]

# -- the corpus itself -------------------------------------------------------------------


def test_corpus_size() -> None:
    assert len(ENTRIES) >= MIN_ENTRIES
    assert {e.reason for e in ENTRIES} == REASONS


def test_corpus_lines_are_unique() -> None:
    assert len({e.id for e in ENTRIES}) == len(ENTRIES)


@pytest.mark.parametrize(
    "text",
    [
        "-- expect: replica\nSELECT 1\n",
        "-- expect: nowhere select\nSELECT 1\n",
        "-- expect: replica selects\nSELECT 1\n",
        "-- expect:  replica select\nSELECT 1\n",
        "-- expectation: replica select\nSELECT 1\n",
        "-- expect: replica select\nSELECT 1\n-- params: [1]\n",
        "-- params: [1]\n-- expect: replica select\nSELECT 1\n",
        "-- expect: replica select\n-- params: [1\nSELECT %s\n",
        "-- expect: replica select\n-- params: 1\nSELECT %s\n",
        "SELECT 1\n-- expect: replica select\nSELECT 1\n",
    ],
)
def test_parser_rejects_malformed_corpus(text: str) -> None:
    with pytest.raises(CorpusError):
        parse_corpus(text)


def test_parser_reads_entries() -> None:
    text = (
        "--# a comment of the file\n\n"
        '-- expect: replica select\n-- params: {"a": 1}\n'
        "-- a SQL comment\nSELECT %(a)s;\n\n"
        "-- expect: replica empty\n"
        "-- expect: primary write\nINSERT INTO t\n--# dropped\nVALUES (1)\n"
    )
    assert parse_corpus(text) == [
        Entry(3, "replica", "select", "-- a SQL comment\nSELECT %(a)s;", {"a": 1}),
        Entry(8, "replica", "empty", ""),
        Entry(9, "primary", "write", "INSERT INTO t\nVALUES (1)"),
    ]


# -- classify() ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.id for e in ENTRIES])
def test_classify(entry: Entry) -> None:
    result = classify(entry.sql)
    assert (result.target, result.reason) == (entry.target, entry.reason), entry.sql


def test_warm_cache_returns_the_same_object() -> None:
    for entry in ENTRIES:
        first = classify(entry.sql)
        equal_text = "".join(list(entry.sql))  # the same text in another str object
        assert len(entry.sql) < 2 or equal_text is not entry.sql
        assert classify(equal_text) is first
        assert classify(entry.sql) is first
        assert classify(entry.sql.encode()) is first


# -- real servers ----------------------------------------------------------------------

_COPY_TO_STDOUT = re.compile(r"^\s*COPY\b.*\bTO\s+STDOUT\b", re.IGNORECASE | re.DOTALL)
#: Statements that are not allowed in a transaction block.
_NO_TRANSACTION = re.compile(
    r"^\s*(VACUUM|CREATE\s+INDEX\s+CONCURRENTLY|REINDEX\s+\S+\s+CONCURRENTLY|"
    r"ALTER\s+SYSTEM|CREATE\s+DATABASE|COMMIT\s+PREPARED|PREPARE\s+TRANSACTION|"
    r"DISCARD\s+ALL)\b",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def routing_schema(cluster: LocalCluster) -> LocalCluster:
    """The session cluster with routing_schema.sql loaded and replayed by the replicas."""
    cluster.execute(0, SCHEMA.read_text(encoding="utf-8"))
    cluster.wait_replayed()
    return cluster


def connect(dsn: str) -> psycopg.Connection[Any]:
    options = "-c statement_timeout=10s -c search_path=routing,public"
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10, options=options)


def run(conn: psycopg.Connection[Any], entry: Entry, *, begin: str | None) -> None:
    """Run a corpus entry (with its params), inside ``begin`` ... ROLLBACK if given."""
    if begin is not None:
        conn.execute(begin)
    try:
        with conn.cursor() as cur:
            if _COPY_TO_STDOUT.match(entry.sql):
                with cur.copy(entry.sql, entry.params) as copy:
                    for _ in copy:
                        pass
            else:
                cur.execute(entry.sql, entry.params)
                while cur.nextset():
                    pass
    finally:
        if begin is not None:
            conn.execute("ROLLBACK")


def is_recovery_error(exc: psycopg.Error) -> bool:
    """A read-only transaction error, or one saying that the server is in recovery
    ("cannot execute ... during recovery", "recovery is in progress", "cannot assign
    TransactionIds during recovery", "... in a hot standby")."""
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return True
    text = " ".join(m or "" for m in (exc.diag.message_primary, exc.diag.message_hint))
    return re.search(r"during recovery|recovery is in progress|hot standby", text) is not None


@pytest.mark.parametrize("entry", REPLICA_ENTRIES, ids=[e.id for e in REPLICA_ENTRIES])
def test_replica_entry_runs_on_a_hot_standby(routing_schema: LocalCluster, entry: Entry) -> None:
    """Every statement the corpus sends to a replica succeeds on one."""
    with connect(routing_schema.dsn(1)) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        try:
            run(conn, entry, begin="BEGIN READ ONLY")
        except psycopg.Error as exc:
            kind = "a read-only/recovery error" if is_recovery_error(exc) else "an error"
            pytest.fail(f"{entry.sql!r} failed on the replica with {kind}: {exc!r}")


#: Primary-targeted entries that cannot run on a hot standby at all: the sample of
#: labels that matter. Not every primary label means that: LOCK ... IN ACCESS SHARE
#: MODE, advisory locks (see test_advisory_lock_on_a_standby_excludes_nobody),
#: UNLISTEN, CHECKPOINT, ALTER SYSTEM, session SETs, currval(),
#: txid_current_if_assigned() or the read-only user functions do run on a standby; they
#: go to the primary because their effect or their session state belongs there.
_ALWAYS_FAIL = frozenset(
    {
        "write",
        "writable_cte",
        "locking",
        "select_into",
        "copy_from",
        "explain_analyze_write",
        "notify",
        "call",
    }
)
#: Statements of the other primary reasons that fail on a standby.
_FAILS = re.compile(
    r"""(?ix)
    \b(nextval|setval|txid_current|pg_current_xact_id|lo_unlink|lo_create|log_event
       |pg_create_restore_point|pg_switch_wal|pg_current_wal_lsn|pg_walfile_name)"?\s*\(
    | "Random"\s*\(
    | \bFOR\s+(NO\s+KEY\s+)?UPDATE\b
    | (^|;)\s*(INSERT|UPDATE|DELETE|CREATE|DROP|COMMENT|GRANT|REVOKE|ALTER\s+(?!SYSTEM)
                |VACUUM|ANALYZE|REINDEX|CLUSTER|REFRESH|LISTEN)\b
    | ^\s*LOCK\b(?!.*\bIN\s+(ACCESS\s+SHARE|ROW\s+SHARE|ROW\s+EXCLUSIVE)\s+MODE)
    | ^\s*SET\s+LOCAL\s+transaction_(read_only|isolation)\b
    """
)
#: PREPARE only plans and DECLARE only starts its query (a row-locking one fails then);
#: PostgreSQL rejects a data-modifying WITH below the top level on any server.
_NOT_RUN = re.compile(r"(?i)^\s*(PREPARE|DECLARE)\s|^\s*(?!COPY).*\(\s*WITH\s", re.DOTALL)


def fails_on_a_standby(entry: Entry) -> bool:
    if entry.target != "primary" or entry.reason == "unparsable":
        return False
    if _NOT_RUN.search(entry.sql):
        return entry.reason == "locking" and entry.sql.lstrip().upper().startswith("DECLARE")
    return entry.reason in _ALWAYS_FAIL or _FAILS.search(entry.sql) is not None


MUST_FAIL = [e for e in ENTRIES if fails_on_a_standby(e)]


def test_the_sample_covers_the_labels() -> None:
    assert len(MUST_FAIL) >= 100
    assert {e.reason for e in MUST_FAIL} >= {
        "write",
        "writable_cte",
        "locking",
        "select_into",
        "copy_from",
        "explain_analyze_write",
        "sequence_function",
        "transaction_id",
        "volatile_function",
        "unknown_function",
        "lock",
        "ddl",
        "maintenance",
        "multi_statement",
    }


@pytest.mark.parametrize("entry", MUST_FAIL, ids=[e.id for e in MUST_FAIL])
def test_primary_entry_fails_on_a_hot_standby(routing_schema: LocalCluster, entry: Entry) -> None:
    """The sample of primary labels that matter: these statements fail on a standby."""
    sql = entry.sql.lstrip()
    needs_block = sql.upper().startswith(("DECLARE", "SET LOCAL", "LOCK"))
    begin = "BEGIN" if needs_block else None
    if _NO_TRANSACTION.match(sql):
        begin = None
    with connect(routing_schema.dsn(1)) as conn:
        with pytest.raises(psycopg.Error) as caught:
            run(conn, entry, begin=begin)
        assert is_recovery_error(caught.value), f"{entry.sql!r}: {caught.value!r}"


def test_advisory_lock_on_a_standby_excludes_nobody(routing_schema: LocalCluster) -> None:
    """Advisory locks do not fail on a standby, but one taken there is no lock at all
    for the primary's sessions: that is why they go to the primary."""
    with connect(routing_schema.dsn(1)) as replica, connect(routing_schema.dsn(0)) as primary:
        key = 7_364_501
        assert replica.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone() == (True,)
        assert primary.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone() == (True,)
        primary.execute("SELECT pg_advisory_unlock(%s)", [key])
        replica.execute("SELECT pg_advisory_unlock(%s)", [key])
