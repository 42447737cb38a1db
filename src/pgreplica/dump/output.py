"""The files of a dump besides the CSVs: ``schema.sql``, ``import.sql``, ``metadata.json``,
and the ``.tar.gz`` they can be packed into."""

from __future__ import annotations

import datetime as dt
import os
import tarfile
from pathlib import Path
from typing import Any

from pgreplica.dump.catalog import _Plan
from pgreplica.dump.source import _Source
from pgreplica.dump.visibility import Visibility

FORMAT_VERSION = 1


def _header(kind: str, plan: _Plan, db_name: str, source: _Source) -> list[str]:
    return [
        f"-- pgreplica dump: {kind} of database {db_name!r} from {source.label} ({source.role})",
        f"-- {len(plan.tables)} tables: only the columns classified public; generated from the"
        " catalog.",
    ]


def _schema_sql(plan: _Plan, db_name: str, source: _Source) -> str:
    lines = _header("schema", plan, db_name, source)
    lines += ["", "-- Tables", *plan.pre_data, "", "-- Keys, indexes, foreign keys"]
    lines += plan.post_data
    return "\n".join(lines) + "\n"


def _import_sql(plan: _Plan, db_name: str, source: _Source) -> str:
    lines = _header("import script", plan, db_name, source)
    lines += [
        "-- Loads everything into an EMPTY database in one transaction. Run it from the",
        "-- dump's directory (\\copy paths are relative to the current directory):",
        "--     psql -X -v ON_ERROR_STOP=1 -d TARGET -f import.sql",
        "-- Tables are created bare and loaded, then get their keys and indexes, and the",
        "-- foreign keys last: creating a foreign key checks every row.",
        "\\set ON_ERROR_STOP on",
        "BEGIN;",
        *plan.pre_data,
    ]
    for table in plan.tables:
        lines.append(
            f"\\copy {table.sql_name} ({table.column_list()}) FROM '{table.file}' "
            "WITH (FORMAT csv, HEADER)"
        )
    lines += [*plan.post_data, "COMMIT;"]
    return "\n".join(lines) + "\n"


def _metadata(
    plan: _Plan,
    visibility: Visibility,
    source: _Source,
    db_name: str,
    jobs: int,
    *,
    lsn: str | None,
    lsn_before: str | None,
    replay_ts: dt.datetime | None,
    version: str,
    version_num: int,
    taken_at: dt.datetime,
) -> dict[str, Any]:
    from pgreplica import __version__

    def iso(value: dt.datetime | None) -> str | None:
        return value.astimezone(dt.timezone.utc).isoformat() if value is not None else None

    return {
        "format": FORMAT_VERSION,
        "tool": "pgreplica dump",
        "pgreplica_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "snapshot_taken_at": iso(taken_at),
        "database": db_name,
        "host": source.label,
        "role": source.role,
        "primary_because": source.reason or None,
        "postgresql_version": version,
        "server_version_num": version_num,
        "replay_lsn": lsn,
        "replay_lsn_before_snapshot": lsn_before,
        "replay_timestamp": iso(replay_ts),
        "isolation": "REPEATABLE READ, READ ONLY",
        "jobs": jobs,
        "visibility": {"file": visibility.source, "sha256": visibility.sha256},
        "tables": [
            {
                "name": t.qualified,
                "file": t.file,
                "columns": [c.name for c in t.exported],
                "filter": t.rule.filter,
                "row_filter": t.condition or None,
                "rows": t.rows,
                "bytes": t.bytes,
            }
            for t in plan.tables
        ],
        "foreign_keys": [
            {
                "name": fk.name,
                "table": next(t.qualified for t in plan.tables if t.oid == fk.child),
                "columns": list(fk.child_columns),
                "references": next(t.qualified for t in plan.tables if t.oid == fk.parent),
                "referenced_columns": list(fk.parent_columns),
            }
            for fk in plan.foreign_keys
        ],
        "unlisted_tables": plan.unlisted,
        "warnings": plan.warnings,
    }


def _write_tarball(staging: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        # Readable by its owner only, like the dump directory (umask aside).
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for path in sorted(staging.rglob("*")):
                tar.add(path, arcname=path.relative_to(staging).as_posix(), recursive=False)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
