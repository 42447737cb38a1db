"""``pgreplica dump`` with big tables split across workers, and recovery conflicts.

On the session cluster, in a database of its own (``pgreplica_dump_parallel_test``)
whose tables all start with ``par_``. The dumps read replica 1 only, so that a test can
change that replica's settings (``max_standby_streaming_delay``) and know the dump
meets them; the fixture that does so puts the setting back.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgreplica.dump.export
from dump_support import database_dsn, filled_database
from pgreplica.config import Settings
from pgreplica.dump import DumpError, DumpResult, Visibility, dump, verify
from pgreplica.errors import ConfigError
from pgreplica.testing import LocalCluster

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DB = "pgreplica_dump_parallel_test"
BIG, MULTI, HEAP, ORPHANS, SLOW = 200_000, 60_000, 30_000, 30_000, 150
SPLIT_ROWS = 20_000

# par_big is filled in random order, so that its key order is not its physical order;
# its note has the CSV's special characters; its query joins its filtered parent's keys,
# so it is split by key. par_multi (a composite key whose leading column is text with
# quotes and backslashes, in random order) and par_heap (no primary key) are read by a
# plain scan, so they are split by blocks. par_orphans has no primary key and a filtered
# parent: it cannot be split. par_slow takes about 1.5 s to read (pg_sleep in its filter).
SCHEMA = f"""
CREATE TABLE par_parent (id int PRIMARY KEY, hidden boolean NOT NULL);
CREATE TABLE par_big (
    id bigint PRIMARY KEY,
    parent_id int NOT NULL REFERENCES par_parent,
    note text,
    at timestamptz NOT NULL
);
CREATE TABLE par_multi (a text, b int, v text NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE par_heap (n int NOT NULL, v text NOT NULL);
CREATE TABLE par_orphans (parent_id int NOT NULL REFERENCES par_parent, v text NOT NULL);
CREATE TABLE par_slow (id int PRIMARY KEY, v text NOT NULL);

INSERT INTO par_parent SELECT g, g % 10 = 0 FROM generate_series(1, 100) g;
INSERT INTO par_big
SELECT g, 1 + g % 100,
       CASE WHEN g % 13 = 0 THEN NULL ELSE 'note ' || g || ', "quoted"' || chr(10) || 'x' END,
       timestamptz '2020-01-01' + g * interval '1 second'
FROM generate_series(1, {BIG}) g ORDER BY random();
INSERT INTO par_multi
SELECT 'k''' || (g % 40) || E'\\\\', g, md5(g::text) FROM generate_series(1, {MULTI}) g
ORDER BY random();
INSERT INTO par_heap SELECT g, 'heap ' || g FROM generate_series(1, {HEAP}) g;
INSERT INTO par_orphans SELECT 1 + g % 100, 'orphan ' || g FROM generate_series(1, {ORPHANS}) g;
INSERT INTO par_slow SELECT g, 'slow ' || g FROM generate_series(1, {SLOW}) g;
ANALYZE;
"""

PARENT = '[tables.par_parent]\ncolumns = { id = "public", hidden = "private" }\n'
PARENT += 'filter = "NOT hidden"\n'
# pg_sleep in the filter keeps every row: it slows each key range of par_big down enough
# that the workers are seen copying ranges at the same time.
BIG_RULE = (
    "[tables.par_big]\n"
    'columns = { id = "public", parent_id = "public", note = "public", at = "public" }\n'
    "filter = \"id % 20000 <> 7 OR pg_sleep(0.2)::text = ''\"\n"
)
MULTI_RULE = '[tables.par_multi]\ncolumns = { a = "public", b = "public", v = "public" }\n'
HEAP_RULE = '[tables.par_heap]\ncolumns = { n = "public", v = "public" }\n'
ORPHANS_RULE = '[tables.par_orphans]\ncolumns = { parent_id = "public", v = "public" }\n'
SLOW_RULE = (
    '[tables.par_slow]\ncolumns = { id = "public", v = "public" }\n'
    "filter = \"pg_sleep(0.01)::text = ''\"\n"
)
SPLIT_VISIBILITY = PARENT + BIG_RULE + MULTI_RULE + HEAP_RULE + ORPHANS_RULE
CONFLICT_VISIBILITY = PARENT + BIG_RULE.replace("pg_sleep(0.2)", "pg_sleep(0)") + SLOW_RULE


def db_dsn(cluster: LocalCluster, index: int) -> str:
    return database_dsn(cluster, index, DB)


@pytest.fixture(scope="module")
def pardb(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster with the test database created, filled and replayed."""
    with filled_database(cluster, DB, SCHEMA):
        yield cluster


@pytest.fixture
def settings(pardb: LocalCluster) -> Settings:
    """Replica 1 only: the dump reads the replica whose settings a test changes."""
    return Settings.from_dict(
        {"databases": {"main": {"primary": db_dsn(pardb, 0), "replicas": [db_dsn(pardb, 1)]}}},
        environ={},
    )


def visibility(text: str) -> Visibility:
    return Visibility.from_dict(tomllib.loads(text), source="visibility.toml")


def replica_value(cluster: LocalCluster, sql: str) -> Any:
    with psycopg.connect(db_dsn(cluster, 1), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def events(stderr: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.getvalue().splitlines()]


def data_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


def wait_for_no_dump_sessions(cluster: LocalCluster) -> None:
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgreplica-dump'"
    deadline = time.monotonic() + 5  # a closed session's backend exits a moment later
    while (left := replica_value(cluster, sql)) != 0:
        assert time.monotonic() < deadline, left
        time.sleep(0.02)


class RangeSampler(threading.Thread):
    """Samples replica 1's pg_stat_activity for the sessions of the dump that run (or
    last ran) a COPY of one of par_big's key ranges."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.sessions: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        sql = (
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgreplica-dump' "
            "AND query LIKE 'COPY%par_big%_pgr_part%'"
        )
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    self.sessions.update(row[0] for row in conn.execute(sql).fetchall())
                    time.sleep(0.002)
        except BaseException as exc:
            self.error = exc


# ---------------------------------------------------------------------- big tables


def plain_copy(cluster: LocalCluster, table: str, columns: str) -> bytes:
    """One plain COPY of ``table`` on replica 1: its rows in block order."""
    out = io.BytesIO()
    with psycopg.connect(db_dsn(cluster, 1), autocommit=True) as conn:
        conn.execute("SET synchronize_seqscans = off")
        conn.execute("SET max_parallel_workers_per_gather = 0")
        sql = f"COPY (SELECT {columns} FROM {table}) TO STDOUT WITH (FORMAT csv, HEADER)"
        with conn.cursor().copy(sql) as copy:
            for chunk in copy:
                out.write(chunk)
    return out.getvalue()


def test_big_tables_split_across_4_workers_are_byte_identical_to_1_worker(
    pardb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """With split_rows at 20,000 and 4 workers: par_big (200,000 rows in random physical
    order, a filter, and a check of its filtered parent's keys) is split in 8 primary key
    ranges, copied by several sessions, in key order; par_multi (composite text key)
    and par_heap (no primary key) are read by a plain scan, so they are split in block
    ranges, in the order of one plain COPY; par_orphans (no primary key, a filtered
    parent) is copied whole, with a warning. Every CSV is byte for byte what one worker
    writes, with one header, and the dump verifies."""
    vis = visibility(SPLIT_VISIBILITY)
    one_err = io.StringIO()
    one = dump(settings, vis, tmp_path / "one", jobs=1, split_rows=SPLIT_ROWS, stderr=one_err)
    sampler = RangeSampler(db_dsn(pardb, 1))
    sampler.start()
    four_err = io.StringIO()
    try:
        four = dump(
            settings, vis, tmp_path / "four", jobs=4, split_rows=SPLIT_ROWS, stderr=four_err
        )
    finally:
        sampler.stop.set()
        sampler.join()
    assert sampler.error is None

    # Split: 2 ranges a worker, none under 10,000 rows; one range with 1 worker.
    assert one.parts == {"public.par_big": 1, "public.par_multi": 1, "public.par_heap": 1}
    assert four.parts == {"public.par_big": 8, "public.par_multi": 6, "public.par_heap": 3}
    # Each range of par_big sleeps 0.2 s or more (its filter): the sessions share them.
    assert len(sampler.sessions) >= 3, sampler.sessions
    table_events = {e["table"]: e for e in events(four_err) if e["event"] == "table"}
    splits = {n: (e.get("parts"), e.get("split")) for n, e in table_events.items()}
    assert splits == {
        "public.par_big": (8, "key"),
        "public.par_multi": (6, "block"),
        "public.par_heap": (3, "block"),
        "public.par_orphans": (None, None),
        "public.par_parent": (None, None),
    }
    warnings = [e["message"] for e in events(four_err) if e["event"] == "warning"]
    assert any(
        "public.par_orphans" in w and "no primary key" in w and "one connection" in w
        for w in warnings
    ), warnings
    assert not any("par_orphans" in e.get("message", "") for e in events(one_err))

    # The same bytes, no leftover range files.
    assert one.tables == four.tables
    files_one, files_four = data_files(one.out), data_files(four.out)
    assert (
        list(files_one)
        == list(files_four)
        == [
            "public.par_big.csv",
            "public.par_heap.csv",
            "public.par_multi.csv",
            "public.par_orphans.csv",
            "public.par_parent.csv",
        ]
    )
    for name, content in files_one.items():
        assert content == files_four[name], name
    assert four.metadata["tables"] == one.metadata["tables"]
    assert {t["name"]: t["bytes"] for t in four.metadata["tables"]} == {
        name: len(files_four[f"{name}.csv"]) for name in four.tables
    }

    # Key order for par_big, one header, every row the filters keep.
    with (four.out / "data" / "public.par_big.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "parent_id", "note", "at"]
    ids = [int(r[0]) for r in rows[1:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    expected = replica_value(
        pardb,
        "SELECT count(*) FROM par_big b JOIN par_parent p ON p.id = b.parent_id WHERE NOT p.hidden",
    )
    assert four.tables["public.par_big"] == len(ids) == expected
    # Block order for the others: what one plain COPY gives.
    assert files_four["public.par_multi.csv"] == plain_copy(pardb, "par_multi", "a, b, v")
    assert "k'7\\" in files_four["public.par_multi.csv"].decode()
    assert files_four["public.par_heap.csv"] == plain_copy(pardb, "par_heap", "n, v")
    assert four.tables["public.par_heap"] == HEAP

    verified = verify(four.out, settings, out=io.StringIO())
    assert verified.tables == dict(four.tables)


def test_below_the_threshold_or_without_split_rows_tables_are_copied_whole(
    pardb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    vis = visibility(PARENT + MULTI_RULE + HEAP_RULE)
    default = dump(settings, vis, tmp_path / "a", jobs=4, quiet=True, stderr=io.StringIO())
    assert default.parts == {}  # 60,000 rows: below the default of 1,000,000
    never = dump(
        settings, vis, tmp_path / "b", jobs=4, split_rows=None, quiet=True, stderr=io.StringIO()
    )
    assert never.parts == {} and never.tables == default.tables
    for name, value in (("split_rows", 0), ("attempts", 0)):
        with pytest.raises(ConfigError, match=name):
            dump(settings, vis, tmp_path / "c", **{name: value})  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------- recovery conflicts


@pytest.fixture
def conflicting_replica(healthy_cluster: LocalCluster, pardb: LocalCluster) -> Iterator[None]:
    """Replica 1 cancels a query as soon as WAL replay needs what it holds
    (``max_standby_streaming_delay = 0``); the setting is reset afterwards (heal() does
    not know about it)."""

    def set_delay(sql: str, expected: str) -> None:
        healthy_cluster.execute(1, sql)
        healthy_cluster.execute(1, "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while healthy_cluster.execute(1, "SHOW max_standby_streaming_delay") != [(expected,)]:
            assert time.monotonic() < deadline, "the replica did not reload its settings"
            time.sleep(0.02)

    set_delay("ALTER SYSTEM SET max_standby_streaming_delay = 0", "0")
    try:
        yield
    finally:
        set_delay("ALTER SYSTEM RESET max_standby_streaming_delay", "30s")


def lock_on_primary(cluster: LocalCluster, table: str) -> None:
    """Take (and release) an ACCESS EXCLUSIVE lock on ``table`` on the primary: replaying
    it conflicts with any replica session holding a lock on the table."""
    with psycopg.connect(db_dsn(cluster, 0), autocommit=True) as conn, conn.transaction():
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")


def wait_for_copy(
    cluster: LocalCluster, table: str, running: threading.Thread, timeout: float = 20
) -> None:
    """Wait until a session of the dump is in the middle of a COPY of ``table``."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgreplica-dump' "
        f"AND state = 'active' AND query LIKE 'COPY%{table}%'"
    )
    deadline = time.monotonic() + timeout
    while replica_value(cluster, sql) == 0:
        assert running.is_alive(), "the dump ended before it was seen copying"
        assert time.monotonic() < deadline, f"no COPY of {table} seen on replica 1"
        time.sleep(0.005)


def test_a_recovery_conflict_is_retried_in_a_fresh_snapshot(
    pardb: LocalCluster,
    conflicting_replica: None,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a worker copies par_slow, the primary locks it: replaying the lock cancels
    the COPY ("conflict with recovery"). The dump says so, throws away what it wrote,
    starts again in a new snapshot and ends with the same files as a dump that met no
    conflict (par_big split in key ranges too), in a tarball without leftovers."""
    monkeypatch.setattr(pgreplica.dump.export, "_RETRY_WAIT", 0.2)
    vis = visibility(CONFLICT_VISIBILITY)
    options: dict[str, Any] = {"jobs": 2, "split_rows": SPLIT_ROWS, "tty": False}
    reference = dump(settings, vis, tmp_path / "reference", stderr=io.StringIO(), **options)
    assert reference.attempts == 1

    out = tmp_path / "retried.tar.gz"
    stderr = io.StringIO()
    outcome: list[DumpResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(dump(settings, vis, out, stderr=stderr, **options))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for_copy(pardb, "par_slow", thread)
        lock_on_primary(pardb, "par_slow")
    finally:
        thread.join(60)
    assert not thread.is_alive()
    result = outcome[0]
    assert isinstance(result, DumpResult), result
    assert result.attempts == 2

    seen = events(stderr)
    retries = [e for e in seen if e["event"] == "retry"]
    assert len(retries) == 1, seen
    retry = retries[0]
    assert (retry["attempt"], retry["attempts"], retry["wait"]) == (2, 3, 0.2)
    assert f"the replica 127.0.0.1:{pardb.port(1)}/{DB} cancelled the export" in retry["message"]
    assert "conflict with recovery" in retry["message"]
    assert "attempt 1 of 3" in retry["message"] and "discarded" in retry["message"]
    after = seen[seen.index(retry) + 1 :]  # the second attempt reports every table again
    assert sorted(e["table"] for e in after if e["event"] == "table") == sorted(result.tables)
    assert retry["message"] in result.metadata["warnings"]

    assert result.tables == reference.tables
    assert result.tables["public.par_slow"] == SLOW
    assert result.parts == reference.parts == {"public.par_big": 4}
    with tarfile.open(out) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
        assert names == {"schema.sql", "import.sql", "metadata.json"} | {
            t["file"] for t in result.metadata["tables"]
        }
        for name, content in data_files(reference.out).items():
            member = tar.extractfile(f"data/{name}")
            assert member is not None and member.read() == content, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "retried.tar.gz"]
    wait_for_no_dump_sessions(pardb)


def test_recovery_conflicts_on_every_attempt_give_the_advice_and_leave_nothing(
    pardb: LocalCluster,
    conflicting_replica: None,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The primary keeps locking par_slow: each of the 3 attempts is cancelled, with
    waits of 0.1 s then 0.2 s between them; the error names the replica, the conflict
    and the settings that prevent it, and nothing is left behind."""
    monkeypatch.setattr(pgreplica.dump.export, "_RETRY_WAIT", 0.1)
    stop = threading.Event()
    locks = 0

    def keep_locking() -> None:
        nonlocal locks
        while not stop.is_set():
            lock_on_primary(pardb, "par_slow")
            locks += 1
            time.sleep(0.05)

    locker = threading.Thread(target=keep_locking, daemon=True)
    locker.start()
    stderr = io.StringIO()
    out = tmp_path / "dump"
    try:
        with pytest.raises(DumpError) as error:
            dump(settings, visibility(CONFLICT_VISIBILITY), out, jobs=2, stderr=stderr, tty=False)
    finally:
        stop.set()
        locker.join()
    assert locks > 0
    message = str(error.value)
    assert f"the replica 127.0.0.1:{pardb.port(1)}/{DB} cancelled the export" in message
    assert "conflict with recovery" in message and "on each of 3 attempts" in message
    assert "hot_standby_feedback" in message and "max_standby_streaming_delay" in message
    retries = [e for e in events(stderr) if e["event"] == "retry"]
    assert [(e["attempt"], e["wait"]) for e in retries] == [(2, 0.1), (3, 0.2)]
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    wait_for_no_dump_sessions(pardb)


def test_a_session_ended_while_idle_is_told_apart_by_the_replicas_conflict_counts(
    pardb: LocalCluster, conflicting_replica: None, settings: Settings
) -> None:
    """A session idle in its transaction is not cancelled but terminated by a conflict,
    and the client may only see "server closed the connection unexpectedly", without
    SQLSTATE. The dump then asks pg_stat_database_conflicts: a conflict counted since the
    attempt began makes the lost session a recovery conflict (retried); none, and the
    error stays what it was."""
    from pgreplica.dump.source import _Source
    from pgreplica.dump.workers import conflict_counts, lost_session, new_conflicts

    source = _Source(db_dsn(pardb, 1), f"127.0.0.1:{pardb.port(1)}/{DB}", "replica")
    with psycopg.connect(db_dsn(pardb, 1), autocommit=True) as conn:
        before = conflict_counts(conn)
        assert set(before) == {"lock", "snapshot", "bufferpin", "deadlock", "tablespace"}
        assert new_conflicts(source, settings, before) is None
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SELECT count(*) FROM par_slow")  # holds its lock, then sits idle
        lock_on_primary(pardb, "par_slow")
        pardb.wait_replayed(replicas=[1])
        with pytest.raises(psycopg.OperationalError) as ended:
            conn.execute("SELECT 1")
    assert "conflict with recovery" in str(ended.value) or lost_session(ended.value)
    reason = new_conflicts(source, settings, before)
    assert reason is not None and "1 lock conflict(s)" in reason, reason

    closed = psycopg.OperationalError("consuming input failed: server closed the connection")
    assert lost_session(closed)
    try:
        try:
            raise closed
        except psycopg.Error:
            raise DumpError("while collecting the schema") from None
    except DumpError as wrapped:
        assert lost_session(wrapped)  # found behind what the failure was reported as
    gone = psycopg.errors.ObjectNotInPrerequisiteState(
        "could not import the requested snapshot"  # a worker, after its leader's session
    )
    assert lost_session(gone)
    assert not lost_session(psycopg.errors.DivisionByZero("division by zero"))
