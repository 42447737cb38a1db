"""The files of a dump besides the CSVs: ``schema.sql``, ``import.sql``, ``metadata.json``
(and, in crates.io's layout, ``README.md`` and ``export.sql``), and the ``.tar.gz`` they can
be packed into.

The statements come from the plan (:mod:`pgreplica.dump.catalog`) and the schema around it
(:mod:`pgreplica.dump.schema`); this module arranges them for each import mode: into an
empty database (everything created, then loaded, then keys, indexes and foreign keys), or
into an existing, migrated one (triggers off, truncate, load, triggers back on).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from pgreplica.dump._util import quote_literal
from pgreplica.dump.catalog import _Plan, _Table
from pgreplica.dump.schema import FIDELITIES, IMPORT_MODES, LAYOUTS, _OutputOptions, _Schema
from pgreplica.dump.source import _Source
from pgreplica.dump.visibility import Visibility

FORMAT_VERSION = 2
"""2: ``import.sql`` may hold dollar-quoted bodies (functions, ``DO`` blocks), and
``metadata.json`` describes the schema under ``"schema"``."""

_STATE_TABLE = "pg_temp.pgreplica_import"


def _legacy_schema(plan: _Plan) -> _Schema:
    """The plan's own DDL, as a :class:`_Schema` (no extensions, functions or defaults)."""
    schema = _Schema(_OutputOptions(fidelity="minimal"))
    schema.schemas = [s for s in plan.pre_data if s.startswith("CREATE SCHEMA ")]
    schema.types = [s for s in plan.pre_data if s.startswith("CREATE TYPE ")]
    schema.tables = [s for s in plan.pre_data if s.startswith("CREATE TABLE ")]
    schema.post_data = list(plan.post_data)
    return schema


def _header(kind: str, plan: _Plan, db_name: str, source: _Source, schema: _Schema) -> list[str]:
    columns = "only the columns classified public"
    if schema.options.keep_private_columns:
        columns += " (private columns are created empty, or with their defaults)"
    return [
        f"-- pgreplica dump: {kind} of database {db_name!r} from {source.label} ({source.role})",
        f"-- {len(plan.tables)} tables: {columns}; generated from the catalog"
        f" ({schema.options.fidelity} schema).",
    ]


def _pre_data(schema: _Schema) -> list[str]:
    """Everything the tables need, then the tables, in the order they can be created."""
    return [
        *schema.schemas,
        *schema.extensions,
        *schema.types,
        *schema.functions,
        *schema.domain_constraints,
        *schema.sequences,
        *schema.tables,
        *schema.owned_by,
    ]


def _copy_lines(plan: _Plan) -> list[str]:
    return [
        f"\\copy {table.sql_name} ({table.column_list()}) FROM '{table.file}' "
        "WITH (FORMAT csv, HEADER)"
        for table in plan.tables
    ]


def _schema_sql(plan: _Plan, db_name: str, source: _Source, schema: _Schema | None = None) -> str:
    schema = schema or _legacy_schema(plan)
    lines = _header("schema", plan, db_name, source, schema)
    if schema.check_function_bodies_off:
        lines += [
            "SET check_function_bodies = false;  -- as pg_dump: bodies may name later objects"
        ]
    lines += ["", "-- Tables", *_pre_data(schema), *schema.after_load]
    lines += ["", "-- Keys, indexes, constraints, foreign keys", *schema.post_data]
    if schema.views:
        lines += ["", "-- Views", *schema.views]
    if schema.comments:
        lines += ["", "-- Comments", *schema.comments]
    return "\n".join(lines) + "\n"


def _import_sql(plan: _Plan, db_name: str, source: _Source, schema: _Schema | None = None) -> str:
    schema = schema or _legacy_schema(plan)
    if schema.options.import_mode == "existing":
        return _import_existing_sql(plan, db_name, source, schema)
    lines = _header("import script", plan, db_name, source, schema)
    lines += [
        "-- Loads everything into an EMPTY database in one transaction. Run it from the",
        "-- dump's directory (\\copy paths are relative to the current directory):",
        "--     psql -X -v ON_ERROR_STOP=1 -d TARGET -f import.sql",
        "-- Tables are created bare and loaded, then get their keys and indexes, and the",
        "-- foreign keys last: creating a foreign key checks every row.",
        "\\set ON_ERROR_STOP on",
        "BEGIN;",
    ]
    if schema.check_function_bodies_off:
        lines.append("SET LOCAL check_function_bodies = false;")
    lines += [*_pre_data(schema), *_copy_lines(plan), *schema.after_load, *schema.post_data]
    if schema.setvals:
        lines += ["-- Sequences continue after the exported values.", *_quietly(schema.setvals)]
    lines += [*schema.views, *schema.comments, "COMMIT;"]
    return "\n".join(lines) + "\n"


def _quietly(selects: list[str]) -> list[str]:
    """``SELECT`` statements run for their effect, in a ``DO`` block (psql prints no rows)."""
    if not selects:
        return []
    body = ["    PERFORM" + s.removeprefix("SELECT").replace("\n", "\n    ") for s in selects]
    return ["DO $pgreplica$", "BEGIN", *body, "END", "$pgreplica$;"]


def _table_array(tables: list[_Table]) -> str:
    return "ARRAY[" + ", ".join(quote_literal(t.sql_name) for t in tables) + "]::regclass[]"


def _import_existing_sql(plan: _Plan, db_name: str, source: _Source, schema: _Schema) -> str:
    """crates.io's model: the target already has the tables (migrated by the application,
    or made with ``schema.sql``); their rows are replaced, its defaults and triggers kept."""
    lines = _header("import script", plan, db_name, source, schema)
    lines += [
        "-- Loads into an EXISTING database that already has these tables (migrated by the",
        "-- application, or created with schema.sql), REPLACING their rows, in one transaction:",
        "-- the tables' enabled user triggers are disabled, the tables truncated (CASCADE: also",
        "-- the tables whose foreign keys reference them), the CSV files loaded, then the",
        "-- triggers enabled again as they were and the sequences set past the loaded values.",
        "-- Run it from the dump's directory:",
        "--     psql -X -v ON_ERROR_STOP=1 -d TARGET -f import.sql",
        "\\set ON_ERROR_STOP on",
        "BEGIN;",
        f"CREATE TEMPORARY TABLE {_STATE_TABLE.split('.')[1]} (kind text NOT NULL, "
        "relation regclass NOT NULL, name text NOT NULL, saved text) ON COMMIT DROP;",
    ]
    kept = "".join(
        f"\n          AND NOT (t.tgrelid = {quote_literal(table.sql_name)}::regclass"
        f" AND t.tgname = {quote_literal(trigger)})"
        for table, trigger in schema.load_triggers
    )
    lines += [
        "-- User triggers off while loading (those enabled now: they are enabled again after).",
        "DO $pgreplica$",
        "DECLARE",
        "    r record;",
        "BEGIN",
        "    FOR r IN",
        "        SELECT t.tgrelid::regclass AS relation, t.tgname::text AS name,"
        " t.tgenabled::text AS enabled",
        "        FROM pg_catalog.pg_trigger t",
        f"        WHERE t.tgrelid = ANY ({_table_array(plan.tables)})",
        f"          AND NOT t.tgisinternal AND t.tgenabled <> 'D'{kept}",
        "        ORDER BY 1, 2",
        "    LOOP",
        f"        INSERT INTO {_STATE_TABLE} VALUES ('trigger', r.relation, r.name, r.enabled);",
        "        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', r.relation, r.name);",
        "    END LOOP;",
    ]
    if schema.column_defaults:
        values = ",\n                ".join(
            f"({quote_literal(table.sql_name)}::regclass, {quote_literal(column)}, "
            f"{quote_literal(sql)})"
            for table, column, sql in schema.column_defaults
        )
        lines += [
            "    -- Private NOT NULL columns the target has: column_defaults while loading.",
            "    FOR r IN",
            "        SELECT v.relation, v.name, v.value,"
            " pg_catalog.pg_get_expr(d.adbin, d.adrelid) AS saved",
            f"        FROM (VALUES {values}) AS v(relation, name, value)",
            "        JOIN pg_catalog.pg_attribute a ON a.attrelid = v.relation"
            " AND a.attname = v.name AND NOT a.attisdropped",
            "        LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid"
            " AND d.adnum = a.attnum",
            "    LOOP",
            f"        INSERT INTO {_STATE_TABLE} VALUES ('default', r.relation, r.name, r.saved);",
            "        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT %s',"
            " r.relation, r.name, r.value);",
            "    END LOOP;",
        ]
    lines += ["END", "$pgreplica$;"]
    tables = ", ".join(t.sql_name for t in plan.tables)
    lines += [f"TRUNCATE TABLE {tables} RESTART IDENTITY CASCADE;", *_copy_lines(plan)]
    lines += [
        "-- The target's own defaults and triggers back, as they were.",
        "DO $pgreplica$",
        "DECLARE",
        "    r record;",
        "BEGIN",
        f"    FOR r IN SELECT * FROM {_STATE_TABLE} WHERE kind = 'default' LOOP",
        "        IF r.saved IS NULL THEN",
        "            EXECUTE format('ALTER TABLE %s ALTER COLUMN %I DROP DEFAULT',"
        " r.relation, r.name);",
        "        ELSE",
        "            EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT %s',"
        " r.relation, r.name, r.saved);",
        "        END IF;",
        "    END LOOP;",
        f"    FOR r IN SELECT * FROM {_STATE_TABLE} WHERE kind = 'trigger' LOOP",
        "        EXECUTE format('ALTER TABLE %s ENABLE %s TRIGGER %I', r.relation,",
        "                       CASE r.saved WHEN 'A' THEN 'ALWAYS' WHEN 'R' THEN 'REPLICA'"
        " ELSE '' END, r.name);",
        "    END LOOP;",
        "END",
        "$pgreplica$;",
    ]
    if schema.existing_setvals:
        lines += [
            "-- Sequences continue after the loaded values.",
            *_quietly(schema.existing_setvals),
        ]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def _export_sql(plan: _Plan, db_name: str, source: _Source) -> str:
    """The export as a psql script (crates.io ships one for reference): the same queries
    in one ``REPEATABLE READ, READ ONLY`` snapshot."""
    lines = [
        f"-- pgreplica dump: the export of database {db_name!r} from {source.label}, as a psql",
        "-- script, for reference: the queries the dump ran, in one snapshot. Run from a",
        "-- directory with an empty data/ folder:",
        "--     psql -X -v ON_ERROR_STOP=1 -d SOURCE -f export.sql",
        "\\set ON_ERROR_STOP on",
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;",
    ]
    for table in plan.tables:
        query = table.select_sql()
        if "\n" in query:  # \copy is one line; COPY ... \g may span several
            lines.append(f"COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER) \\g '{table.file}'")
        else:
            lines.append(f"\\copy ({query}) TO '{table.file}' WITH (FORMAT csv, HEADER)")
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def _readme(plan: _Plan, metadata: dict[str, Any], schema: _Schema) -> str:
    existing = schema.options.import_mode == "existing"
    rows = "\n".join(f"| `{t.qualified}` | `{t.file}` | {t.rows} |" for t in plan.tables)
    if existing:
        restore = """\
1.  Create the database and its tables: run the application's migrations, or

        createdb DATABASE_NAME
        psql -X -v ON_ERROR_STOP=1 -d DATABASE_NAME -f schema.sql

2.  Run the import script from this directory. It REPLACES the rows of the exported
    tables (and, through `TRUNCATE ... CASCADE`, empties the tables whose foreign keys
    reference them), with their triggers disabled while loading:

        psql -X -v ON_ERROR_STOP=1 -d DATABASE_NAME -f import.sql

It can be run again on the same database: each run replaces the data."""
    else:
        restore = """\
1.  Create a new, empty database.

        createdb DATABASE_NAME

2.  Run the import script from this directory: it creates the schema and loads the data.

        psql -X -v ON_ERROR_STOP=1 -d DATABASE_NAME -f import.sql

`schema.sql` holds the same schema without the data."""
    return f"""\
# Database dump of `{metadata["database"]}`

This is a dump of the public information in the database `{metadata["database"]}`, taken by
`pgreplica dump` in one snapshot at {metadata["snapshot_taken_at"]} (UTC) from a
{metadata["role"]}. Only the columns its visibility file classifies as public are in it.

## Files

- `data/` - the CSV files with the actual data, one per table (with a header line).
- `export.sql` - the `psql` script equivalent to the export that made this dump. It is only
  included for reference.
- `import.sql` - a `psql` script that loads the dump into {
        "a PostgreSQL database with the same schema, destroying the current data of the "
        "exported tables"
        if existing
        else "a new, empty PostgreSQL database"
    }.
- `metadata.json` - the dump's metadata.
- `schema.sql` - the schema of the exported tables (only their exported columns{
        ", and the private ones kept empty" if schema.options.keep_private_columns else ""
    }), with what they need: extensions, types, functions, sequences.

## Metadata fields

- `timestamp` - the UTC time the dump's snapshot was taken.
- `crates_io_commit` - the commit of the application that made the dump, or `unknown`.
- `tables` - per table: its file, its columns, its row filter and its row count.
- `foreign_keys`, `schema`, `warnings` - the foreign keys kept, what the schema holds and
  leaves out, and what the dump warned about.

## Tables

| table | file | rows |
| --- | --- | --- |
{rows}

## Restoring

{restore}
"""


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
    schema: _Schema | None = None,
) -> dict[str, Any]:
    from pgreplica import __version__

    def iso(value: dt.datetime | None) -> str | None:
        return value.astimezone(dt.timezone.utc).isoformat() if value is not None else None

    metadata: dict[str, Any] = {}
    if schema is not None and schema.options.layout == "crates-io":
        utc = taken_at.astimezone(dt.timezone.utc)
        metadata["timestamp"] = utc.isoformat().replace("+00:00", "Z")
        metadata["crates_io_commit"] = schema.options.app_commit or "unknown"
    metadata |= {
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
    }
    if schema is not None:
        metadata["schema"] = schema.metadata
    metadata["warnings"] = plan.warnings
    return metadata


def _write_output(
    staging: Path,
    plan: _Plan,
    schema: _Schema,
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
    """Write the files besides the CSVs into ``staging`` (where ``data/`` already is),
    arranged for the layout; return the metadata."""
    metadata = _metadata(
        plan,
        visibility,
        source,
        db_name,
        jobs,
        lsn=lsn,
        lsn_before=lsn_before,
        replay_ts=replay_ts,
        version=version,
        version_num=version_num,
        taken_at=taken_at,
        schema=schema,
    )
    files = {
        "schema.sql": _schema_sql(plan, db_name, source, schema),
        "import.sql": _import_sql(plan, db_name, source, schema),
        "metadata.json": json.dumps(metadata, indent=2) + "\n",
    }
    if schema.options.layout == "crates-io":
        files["export.sql"] = _export_sql(plan, db_name, source)
        files["README.md"] = _readme(plan, metadata, schema)
    for name, text in files.items():
        (staging / name).write_text(text, encoding="utf-8")
    if schema.options.layout == "crates-io":
        # crates.io's tarball holds one dated folder: YYYY-MM-DD-HHMMSS/ (UTC).
        stamp = taken_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
        top = staging / stamp
        top.mkdir(mode=0o700)
        for entry in sorted(staging.iterdir()):
            if entry != top:
                shutil.move(str(entry), str(top / entry.name))
    return metadata


def _write_tarball(staging: Path, target: Path) -> None:
    """Pack ``staging`` into ``target``: the small files first, then the CSV files in
    import order (parents first), so that an import can follow the download."""
    partial = target.with_name(target.name + ".partial")
    try:
        # Readable by its owner only, like the dump directory (umask aside).
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for path in _tar_order(staging):
                tar.add(path, arcname=path.relative_to(staging).as_posix(), recursive=False)
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)


def _tar_order(staging: Path) -> list[Path]:
    paths = sorted(staging.rglob("*"))
    order: dict[Path, int] = {}
    for metadata in staging.rglob("metadata.json"):
        try:
            tables = json.loads(metadata.read_text(encoding="utf-8"))["tables"]
            for index, table in enumerate(tables):
                order[metadata.parent / table["file"]] = index
        except (OSError, ValueError, KeyError, TypeError):  # pragma: no cover - we wrote it
            continue
    return sorted(paths, key=lambda p: (p in order, order.get(p, 0), p))


# ---------------------------------------------------------------------- command line


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pgreplica dump`` that choose the schema, import mode and layout."""
    group = parser.add_argument_group("schema and import")
    group.add_argument(
        "--fidelity",
        choices=FIDELITIES,
        default="full",
        help="full: defaults, sequences, CHECKs, comments, domains (default); "
        "minimal: column types, keys, indexes, foreign keys",
    )
    group.add_argument(
        "--keep-private-columns",
        action="store_true",
        help="create private columns too (empty: column_defaults or their own default)",
    )
    group.add_argument("--views", action="store_true", help="carry the views that can work")
    group.add_argument(
        "--functions", action="store_true", help="carry every SQL and PL/pgSQL function"
    )
    group.add_argument(
        "--import",
        dest="import_mode",
        choices=IMPORT_MODES,
        default="empty",
        help="import.sql loads into an empty database (default) or an existing, migrated one",
    )
    group.add_argument(
        "--load-trigger",
        dest="load_triggers",
        action="append",
        default=[],
        metavar="TABLE.TRIGGER",
        help="with --import existing: a trigger left enabled while loading (repeatable)",
    )
    group.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="pgreplica",
        help="crates-io: a dated top folder, data/<table>.csv, README.md, export.sql",
    )
    group.add_argument(
        "--app-commit", metavar="SHA", help="recorded as crates_io_commit (crates-io layout)"
    )


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`pgreplica.dump.dump` from those options."""
    return {
        "fidelity": args.fidelity,
        "keep_private_columns": args.keep_private_columns,
        "views": args.views,
        "functions": args.functions,
        "import_mode": args.import_mode,
        "load_triggers": tuple(args.load_triggers),
        "layout": args.layout,
        "app_commit": args.app_commit,
    }
