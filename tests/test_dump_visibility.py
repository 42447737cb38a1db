"""The visibility file in crates.io's format, and ``pgreplica dump --check-visibility``.

The module creates its own database ``pgreplica_vis_test`` on the session cluster, with
a schema shaped like crates.io's (``users`` filtered by a subquery over ``crate_owners``
and ``versions``, ``versions.published_by``, ``crate_owners`` filtered ``NOT deleted``,
a table named ``dependencies``, the fully private ``api_tokens``), and reads crates.io's
``dump-db.toml`` format as written. The database is dropped at the end.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dump_support import database_dsn, filled_database
from pgreplica.cli import main
from pgreplica.config import Settings
from pgreplica.dump import TableRule, Visibility, VisibilityError, dump
from pgreplica.dump.check import check_schema
from pgreplica.localcluster import find_bindir
from pgreplica.testing import LocalCluster

DB = "pgreplica_vis_test"

SCHEMA = """
CREATE TABLE users (
    id serial PRIMARY KEY,
    gh_login text NOT NULL,
    name text,
    gh_access_token text NOT NULL,
    account_lock_reason text
);
CREATE TABLE api_tokens (
    id serial PRIMARY KEY,
    user_id int NOT NULL REFERENCES users,
    token text NOT NULL,
    name text NOT NULL
);
CREATE TABLE crates (id serial PRIMARY KEY, name text NOT NULL UNIQUE, description text);
CREATE TABLE versions (
    id serial PRIMARY KEY,
    crate_id int NOT NULL REFERENCES crates,
    num text NOT NULL,
    published_by int REFERENCES users
);
CREATE TABLE crate_owners (
    crate_id int NOT NULL REFERENCES crates,
    owner_id int NOT NULL,
    owner_kind int NOT NULL DEFAULT 0,
    created_by int REFERENCES users,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (crate_id, owner_id, owner_kind)
);
CREATE TABLE dependencies (
    id serial PRIMARY KEY,
    version_id int NOT NULL REFERENCES versions,
    crate_id int NOT NULL REFERENCES crates,
    req text NOT NULL
);

INSERT INTO users (gh_login, name, gh_access_token, account_lock_reason)
SELECT 'login' || g, 'User ' || g, 'gho_sekrit_' || g, CASE WHEN g = 4 THEN 'spam' END
FROM generate_series(1, 6) g;
INSERT INTO api_tokens (user_id, token, name)
SELECT g, 'cio_sekrit_' || g, 'ci' FROM generate_series(1, 6) g;
INSERT INTO crates (name, description) VALUES ('serde', 'ser'), ('rand', 'rng'), ('log', 'l');
-- owners: users 1 and 2; user 5 only through a deleted ownership; team 900 (kind 1)
INSERT INTO crate_owners VALUES
    (1, 1, 0, NULL, false), (2, 2, 0, 1, false), (3, 1, 0, 2, false),
    (3, 5, 0, NULL, true), (2, 900, 1, 1, false);
-- publishers: users 1 and 3 (and one version published by nobody known)
INSERT INTO versions (crate_id, num, published_by) VALUES
    (1, '1.0.0', 1), (1, '1.0.1', 3), (2, '0.8.0', NULL), (3, '0.4.0', 1);
INSERT INTO dependencies (version_id, crate_id, req) VALUES (1, 3, '^0.4'), (3, 1, '^1');
ANALYZE;
"""

USERS_FILTER = '''"""
id in (
    SELECT owner_id AS user_id FROM crate_owners WHERE NOT deleted AND owner_kind = 0
    UNION
    SELECT published_by as user_id FROM versions
)"""'''

# crates.io's dump-db.toml format, as their file writes it (comments included).
CRATES_IO = f"""
# This file configures what to include in public database dumps.

[api_tokens.columns]
id = "private"
user_id = "private"
token = "private"
name = "private"

[crate_owners]
dependencies = ["crates", "users"]
filter = "NOT deleted"
[crate_owners.columns]
crate_id = "public"
owner_id = "public"
owner_kind = "public"
created_by = "public"
deleted = "private"

[crates.columns]
id = "public"
name = "public"
description = "public"

[dependencies]
dependencies = ["crates", "versions"]
[dependencies.columns]
id = "public"
version_id = "public"
crate_id = "public"
req = "public"

[users]
filter = {USERS_FILTER}
[users.columns]
id = "public"
gh_login = "public"
name = "public"
gh_access_token = "private"
account_lock_reason = "private"
[users.column_defaults]
gh_access_token = "''"

[versions]
dependencies = ["crates", "users"]
[versions.columns]
id = "public"
crate_id = "public"
num = "public"
published_by = "public"
"""

# The same classification in pgreplica's format.
PGREPLICA = f"""
[tables.api_tokens]
columns = {{ id = "private", user_id = "private", token = "private", name = "private" }}

[tables.crate_owners]
dependencies = ["crates", "users"]
filter = "NOT deleted"
columns = {{ crate_id = "public", owner_id = "public", owner_kind = "public", \
created_by = "public", deleted = "private" }}

[tables.crates]
columns = {{ id = "public", name = "public", description = "public" }}

[tables.dependencies]
dependencies = ["crates", "versions"]
columns = {{ id = "public", version_id = "public", crate_id = "public", req = "public" }}

[tables.users]
filter = {USERS_FILTER}
column_defaults = {{ gh_access_token = "''" }}
[tables.users.columns]
id = "public"
gh_login = "public"
name = "public"
gh_access_token = "private"
account_lock_reason = "private"

[tables.versions]
dependencies = ["crates", "users"]
columns = {{ id = "public", crate_id = "public", num = "public", published_by = "public" }}
"""

EXPORTED = ("crate_owners", "crates", "dependencies", "users", "versions")


def db_dsn(cluster: LocalCluster, index: int) -> str:
    return database_dsn(cluster, index, DB)


def on_primary(cluster: LocalCluster, sql: str) -> None:
    with psycopg.connect(db_dsn(cluster, 0), autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="module")
def visdb(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster with the crates.io-shaped database created and replayed."""
    with filled_database(cluster, DB, SCHEMA):
        yield cluster


@pytest.fixture
def config(visdb: LocalCluster, tmp_path: Path) -> Path:
    """``main`` with both replicas, and ``lonely`` (its primary only)."""
    replicas = ", ".join(f'"{db_dsn(visdb, i)}"' for i in (1, 2))
    path = tmp_path / "pgreplica.toml"
    path.write_text(
        f'[databases.main]\nprimary = "{db_dsn(visdb, 0)}"\nreplicas = [{replicas}]\n'
        f'[databases.lonely]\nprimary = "{db_dsn(visdb, 0)}"\n'
    )
    return path


def write(tmp_path: Path, text: str, name: str = "dump-db.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_argv(config: Path, visibility: Path, *more: str) -> list[str]:
    return [
        "dump",
        "--check-visibility",
        "--config",
        str(config),
        "--visibility",
        str(visibility),
        *more,
    ]


def rows(cluster: LocalCluster, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(db_dsn(cluster, 1), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


# ---------------------------------------------------------------------- the two formats


def test_crates_io_format_is_read_as_written(tmp_path: Path) -> None:
    vis = Visibility.load(write(tmp_path, CRATES_IO))
    assert vis.format == "crates-io"
    rules = {rule.name: rule for rule in vis.tables}
    assert sorted(rules) == sorted(["api_tokens", *EXPORTED])
    assert rules["api_tokens"].all_private and not rules["users"].all_private
    assert [r.name for r in vis.exported] == [n for n in rules if n != "api_tokens"]
    assert rules["users"].column_defaults == {"gh_access_token": "''"}
    assert rules["users"].filter is not None and "UNION" in rules["users"].filter
    assert rules["crate_owners"].filter == "NOT deleted"
    assert rules["versions"].dependencies == ("public.crates", "public.users")
    assert rules["crates"].dependencies is None  # no key: nothing to compare
    assert rules["dependencies"].setting == "dependencies"  # a table, not the key
    assert rules["users"].setting == "users"


def test_both_formats_give_the_same_visibility(tmp_path: Path) -> None:
    crates = Visibility.load(write(tmp_path, CRATES_IO))
    ours = Visibility.load(write(tmp_path, PGREPLICA, "visibility.toml"))
    assert (crates.format, ours.format) == ("crates-io", "pgreplica")

    def model(vis: Visibility) -> dict[str, TableRule]:
        return {r.qualified: dataclasses.replace(r, format="") for r in vis.tables}

    assert model(crates) == model(ours)
    assert model(crates)["public.users"].column_defaults == {"gh_access_token": "''"}
    # Forcing a format reads the file that way, or says why it cannot.
    assert Visibility.load(tmp_path / "dump-db.toml", format="crates-io") is not None
    with pytest.raises(VisibilityError, match="unknown setting"):
        Visibility.load(tmp_path / "dump-db.toml", format="pgreplica")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[tables.users]\ncolumns = { id = "public" }\n[crates.columns]\nid = "public"\n',
            "crates: mixes the two visibility formats",
        ),
        (
            '[users.columns]\nid = "public"\ntoken = "private"\n'
            "[users.columns_defaults]\ntoken = \"''\"\n",
            "users.columns_defaults: unknown setting (columns, filter, dependencies, "
            "column_defaults) (did you mean column_defaults?)",
        ),
        (
            '[users.columns]\nid = "public"\ntoken = "private"\n'
            '[users.column_defaults]\nid = "0"\n',
            "users.column_defaults.id: the column is public",
        ),
        (
            '[users.columns]\nid = "public"\ntoken = "private"\n'
            "[users.column_defaults]\ntoken = \"''; DROP TABLE users\"\n",
            "users.column_defaults.token: must not contain ';'",
        ),
        (
            '[users.columns]\nid = "public"\ntoken = "private"\n'
            "[users.column_defaults]\ntoken = 0\n",
            "users.column_defaults.token: expected a SQL expression as text",
        ),
        (
            '[users.columns]\nid = "public"\ntoken = "private"\n'
            "[users.column_defaults]\ntoken = \"'' AS x, (SELECT 1)\"\n",
            "users.column_defaults.token: must be a single SQL expression",
        ),
        (
            '[users]\ndependencies = "crates"\n[users.columns]\nid = "public"\n',
            "users.dependencies: expected a list of table names",
        ),
        (
            '[users]\nfilter = "true) UNION SELECT 1 FROM api_tokens WHERE (true"\n'
            '[users.columns]\nid = "public"\n',
            "users.filter: not a SQL expression",
        ),
        (
            '[audit.events.columns]\nid = "public"\n',
            'a table outside the public schema is written ["schema.table".columns]',
        ),
        ("", "no table: declare each table as [NAME.columns]"),
    ],
    ids=[
        "mixed-formats",
        "misspelt-key",
        "default-for-public-column",
        "default-with-statement",
        "default-not-text",
        "default-two-expressions",
        "dependencies-not-a-list",
        "filter-injection",
        "dotted-table-key",
        "empty",
    ],
)
def test_malformed_files_are_errors_naming_the_setting(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(VisibilityError) as info:
        Visibility.load(write(tmp_path, text))
    assert message in str(info.value)


# ---------------------------------------------------------------------- exporting


def test_crates_io_file_exports_the_right_tables_columns_and_rows(
    visdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file as crates.io writes it: api_tokens (fully private) is skipped without a
    word, users is filtered by its subquery, no private column or value leaves."""
    out = tmp_path / "dump"
    vis = write(tmp_path, CRATES_IO)
    code, _, stderr = run_cli(
        ["dump", "--config", str(config), "--visibility", str(vis), "--out", str(out)], capsys
    )
    assert code == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines()]
    assert [e for e in events if e["event"] == "warning"] == []

    metadata = json.loads((out / "metadata.json").read_text())
    tables = {t["name"]: t for t in metadata["tables"]}
    assert sorted(tables) == [f"public.{name}" for name in EXPORTED]
    assert tables["public.users"]["columns"] == ["id", "gh_login", "name"]
    assert tables["public.crate_owners"]["columns"] == [
        "crate_id",
        "owner_id",
        "owner_kind",
        "created_by",
    ]
    assert tables["public.users"]["rows"] == 3  # owners 1, 2 and publisher 3
    assert tables["public.crate_owners"]["rows"] == 4  # the deleted ownership left out
    expected_users = rows(
        visdb,
        "SELECT id, gh_login, name FROM users WHERE id IN (SELECT owner_id FROM crate_owners "
        "WHERE NOT deleted AND owner_kind = 0 UNION SELECT published_by FROM versions) "
        "ORDER BY id",
    )
    csv_users = (out / tables["public.users"]["file"]).read_text().splitlines()[1:]
    assert csv_users == [",".join(str(v) for v in row) for row in expected_users]
    text = "\n".join(p.read_text() for p in out.rglob("*.*"))
    assert "sekrit" not in text and "api_tokens" not in text and "spam" not in text
    assert "gh_access_token" not in (out / "schema.sql").read_text()

    # Without api_tokens in the file, the table is noticed as unlisted, as any other.
    partial = write(tmp_path, CRATES_IO.split("[crate_owners]")[1].join(["[crate_owners]", ""]))
    quiet = io.StringIO()
    dump(Settings.from_toml(config), Visibility.load(partial), tmp_path / "b", stderr=quiet)
    warnings = [json.loads(line) for line in quiet.getvalue().splitlines()]
    assert any(
        e["event"] == "warning" and e["message"].endswith("not exported: public.api_tokens")
        for e in warnings
    ), warnings


def test_pgreplica_format_exports_the_same_as_crates_io_format(
    visdb: LocalCluster, config: Path, tmp_path: Path
) -> None:
    settings = Settings.from_toml(config)
    visdb.wait_replayed()
    results = [
        dump(settings, Visibility.load(write(tmp_path, text, name)), tmp_path / name[:-5])
        for text, name in ((CRATES_IO, "crates.toml"), (PGREPLICA, "ours.toml"))
    ]

    def tables(metadata: dict[str, object]) -> object:
        return [
            {k: t[k] for k in ("name", "columns", "filter", "row_filter", "rows")}
            for t in metadata["tables"]
        ]  # type: ignore[attr-defined]

    assert tables(results[0].metadata) == tables(results[1].metadata)


def test_dependencies_that_disagree_with_the_foreign_keys_warn(
    visdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """versions forgets users (its published_by parent) and crates declares users, which
    it has no foreign key to: both are warnings, and the order still follows the keys."""
    text = CRATES_IO.replace(
        '[versions]\ndependencies = ["crates", "users"]', '[versions]\ndependencies = ["crates"]'
    ).replace("[crates.columns]", '[crates]\ndependencies = ["users"]\n[crates.columns]')
    vis = write(tmp_path, text)
    stderr = io.StringIO()
    result = dump(Settings.from_toml(config), Visibility.load(vis), tmp_path / "d", stderr=stderr)
    warnings = [
        json.loads(line)["message"]
        for line in stderr.getvalue().splitlines()
        if json.loads(line)["event"] == "warning"
    ]
    assert len(warnings) == 2, warnings
    assert any(
        w.startswith("versions.dependencies does not list public.users")
        and "versions_published_by_fkey" in w
        for w in warnings
    ), warnings
    assert any(
        w.startswith("crates.dependencies lists public.users, but public.crates has no foreign")
        for w in warnings
    ), warnings
    order = list(result.tables)
    assert order.index("public.users") < order.index("public.versions")
    assert order.index("public.crates") < order.index("public.versions")

    # The check prints the same warnings and still passes.
    code, stdout, err = run_cli(check_argv(config, vis), capsys)
    assert code == 0, err
    assert stdout.startswith("visibility: OK")
    assert err.count("pgreplica: warning: ") == 2 and "versions_published_by_fkey" in err


def test_a_misspelt_column_is_named_next_to_the_real_one(
    visdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vis = write(tmp_path, CRATES_IO.replace('gh_login = "public"', 'gh_logn = "public"'))
    out = tmp_path / "dump"
    code, stdout, stderr = run_cli(
        ["dump", "--config", str(config), "--visibility", str(vis), "--out", str(out)], capsys
    )
    assert (code, stdout) == (1, "")
    assert stderr.count("\n") == 1, stderr  # one error, both names in it
    assert "not classified as public or private: public.users.gh_login" in stderr
    assert "do not exist: users.columns.gh_logn (did you mean gh_login?)" in stderr
    assert not out.exists()

    code, stdout, stderr = run_cli(check_argv(config, vis), capsys)
    assert (code, stdout) == (1, "")
    assert "  column public.users.gh_login is not classified\n" in stderr
    assert (
        "  classified column that does not exist: users.columns.gh_logn "
        "(did you mean gh_login?)\n" in stderr
    )


# ---------------------------------------------------------------------- --check-visibility


def test_check_visibility_fails_on_a_new_column_until_it_is_classified(
    visdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vis = write(tmp_path, CRATES_IO)
    before = sorted(tmp_path.iterdir())
    code, stdout, stderr = run_cli(check_argv(config, vis), capsys)
    assert (code, stderr) == (0, ""), stderr
    assert stdout.count("\n") == 1 and stdout.startswith("visibility: OK (dump-db.toml")
    assert "6 tables, 5 exported, 1 fully private" in stdout
    assert f"/{DB} (replica)" in stdout

    on_primary(visdb, "ALTER TABLE users ADD COLUMN gh_email text")
    try:
        visdb.wait_replayed()
        code, stdout, stderr = run_cli(check_argv(config, vis), capsys)
        assert (code, stdout) == (1, "")
        assert stderr.startswith("pgreplica: dump-db.toml does not match 127.0.0.1:")
        assert "1 problem(s)\n  column public.users.gh_email is not classified\n" in stderr

        classified = write(
            tmp_path,
            CRATES_IO.replace(
                'name = "public"\ngh_access', 'name = "public"\ngh_email = "private"\ngh_access'
            ),
            "fixed.toml",
        )
        code, stdout, stderr = run_cli(check_argv(config, classified), capsys)
        assert (code, stderr) == (0, ""), stderr
        assert stdout.startswith("visibility: OK (fixed.toml")
    finally:
        on_primary(visdb, "ALTER TABLE users DROP COLUMN gh_email")
        visdb.wait_replayed()
    assert sorted(tmp_path.iterdir()) == sorted([*before, tmp_path / "fixed.toml"])


def test_check_visibility_names_every_problem_at_once(
    visdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unlisted table, a table that no longer exists, a stale column and a misspelt
    one (with its real column), all in one run."""
    text = (
        CRATES_IO.replace("[api_tokens.columns]", "[api_token.columns]")
        .replace('req = "public"', 'req = "public"\nexplicit_name = "public"')
        .replace('gh_login = "public"', 'gh_logn = "public"')
    )
    on_primary(visdb, "CREATE TABLE follows (user_id int, crate_id int)")
    try:
        visdb.wait_replayed()
        code, stdout, stderr = run_cli(check_argv(config, write(tmp_path, text)), capsys)
    finally:
        on_primary(visdb, "DROP TABLE follows")
        visdb.wait_replayed()
    assert (code, stdout) == (1, "")
    lines = stderr.splitlines()
    assert lines[0].endswith("6 problem(s)"), stderr
    assert sorted(lines[1:]) == sorted(
        [
            "  table public.api_tokens is not listed (columns: id, user_id, token, name): "
            "list it, with every column private to keep it out of the export",
            "  table public.follows is not listed (columns: user_id, crate_id): "
            "list it, with every column private to keep it out of the export",
            "  api_token: table public.api_token does not exist (did you mean api_tokens?)",
            "  column public.users.gh_login is not classified",
            "  classified column that does not exist: users.columns.gh_logn "
            "(did you mean gh_login?)",
            "  classified column that does not exist: dependencies.columns.explicit_name",
        ]
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            (
                'id = "public"\nname = "public"\ndescription',
                'id = "private"\nname = "public"\ndescription',
            ),
            "keys must be public",
        ),
        (
            ('filter = "NOT deleted"', 'filter = "NOT removed"'),
            "crate_owners.filter: the row filter of public.crate_owners does not compile",
        ),
    ],
    ids=["private-key", "filter-does-not-compile"],
)
def test_check_visibility_refuses_what_the_export_would(
    visdb: LocalCluster,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: tuple[str, str],
    message: str,
) -> None:
    assert CRATES_IO.count(change[0]) == 1
    vis = write(tmp_path, CRATES_IO.replace(*change))
    code, stdout, stderr = run_cli(check_argv(config, vis), capsys)
    assert (code, stdout) == (1, "")
    assert "1 problem(s)\n" in stderr and message in stderr, stderr


def test_check_visibility_runs_on_a_replica_or_the_allowed_primary(
    visdb: LocalCluster, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vis = write(tmp_path, CRATES_IO)
    code, _, stderr = run_cli(check_argv(config, vis, "--database", "lonely"), capsys)
    assert code == 1 and "databases.lonely.replicas: no replicas configured" in stderr
    assert "--allow-primary" in stderr
    code, stdout, stderr = run_cli(
        check_argv(config, vis, "--database", "lonely", "--allow-primary"), capsys
    )
    assert code == 0, stderr
    assert f"127.0.0.1:{visdb.port(0)}/{DB} (primary)" in stdout
    assert stderr.startswith(f"pgreplica: warning: checking the PRIMARY 127.0.0.1:{visdb.port(0)}")


def test_check_visibility_as_a_ci_step(visdb: LocalCluster, tmp_path: Path) -> None:
    """The documented CI step, as a process: the environment names the primary of a
    database without replicas, and the exit status is the verdict."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGREPLICA_")}
    env["PGREPLICA_PRIMARY_URL"] = db_dsn(visdb, 0)

    def check(text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pgreplica.cli import main; sys.exit(main())",
                *("dump", "--check-visibility", "--allow-primary"),
                *("--visibility", str(write(tmp_path, text))),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    passed = check(CRATES_IO)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.startswith("visibility: OK") and "(primary)" in passed.stdout
    failed = check(CRATES_IO.replace('num = "public"\n', ""))
    assert failed.returncode == 1 and failed.stdout == ""
    assert "  column public.versions.num is not classified\n" in failed.stderr


def test_check_visibility_usage_errors(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vis = write(tmp_path, CRATES_IO)
    for argv, message in [
        (check_argv(config, vis, "--out", str(tmp_path / "d")), "--out: not with --check"),
        (["dump", "--check-visibility", "--config", str(config)], "--visibility: required"),
        (
            ["dump", "--config", str(config), "--visibility", str(vis), "--schema", "x.sql"],
            "--schema: only with --check-visibility",
        ),
        (check_argv(config, vis, "--schema", "x.sql"), "--config: not with --schema"),
        (
            check_argv(config, vis, "--visibility-format", "pgreplica"),
            "dump-db.toml: api_tokens: unknown setting (expected [tables.NAME] sections)",
        ),
    ]:
        code, stdout, stderr = run_cli(argv, capsys)
        assert (code, stdout) == (1, ""), argv
        assert message in stderr, (argv, stderr)
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------- --schema FILE.sql


def test_check_against_a_pg_dump_schema_file(
    visdb: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = tmp_path / "structure.sql"
    proc = subprocess.run(
        [os.path.join(find_bindir(), "pg_dump"), "--schema-only", "-d", db_dsn(visdb, 1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    schema.write_text(proc.stdout)
    vis = write(tmp_path, CRATES_IO)
    argv = ["dump", "--check-visibility", "--visibility", str(vis), "--schema", str(schema)]
    code, stdout, stderr = run_cli(argv, capsys)
    assert (code, stderr) == (0, ""), stderr
    assert stdout.startswith(
        "visibility: OK (dump-db.toml, crates-io format, matches "
        "structure.sql: 6 tables, 5 exported"
    )

    # A migration in the file: a new column, a renamed one, a new table.
    schema.write_text(
        proc.stdout
        + "\nALTER TABLE ONLY public.users ADD COLUMN gh_email text;"
        + "\nALTER TABLE public.crates RENAME COLUMN description TO summary;"
        + "\nCREATE TABLE public.follows (user_id integer REFERENCES public.users);\n"
    )
    code, stdout, stderr = run_cli(argv, capsys)
    assert (code, stdout) == (1, "")
    for expected in (
        "column public.users.gh_email is not classified",
        "column public.crates.summary is not classified",
        "classified column that does not exist: crates.columns.description",  # no look-alike
        "table public.follows is not listed (columns: user_id): list it, with every column "
        "private to keep it out of the export",
    ):
        assert f"  {expected}\n" in stderr, stderr
    assert "4 problem(s)" in stderr


def test_schema_reader_follows_inheritance_partitions_and_drops(tmp_path: Path) -> None:
    schema = write(
        tmp_path,
        """
        SET search_path = app, public;
        CREATE TABLE base (id int PRIMARY KEY, created_at timestamptz);
        CREATE TABLE events (kind text) INHERITS (base);
        CREATE TABLE log (id int, at date) PARTITION BY RANGE (at);
        CREATE TABLE log_2024 PARTITION OF log FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE log_old (id int, at date);
        ALTER TABLE ONLY log ATTACH PARTITION log_old FOR VALUES FROM (MINVALUE) TO ('2024-01-01');
        CREATE TABLE scratch (x int);
        DROP TABLE scratch;
        CREATE TABLE tmp (x int);
        ALTER TABLE tmp RENAME TO kept;
        ALTER TABLE kept DROP COLUMN x, ADD COLUMN y int REFERENCES base;
        CREATE VIEW recent AS SELECT 1 AS one;
        """,
        "schema.sql",
    )
    vis = Visibility.from_dict(
        {
            "app.base": {"columns": {"id": "public", "created_at": "public"}},
            "app.events": {"columns": {"id": "public", "created_at": "public", "kind": "public"}},
            "app.log": {"columns": {"id": "public", "at": "public"}},
            "app.kept": {"columns": {"y": "public"}, "dependencies": []},
        },
        format="crates-io",
    )
    result = check_schema(vis, schema)
    assert result.problems == (), result.problems
    assert result.warnings == (
        "app.kept.dependencies does not list app.base, which app.kept references "
        "(foreign key kept_y_fkey); the import order follows the foreign keys",
    )
    with_view = dataclasses.replace(
        vis, tables=(*vis.tables, dataclasses.replace(vis.tables[0], name="recent"))
    )
    assert check_schema(with_view, schema).problems == (
        "app.recent: app.recent is a view, not a table",
    )
