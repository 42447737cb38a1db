"""COPY every table out of one snapshot, with ``--jobs`` workers on their own connections.

A table is copied by one ``COPY`` into its CSV file, except a big one (an estimated
``split_rows`` rows or more), which is cut into ranges that different workers copy at
the same time: ranges of its blocks when its query is a plain scan of the table, else
ranges of its primary key, copied in key order. The ranges' files are joined in order
into the table's one CSV, byte for byte what a single worker writes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import selectors
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
from psycopg import pq

from pgreplica.config import Settings
from pgreplica.dump._util import (
    APPLICATION_NAME,
    DumpError,
    _connect,
    _first_line,
    quote_ident,
    quote_literal,
)
from pgreplica.dump.catalog import _Plan, _Table
from pgreplica.dump.progress import _Reporter
from pgreplica.dump.source import _Source

_PROGRESS_EVERY_ROWS = 4096

DEFAULT_SPLIT_ROWS = 1_000_000
"""Tables with at least this many rows (``pg_class.reltuples``) are split in ranges
across the workers."""
_PARTS_PER_JOB = 2
"""Ranges per worker for a split table: more than one, so that a range bigger than the
others (the sample is a sample) does not leave the other workers idle at the end."""
_MIN_PART_ROWS = 10_000
_SAMPLE_ROWS = 30_000
"""Rows sampled (``TABLESAMPLE SYSTEM``) to find the key ranges."""

_PRIMARY_KEYS_SQL = """
SELECT con.conrelid::int8,
       ARRAY(SELECT a.attname::text
             FROM unnest(con.conkey) WITH ORDINALITY AS k(num, i)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num
             ORDER BY k.i)
FROM pg_catalog.pg_constraint con
WHERE con.conrelid = ANY(%s) AND con.contype = 'p'
"""


_COUNT_WAIT = 1.0
"""Seconds to wait for a lost session's conflict to show in the replica's statistics."""
_CONFLICT_KINDS = ("lock", "snapshot", "bufferpin", "deadlock", "tablespace")
_CONFLICTS_SQL = (
    "SELECT "
    + ", ".join(f"confl_{kind}" for kind in _CONFLICT_KINDS)
    + " FROM pg_catalog.pg_stat_database_conflicts WHERE datname = current_database()"
)


class RecoveryConflict(DumpError):
    """WAL replay on the replica cancelled a statement of the export, or ended one of
    its sessions ("conflict with recovery"); the snapshot is lost, the export can start
    again in a new one. ``reason`` says what the server said."""

    def __init__(self, source: _Source, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the replica {source.label} cancelled the export to replay WAL")


def describe(error: psycopg.Error) -> str:
    """The server's message and its detail, on one line."""
    detail = error.diag.message_detail
    return _first_line(error) + (f": {detail}" if detail else "")


def is_recovery_conflict(error: BaseException) -> bool:
    """Whether ``error`` is a standby cancelling a statement, or terminating a session,
    because WAL replay needed what it held (a lock, row versions, a pinned buffer)."""
    if not isinstance(error, psycopg.Error):
        return False
    if error.sqlstate == "40001":  # on a standby: only recovery conflicts
        return True
    return error.sqlstate == "40P01" and "conflict with recovery" in str(error)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def find_recovery_conflict(error: BaseException) -> psycopg.Error | None:
    """The recovery conflict behind ``error``: itself, or an exception it was raised from
    or while handling (a filter check reports a failed ``EXPLAIN`` as a bad filter)."""
    for current in _chain(error):
        if is_recovery_conflict(current):
            assert isinstance(current, psycopg.Error)
            return current
    return None


def lost_session(error: BaseException) -> bool:
    """Whether ``error`` comes from a session the server closed without the client
    reading why ("server closed the connection unexpectedly", no SQLSTATE), or from a
    snapshot that was gone when a worker came to adopt it (its leader's session ended):
    what a recovery conflict looks like when it ends a session idle in its transaction."""
    for current in _chain(error):
        if isinstance(current, psycopg.OperationalError) and current.sqlstate is None:
            return True
        if (
            isinstance(current, psycopg.Error)
            # invalid snapshot identifier; could not import the requested snapshot
            and current.sqlstate in ("22023", "55000")
            and "snapshot" in str(current)
        ):
            return True
    return False


def conflict_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The replica's recovery conflicts so far in this database, by kind (outside a
    transaction: statistics read in one are frozen for its duration)."""
    row = conn.execute(_CONFLICTS_SQL).fetchone()
    return dict(zip(_CONFLICT_KINDS, row or (), strict=False))


def new_conflicts(source: _Source, settings: Settings, before: dict[str, int]) -> str | None:
    """After a lost session: what ``pg_stat_database_conflicts`` counted since ``before``
    (``None`` if nothing within a second, or if the replica cannot be asked)."""
    new: dict[str, int] = {}
    try:
        with contextlib.closing(_connect(source.conninfo, APPLICATION_NAME, settings)) as conn:
            # The ended session sends its error, then counts the conflict as it exits.
            deadline = time.monotonic() + _COUNT_WAIT
            while not new and time.monotonic() < deadline:
                after = conflict_counts(conn)
                new = {k: after.get(k, 0) - n for k, n in before.items() if after.get(k, 0) > n}
                if not new:
                    time.sleep(0.05)
    except psycopg.Error:
        return None
    if not new:
        return None
    counted = ", ".join(f"{n} {kind}" for kind, n in new.items())
    return (
        "terminating connection due to conflict with recovery: a session was closed, and "
        f"pg_stat_database_conflicts counted {counted} conflict(s) meanwhile"
    )


def recovery_advice(source: _Source, reason: str, attempts: int = 1) -> DumpError:
    """The error of an export that replay cancelled (on each of ``attempts`` attempts),
    with the way out."""
    each = f" on each of {attempts} attempts" if attempts > 1 else ""
    return DumpError(
        f"the replica {source.label} cancelled the export to replay WAL ({reason}){each}: "
        "enable hot_standby_feedback or raise max_standby_streaming_delay on the replica, "
        "then retry"
    )


@dataclass
class _Split:
    """How a big table is copied: one ``COPY`` per range, in the order of the ranges."""

    by: str
    """``"block"``: ranges of the table's blocks, in physical order (the order of one plain
    ``COPY`` of the table); ``"key"``: ranges of the primary key, in key order."""
    statements: list[str]


@dataclass
class _Piece:
    """One ``COPY`` of the work queue: a whole table, or one range of a split table."""

    table: _Table
    statement: str
    path: Path
    weight: float
    index: int = 0
    assembly: _Assembly | None = None


@dataclass
class _Assembly:
    """The ranges of a split table as they are copied, joined into one file at the end."""

    table: _Table
    paths: list[Path]
    by: str
    """How the table was split: ``"block"`` or ``"key"`` (see :class:`_Split`)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    rows: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    done: int = 0
    started: float | None = None

    def __post_init__(self) -> None:
        self.rows = [0] * len(self.paths)
        self.sizes = [0] * len(self.paths)

    def begin(self) -> None:
        with self.lock:
            if self.started is None:
                self.started = time.monotonic()

    def advance(self, index: int, rows: int, nbytes: int) -> tuple[int, int]:
        with self.lock:
            self.rows[index], self.sizes[index] = rows, nbytes
            return sum(self.rows), sum(self.sizes)

    def finish(self, index: int, rows: int, nbytes: int) -> bool:
        """Record range ``index`` as copied; True for the last one."""
        with self.lock:
            self.rows[index], self.sizes[index] = rows, nbytes
            self.done += 1
            return self.done == len(self.paths)

    def join(self) -> None:
        """Append the ranges' files, in order, to the first one (the table's file)."""
        with self.paths[0].open("r+b", buffering=0) as out:
            out.seek(0, os.SEEK_END)
            for path in self.paths[1:]:
                with path.open("rb", buffering=0) as part:
                    _append(part, out)
                path.unlink()
        self.table.rows, self.table.bytes = sum(self.rows), sum(self.sizes)
        self.table.seconds = time.monotonic() - (self.started or time.monotonic())


def _append(source: BinaryIO, target: BinaryIO) -> None:
    """Copy ``source`` from its position to ``target`` at its position (unbuffered
    files): in the kernel where ``copy_file_range`` exists, else through a buffer."""
    size = os.fstat(source.fileno()).st_size
    with contextlib.suppress(AttributeError, OSError):
        while source.tell() < size:
            if not os.copy_file_range(source.fileno(), target.fileno(), size - source.tell()):
                break
    shutil.copyfileobj(source, target, 1 << 20)  # what is left, if anything


def _literal(text: str) -> str:
    """An SQL string literal that means ``text`` whatever standard_conforming_strings."""
    if "\\" in text:
        return "E" + quote_literal(text.replace("\\", "\\\\"))
    return quote_literal(text)


_SESSION_ORDER = (
    # A sequential scan returns the table's rows in block order, unless it joins another
    # session's scan of the same table half way through (synchronized scans), or the
    # planner gives it parallel workers: both would change the order from one dump to
    # the next. The dump brings its own parallelism (--jobs).
    "SET synchronize_seqscans = off",
    "SET max_parallel_workers_per_gather = 0",
)
_ALIAS = "_pgr_0"
"""The table's alias in its export query (catalog.py's ``select_sql``)."""


def _plan_splits(
    conn: psycopg.Connection[Any],
    tables: Sequence[_Table],
    jobs: int,
    split_rows: int | None,
    report: _Reporter,
) -> dict[int, _Split]:
    """Which tables to copy in ranges, how, and in which ranges.

    A table of ``split_rows`` rows or more (the planner's estimate) whose export query is
    a plain sequential scan of the table is split in **block** ranges (``ctid``, a TID
    range scan each, PostgreSQL 14 or later): their rows in block order are the rows of
    one plain ``COPY``, so one worker copies it as before. Otherwise (a join to a
    filtered parent's keys, a partitioned table, an index scan), a table with a primary
    key is split in ranges of the key's leading column and copied in **key** order,
    with one worker too; one without a primary key is copied whole.

    The choice depends on the table and its plan, never on ``jobs``, so that the file
    is the same whatever the number of workers; ``jobs`` only sets how many ranges.
    """
    if split_rows is None:
        return {}
    big = [t for t in tables if t.estimate is not None and t.estimate >= split_rows]
    if not big:
        return {}
    keys: dict[int, tuple[str, ...]] = {
        oid: tuple(columns)
        for oid, columns in conn.execute(_PRIMARY_KEYS_SQL, ([t.oid for t in big],)).fetchall()
    }
    version = conn.info.server_version
    splits: dict[int, _Split] = {}
    for table in big:
        assert table.estimate is not None
        parts = 1 if jobs == 1 else min(_PARTS_PER_JOB * jobs, table.estimate // _MIN_PART_ROWS)
        parts = max(parts, 1)
        statements = _block_statements(conn, table, parts) if version >= 140000 else None
        if statements is not None:
            splits[table.oid] = _Split("block", statements)
            continue
        key = keys.get(table.oid)
        if key:
            bounds = _sample_bounds(conn, table, key[0], parts)
            splits[table.oid] = _Split("key", _key_statements(table, key, bounds))
        elif jobs > 1:
            report.warning(
                f"{table.qualified}: about {table.estimate:,} rows, but its query is not a "
                "plain scan of the table and it has no primary key to split it by: copied "
                "by one connection"
            )
    return splits


def _plan_root(conn: psycopg.Connection[Any], select: str) -> dict[str, Any]:
    row = conn.execute("EXPLAIN (FORMAT JSON) " + select).fetchone()  # no parameters: "%"
    assert row is not None
    document = json.loads(row[0]) if isinstance(row[0], str) else row[0]
    root: dict[str, Any] = document[0]["Plan"]
    return root


def _scan_of(root: dict[str, Any], table: _Table) -> str | None:
    """The node type if the plan is one scan of ``table`` (with, at most, subqueries
    evaluated per row or once: they do not reorder rows), else ``None``."""
    if root.get("Relation Name") != table.name or root.get("Alias") != _ALIAS:
        return None
    children = root.get("Plans", [])
    if any(p.get("Parent Relationship") not in ("InitPlan", "SubPlan") for p in children):
        return None
    return str(root.get("Node Type"))


def _block_statements(conn: psycopg.Connection[Any], table: _Table, parts: int) -> list[str] | None:
    """``parts`` COPYs of block ranges of ``table`` if its query is a plain sequential
    scan and a range of blocks is read with a TID range scan; else ``None``."""
    select, copy = table.select_sql(), table.copy_sql()
    base = f"FROM {table.sql_name} AS {_ALIAS}"
    inner = f"({select})"
    if select.count(base) != 1 or inner not in copy:
        return None
    if _scan_of(_plan_root(conn, select), table) != "Seq Scan":
        return None

    def ranged(low: int | None, high: int | None) -> str:
        bounds = [f"ctid >= '({low},0)'"] if low is not None else []
        bounds += [f"ctid < '({high},0)'"] if high is not None else []
        blocks = f"(SELECT * FROM {table.sql_name} AS {_ALIAS} WHERE {' AND '.join(bounds)})"
        return select.replace(base, f"FROM {blocks} AS {_ALIAS}")

    if _scan_of(_plan_root(conn, ranged(0, 1)), table) != "Tid Range Scan":
        return None
    if parts < 2:
        return [copy]
    row = conn.execute(
        "SELECT pg_catalog.pg_relation_size(%s::oid::regclass)"
        " / pg_catalog.current_setting('block_size')::int8",
        (table.oid,),
    ).fetchone()
    blocks = int(row[0]) if row is not None else 0
    cuts = sorted({blocks * i // parts for i in range(1, parts)} - {0})
    # The first range has no lower bound and the last no upper one: every block is in one.
    edges: list[int | None] = [None, *cuts, None]
    return [
        copy.replace(inner, f"({ranged(low, high)})", 1) for low, high in itertools.pairwise(edges)
    ]


def _sample_bounds(
    conn: psycopg.Connection[Any], table: _Table, column: str, parts: int
) -> list[str]:
    """``parts - 1`` ascending values of ``column`` that cut the table in even ranges."""
    if parts < 2:
        return []
    estimate = max(table.estimate or 1, 1)
    percent = min(100.0, 100.0 * _SAMPLE_ROWS / estimate)
    fractions = ", ".join(repr(i / parts) for i in range(1, parts))
    key = quote_ident(column)
    # No parameters: names may hold a "%".
    row = conn.execute(
        f"SELECT (percentile_disc(ARRAY[{fractions}]::float8[]) WITHIN GROUP"
        f" (ORDER BY _pgr_s.{key}))::text[] FROM (SELECT {key} FROM {table.sql_name}"
        f" TABLESAMPLE SYSTEM ({percent!r})) AS _pgr_s"
    ).fetchone()
    bounds: list[str] = []
    for value in row[0] if row is not None and row[0] is not None else []:
        if value is not None and (not bounds or bounds[-1] != value):
            bounds.append(value)
    return bounds


def _key_statements(table: _Table, key: Sequence[str], bounds: Sequence[str]) -> list[str]:
    """One ``COPY`` per key range, each in key order, with the table's own columns and
    row filter: the table's query as a subquery, which the planner flattens (the range
    becomes an index condition on the primary key)."""
    select = table.select_sql()
    copy = table.copy_sql()
    inner = f"({select})"
    if inner not in copy:  # pragma: no cover - copy_sql() is COPY (select_sql()) ...
        copy = f"COPY {inner} TO STDOUT WITH (FORMAT csv, HEADER)"
    alias = "_pgr_part"
    lead = f"{alias}.{quote_ident(key[0])}"
    order = ", ".join(f"{alias}.{quote_ident(c)}" for c in key)
    edges: list[str | None] = [None, *bounds, None]
    statements = []
    for low, high in itertools.pairwise(edges):
        conditions = []
        if low is not None:
            conditions.append(f"{lead} >= {_literal(low)}")
        if high is not None:
            conditions.append(f"{lead} < {_literal(high)}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        wrapped = f"(SELECT * FROM {inner} AS {alias}{where} ORDER BY {order})"
        statements.append(copy.replace(inner, wrapped, 1))
    return statements


def _pieces(tables: Sequence[_Table], splits: dict[int, _Split], staging: Path) -> list[_Piece]:
    """The work queue: whole tables and ranges of split ones, biggest first."""
    pieces: list[_Piece] = []
    for table in tables:
        path = staging / table.file
        split = splits.get(table.oid)
        if split is None:
            pieces.append(_Piece(table, table.copy_sql(), path, float(table.pages)))
            continue
        statements = split.statements
        paths = [path] + [
            path.with_name(f"{path.name}.part-{i}") for i in range(1, len(statements))
        ]
        assembly = _Assembly(table, paths, split.by)
        weight = table.pages / len(statements)
        for index, (statement, part_path) in enumerate(zip(statements, paths, strict=True)):
            pieces.append(_Piece(table, statement, part_path, weight, index, assembly))
    return sorted(pieces, key=lambda p: -p.weight)  # stable: ranges stay in order


def _copy_all(
    leader: psycopg.Connection[Any],
    source: _Source,
    settings: Settings,
    snapshot: str,
    plan: _Plan,
    staging: Path,
    jobs: int,
    report: _Reporter,
    split_rows: int | None = DEFAULT_SPLIT_ROWS,
    baseline: dict[str, int] | None = None,
) -> dict[str, int]:
    """COPY every table, each by one worker or in ranges by several; workers share the
    leader's snapshot. Returns the number of ranges of each table big enough to split.

    The leader is worker 0; the others open their own connection to the same host and
    import the snapshot before their first table. The leader commits once its share is
    copied and every worker has imported the snapshot (a session idle in a transaction
    still holds its locks, which WAL replay may then have to cancel), the workers when
    theirs is. The first failure cancels the rest. A recovery conflict on any connection
    raises :class:`RecoveryConflict`, for the caller to start again in a new snapshot;
    so does a lost session when the replica's conflict counts have grown since
    ``baseline`` (:func:`conflict_counts` before the snapshot was taken).
    """
    for statement in _SESSION_ORDER:
        leader.execute(statement)
    splits = _plan_splits(leader, plan.tables, jobs, split_rows, report)
    pieces = _pieces(plan.tables, splits, staging)
    work: queue.SimpleQueue[_Piece] = queue.SimpleQueue()
    for piece in pieces:
        work.put(piece)
    count = max(1, min(jobs, len(pieces)))
    connections: list[psycopg.Connection[Any]] = [leader]
    lock = threading.Condition()
    failed = threading.Event()
    errors: list[BaseException] = []
    pending = count - 1  # workers that have not imported the snapshot yet

    def imported() -> None:
        nonlocal pending
        with lock:
            pending -= 1
            lock.notify_all()

    def worker(number: int) -> None:
        conn = leader
        own: psycopg.Connection[Any] | None = None
        waiting = bool(number)
        try:
            if number:
                conn = own = _connect(source.conninfo, APPLICATION_NAME, settings)
                for statement in _SESSION_ORDER:
                    conn.execute(statement)
                with lock:
                    connections.append(conn)
                    if failed.is_set():
                        return
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute("SET TRANSACTION SNAPSHOT " + quote_literal(snapshot))
                waiting = False
                imported()
            while not failed.is_set():
                try:
                    piece = work.get_nowait()
                except queue.Empty:
                    break
                _copy_piece(conn, piece, report, failed)
            if not number:
                with lock:  # the snapshot must outlive its last import
                    while pending and not failed.is_set():
                        lock.wait(0.1)
            if not failed.is_set():
                conn.execute("COMMIT")
        except BaseException as exc:
            with lock:
                first = not failed.is_set()
                failed.set()
                errors.append(exc)
                others = [c for c in connections if c is not conn]
                lock.notify_all()
            if first:
                for other in others:
                    with contextlib.suppress(Exception):
                        other.cancel_safe(timeout=5)
        finally:
            if waiting:
                imported()
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
        for error in errors:  # the first error may be a consequence (the snapshot lost)
            conflict = find_recovery_conflict(error)
            if conflict is not None:
                raise RecoveryConflict(source, describe(conflict)) from error
        error = errors[0]
        if baseline is not None and any(lost_session(e) for e in errors):
            reason = new_conflicts(source, settings, baseline)
            if reason is not None:
                raise RecoveryConflict(source, reason) from error
        if isinstance(error, psycopg.Error) and error.sqlstate == "57P04":
            raise recovery_advice(source, describe(error)) from error
        raise error
    return {t.qualified: len(splits[t.oid].statements) for t in plan.tables if t.oid in splits}


class _SkipHeader:
    """``write`` without the first chunk: the header line, which only the first range of
    a split table keeps (``COPY`` sends every line, the header too, as its own chunk)."""

    def __init__(self, write: Callable[[bytes | memoryview], object]) -> None:
        self._write = write
        self.skipped: int | None = None

    def __call__(self, data: bytes | memoryview) -> object:
        if self.skipped is None:
            self.skipped = len(data)
            return None
        return self._write(data)


def _copy_piece(
    conn: psycopg.Connection[Any], piece: _Piece, report: _Reporter, failed: threading.Event
) -> None:
    started = time.monotonic()
    table, assembly, index = piece.table, piece.assembly, piece.index
    name = table.qualified
    if assembly is not None:
        assembly.begin()

    def progress(rows: int, nbytes: int) -> None:
        if failed.is_set():
            raise DumpError("cancelled: another worker failed")
        if assembly is not None:
            rows, nbytes = assembly.advance(index, rows, nbytes)
        report.advance(name, rows, nbytes)

    with piece.path.open("wb", buffering=1 << 20) as fh:
        write: Callable[[bytes | memoryview], object] = fh.write
        skip = _SkipHeader(fh.write) if index else None
        rows, nbytes = copy_out(conn, piece.statement, skip or write, progress)
    if skip is not None:
        nbytes -= skip.skipped or 0
    if assembly is None:
        table.rows, table.bytes = rows, nbytes
        table.seconds = time.monotonic() - started
        report.finish(table)
    elif assembly.finish(index, rows, nbytes):
        assembly.join()
        report.finish(table, parts=len(assembly.paths), split=assembly.by)


def copy_out(
    conn: psycopg.Connection[Any],
    statement: str,
    write: Callable[[bytes | memoryview], object],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Run ``COPY ... TO STDOUT`` and hand every chunk to ``write``: (rows, bytes).

    This drives libpq directly (``PQgetCopyData`` in non-blocking mode, waiting on the
    socket between bursts) instead of iterating a psycopg ``Copy``: the per-row Python
    cost is a third of that, which is most of the client's time in an export. Every wait
    is a ``select`` on the socket, never a libpq call that blocks: those hold the GIL, so
    a ``COPY`` slow to send its first row (a sort, a selective filter) would stop every
    other worker's thread meanwhile. ``rows`` is the server's count (the command tag);
    ``progress(rows so far, bytes so far)`` is called every few thousand rows and may
    raise to stop.
    """
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    with conn.lock, selectors.DefaultSelector() as selector:
        selector.register(pgconn.socket, selectors.EVENT_READ)
        pgconn.send_query(statement.encode(encoding))
        _flush(pgconn)
        result = _get_result(pgconn, selector)
        if result is None or result.status != pq.ExecStatus.COPY_OUT:
            _drain_results(pgconn, selector)
            if result is None:
                raise DumpError(f"no result for {statement[:60]}")
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        rows = nbytes = 0
        drained = False  # the last read of the socket, without waiting, brought no row
        # An exception in here leaves the connection mid-COPY: the callers close it.
        while True:
            size, data = pgconn.get_copy_data(1)
            if size > 0:
                drained = False
                write(data)
                nbytes += size
                rows += 1
                if progress is not None and rows % _PROGRESS_EVERY_ROWS == 0:
                    progress(rows - 1, nbytes)  # the first chunk is the header
            elif size == 0:
                # Read what the socket already holds before waiting on it: a wait
                # releases the GIL, and getting it back while the other workers' threads
                # hold it costs more than the rows it brings (a few hundred at a time).
                if drained:
                    selector.select(timeout=1.0)
                pgconn.consume_input()
                drained = True
            else:
                break
        result = _get_result(pgconn, selector)
        _drain_results(pgconn, selector)
        if result is None or result.status != pq.ExecStatus.COMMAND_OK:
            if result is None:
                raise DumpError(f"no result for {statement[:60]}")
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        return result.command_tuples or 0, nbytes


def _flush(pgconn: pq.abc.PGconn) -> None:
    """Send what libpq holds of the query (the connection is non-blocking)."""
    with selectors.DefaultSelector() as selector:
        selector.register(pgconn.socket, selectors.EVENT_WRITE)
        while pgconn.flush():
            selector.select(timeout=1.0)


def _get_result(pgconn: pq.abc.PGconn, selector: selectors.BaseSelector) -> pq.abc.PGresult | None:
    """``PQgetResult`` once it cannot block: the wait is in ``select``, without the GIL."""
    while pgconn.is_busy():
        selector.select(timeout=1.0)
        pgconn.consume_input()
    return pgconn.get_result()


def _drain_results(pgconn: pq.abc.PGconn, selector: selectors.BaseSelector) -> None:
    while _get_result(pgconn, selector) is not None:
        pass
