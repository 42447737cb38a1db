"""The dump itself: one snapshot on the chosen host, the plan, the COPYs, the output.

Nothing is written until the host is chosen and the catalog matches the visibility file;
files go to a staging directory next to the target, renamed (or packed) at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pgreplica.config import Settings
from pgreplica.dump._util import APPLICATION_NAME, DumpError, _connect
from pgreplica.dump.catalog import _build_plan
from pgreplica.dump.output import _write_output, _write_tarball
from pgreplica.dump.progress import DumpResult, _Reporter
from pgreplica.dump.schema import _collect_schema, _OutputOptions
from pgreplica.dump.source import _choose_source
from pgreplica.dump.visibility import Visibility
from pgreplica.dump.workers import _copy_all
from pgreplica.errors import ConfigError

_SNAPSHOT_SQL = """
SELECT pg_is_in_recovery(), pg_export_snapshot(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END)::text,
       pg_last_xact_replay_timestamp(),
       current_setting('server_version'), current_setting('server_version_num')::int,
       clock_timestamp()
"""
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

    The other keyword arguments choose what ``schema.sql`` and ``import.sql`` hold, and the
    files' layout (see :mod:`pgreplica.dump.schema` and docs/dump.md, "Output").
    """
    if jobs < 1:
        raise ConfigError("--jobs", f"must be at least 1, got {jobs}")
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
        leader = stack.enter_context(_connect(source.conninfo, APPLICATION_NAME, settings))
        lsn_before = leader.execute(_LSN_SQL).fetchone()
        leader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = leader.execute(_SNAPSHOT_SQL).fetchone()
        assert row is not None and lsn_before is not None
        in_recovery, snapshot, lsn, replay_ts, version, version_num, taken_at = row
        if source.role == "replica" and not in_recovery:
            raise DumpError(
                f"{source.label} was chosen as a replica but is not in recovery (promoted?): "
                "not dumping from a primary without --allow-primary"
            )
        plan = _build_plan(leader, visibility)
        schema = _collect_schema(leader, plan, options)  # extensions, functions, defaults...
        for message in plan.warnings:
            report.warning(message)
        if plan.unlisted:
            report.warning(
                f"tables not listed in {visibility.source}, not exported: "
                + ", ".join(plan.unlisted)
            )

        staging = Path(tempfile.mkdtemp(prefix=".pgreplica-dump-", dir=parent))
        stack.callback(shutil.rmtree, staging, True)
        (staging / "data").mkdir()
        report.start(plan.tables)
        _copy_all(leader, source, settings, snapshot, plan, staging, jobs, report)
        leader.execute("COMMIT")

        metadata = _write_output(
            staging,
            plan,
            schema,
            visibility,
            source,
            db_name,
            jobs,
            lsn=lsn,
            lsn_before=lsn_before[0],
            replay_ts=replay_ts,
            version=version,
            version_num=version_num,
            taken_at=taken_at,
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
    )
    report.done(result)
    return result
