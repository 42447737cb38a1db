"""COPY every table out of one snapshot, with ``--jobs`` workers on their own connections."""

from __future__ import annotations

import contextlib
import queue
import selectors
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

from pgreplica.config import Settings
from pgreplica.dump._util import APPLICATION_NAME, DumpError, _connect, _first_line, quote_literal
from pgreplica.dump.catalog import _Plan, _Table
from pgreplica.dump.progress import _Reporter
from pgreplica.dump.source import _Source

_PROGRESS_EVERY_ROWS = 4096


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
