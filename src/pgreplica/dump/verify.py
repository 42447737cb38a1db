"""Loading a dump without psql (:func:`import_dump`) and proving it loads (``--verify``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg.conninfo import make_conninfo

from pgreplica.config import Settings
from pgreplica.dump._util import DumpError, _connect, _first_line, quote_ident

VERIFY_APPLICATION_NAME = "pgreplica-verify"
_COPY_LINE = re.compile(
    r"\A\\copy\s+(?P<target>.+?)\s+FROM\s+'(?P<file>[^']+)'\s+WITH\s+\(FORMAT csv, HEADER\)\s*\Z"
)


def import_dump(conn: psycopg.Connection[Any], directory: str | os.PathLike[str]) -> None:
    """Run a dump's ``import.sql`` on ``conn`` the way psql would, without psql.

    Understands exactly what ``pgreplica dump`` writes: SQL statements ending with ``;``
    at the end of a line, ``\\set`` (ignored) and ``\\copy ... FROM 'file'`` (sent as
    ``COPY ... FROM STDIN`` with the file's bytes). ``conn`` should be in autocommit
    mode: the script has its own ``BEGIN`` and ``COMMIT``.
    """
    root = Path(directory).resolve()
    script = (root / "import.sql").read_text(encoding="utf-8")
    statement: list[str] = []
    start = 0
    for number, line in enumerate(script.splitlines(), 1):
        if not statement:
            start = number
            if not line.strip() or line.startswith("--"):
                continue
            if line.startswith("\\"):
                _meta_command(conn, root, line, number)
                continue
        statement.append(line)
        if line.rstrip().endswith(";"):
            text = "\n".join(statement)
            statement = []
            try:
                conn.execute(text.encode())
            except psycopg.Error as exc:
                raise DumpError(
                    f"import.sql line {start}: {text.splitlines()[0][:80]}: {_first_line(exc)}"
                ) from None
    if statement:
        raise DumpError(f"import.sql line {start}: statement without a final ';'")


def _meta_command(conn: psycopg.Connection[Any], root: Path, line: str, number: int) -> None:
    if line.startswith("\\set "):
        return
    match = _COPY_LINE.match(line)
    if match is None:
        raise DumpError(f"import.sql line {number}: unsupported psql command {line.split()[0]}")
    path = (root / match["file"]).resolve()
    if root not in path.parents:
        raise DumpError(f"import.sql line {number}: {match['file']} is outside the dump")
    try:
        with (
            path.open("rb") as fh,
            conn.cursor() as cur,
            cur.copy(
                f"COPY {match['target']} FROM STDIN WITH (FORMAT csv, HEADER)".encode()
            ) as copy,
        ):
            while data := fh.read(1 << 20):
                copy.write(data)
    except FileNotFoundError:
        raise DumpError(f"import.sql line {number}: {match['file']} is missing") from None
    except psycopg.Error as exc:
        raise DumpError(
            f"import.sql line {number}: loading {match['file']}: {_first_line(exc)}"
        ) from None


@dataclass(frozen=True)
class VerifyResult:
    """Row counts as loaded, and the number of foreign keys created (so validated)."""

    tables: Mapping[str, int]
    foreign_keys: int
    database: str
    host: str


@contextlib.contextmanager
def _opened_dump(path: Path) -> Iterator[Path]:
    """A dump directory, or a ``.tar.gz`` unpacked into a temporary one."""
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise DumpError(f"{path}: no such dump (a directory or a .tar.gz)")
    with tempfile.TemporaryDirectory(prefix="pgreplica-verify-") as tmp:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if (
                        name.is_absolute()
                        or ".." in name.parts
                        or not (member.isfile() or member.isdir())
                    ):
                        raise DumpError(f"{path}: unexpected member {member.name!r}")
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # pragma: no cover - old Pythons; members were checked above
                    tar.extractall(tmp)
        except tarfile.TarError as exc:
            raise DumpError(f"{path}: not a readable tarball ({exc})") from None
        yield Path(tmp)


def verify(
    path: str | os.PathLike[str],
    settings: Settings,
    *,
    database: str | None = None,
    out: TextIO | None = None,
) -> VerifyResult:
    """Import a dump into a fresh scratch database on the primary and check it.

    The scratch database ``pgreplica_verify_<random>`` is created from ``template0``
    on the primary of ``database`` and dropped afterwards. The import creates the
    foreign keys after loading, which checks every row; then each table's row count must
    match ``metadata.json``. Raises :class:`DumpError` with the reason otherwise.
    """
    out = out or sys.stdout
    config = settings.database(database)
    with _opened_dump(Path(path)) as root:
        try:
            metadata = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
            expected = {t["name"]: int(t["rows"]) for t in metadata["tables"]}
            fk_expected = len(metadata["foreign_keys"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DumpError(f"{path}: no readable metadata.json ({exc})") from None
        scratch = f"pgreplica_verify_{secrets.token_hex(6)}"
        admin = _connect(config.primary.conninfo, VERIFY_APPLICATION_NAME, settings)
        try:
            admin.execute(f"CREATE DATABASE {quote_ident(scratch)} TEMPLATE template0")
            try:
                loaded, fks = _load_and_count(config.primary.conninfo, scratch, root, settings)
            finally:
                admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(scratch)} WITH (FORCE)")
        finally:
            admin.close()
    problems = []
    for name, rows in expected.items():
        got = loaded.get(name)
        status = "ok" if got == rows else "MISMATCH"
        print(f"{name}: {got} rows loaded, {rows} in metadata.json: {status}", file=out)
        if got != rows:
            problems.append(f"{name} has {got} rows, metadata.json says {rows}")
    extra = sorted(set(loaded) - set(expected))
    if extra:
        problems.append(f"import.sql created tables not in metadata.json: {', '.join(extra)}")
    print(f"foreign keys: {fks} created and validated ({fk_expected} in metadata.json)", file=out)
    if fks != fk_expected:
        problems.append(f"{fks} foreign keys created, metadata.json lists {fk_expected}")
    if problems:
        raise DumpError("verify failed: " + "; ".join(problems))
    print(
        f"verify: OK ({len(expected)} tables, {sum(expected.values())} rows, {fks} foreign "
        f"keys; scratch database {scratch} on {config.primary.label}, dropped)",
        file=out,
    )
    return VerifyResult(loaded, fks, scratch, config.primary.label)


def _load_and_count(
    conninfo: str, scratch: str, root: Path, settings: Settings
) -> tuple[dict[str, int], int]:
    with _connect(
        make_conninfo(conninfo, dbname=scratch), VERIFY_APPLICATION_NAME, settings
    ) as conn:
        try:
            import_dump(conn, root)
        except DumpError as exc:
            raise DumpError(f"verify failed: {exc}") from None
        counts: dict[str, int] = {}
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, name in tables:
            row = conn.execute(
                f"SELECT count(*) FROM {quote_ident(schema)}.{quote_ident(name)}"
            ).fetchone()
            assert row is not None
            counts[f"{schema}.{name}"] = int(row[0])
        fk_row = conn.execute(
            "SELECT count(*) FILTER (WHERE convalidated), count(*) FROM pg_constraint "
            "WHERE contype = 'f'"
        ).fetchone()
        assert fk_row is not None
        if fk_row[0] != fk_row[1]:
            raise DumpError(f"verify failed: {fk_row[1] - fk_row[0]} foreign keys not validated")
        return counts, int(fk_row[0])
