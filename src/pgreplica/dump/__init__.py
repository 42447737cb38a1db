"""``pgreplica dump``: a consistent, deny-by-default export that runs on a replica.

An export job is a long read that belongs on a replica, and one that quietly runs on the
primary is a bug nobody notices until the primary is slow (crates.io's database dump ran
on the primary for weeks because of a misspelt variable, and could not have run on the
replica anyway: it created views and asked for SERIALIZABLE). So this tool:

* picks a healthy replica of the configured database with the prober (up, in recovery,
  in the read set) and never falls back to the primary unless ``--allow-primary`` is
  given, and then says so on stderr; a database without replicas is an error naming the
  setting, not a silent switch;
* reads everything in ONE snapshot: ``BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY``
  (SERIALIZABLE is refused on a hot standby), shared with ``--jobs`` workers through
  ``pg_export_snapshot()`` / ``SET TRANSACTION SNAPSHOT``, each worker on its own
  connection to the same replica; nothing is created on the server;
* exports only what a visibility file declares (pgreplica's format or crates.io's
  ``dump-db.toml`` as written): every column of every exported table is ``public`` or
  ``private`` (an unclassified column is an error, checked against the live catalog
  before any row is read; ``--check-visibility`` does only that, for CI), private
  columns are never selected, tables may have a row filter, and tables not listed are
  not exported (a warning names them);
* keeps foreign keys intact: a child of a filtered parent keeps only rows whose parent is
  exported, checked against the parent's kept keys once per query (transitively); a
  nullable reference to a row left out is exported as NULL; keys must be public;
* writes ``schema.sql`` (by default with defaults, sequences, CHECKs and comments, and
  the extensions and functions it needs, so the import takes new rows), one CSV per table
  (a big table split across workers gives the same file), ``import.sql`` (psql; into an
  empty database or an existing, migrated one) and ``metadata.json``, to a directory or a
  ``.tar.gz``, and can re-import a dump into a scratch database to prove it loads with
  every foreign key valid (``--verify``); a recovery conflict starts the export again in
  a fresh snapshot.

See ``docs/dump.md``.

The package, one job a module: :mod:`~pgreplica.dump.visibility` (the visibility file),
:mod:`~pgreplica.dump.catalog` (matching it with the catalog: the plan, the foreign key
checks, the DDL), :mod:`~pgreplica.dump.schema` (what a full-fidelity schema adds),
:mod:`~pgreplica.dump.check` (``--check-visibility``), :mod:`~pgreplica.dump.source`
(choosing the host),
:mod:`~pgreplica.dump.progress` (stderr), :mod:`~pgreplica.dump.workers` (the COPYs),
:mod:`~pgreplica.dump.output` (schema.sql, import.sql, metadata.json, the tarball),
:mod:`~pgreplica.dump.export` (:func:`dump`), :mod:`~pgreplica.dump.verify` (``--verify``
and :func:`import_dump`) and :mod:`~pgreplica.dump.cli` (the command's options).
"""

from __future__ import annotations

from pgreplica.dump._util import APPLICATION_NAME, DumpError
from pgreplica.dump._util import quote_ident as quote_ident
from pgreplica.dump._util import quote_literal as quote_literal
from pgreplica.dump.check import CheckResult, check_schema, check_visibility
from pgreplica.dump.cli import add_arguments, run
from pgreplica.dump.export import dump
from pgreplica.dump.output import FORMAT_VERSION as FORMAT_VERSION
from pgreplica.dump.progress import DumpResult
from pgreplica.dump.verify import VERIFY_APPLICATION_NAME as VERIFY_APPLICATION_NAME
from pgreplica.dump.verify import VerifyResult, import_dump, verify
from pgreplica.dump.visibility import PRIVATE as PRIVATE
from pgreplica.dump.visibility import PUBLIC as PUBLIC
from pgreplica.dump.visibility import TableRule, Visibility, VisibilityError
from pgreplica.dump.workers import copy_out as copy_out

__all__ = [
    "APPLICATION_NAME",
    "CheckResult",
    "DumpError",
    "DumpResult",
    "TableRule",
    "VerifyResult",
    "Visibility",
    "VisibilityError",
    "add_arguments",
    "check_schema",
    "check_visibility",
    "dump",
    "import_dump",
    "run",
    "verify",
]
