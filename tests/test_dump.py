"""``pgreplica dump`` on the local cluster: a replica-only, consistent, deny-by-default
export whose output re-imports with every foreign key intact.

The module creates its own database ``pgreplica_dump_test`` on the session cluster (the
replicas replay it) so that the exported tables are known exactly; it is dropped at the
end. Expected results are computed independently with plain SQL on a replica.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dump_support import database_dsn, filled_database
from pgreplica.cli import main
from pgreplica.config import Settings
from pgreplica.dump import DumpError, Visibility, dump, verify
from pgreplica.localcluster import find_bindir
from pgreplica.testing import LocalCluster
from secrets_registry import register_secret

DB = "pgreplica_dump_test"
USERS, CRATES, VERSIONS = 2000, 6000, 30000
ORDERS = 40000

SCHEMA = f"""
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE users (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    is_banned boolean NOT NULL DEFAULT false,
    mood mood
);
CREATE TABLE crates (
    id bigint PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES users,
    name text NOT NULL UNIQUE,
    is_private boolean NOT NULL DEFAULT false,
    api_token text
);
CREATE INDEX crates_api_token_idx ON crates (api_token);
CREATE TABLE versions (
    id bigint PRIMARY KEY,
    crate_id bigint NOT NULL REFERENCES crates,
    num text NOT NULL,
    yanked_by bigint REFERENCES users
);
CREATE INDEX versions_num_idx ON versions (num);
CREATE TABLE employees (id int PRIMARY KEY, manager_id int REFERENCES employees, name text);
CREATE TABLE sessions (id int PRIMARY KEY, token text);
CREATE TABLE profiles (id int PRIMARY KEY, bio text);
CREATE TABLE orders (id bigserial PRIMARY KEY, note text NOT NULL);
CREATE TABLE order_lines (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES orders,
    n int NOT NULL
);
CREATE TABLE order_counter (id int PRIMARY KEY, n bigint NOT NULL);

INSERT INTO users
SELECT g, 'user ' || g, 'secret-' || g || '@mail.test', g % 10 = 0,
       (ARRAY['sad', 'ok', 'happy'])[1 + g % 3]::mood
FROM generate_series(1, {USERS}) g;
INSERT INTO crates
SELECT g, 1 + g % {USERS}, 'crate-' || g, g % 7 = 0, 'tok-' || g || '-sekrit'
FROM generate_series(1, {CRATES}) g;
INSERT INTO versions
SELECT g, 1 + g % {CRATES}, '1.' || g, CASE WHEN g % 5 = 0 THEN 1 + g % {USERS} END
FROM generate_series(1, {VERSIONS}) g;
INSERT INTO employees SELECT g, CASE WHEN g > 1 THEN g / 2 END, 'emp ' || g
FROM generate_series(1, 500) g;
INSERT INTO sessions SELECT g, 'session-' || g FROM generate_series(1, 10) g;
INSERT INTO profiles SELECT g, 'bio ' || g FROM generate_series(1, 10) g;
INSERT INTO orders (note)
SELECT 'order, "quoted"' || chr(10) || g FROM generate_series(1, {ORDERS}) g;
INSERT INTO order_lines (order_id, n)
SELECT 1 + (g - 1) / 2, g FROM generate_series(1, {2 * ORDERS}) g;
INSERT INTO order_counter VALUES (1, {ORDERS});
ANALYZE;
"""

VISIBILITY = """
[tables.users]
filter = "NOT is_banned"
[tables.users.columns]
id = "public"
name = "public"
email = "private"
is_banned = "private"
mood = "public"

[tables.crates]
filter = "NOT is_private"
[tables.crates.columns]
id = "public"
owner_id = "public"
name = "public"
is_private = "private"
api_token = "private"

[tables.versions]
columns = { id = "public", crate_id = "public", num = "public", yanked_by = "public" }

[tables.employees]
columns = { id = "public", manager_id = "public", name = "public" }

[tables.orders]
columns = { id = "public", note = "public" }

[tables.order_lines]
columns = { id = "public", order_id = "public", n = "public" }

[tables.order_counter]
columns = { id = "public", n = "public" }
"""

PRIVATE_COLUMNS = ("email", "is_banned", "is_private", "api_token")
PRIVATE_VALUES = ("secret-", "@mail.test", "sekrit")


def db_dsn(cluster: LocalCluster, index: int) -> str:
    return database_dsn(cluster, index, DB)


def password_of(cluster: LocalCluster) -> str:
    return cluster.primary_dsn.split(":")[2].split("@")[0]


@pytest.fixture(scope="module")
def dumpdb(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster with the test database created, filled and replayed."""
    with filled_database(cluster, DB, SCHEMA):
        yield cluster


@pytest.fixture
def config(dumpdb: LocalCluster, tmp_path: Path) -> Path:
    """A pgreplica config for the test database, plus a database ``lonely`` without
    replicas."""
    replicas = ", ".join(f'"{db_dsn(dumpdb, i)}"' for i in (1, 2))
    path = tmp_path / "pgreplica.toml"
    path.write_text(
        f'[databases.main]\nprimary = "{db_dsn(dumpdb, 0)}"\nreplicas = [{replicas}]\n'
        f'[databases.lonely]\nprimary = "{db_dsn(dumpdb, 0)}"\n'
    )
    return path


@pytest.fixture
def visibility(tmp_path: Path) -> Path:
    path = tmp_path / "visibility.toml"
    path.write_text(VISIBILITY)
    return path


def on_primary(cluster: LocalCluster, sql: str) -> None:
    with psycopg.connect(db_dsn(cluster, 0), autocommit=True) as conn:
        conn.execute(sql)


def replica_rows(cluster: LocalCluster, sql: str, replica: int = 1) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_dsn(cluster, replica), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def all_text(directory: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(directory.rglob("*.*")))


def base_argv(config: Path, visibility: Path) -> list[str]:
    return ["dump", "--config", str(config), "--visibility", str(visibility)]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------- consistency


class Writer(threading.Thread):
    """Keeps committing one order, its two lines and the counter, in one transaction."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        row = conn.execute(
                            "INSERT INTO orders (note) VALUES ('live') RETURNING id"
                        ).fetchone()
                        assert row is not None
                        conn.execute(
                            "INSERT INTO order_lines (order_id, n) VALUES (%s, 1), (%s, 2)",
                            (row[0], row[0]),
                        )
                        conn.execute("UPDATE order_counter SET n = n + 1 WHERE id = 1")
                    self.commits += 1
        except BaseException as exc:
            self.error = exc


class Sampler(threading.Thread):
    """Samples pg_stat_activity of one server for the dump's connections."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.seen: set[str] = set()
        self.samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, application_name="sampler") as c:
                while not self.stop.is_set():
                    rows = c.execute(
                        "SELECT application_name FROM pg_stat_activity "
                        "WHERE application_name LIKE 'pgreplica-dump%%'"
                    ).fetchall()
                    self.seen.update(r[0] for r in rows)
                    self.samples += 1
                    time.sleep(0.001)
        except BaseException as exc:
            self.error = exc


def test_dump_on_a_replica_is_one_snapshot_under_concurrent_writes(
    dumpdb: LocalCluster,
    config: Path,
    visibility: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Four workers COPY while a writer commits order + 2 lines + counter on the primary:
    the dump still holds exactly 2 lines per order and a counter equal to the orders,
    came from a replica, and the primary never saw a dump connection."""
    before = replica_rows(dumpdb, "SELECT n FROM order_counter")[0][0]
    writer = Writer(db_dsn(dumpdb, 0))
    on_primary, on_replicas = (
        Sampler(db_dsn(dumpdb, 0)),
        [Sampler(db_dsn(dumpdb, i)) for i in (1, 2)],
    )
    samplers = [on_primary, *on_replicas]
    writer.start()
    for sampler in samplers:
        sampler.start()
    try:
        while writer.commits < 50 and writer.is_alive():
            time.sleep(0.01)
        dumpdb.wait_replayed()
        out = tmp_path / "dump"
        code, stdout, stderr = run_cli(
            [*base_argv(config, visibility), "--out", str(out), "--jobs", "4"],
            capsys,
        )
        commits_at_dump_end = writer.commits
        while writer.commits < commits_at_dump_end + 50 and writer.is_alive():
            time.sleep(0.01)
    finally:
        writer.stop.set()
        writer.join()
        for sampler in samplers:
            sampler.stop.set()
            sampler.join()
    assert writer.error is None and all(s.error is None for s in samplers)
    assert code == 0, stderr
    assert on_primary.samples > 10 and on_primary.seen == set()
    assert "pgreplica-dump" in set().union(*(s.seen for s in on_replicas))

    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["role"] == "replica"
    assert metadata["host"] in {f"127.0.0.1:{dumpdb.port(i)}/{DB}" for i in (1, 2)}
    assert metadata["isolation"] == "REPEATABLE READ, READ ONLY"
    tables = {t["name"]: t for t in metadata["tables"]}

    _, orders = read_csv(out / tables["public.orders"]["file"])
    _, lines = read_csv(out / tables["public.order_lines"]["file"])
    _, counter = read_csv(out / tables["public.order_counter"]["file"])
    order_ids = {row[0] for row in orders}
    assert len(lines) == 2 * len(orders)
    assert {row[1] for row in lines} == order_ids  # every line's order, every order's lines
    exported_counter = int(counter[0][1])
    assert exported_counter == len(orders)
    # The snapshot fell inside the writes: after some of the writer's commits, before others.
    assert before < exported_counter < before + writer.commits
    for table in tables.values():
        assert len(read_csv(out / table["file"])[1]) == table["rows"]

    code, stdout, stderr = run_cli(["dump", "--verify", str(out), "--config", str(config)], capsys)
    assert code == 0, stderr
    assert stdout.rstrip().splitlines()[-1].startswith("verify: OK")
    assert "foreign keys: 5 created and validated" in stdout


def test_jobs_4_export_the_same_data_as_jobs_1(
    dumpdb: LocalCluster, config: Path, visibility: Path, tmp_path: Path
) -> None:
    dumpdb.wait_replayed()  # both dumps see the same data, whichever replica they pick
    settings = Settings.from_toml(config)
    vis = Visibility.load(visibility)
    one = dump(settings, vis, tmp_path / "one", jobs=1, quiet=True, stderr=io.StringIO())
    four = dump(settings, vis, tmp_path / "four", jobs=4, quiet=True, stderr=io.StringIO())
    assert one.tables == four.tables and sum(one.tables.values()) > 100_000
    files = sorted(p.relative_to(one.out) for p in (one.out / "data").iterdir())
    assert files == sorted(p.relative_to(four.out) for p in (four.out / "data").iterdir())
    for name in files:
        a, b = (one.out / name).read_bytes(), (four.out / name).read_bytes()
        assert sorted(a.splitlines()) == sorted(b.splitlines()), name
    for name in ("schema.sql", "import.sql"):
        assert (one.out / name).read_text() == (four.out / name).read_text()


def test_a_failure_mid_export_stops_every_worker_and_leaves_nothing(
    dumpdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One table's filter divides by zero when its rows are read (planning is fine) while
    other workers copy: the error is reported, no file or staging directory remains, and
    no dump connection is left on the replicas."""
    vis = write(
        tmp_path,
        VISIBILITY.replace(
            "[tables.order_counter]\n", '[tables.order_counter]\nfilter = "1 / (n - n) = 0"\n'
        ),
    )
    out = tmp_path / "dump"
    code, _, stderr = run_cli([*base_argv(config, vis), "--out", str(out), "--jobs", "4"], capsys)
    assert code == 1 and "division by zero" in stderr, stderr
    assert sorted(tmp_path.iterdir()) == sorted([config, vis])
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgreplica-dump'"
    for replica in (1, 2):
        deadline = time.monotonic() + 5  # a closed session's backend exits a moment later
        while (left := replica_rows(dumpdb, sql, replica)) != [(0,)]:
            assert time.monotonic() < deadline, (replica, left)
            time.sleep(0.02)


# ---------------------------------------------------------------------- visibility and keys


def test_filters_follow_foreign_keys_and_private_columns_never_leave(
    dumpdb: LocalCluster,
    config: Path,
    visibility: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Banned users' crates, private crates' versions and versions yanked by banned users
    are left out (semi-joins, transitively); private columns are in no file."""
    out = tmp_path / "dump"
    code, _, stderr = run_cli(
        ["dump", "--config", str(config), "--visibility", str(visibility), "--out", str(out)],
        capsys,
    )
    assert code == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines()]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("not exported: public.profiles, public.sessions" in w for w in warnings)

    metadata = json.loads((out / "metadata.json").read_text())
    rows = {t["name"]: t["rows"] for t in metadata["tables"]}
    expected = {
        "public.users": "SELECT count(*) FROM users WHERE NOT is_banned",
        "public.crates": "SELECT count(*) FROM crates c JOIN users u ON u.id = c.owner_id "
        "WHERE NOT c.is_private AND NOT u.is_banned",
        "public.versions": "SELECT count(*) FROM versions v JOIN crates c ON c.id = v.crate_id "
        "JOIN users u ON u.id = c.owner_id LEFT JOIN users y ON y.id = v.yanked_by "
        "WHERE NOT c.is_private AND NOT u.is_banned AND NOT coalesce(y.is_banned, false)",
        "public.employees": "SELECT count(*) FROM employees",
    }
    for table, sql in expected.items():
        assert rows[table] == replica_rows(dumpdb, sql)[0][0], table
    assert rows["public.versions"] < VERSIONS and rows["public.crates"] < CRATES

    for table in metadata["tables"]:
        header, _ = read_csv(out / table["file"])
        assert header == table["columns"]
        assert not set(header) & set(PRIVATE_COLUMNS)
    schema = (out / "schema.sql").read_text()
    for table in metadata["tables"]:  # the filters name private columns, as declared
        del table["filter"], table["row_filter"]
    text = all_text(out).replace((out / "metadata.json").read_text(), json.dumps(metadata))
    for word in (*PRIVATE_COLUMNS, *PRIVATE_VALUES, "crates_api_token_idx", "users_email_key"):
        assert word not in text, word
    assert "CREATE INDEX versions_num_idx" in schema
    assert "CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy')" in schema
    assert "REFERENCES public.employees(id)" in schema  # a self-reference without filter

    code, stdout, stderr = run_cli(["dump", "--verify", str(out), "--config", str(config)], capsys)
    assert code == 0, stderr
    assert "verify: OK" in stdout


def test_import_sql_loads_with_psql(
    dumpdb: LocalCluster, config: Path, visibility: Path, tmp_path: Path
) -> None:
    """The psql path: ``psql -f import.sql`` from the dump directory, into an empty
    database, leaves every table and foreign key in place."""
    out = tmp_path / "dump"
    result = dump(Settings.from_toml(config), Visibility.load(visibility), out, quiet=True)
    target = "pgreplica_dump_psql"
    dumpdb.execute(0, f"CREATE DATABASE {target} TEMPLATE template0")
    try:
        dsn = dumpdb.dsn(0)[: -len("postgres")] + target
        psql = os.path.join(find_bindir(), "psql")
        proc = subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "import.sql"],
            cwd=out,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table, rows in result.tables.items():
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (rows,)
            fks = conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'")
            assert fks.fetchone() == (len(result.metadata["foreign_keys"]),)
    finally:
        dumpdb.execute(0, f"DROP DATABASE IF EXISTS {target} WITH (FORCE)")


def write(tmp_path: Path, text: str, name: str = "vis.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unclassified_column_fails_before_any_row_is_read(
    dumpdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first table's filter divides by zero on every row it reads: the error is the
    unclassified column of the second table, so no row was read before the check."""
    vis = write(
        tmp_path,
        '[tables.orders]\ncolumns = { id = "public", note = "public" }\n'
        'filter = "1 / (id - id) = 0"\n'
        '[tables.users]\ncolumns = { id = "public", name = "public", email = "private", '
        'is_banned = "private" }\n',
    )
    out = tmp_path / "dump"
    code, _, stderr = run_cli(
        ["dump", "--config", str(config), "--visibility", str(vis), "--out", str(out)], capsys
    )
    assert code == 1
    assert "public.users.mood" in stderr and "not classified" in stderr
    assert "division by zero" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".pgreplica-dump-*"))


def test_a_new_column_stops_the_dump_until_classified(
    dumpdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vis = write(tmp_path, '[tables.profiles]\ncolumns = { id = "public", bio = "public" }\n')
    argv = ["dump", "--config", str(config), "--visibility", str(vis), "--quiet"]
    assert run_cli([*argv, "--out", str(tmp_path / "a")], capsys)[0] == 0
    on_primary(dumpdb, "ALTER TABLE profiles ADD COLUMN phone text")
    try:
        dumpdb.wait_replayed()
        code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "b")], capsys)
    finally:
        on_primary(dumpdb, "ALTER TABLE profiles DROP COLUMN phone")
        dumpdb.wait_replayed()
    assert code == 1 and "public.profiles.phone" in stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[tables.nosuch]\ncolumns = { id = "public" }\n',
            "tables.nosuch: public.nosuch does not exist",
        ),
        (
            '[tables.profiles]\ncolumns = { id = "public", bio = "public", bi0 = "public" }\n',
            "classified columns that do not exist: tables.profiles.columns.bi0",
        ),
        (
            '[tables.profiles]\ncolumns = { id = "public", bio = "secret" }\n',
            'tables.profiles.columns.bio: expected "public" or "private"',
        ),
        (
            '[tables.profiles]\ncolumns = { id = "public", bio = "public" }\n'
            'filter = "true; DELETE FROM profiles"\n',
            "tables.profiles.filter: must not contain ';'",
        ),
        (
            '[tables.profiles]\ncolumns = { id = "public", bio = "public" }\n'
            'filter = "true) UNION SELECT 1, token FROM sessions WHERE (true"\n',
            "tables.profiles.filter: not a SQL expression",
        ),
        (
            '[tables.profiles]\ncolumns = { id = "public", bio = "public" }\n'
            'filter = "true UNION SELECT 1"\n',
            "tables.profiles.filter: must be a single boolean expression",
        ),
        (
            '[tables.profiles]\ncolumns = { id = "public", bio = "public" }\n'
            'filter = "no_such_column > 1"\n',
            "tables.profiles.filter: the row filter of public.profiles does not compile",
        ),
        (
            '[tables.profiles]\ncolumns = { id = "private", bio = "public" }\n',
            "keys must be public",
        ),
        (
            '[tables.users]\ncolumns = { id = "public", name = "public", email = "private", '
            'is_banned = "private", mood = "public" }\n'
            '[tables.crates]\ncolumns = { id = "public", owner_id = "private", name = "public", '
            'is_private = "private", api_token = "private" }\n',
            "foreign key crates_owner_id_fkey uses private column(s) public.crates.owner_id",
        ),
        (
            '[tables.employees]\ncolumns = { id = "public", manager_id = "public", '
            'name = "public" }\nfilter = "id < 100"\n',
            "foreign keys form a cycle (public.employees) through a filtered table",
        ),
    ],
    ids=[
        "missing-table",
        "misspelt-column",
        "bad-level",
        "semicolon",
        "parenthesis-injection",
        "union",
        "filter-does-not-compile",
        "private-primary-key",
        "private-foreign-key",
        "filtered-cycle",
    ],
)
def test_visibility_mistakes_are_errors_that_name_the_setting(
    dumpdb: LocalCluster,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    vis = write(tmp_path, text)
    out = tmp_path / "dump"
    code, stdout, stderr = run_cli(
        ["dump", "--config", str(config), "--visibility", str(vis), "--out", str(out)], capsys
    )
    assert (code, stdout) == (1, "")
    assert stderr.startswith("pgreplica: ") and message in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob(".pgreplica-dump-*"))


# ---------------------------------------------------------------------- choosing the host


def test_no_healthy_replica_is_an_error_unless_the_primary_is_allowed(
    healthy_cluster: LocalCluster,
    dumpdb: LocalCluster,
    config: Path,
    visibility: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    healthy_cluster.kill(1)
    healthy_cluster.kill(2)
    out = tmp_path / "dump.tar.gz"
    argv = ["dump", "--config", str(config), "--visibility", str(visibility), "--out", str(out)]
    code, stdout, stderr = run_cli(argv, capsys)
    assert (code, stdout) == (1, "")
    assert "no healthy replica of database 'main'" in stderr and "--allow-primary" in stderr
    for i in (1, 2):
        assert f"127.0.0.1:{healthy_cluster.port(i)}/{DB} down" in stderr
    assert password_of(healthy_cluster) not in stderr
    assert sorted(tmp_path.iterdir()) == sorted([config, visibility])  # nothing written

    code, _, stderr = run_cli([*argv, "--allow-primary"], capsys)
    assert code == 0, stderr
    assert f"dumping from the PRIMARY 127.0.0.1:{healthy_cluster.port(0)}/{DB}" in stderr
    assert out.stat().st_mode & 0o777 == 0o600  # like the directory output: owner only
    with tarfile.open(out) as tar:
        member = tar.extractfile("metadata.json")
        assert member is not None
        metadata = json.load(member)
    assert metadata["role"] == "primary"
    assert metadata["host"] == f"127.0.0.1:{healthy_cluster.port(0)}/{DB}"


def test_a_database_without_replicas_or_unknown_is_an_error_naming_it(
    config: Path, visibility: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["dump", "--config", str(config), "--visibility", str(visibility)]
    code, _, stderr = run_cli([*argv, "--database", "lonely", "--out", str(tmp_path / "a")], capsys)
    assert code == 1
    assert stderr.startswith("pgreplica: databases.lonely.replicas: no replicas configured")
    assert "--allow-primary" in stderr
    code, _, stderr = run_cli([*argv, "--database", "mian", "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "no database 'mian' (configured: main, lonely)" in stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unreachable_replicas_never_show_their_password(
    dumpdb: LocalCluster, visibility: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = register_secret("S3cr3t-pw-dump", "dump test DSN password")
    config = write(
        tmp_path,
        f'[databases.main]\nprimary = "{db_dsn(dumpdb, 0)}"\n'
        f'replicas = ["postgresql://postgres:{secret}@127.0.0.1:{dumpdb.port(1)}/{DB}"]\n',
        "pgreplica.toml",
    )
    code, _, stderr = run_cli(
        [*base_argv(config, visibility), "--out", str(tmp_path / "dump")],
        capsys,
    )
    assert code == 1 and "password authentication failed" in stderr
    assert secret not in stderr and password_of(dumpdb) not in stderr


# ---------------------------------------------------------------------- output formats


def test_tarball_holds_the_same_files_and_verifies(
    dumpdb: LocalCluster,
    config: Path,
    visibility: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "export.tar.gz"
    result = dump(Settings.from_toml(config), Visibility.load(visibility), out, jobs=2, quiet=True)
    with tarfile.open(out, "r:gz") as tar:
        names = set(tar.getnames())
    expected = {"schema.sql", "import.sql", "metadata.json", "data"}
    expected |= {t["file"] for t in result.metadata["tables"]}
    assert names == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "export.tar.gz",
        "pgreplica.toml",
        "visibility.toml",
    ]
    code, stdout, stderr = run_cli(["dump", "--verify", str(out), "--config", str(config)], capsys)
    assert code == 0, stderr
    assert "verify: OK (7 tables" in stdout
    assert password_of(dumpdb) not in stdout + stderr + json.dumps(result.metadata)


def test_metadata_describes_the_snapshot_without_secrets(
    dumpdb: LocalCluster, config: Path, visibility: Path, tmp_path: Path
) -> None:
    result = dump(Settings.from_toml(config), Visibility.load(visibility), tmp_path / "d")
    metadata = json.loads((result.out / "metadata.json").read_text())
    for key in ("created_at", "postgresql_version", "replay_lsn", "replay_timestamp"):
        assert metadata[key], key
    assert metadata["pgreplica_version"] and metadata["database"] == "main"
    assert metadata["server_version_num"] >= 100000
    assert metadata["visibility"]["file"] == "visibility.toml"
    assert {t["name"]: t["rows"] for t in metadata["tables"]} == dict(result.tables)
    assert password_of(dumpdb) not in all_text(result.out)


def test_progress_is_json_lines_off_a_terminal_bars_on_one_and_nothing_when_quiet(
    dumpdb: LocalCluster, config: Path, visibility: Path, tmp_path: Path
) -> None:
    settings, vis = Settings.from_toml(config), Visibility.load(visibility)
    plain = io.StringIO()
    dump(settings, vis, tmp_path / "a", stderr=plain, tty=False)
    events = [json.loads(line) for line in plain.getvalue().splitlines()]
    tables = [e["table"] for e in events if e["event"] == "table"]
    metadata = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert sorted(tables) == sorted(t["name"] for t in metadata["tables"])
    assert events[-1]["event"] == "done" and events[-1]["role"] == "replica"

    terminal = io.StringIO()
    dump(settings, vis, tmp_path / "b", stderr=terminal, tty=True, jobs=2)
    screen = terminal.getvalue()
    assert "\x1b[" in screen and "pgreplica dump: 7 tables" in screen
    for table in tables:
        assert any(table in line and "100%" in line for line in screen.splitlines()), table

    quiet = io.StringIO()
    dump(settings, vis, tmp_path / "c", stderr=quiet, quiet=True, tty=False)
    assert [json.loads(line)["event"] for line in quiet.getvalue().splitlines()] == ["warning"]


# ---------------------------------------------------------------------- verify failures


def test_verify_fails_on_a_wrong_count_and_on_an_orphan(
    dumpdb: LocalCluster,
    config: Path,
    visibility: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings.from_toml(config)
    out = dump(settings, Visibility.load(visibility), tmp_path / "d", quiet=True).out
    metadata_path = out / "metadata.json"
    original = metadata_path.read_text()
    metadata = json.loads(original)
    for table in metadata["tables"]:
        if table["name"] == "public.users":
            table["rows"] += 1
    metadata_path.write_text(json.dumps(metadata))
    code, _, stderr = run_cli(["dump", "--verify", str(out), "--config", str(config)], capsys)
    assert code == 1 and "verify failed: public.users has" in stderr

    metadata_path.write_text(original)
    crates = out / "data" / "public.crates.csv"
    with crates.open("a") as fh:
        fh.write(f"999999,{10**9},orphan\n")  # an owner that does not exist
    with pytest.raises(DumpError, match="crates_owner_id_fkey"):
        verify(out, settings, out=io.StringIO())
    leftovers = dumpdb.execute(
        0, "SELECT datname FROM pg_database WHERE datname LIKE 'pgreplica_verify_%'"
    )
    assert leftovers == []


def test_cli_usage_errors(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(["dump", "--config", str(config)], capsys)
    assert code == 1 and "--visibility: required" in stderr
    with pytest.raises(SystemExit) as exit_info:
        main(["dump", "--config", str(config), "--jobs", "0"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    existing = tmp_path / "full"
    existing.mkdir()
    (existing / "x").write_text("x")
    vis = write(tmp_path, VISIBILITY)
    code, _, stderr = run_cli(
        ["dump", "--config", str(config), "--visibility", str(vis), "--out", str(existing)],
        capsys,
    )
    assert code == 1 and "already exists: not overwriting it" in stderr


def test_the_dump_source_repr_holds_no_password() -> None:
    """Error trackers record a traceback's local variables: the source chosen for a
    dump shows its label and role, never its connection string."""
    from pgreplica.dump.source import _Source

    source = _Source("postgresql://u:S3cr3t-pw-dump@h:5432/db", "h:5432/db", "replica")
    assert "S3cr3t-pw-dump" not in repr(source) and "h:5432/db" in repr(source)
