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

    Understands what ``pgreplica dump`` writes: SQL statements split as psql splits them
    (quotes, dollar quotes, comments and ``BEGIN ATOMIC`` bodies kept whole), ``\\set``
    (ignored) and ``\\copy ... FROM 'file'`` (sent as ``COPY ... FROM STDIN`` with the
    file's bytes). ``conn`` should be in autocommit mode: the script has its own ``BEGIN``
    and ``COMMIT``. ``directory`` is the dump's directory, or the folder holding the dated
    directory of crates.io's layout. A dump made for an existing database
    (``import_mode="existing"``) needs its tables in place first: run ``schema.sql`` with
    :func:`run_script`, or the application's migrations.
    """
    run_script(conn, directory, "import.sql")


def run_script(conn: psycopg.Connection[Any], directory: str | os.PathLike[str], name: str) -> None:
    """Run one of a dump's psql scripts (``schema.sql``, ``import.sql``) on ``conn``."""
    root = _dump_root(Path(directory).resolve())
    script = (root / name).read_text(encoding="utf-8")
    for number, text, meta in _split_script(script, name):
        if meta:
            _meta_command(conn, root, text, number, name)
            continue
        if not text.rstrip().endswith(";"):
            raise DumpError(f"{name} line {number}: statement without a final ';'")
        try:
            conn.execute(text.encode())
        except psycopg.Error as exc:
            raise DumpError(
                f"{name} line {number}: {text.strip().splitlines()[0][:80]}: {_first_line(exc)}"
            ) from None


def _dump_root(path: Path) -> Path:
    """The directory holding metadata.json: ``path``, or its one dated folder."""
    if (path / "metadata.json").is_file() or not path.is_dir():
        return path
    inner = [d for d in path.iterdir() if d.is_dir() and (d / "metadata.json").is_file()]
    return inner[0] if len(inner) == 1 else path


_IDENT_START = re.compile(r"[A-Za-z_\x80-\U0010ffff]")
_IDENT = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")


def _split_script(script: str, name: str = "import.sql") -> Iterator[tuple[int, str, bool]]:
    """(first line, text, is a psql meta-command) for each statement of a psql script.

    A statement ends at a ``;`` outside quotes, dollar quotes, comments and the
    ``BEGIN ... END`` of a ``CREATE FUNCTION ... BEGIN ATOMIC`` body (psql's own rule); a
    line starting with a backslash between statements is a meta-command.
    """
    i, n, line = 0, len(script), 1
    start = -1
    start_line = 0
    words: list[str] = []
    depth = parens = 0

    def skip_to(end: int) -> int:
        nonlocal line
        line += script.count("\n", i, end)
        return end

    while i < n:
        ch = script[i]
        if start < 0:
            if ch in " \t\r\n":
                line += ch == "\n"
                i += 1
                continue
            if script.startswith("--", i) or ch == "\\":
                end = script.find("\n", i)
                end = n if end < 0 else end
                if ch == "\\":
                    yield line, script[i:end], True
                i = end
                continue
            start, start_line, words, depth, parens = i, line, [], 0, 0
        if ch == "'":
            escapes = i > 0 and script[i - 1] in "Ee" and not _word_char(script, i - 2)
            j = i + 1
            while True:
                if j >= n:
                    raise DumpError(f"{name} line {line}: unterminated quoted string")
                if escapes and script[j] == "\\":
                    j += 2
                    continue
                if script[j] == "'":
                    if script.startswith("''", j):
                        j += 2
                        continue
                    break
                j += 1
            i = skip_to(j + 1)
            continue
        if ch == '"':
            j = i + 1
            while True:
                j = script.find('"', j)
                if j < 0:
                    raise DumpError(f"{name} line {line}: unterminated quoted identifier")
                if script.startswith('""', j):
                    j += 2
                    continue
                break
            i = skip_to(j + 1)
            continue
        if ch == "$" and not _word_char(script, i - 1):
            tag = _DOLLAR_TAG.match(script, i)
            if tag is not None:
                end = script.find(tag.group(0), tag.end())
                if end < 0:
                    raise DumpError(f"{name} line {line}: unterminated dollar-quoted string")
                i = skip_to(end + len(tag.group(0)))
                continue
        if script.startswith("--", i):
            end = script.find("\n", i)
            i = n if end < 0 else end
            continue
        if script.startswith("/*", i):
            nesting, j = 1, i + 2
            while nesting:
                if j >= n:
                    raise DumpError(f"{name} line {line}: unterminated /* comment")
                if script.startswith("/*", j):
                    nesting, j = nesting + 1, j + 2
                elif script.startswith("*/", j):
                    nesting, j = nesting - 1, j + 2
                else:
                    j += 1
            i = skip_to(j)
            continue
        if _IDENT_START.match(ch) and not _word_char(script, i - 1):
            match = _IDENT.match(script, i)
            assert match is not None
            word = match.group(0).lower()
            words.append(word)
            if parens == 0 and _is_create_function(words):
                if word == "begin" or (word == "case" and depth > 0):
                    depth += 1
                elif word == "end" and depth > 0:
                    depth -= 1
            i = match.end()
            continue
        if ch == "(":
            parens += 1
        elif ch == ")":
            parens -= 1
        elif ch == ";" and depth == 0:
            yield start_line, script[start : i + 1], False
            start = -1
        elif ch == "\n":
            line += 1
        i += 1
    if start >= 0 and script[start:].strip():
        yield start_line, script[start:], False


def _word_char(text: str, index: int) -> bool:
    return index >= 0 and (text[index].isalnum() or text[index] in "_$")


def _is_create_function(words: list[str]) -> bool:
    """psql's test for a statement whose BEGIN ... END must be kept whole."""
    if not words or words[0] != "create" or len(words) < 2:
        return False
    if words[1] in ("function", "procedure"):
        return True
    return (
        words[1:3] == ["or", "replace"] and len(words) > 3 and words[3] in ("function", "procedure")
    )


def _meta_command(
    conn: psycopg.Connection[Any], root: Path, line: str, number: int, name: str = "import.sql"
) -> None:
    if line.startswith("\\set "):
        return
    match = _COPY_LINE.match(line)
    if match is None:
        raise DumpError(f"{name} line {number}: unsupported psql command {line.split()[0]}")
    path = (root / match["file"]).resolve()
    if root not in path.parents:
        raise DumpError(f"{name} line {number}: {match['file']} is outside the dump")
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
        raise DumpError(f"{name} line {number}: {match['file']} is missing") from None
    except psycopg.Error as exc:
        raise DumpError(
            f"{name} line {number}: loading {match['file']}: {_first_line(exc)}"
        ) from None


@dataclass(frozen=True)
class VerifyResult:
    """Row counts as loaded, the number of foreign keys created (so validated), and of
    sequences found set past the loaded values."""

    tables: Mapping[str, int]
    foreign_keys: int
    database: str
    host: str
    sequences: int = 0


@contextlib.contextmanager
def _opened_dump(path: Path) -> Iterator[Path]:
    """A dump directory, or a ``.tar.gz`` unpacked into a temporary one (in crates.io's
    layout, the dated directory inside)."""
    if path.is_dir():
        yield _dump_root(path)
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
        yield _dump_root(Path(tmp))


def verify(
    path: str | os.PathLike[str],
    settings: Settings,
    *,
    database: str | None = None,
    out: TextIO | None = None,
) -> VerifyResult:
    """Import a dump into a fresh scratch database on the primary and check it.

    The scratch database ``pgreplica_verify_<random>`` is created from ``template0``
    on the primary of ``database`` and dropped afterwards. ``import.sql`` creates the
    extensions the schema needs, and the foreign keys after loading, which checks every
    row; then each table's row count must match ``metadata.json``, and each sequence must
    be past the loaded values (so that the database takes new rows). A dump made for an
    existing database gets its ``schema.sql`` first, then ``import.sql``. Raises
    :class:`DumpError` with the reason otherwise.
    """
    out = out or sys.stdout
    config = settings.database(database)
    with _opened_dump(Path(path)) as root:
        try:
            metadata = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
            expected = {t["name"]: int(t["rows"]) for t in metadata["tables"]}
            fk_expected = len(metadata["foreign_keys"])
            schema = metadata.get("schema") or {}
            existing = schema.get("import") == "existing"
            sequences = list(schema.get("sequences") or [])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DumpError(f"{path}: no readable metadata.json ({exc})") from None
        scratch = f"pgreplica_verify_{secrets.token_hex(6)}"
        admin = _connect(config.primary.conninfo, VERIFY_APPLICATION_NAME, settings)
        try:
            admin.execute(f"CREATE DATABASE {quote_ident(scratch)} TEMPLATE template0")
            try:
                loaded, fks, seq_problems = _load_and_count(
                    config.primary.conninfo, scratch, root, settings, existing, sequences
                )
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
    if sequences:
        good = len(sequences) - len(seq_problems)
        print(f"sequences: {good} of {len(sequences)} past the loaded values", file=out)
        problems += seq_problems
    if problems:
        raise DumpError("verify failed: " + "; ".join(problems))
    how = "schema.sql, then import.sql" if existing else "import.sql"
    print(
        f"verify: OK ({len(expected)} tables, {sum(expected.values())} rows, {fks} foreign "
        f"keys, {len(sequences)} sequences; {how} in scratch database {scratch} on "
        f"{config.primary.label}, dropped)",
        file=out,
    )
    return VerifyResult(loaded, fks, scratch, config.primary.label, len(sequences))


_NOT_EXTENSION = (
    "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass "
    "AND d.objid = {oid} AND d.deptype = 'e')"
)


def _load_and_count(
    conninfo: str,
    scratch: str,
    root: Path,
    settings: Settings,
    existing: bool = False,
    sequences: list[Any] | None = None,
) -> tuple[dict[str, int], int, list[str]]:
    with _connect(
        make_conninfo(conninfo, dbname=scratch), VERIFY_APPLICATION_NAME, settings
    ) as conn:
        try:
            if existing:  # the tables first, as the application's migrations would
                run_script(conn, root, "schema.sql")
            import_dump(conn, root)
        except DumpError as exc:
            raise DumpError(f"verify failed: {exc}") from None
        counts: dict[str, int] = {}
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND "
            + _NOT_EXTENSION.format(catalog="pg_class", oid="c.oid")
        ).fetchall()
        for schema, name in tables:
            row = conn.execute(
                f"SELECT count(*) FROM {quote_ident(schema)}.{quote_ident(name)}"
            ).fetchone()
            assert row is not None
            counts[f"{schema}.{name}"] = int(row[0])
        fk_row = conn.execute(
            "SELECT count(*) FILTER (WHERE convalidated), count(*) FROM pg_constraint c "
            "WHERE contype = 'f' AND " + _NOT_EXTENSION.format(catalog="pg_class", oid="c.conrelid")
        ).fetchone()
        assert fk_row is not None
        if fk_row[0] != fk_row[1]:
            raise DumpError(f"verify failed: {fk_row[1] - fk_row[0]} foreign keys not validated")
        return counts, int(fk_row[0]), _check_sequences(conn, sequences or [])


def _check_sequences(conn: psycopg.Connection[Any], sequences: list[Any]) -> list[str]:
    """Each sequence's next value must be beyond the loaded values of its columns."""
    problems: list[str] = []
    for entry in sequences:
        name, increment = str(entry["name"]), int(entry.get("increment", 1))
        row = conn.execute("SELECT to_regclass(%s)::text", (name,)).fetchone()
        if row is None or row[0] is None:
            problems.append(f"sequence {name} was not created")
            continue
        relation = str(row[0])  # as the server quotes it
        state = conn.execute(f"SELECT last_value, is_called FROM {relation}").fetchone()
        assert state is not None
        last, called = int(state[0]), bool(state[1])
        pick = "max" if increment > 0 else "min"
        for column in entry.get("columns", []):
            table = f"{quote_ident(column['schema'])}.{quote_ident(column['table'])}"
            found = conn.execute(
                f"SELECT {pick}({quote_ident(column['column'])})::bigint FROM {table}"
            ).fetchone()
            value = None if found is None else found[0]
            if value is None:
                continue
            ahead = (
                (last >= value if called else last > value)
                if increment > 0
                else (last <= value if called else last < value)
            )
            if not ahead:
                problems.append(
                    f"sequence {name} would give {last + increment if called else last}, "
                    f"already in {column['schema']}.{column['table']}.{column['column']}"
                )
    return problems
