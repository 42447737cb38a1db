"""The schema around the exported columns (docs/dump.md, "Output"), on a schema shaped like
crates.io's: an ltree column, a trigram index, indexes on user functions, serial and
identity keys, a domain, an enum, CHECK constraints (one on a private column), comments,
private NOT NULL columns, a trigger that fills a derived column, and a fully private table
whose foreign key points at an exported one.

Each module run creates its own database ``schema_test_<random>`` on the session cluster
(the replicas replay it) and drops it at the end, with the scratch databases it imports
into.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import secrets
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dump_support import database_dsn, filled_database
from pgreplica.config import Settings
from pgreplica.dump import Visibility, dump, import_dump, verify
from pgreplica.dump.verify import _split_script, run_script
from pgreplica.errors import ConfigError
from pgreplica.localcluster import find_bindir
from pgreplica.testing import LocalCluster

DB = f"schema_test_{secrets.token_hex(4)}"
EXTENSIONS = ("ltree", "pg_trgm")

SCHEMA = """
CREATE EXTENSION ltree;
CREATE EXTENSION pg_trgm;
CREATE FUNCTION canon_crate_name(text) RETURNS text AS $$
    SELECT replace(lower($1), '-', '_')
$$ LANGUAGE sql IMMUTABLE;
CREATE FUNCTION atomic_lower(x text) RETURNS text LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
    SELECT lower(x);
END;
CREATE FUNCTION random_string(int4) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RETURN substr(md5(random()::text), 1, $1);
END;
$$;
CREATE DOMAIN semver AS text CHECK (VALUE ~ '^[0-9]+\\.[0-9]+\\.[0-9]+');
CREATE TYPE dependency_kind AS ENUM ('normal', 'build', 'dev');

CREATE TABLE users (
    id serial PRIMARY KEY,
    gh_login varchar NOT NULL,
    name varchar,
    gh_id integer NOT NULL,
    gh_access_token varchar NOT NULL,
    is_admin boolean NOT NULL DEFAULT false,
    CONSTRAINT users_token_length CHECK (length(gh_access_token) < 200)
);
CREATE INDEX lower_gh_login ON users (lower(gh_login));
CREATE FUNCTION touch_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RETURN NEW; END;
$$;
CREATE TRIGGER users_touch BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION touch_user();

CREATE TABLE emails (
    id serial PRIMARY KEY,
    user_id int NOT NULL REFERENCES users ON DELETE CASCADE,
    email varchar NOT NULL,
    token text NOT NULL DEFAULT random_string(26)
);
CREATE FUNCTION email_domain(uid int) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN (SELECT split_part(email, '@', 2) FROM emails WHERE user_id = uid LIMIT 1);
END;
$$;
CREATE INDEX users_email_domain_idx ON users (email_domain(id));

CREATE TABLE categories (
    id serial PRIMARY KEY,
    category varchar NOT NULL UNIQUE,
    path ltree NOT NULL
);
CREATE INDEX path_gist_categories_idx ON categories USING gist (path);

CREATE TABLE crates (
    id serial PRIMARY KEY,
    name varchar NOT NULL,
    description varchar,
    created_at timestamp NOT NULL DEFAULT now(),
    textsearchable_index_col tsvector NOT NULL,
    max_upload_size int CONSTRAINT crates_max_upload_size_check CHECK (max_upload_size > 0)
);
COMMENT ON TABLE crates IS 'Packages; one row per crate name';
COMMENT ON COLUMN crates.name IS 'As published';
COMMENT ON COLUMN crates.textsearchable_index_col IS 'Derived from name and description';
CREATE UNIQUE INDEX index_crates_name ON crates (canon_crate_name(name));
CREATE INDEX index_crates_name_tgrm ON crates USING gin (canon_crate_name(name) gin_trgm_ops);
CREATE INDEX index_crates_atomic ON crates (atomic_lower(name));
CREATE INDEX index_crates_name_search ON crates USING gin (textsearchable_index_col);
CREATE FUNCTION crates_tsvector() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.textsearchable_index_col := to_tsvector('pg_catalog.english',
        coalesce(NEW.name, '') || ' ' || coalesce(NEW.description, ''));
    RETURN NEW;
END;
$$;
CREATE TRIGGER trigger_crates_tsvector_update BEFORE INSERT OR UPDATE ON crates
    FOR EACH ROW EXECUTE FUNCTION crates_tsvector();

CREATE TABLE crate_owners (
    crate_id int NOT NULL REFERENCES crates,
    owner_id int NOT NULL REFERENCES users,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (crate_id, owner_id)
);
CREATE TABLE versions (
    id serial PRIMARY KEY,
    crate_id int NOT NULL REFERENCES crates,
    num semver NOT NULL,
    published_by int REFERENCES users,
    UNIQUE (crate_id, num)
);
CREATE TABLE keywords (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    keyword text NOT NULL
);
COMMENT ON TABLE keywords IS 'Keywords, numbered by an identity column';
CREATE TABLE dependencies (
    id bigserial PRIMARY KEY,
    version_id int NOT NULL REFERENCES versions,
    crate_id int NOT NULL REFERENCES crates,
    kind dependency_kind NOT NULL DEFAULT 'normal'
);
CREATE VIEW crate_names AS SELECT id, name FROM crates;
CREATE VIEW user_tokens AS SELECT id, gh_access_token FROM users;
"""

DATA = """
INSERT INTO users (gh_login, name, gh_id, gh_access_token)
SELECT 'user-' || g, 'User ' || g, g, 'secret-token-' || g FROM generate_series(1, 40) g;
INSERT INTO emails (user_id, email) SELECT g, 'u' || g || '@mail.test'
FROM generate_series(1, 40) g;
INSERT INTO categories (category, path) VALUES ('Web', 'web'), ('Web servers', 'web.servers');
INSERT INTO crates (name, description, max_upload_size)
SELECT 'crate-' || g, 'crate number ' || g, 10 FROM generate_series(1, 60) g;
INSERT INTO crate_owners SELECT g, 1 + g % 40, g % 7 = 0 FROM generate_series(1, 60) g;
INSERT INTO versions (crate_id, num, published_by)
SELECT 1 + g % 60, '1.0.' || g, CASE WHEN g % 3 > 0 THEN 1 + g % 40 END
FROM generate_series(1, 150) g;
INSERT INTO keywords (keyword) VALUES ('web'), ('cli'), ('async');
INSERT INTO dependencies (version_id, crate_id, kind)
SELECT 1 + g % 150, 1 + g % 60, (ARRAY['normal', 'build', 'dev'])[1 + g % 3]::dependency_kind
FROM generate_series(1, 100) g;
ANALYZE;
"""

VISIBILITY: dict[str, Any] = {
    "tables": {
        "users": {
            "columns": {
                "id": "public",
                "gh_login": "public",
                "name": "public",
                "gh_id": "public",
                "gh_access_token": "private",
                "is_admin": "private",
            }
        },
        "categories": {"columns": {"id": "public", "category": "public", "path": "public"}},
        "crates": {
            "columns": {
                "id": "public",
                "name": "public",
                "description": "public",
                "created_at": "public",
                "textsearchable_index_col": "private",
                "max_upload_size": "public",
            }
        },
        "crate_owners": {
            "columns": {"crate_id": "public", "owner_id": "public", "deleted": "private"},
            "filter": "NOT deleted",
        },
        "versions": {
            "columns": {
                "id": "public",
                "crate_id": "public",
                "num": "public",
                "published_by": "public",
            }
        },
        "keywords": {"columns": {"id": "public", "keyword": "public"}},
        "dependencies": {
            "columns": {
                "id": "public",
                "version_id": "public",
                "crate_id": "public",
                "kind": "public",
            }
        },
    }
}

COLUMN_DEFAULTS = {"users": {"gh_access_token": "''"}}

# One insert per table with a serial or identity key, in the application's shape.
INSERTS = {
    "users": "INSERT INTO users (gh_login, gh_id, gh_access_token) VALUES ('new', 9999, 't')",
    "categories": "INSERT INTO categories (category, path) VALUES ('New', 'new.sub')",
    "crates": "INSERT INTO crates (name, textsearchable_index_col) VALUES ('new-crate', '')",
    "versions": "INSERT INTO versions (crate_id, num) VALUES (1, '9.9.9')",
    "keywords": "INSERT INTO keywords (keyword) VALUES ('new')",
    "dependencies": "INSERT INTO dependencies (version_id, crate_id) VALUES (1, 1)",
}
SERIAL_TABLES_SQL = """
SELECT DISTINCT c.relname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0
  AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%%')
"""


def db_dsn(cluster: LocalCluster, index: int, name: str = DB) -> str:
    return database_dsn(cluster, index, name)


@pytest.fixture(scope="module")
def schemadb(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster with the crates.io-shaped database, filled and replayed."""
    cluster.heal()
    available = {
        row[0]
        for row in cluster.execute(
            0,
            "SELECT name FROM pg_available_extensions WHERE name IN "
            f"({', '.join(repr(e) for e in EXTENSIONS)})",
        )
    }
    missing = [e for e in EXTENSIONS if e not in available]
    if missing:
        pytest.skip(
            f"PostgreSQL extension(s) {', '.join(missing)} not installed on this server "
            "(contrib: ltree.control / pg_trgm.control in the extension directory)"
        )
    try:
        with filled_database(cluster, DB, SCHEMA + DATA):
            yield cluster
    finally:  # and the databases the tests imported into
        for (name,) in cluster.execute(
            0, f"SELECT datname FROM pg_database WHERE datname LIKE '{DB}%%'"
        ):
            cluster.execute(0, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(schemadb: LocalCluster, tmp_path: Path) -> Settings:
    replicas = ", ".join(f'"{db_dsn(schemadb, i)}"' for i in (1, 2))
    path = tmp_path / "pgreplica.toml"
    path.write_text(
        f'[databases.main]\nprimary = "{db_dsn(schemadb, 0)}"\nreplicas = [{replicas}]\n'
    )
    return Settings.from_toml(path)


def visibility(column_defaults: Mapping[str, Mapping[str, str]] | None = None) -> Visibility:
    """The visibility file, with crates.io's ``column_defaults`` for some tables."""
    vis = Visibility.from_dict(VISIBILITY, source="visibility.toml")
    rules = [
        dataclasses.replace(rule, column_defaults=dict(column_defaults[rule.name]))
        if column_defaults and rule.name in column_defaults
        else rule
        for rule in vis.tables
    ]
    return dataclasses.replace(vis, tables=tuple(rules))


CRATES_IO_FORMAT = """
[users]
filter = '''
id IN (SELECT owner_id FROM crate_owners WHERE NOT deleted
       UNION SELECT published_by FROM versions)'''
[users.columns]
id = "public"
gh_login = "public"
name = "public"
gh_id = "public"
gh_access_token = "private"
is_admin = "private"
[users.column_defaults]
gh_access_token = "''"

[emails.columns]
id = "private"
user_id = "private"
email = "private"
token = "private"

[categories.columns]
id = "public"
category = "public"
path = "public"

[crates.columns]
id = "public"
name = "public"
description = "public"
created_at = "public"
textsearchable_index_col = "private"
max_upload_size = "public"

[crate_owners]
dependencies = ["crates", "users"]
filter = "NOT deleted"
[crate_owners.columns]
crate_id = "public"
owner_id = "public"
deleted = "private"

[versions]
dependencies = ["crates", "users"]
[versions.columns]
id = "public"
crate_id = "public"
num = "public"
published_by = "public"

[keywords.columns]
id = "public"
keyword = "public"

[dependencies]
dependencies = ["crates", "versions"]
[dependencies.columns]
id = "public"
version_id = "public"
crate_id = "public"
kind = "public"
"""


def export(settings: Settings, out: Path, **options: Any) -> tuple[dict[str, Any], str]:
    """Dump into ``out``; the metadata and what was printed on stderr."""
    stderr = io.StringIO()
    vis = options.pop("visibility", None) or visibility(options.pop("column_defaults", None))
    result = dump(settings, vis, out, quiet=True, stderr=stderr, tty=False, **options)
    return result.metadata, stderr.getvalue()


def warnings_of(stderr: str) -> list[str]:
    return [
        event["message"]
        for event in map(json.loads, stderr.splitlines())
        if event["event"] == "warning"
    ]


@dataclasses.dataclass(frozen=True)
class Target:
    """A database to import into; its repr (in a failure report) holds no password."""

    name: str
    dsn: str = dataclasses.field(repr=False)


def new_database(cluster: LocalCluster, suffix: str) -> Target:
    name = f"{DB}_{suffix}"
    cluster.execute(0, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    cluster.execute(0, f"CREATE DATABASE {name} TEMPLATE template0")
    return Target(name, db_dsn(cluster, 0, name))


def psql(target: Target, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    psql = os.path.join(find_bindir(), "psql")
    return subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target.dsn, "-f", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rows(target: Target, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def counts(target: Target, metadata: dict[str, Any]) -> dict[str, int]:
    return {
        t["name"]: rows(target, f"SELECT count(*) FROM {t['name']}")[0][0]
        for t in metadata["tables"]
    }


def insert_into_every_serial_table(target: Target, metadata: dict[str, Any]) -> None:
    """The imported database takes the application's writes: one insert per exported
    table with a serial or identity key (and every such table is tried)."""
    exported = {t["name"].split(".")[1] for t in metadata["tables"]}
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        serial = {r[0] for r in conn.execute(SERIAL_TABLES_SQL).fetchall()} & exported
        assert serial == set(INSERTS), serial
        for sql in INSERTS.values():
            conn.execute(sql)  # a duplicate key would raise: the sequence is past the rows


# ---------------------------------------------------------------------- extensions, functions


@pytest.mark.parametrize("fidelity", ["full", "minimal"])
def test_extensions_and_functions_make_verify_pass(
    settings: Settings, tmp_path: Path, fidelity: str
) -> None:
    """schema.sql creates ltree and pg_trgm and carries canon_crate_name and atomic_lower
    for the indexes that call them; the index on a function that reads a private table is
    left out with a warning naming both; --verify passes in a database from template0."""
    out = tmp_path / "dump"
    metadata, stderr = export(settings, out, fidelity=fidelity)
    schema = (out / "schema.sql").read_text()
    assert 'CREATE EXTENSION IF NOT EXISTS "ltree" WITH SCHEMA "public";' in schema
    assert 'CREATE EXTENSION IF NOT EXISTS "pg_trgm" WITH SCHEMA "public";' in schema
    assert "CREATE OR REPLACE FUNCTION public.canon_crate_name(text)" in schema
    assert "CREATE OR REPLACE FUNCTION public.atomic_lower(x text)" in schema
    assert "USING gin (public.canon_crate_name((name)::text) public.gin_trgm_ops)" in schema
    assert "USING gist (path)" in schema and "public.ltree NOT NULL" in schema
    assert "email_domain" not in schema and "index_crates_name_search" not in schema
    assert metadata["schema"]["extensions"] == ["ltree", "pg_trgm"]
    assert sorted(metadata["schema"]["functions"]) == [
        "public.atomic_lower(x text)",
        "public.canon_crate_name(text)",
    ]
    (warning,) = [w for w in warnings_of(stderr) if "users_email_domain_idx" in w]
    assert "public.email_domain(uid integer)" in warning
    assert "reads emails, which is not an exported table" in warning
    assert not [w for w in warnings_of(stderr) if "is not created by import.sql" in w]
    if fidelity == "minimal":  # today's content: no defaults, sequences, CHECKs, comments
        assert "DEFAULT" not in schema and "SEQUENCE" not in schema
        assert "CHECK" not in schema.replace("semver_check", "") and "COMMENT" not in schema

    report = io.StringIO()
    result = verify(out, settings, out=report)
    assert "verify: OK (7 tables" in report.getvalue(), report.getvalue()
    assert result.tables == {t["name"]: t["rows"] for t in metadata["tables"]}


def test_an_uncarried_type_is_still_a_warning(settings: Settings, tmp_path: Path) -> None:
    """Only the types the dump now creates lose the plan's "create it first" warning."""
    _, stderr = export(settings, tmp_path / "dump")
    assert not [w for w in warnings_of(stderr) if "ltree" in w or "semver" in w]


# ---------------------------------------------------------------------- full fidelity


def test_full_fidelity_import_is_a_working_database(
    schemadb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """psql -f import.sql into an empty database: defaults, sequences past the rows,
    domains, enums, the public CHECK and comments are there, the CHECK on a private column
    is not, private NOT NULL columns are kept (column_defaults, or their own default), and
    every table with a serial key takes an insert."""
    out = tmp_path / "dump"
    metadata, stderr = export(
        settings, out, keep_private_columns=True, column_defaults=COLUMN_DEFAULTS
    )
    target = new_database(schemadb, "full")
    proc = psql(target, "import.sql", out)
    assert proc.returncode == 0, proc.stderr
    assert counts(target, metadata) == {t["name"]: t["rows"] for t in metadata["tables"]}

    def one(sql: str) -> Any:
        return rows(target, sql)[0][0]

    assert (
        one(
            "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = "
            "'crates'::regclass AND adnum = 4"
        )
        == "now()"
    )
    assert (
        one("SELECT count(*) FROM pg_constraint WHERE conname = 'crates_max_upload_size_check'")
        == 1
    )
    assert one("SELECT count(*) FROM pg_constraint WHERE conname = 'users_token_length'") == 0
    assert {
        "object": "CHECK constraint users_token_length of public.users",
        "reason": "uses private column(s) gh_access_token",
    } in metadata["schema"]["left_out"]
    assert one("SELECT obj_description('crates'::regclass, 'pg_class')") == (
        "Packages; one row per crate name"
    )
    assert one("SELECT col_description('crates'::regclass, 2)") == "As published"
    assert one("SELECT obj_description('keywords'::regclass, 'pg_class')") is not None
    assert (
        one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
            "'versions'::regclass AND attname = 'num'"
        )
        == "semver"
    )
    assert one("SELECT typtype FROM pg_type WHERE typname = 'dependency_kind'") == "e"
    assert (
        one(
            "SELECT attidentity FROM pg_attribute WHERE attrelid = 'keywords'::regclass "
            "AND attname = 'id'"
        )
        == "a"
    )
    # Private columns: kept empty (no value of the source's), their defaults as in the source.
    assert rows(target, "SELECT DISTINCT gh_access_token, is_admin FROM users") == [("", False)]
    assert (
        one("SELECT count(*) FROM pg_attrdef WHERE adrelid = 'users'::regclass AND adnum = 5") == 0
    )  # column_defaults only while loading
    assert "secret-token" not in "".join(p.read_text() for p in out.rglob("*.*"))
    # The private tsvector column has no value to take: left out, with the way to keep it.
    (warning,) = [w for w in warnings_of(stderr) if "textsearchable_index_col" in w]
    assert "NOT NULL without a default" in warning and "column_defaults" in warning
    assert (
        one(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'crates'::regclass "
            "AND attname = 'textsearchable_index_col'"
        )
        == 0
    )

    INSERTS["crates"] = "INSERT INTO crates (name) VALUES ('new-crate')"
    try:
        insert_into_every_serial_table(target, metadata)
    finally:
        INSERTS["crates"] = (
            "INSERT INTO crates (name, textsearchable_index_col) VALUES ('new-crate', '')"
        )
    with (
        psycopg.connect(target.dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute("INSERT INTO crates (name, max_upload_size) VALUES ('bad', 0)")
    with (
        psycopg.connect(target.dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute("INSERT INTO versions (crate_id, num) VALUES (1, 'not-semver')")

    # The same dump through import_dump (no psql), and through --verify.
    target2 = new_database(schemadb, "full2")
    with psycopg.connect(target2.dsn, autocommit=True) as conn:
        import_dump(conn, out)
    assert counts(target2, metadata) == counts(target, metadata) | {
        name: rows - 1
        for name, rows in counts(target, metadata).items()
        if name.split(".")[1] in INSERTS
    }
    report = io.StringIO()
    assert verify(out, settings, out=report).sequences == 6
    assert "sequences: 6 of 6 past the loaded values" in report.getvalue()


def test_views_and_functions_are_opt_in(
    schemadb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """views=True creates the views over exported columns (not the one over a private
    column); functions=True carries the SQL and PL/pgSQL functions that can work."""
    out = tmp_path / "dump"
    metadata, _ = export(settings, out, views=True, functions=True)
    schema = (out / "schema.sql").read_text()
    assert "CREATE VIEW public.crate_names AS" in schema
    assert "user_tokens" not in schema
    assert "FUNCTION public.random_string(integer)" in schema
    assert "FUNCTION public.crates_tsvector()" in schema
    assert "email_domain" not in schema
    left_out = {item["object"]: item["reason"] for item in metadata["schema"]["left_out"]}
    assert left_out["view public.user_tokens"] == "column public.users.gh_access_token is private"
    assert "reads emails" in left_out["function public.email_domain(uid integer)"]
    report = io.StringIO()
    verify(out, settings, out=report)
    assert "verify: OK" in report.getvalue()

    plain, _ = export(settings, tmp_path / "plain")
    assert (
        plain["schema"]["views"] == [] and "VIEW" not in (tmp_path / "plain/schema.sql").read_text()
    )


# ---------------------------------------------------------------------- existing database


def test_import_into_an_existing_migrated_database_twice(
    schemadb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """crates.io's model: the target was migrated with the same schema and holds rows of
    its own. import.sql replaces the exported tables' rows (and empties the private table
    that references them), with triggers off but the one asked for, column_defaults while
    loading; twice in a row gives the same database, with the target's own defaults and
    triggers (a disabled one stays disabled) and sequences past the rows."""
    out = tmp_path / "dump"
    metadata, _ = export(
        settings,
        out,
        import_mode="existing",
        load_triggers=["crates.trigger_crates_tsvector_update"],
        column_defaults=COLUMN_DEFAULTS,
    )
    target = new_database(schemadb, "migrated")
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)  # the application's migrations
        conn.execute("ALTER TABLE users DISABLE TRIGGER users_touch")
        conn.execute(
            "INSERT INTO users (gh_login, gh_id, gh_access_token) VALUES ('local', 1, 'x');"
            "INSERT INTO emails (user_id, email) VALUES (1, 'local@example.test');"
            "INSERT INTO crates (name) VALUES ('local-only');"
        )
    expected = {t["name"]: t["rows"] for t in metadata["tables"]}
    for _ in range(2):
        proc = psql(target, "import.sql", out)
        assert proc.returncode == 0, proc.stderr
        assert counts(target, metadata) == expected
        assert rows(target, "SELECT count(*) FROM emails") == [(0,)]  # TRUNCATE ... CASCADE
        assert rows(target, "SELECT count(*) FROM crates WHERE name = 'local-only'") == [(0,)]
        # The kept trigger computed the derived private column while loading.
        assert rows(target, "SELECT count(*) FROM crates WHERE textsearchable_index_col = ''") == [
            (0,)
        ]
        assert rows(target, "SELECT DISTINCT gh_access_token FROM users") == [("",)]
        triggers = dict(
            rows(target, "SELECT tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal")
        )
        assert triggers == {"trigger_crates_tsvector_update": "O", "users_touch": "D"}
        defaults = rows(
            target,
            "SELECT a.attname FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid "
            "AND a.attnum = d.adnum WHERE d.adrelid = 'users'::regclass ORDER BY 1",
        )
        assert defaults == [("id",), ("is_admin",)]  # gh_access_token's default dropped again
    insert_into_every_serial_table(target, metadata)
    report = io.StringIO()
    verify(out, settings, out=report)  # schema.sql, then import.sql, in a scratch database
    assert "schema.sql, then import.sql" in report.getvalue()


# ---------------------------------------------------------------------- crates.io's layout


def test_crates_io_layout(schemadb: LocalCluster, settings: Settings, tmp_path: Path) -> None:
    """With crates.io's configuration file as written: a dated top folder,
    data/<table>.csv, README.md and export.sql, metadata.json with crates.io's timestamp
    and crates_io_commit; the tarball lists the CSV files parents first; it verifies
    (schema.sql with the private columns kept, then import.sql with column_defaults), and
    export.sql run with psql on a replica gives the same files."""
    config = tmp_path / "dump-db.toml"
    config.write_text(CRATES_IO_FORMAT)  # crates.io's configuration format, as written
    out = tmp_path / "db-dump.tar.gz"
    metadata, _ = export(
        settings,
        out,
        visibility=Visibility.load(config),
        layout="crates-io",
        import_mode="existing",
        keep_private_columns=True,
        app_commit="0123abc",
    )
    assert metadata["schema"]["private_columns_kept"] == [
        "public.users.gh_access_token",  # column_defaults
        "public.users.is_admin",  # their own defaults
        "public.crate_owners.deleted",
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", metadata["timestamp"])
    assert metadata["crates_io_commit"] == "0123abc"
    assert list(metadata)[:2] == ["timestamp", "crates_io_commit"]
    with tarfile.open(out) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "x", filter="data")
    top = names[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-\d{6}", top)
    assert metadata["timestamp"][:10] == top[:10]
    assert all(n == top or n.startswith(top + "/") for n in names)
    files = [n.removeprefix(top + "/") for n in names[1:]]
    csvs = [f for f in files if f.endswith(".csv")]
    assert csvs == [t["file"] for t in metadata["tables"]]  # parents first, after the rest
    assert files[: len(files) - len(csvs)] == [
        "README.md",
        "data",
        "export.sql",
        "import.sql",
        "metadata.json",
        "schema.sql",
    ]
    assert "data/crates.csv" in csvs and "data/crate_owners.csv" in csvs
    readme = (tmp_path / "x" / top / "README.md").read_text()
    assert "`crates_io_commit`" in readme and "| `public.crates` | `data/crates.csv` |" in readme

    report = io.StringIO()
    verify(out, settings, out=report)
    assert "verify: OK (7 tables" in report.getvalue()

    again = tmp_path / "again"
    (again / "data").mkdir(parents=True)
    (again / "export.sql").write_text((tmp_path / "x" / top / "export.sql").read_text())
    schemadb.wait_replayed()
    proc = psql(Target("replica", db_dsn(schemadb, 1)), "export.sql", again)
    assert proc.returncode == 0, proc.stderr
    for table in metadata["tables"]:
        mine = (tmp_path / "x" / top / table["file"]).read_bytes()
        assert sorted(mine.splitlines()) == sorted(
            (again / table["file"]).read_bytes().splitlines()
        )


# ---------------------------------------------------------------------- no database


def test_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    settings = Settings.from_dict({"databases": {"main": {"primary": "postgresql://x/y"}}})
    vis = visibility()
    for options, message in [
        ({"fidelity": "complete"}, "fidelity: expected one of full, minimal"),
        ({"fidelity": "minimal", "views": True}, "views: needs fidelity='full'"),
        ({"load_triggers": ["crates.t"]}, "load_triggers: only applies to import_mode='existing'"),
        ({"layout": "crates.io"}, "layout: expected one of pgreplica, crates-io"),
        ({"app_commit": "a b"}, "app_commit: expected a commit id"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            dump(settings, vis, tmp_path / "never", **options)
    assert not (tmp_path / "never").exists()


def test_scripts_split_as_psql_splits_them(tmp_path: Path) -> None:
    """Dollar quotes, quoted ; and line breaks, nested comments and BEGIN ATOMIC bodies
    stay in one statement; backslash lines between statements are meta-commands."""
    script = (
        "-- a comment; not a statement\n"
        "\\set ON_ERROR_STOP on\n"
        "CREATE FUNCTION f(x text) RETURNS text LANGUAGE sql\n"
        "BEGIN ATOMIC\n SELECT CASE WHEN x = ';' THEN x END;\n SELECT 1;\nEND;\n"
        "CREATE OR REPLACE FUNCTION g() RETURNS int AS $fn$\nBEGIN\n RETURN 1; -- ;\nEND;\n"
        "$fn$ LANGUAGE plpgsql;\n"
        "COMMENT ON TABLE t IS 'a ''quoted'';\nline';\n"
        "SELECT E'\\\\'';' /* a ; /* nested ; */ */, \"a;\"\"b\", $1;\n"
        "\\copy t (a) FROM 'data/t.csv' WITH (FORMAT csv, HEADER)\n"
        "DO $pgreplica$ BEGIN PERFORM 1; END $pgreplica$;\n"
    )
    units = list(_split_script(script))
    assert [(line, meta) for line, _, meta in units] == [
        (2, True),
        (3, False),
        (8, False),
        (13, False),
        (15, False),
        (16, True),
        (17, False),
    ]
    assert units[2][1].endswith("$fn$ LANGUAGE plpgsql;")
    assert units[4][1].endswith('"a;""b", $1;')
    with pytest.raises(Exception, match="unterminated dollar-quoted string"):
        list(_split_script("SELECT $x$ never closed;\n"))


def test_run_script_names_the_failing_line(schemadb: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / "schema.sql").write_text("SELECT 1;\nCREATE TABLE t (x nosuchtype);\n")
    target = new_database(schemadb, "script")
    with (
        psycopg.connect(target.dsn, autocommit=True) as conn,
        pytest.raises(
            Exception,
            match=r"schema.sql line 2: CREATE TABLE t \(x nosuchtype\);: type \"nosuchtype\"",
        ),
    ):
        run_script(conn, tmp_path, "schema.sql")
