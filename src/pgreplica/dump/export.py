"""The dump itself: one snapshot on the chosen host, the plan, the COPYs, the output.

Nothing is written until the host is chosen and the catalog matches the visibility file;
files go to a staging directory next to the target, renamed (or packed) at the end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pgreplica.config import Settings
from pgreplica.dump._util import APPLICATION_NAME, DumpError, _connect
from pgreplica.dump.catalog import _build_plan, _Plan
from pgreplica.dump.output import _write_output, _write_tarball
from pgreplica.dump.progress import DumpResult, _Reporter
from pgreplica.dump.schema import _collect_schema, _OutputOptions, _Schema
from pgreplica.dump.source import _choose_source, _Source
from pgreplica.dump.visibility import Visibility
from pgreplica.dump.workers import (
    DEFAULT_SPLIT_ROWS,
    RecoveryConflict,
    _copy_all,
    conflict_counts,
    describe,
    find_recovery_conflict,
    lost_session,
    new_conflicts,
    recovery_advice,
)
from pgreplica.errors import ConfigError

_SNAPSHOT_SQL = """
SELECT pg_is_in_recovery(), pg_export_snapshot(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END)::text,
       pg_last_xact_replay_timestamp(),
       current_setting('server_version'), current_setting('server_version_num')::int,
       clock_timestamp()
"""
_RETRY_WAIT = 1.0
"""Seconds before the second attempt after a recovery conflict, doubled for each next."""
_LSN_SQL = """
SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END)::text
"""


def _prepare_out(out: Path) -> tuple[bool, Path]:
    """(is a tarball, parent directory); refuse to overwrite anything."""
    tarball = out.name.endswith((".tar.gz", ".tgz"))
    if out.exists() and (tarball or not out.is_dir() or any(out.iterdir())):
        raise DumpError(f"{out} already exists: not overwriting it")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise DumpError(f"{parent} does not exist: create it first")
    return tarball, parent


def dump(
    settings: Settings,
    visibility: Visibility,
    out: str | os.PathLike[str],
    *,
    database: str | None = None,
    jobs: int = 1,
    allow_primary: bool = False,
    stderr: TextIO | None = None,
    quiet: bool = False,
    tty: bool | None = None,
    split_rows: int | None = DEFAULT_SPLIT_ROWS,
    attempts: int = 3,
    fidelity: str = "full",
    keep_private_columns: bool = False,
    views: bool = False,
    functions: bool = False,
    import_mode: str = "empty",
    load_triggers: Sequence[str] = (),
    layout: str = "pgreplica",
    app_commit: str | None = None,
) -> DumpResult:
    """Export the tables of ``visibility`` from a replica of ``database`` into ``out``.

    ``out`` is a new (or empty) directory, or a ``.tar.gz`` file. Nothing is written
    until the host is chosen and the catalog matches the visibility file; a failure
    later removes what was written.

    A table of at least ``split_rows`` rows (the planner's estimate) is split in ranges
    (of blocks, or of its primary key) across the ``jobs`` workers (``None``: never), with
    the same CSV whatever ``jobs``. When WAL replay on the replica cancels the export (a
    recovery conflict), it starts again in a fresh snapshot, up to ``attempts`` in all.

    The other keyword arguments choose what ``schema.sql`` and ``import.sql`` hold, and the
    files' layout (see :mod:`pgreplica.dump.schema` and docs/dump.md, "Output").
    """
    if jobs < 1:
        raise ConfigError("--jobs", f"must be at least 1, got {jobs}")
    if split_rows is not None and split_rows < 1:
        raise ConfigError("split_rows", f"must be at least 1 (or None), got {split_rows}")
    if attempts < 1:
        raise ConfigError("attempts", f"must be at least 1, got {attempts}")
    options = _OutputOptions(
        fidelity=fidelity,
        keep_private_columns=keep_private_columns,
        views=views,
        functions=functions,
        import_mode=import_mode,
        layout=layout,
        app_commit=app_commit,
        load_triggers=tuple(load_triggers),
    )
    started = time.monotonic()
    report = _Reporter(stderr or sys.stderr, quiet=quiet, tty=tty)
    target = Path(out)
    tarball, parent = _prepare_out(target)
    source = _choose_source(settings, database, allow_primary, report)
    db_name = settings.database(database).name

    with contextlib.ExitStack() as stack:
        staging: Path | None = None

        def fresh_staging() -> Path:
            """The staging directory with an empty ``data``: made on first use (once the
            plan holds), emptied for another attempt."""
            nonlocal staging
            if staging is None:
                staging = Path(tempfile.mkdtemp(prefix=".pgreplica-dump-", dir=parent))
                stack.callback(shutil.rmtree, staging, True)
            else:
                shutil.rmtree(staging / "data")
            (staging / "data").mkdir()
            return staging

        retries: list[str] = []
        shown: set[str] = set()
        for attempt in range(1, attempts + 1):
            try:
                export = _export_once(
                    source,
                    settings,
                    visibility,
                    jobs,
                    split_rows,
                    report,
                    fresh_staging,
                    shown,
                    options,
                )
                break
            except RecoveryConflict as conflict:
                if attempt == attempts:
                    raise recovery_advice(source, conflict.reason, attempts) from conflict
                wait = _RETRY_WAIT * 2 ** (attempt - 1)
                message = (
                    f"{conflict} ({conflict.reason}): attempt {attempt} of {attempts} lost, "
                    f"starting again in a fresh snapshot in {wait:g} s (what it wrote is "
                    "discarded)"
                )
                retries.append(message)
                report.retry(message, attempt=attempt + 1, attempts=attempts, wait=wait)
                time.sleep(wait)
        assert staging is not None
        plan = export.plan
        plan.warnings.extend(retries)  # in metadata.json: this export took a retry

        metadata = _write_output(
            staging,
            plan,
            export.schema,
            visibility,
            source,
            db_name,
            jobs,
            lsn=export.lsn,
            lsn_before=export.lsn_before,
            replay_ts=export.replay_ts,
            version=export.version,
            version_num=export.version_num,
            taken_at=export.taken_at,
        )
        if tarball:
            _write_tarball(staging, target)
        else:
            if target.exists():
                target.rmdir()  # empty, checked above
            staging.rename(target)
    result = DumpResult(
        out=target,
        host=source.label,
        role=source.role,
        tables={t.qualified: t.rows for t in plan.tables},
        bytes=sum(t.bytes for t in plan.tables),
        seconds=time.monotonic() - started,
        metadata=metadata,
        parts=export.parts,
        attempts=attempt,
    )
    report.done(result)
    return result


@dataclass
class _Export:
    """One attempt that went through: the plan with its row counts, and the snapshot."""

    plan: _Plan
    parts: dict[str, int]
    lsn: str | None
    lsn_before: str | None
    replay_ts: dt.datetime | None
    version: str
    version_num: int
    taken_at: dt.datetime
    schema: _Schema


def _export_once(
    source: _Source,
    settings: Settings,
    visibility: Visibility,
    jobs: int,
    split_rows: int | None,
    report: _Reporter,
    fresh_staging: Callable[[], Path],
    shown: set[str],
    options: _OutputOptions,
) -> _Export:
    """One snapshot: take it, match the catalog, COPY every table into the staging
    directory. A recovery conflict anywhere raises :class:`RecoveryConflict`."""
    before: dict[str, int] | None = None
    try:
        # closing(), not the connection's own exit: after a failure the connection may be
        # in the middle of a COPY, where a rollback cannot be sent (closing ends it).
        with contextlib.closing(_connect(source.conninfo, APPLICATION_NAME, settings)) as leader:
            if source.role == "replica":  # to tell a session lost to replay from others
                before = conflict_counts(leader)
            lsn_before = leader.execute(_LSN_SQL).fetchone()
            leader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = leader.execute(_SNAPSHOT_SQL).fetchone()
            assert row is not None and lsn_before is not None
            in_recovery, snapshot, lsn, replay_ts, version, version_num, taken_at = row
            if source.role == "replica" and not in_recovery:
                raise DumpError(
                    f"{source.label} was chosen as a replica but is not in recovery "
                    "(promoted?): not dumping from a primary without --allow-primary"
                )
            plan = _build_plan(leader, visibility)
            schema = _collect_schema(leader, plan, options)  # extensions, functions, defaults...
            unlisted = (
                f"tables not listed in {visibility.source}, not exported: "
                + ", ".join(plan.unlisted)
                if plan.unlisted
                else None
            )
            for message in [*plan.warnings, *([unlisted] if unlisted else [])]:
                if message not in shown:  # once, however many attempts
                    shown.add(message)
                    report.warning(message)
            staging = fresh_staging()
            report.start(plan.tables)
            parts = _copy_all(
                leader, source, settings, snapshot, plan, staging, jobs, report, split_rows, before
            )
    except RecoveryConflict:
        raise
    except Exception as exc:
        conflict = find_recovery_conflict(exc)
        if conflict is not None:
            raise RecoveryConflict(source, describe(conflict)) from exc
        if before is not None and lost_session(exc):
            reason = new_conflicts(source, settings, before)
            if reason is not None:
                raise RecoveryConflict(source, reason) from exc
        raise
    return _Export(
        plan, parts, lsn, lsn_before[0], replay_ts, version, version_num, taken_at, schema
    )
