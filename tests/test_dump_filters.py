"""``pgreplica dump``'s row filters through foreign keys: computed once per query, and
nullable references to rows left out exported as NULL (or the row dropped, per key).

The module creates its own database ``pgreplica_dump_filters_test`` on the session
cluster (the replicas replay it), with tables prefixed ``flt_``: a schema shaped like
crates.io's (``flt_users`` filtered by a subquery over ``flt_crate_owners`` and
``flt_versions``, ``flt_versions.published_by`` and ``flt_crate_owners.created_by``
nullable), a ``NOT VALID`` foreign key with orphans, and composite keys (``flt_teams``,
a NOT NULL and a nullable composite reference, and a reference to a nullable unique key
that is itself exported as NULL). Expected rows are computed independently with plain
SQL; every dump is re-imported with ``verify``, which creates every foreign key.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dump_support import database_dsn, filled_database
from pgreplica.config import Settings
from pgreplica.dump import Visibility, VisibilityError, dump, verify
from pgreplica.dump.catalog import _build_plan
from pgreplica.testing import LocalCluster

DB = "pgreplica_dump_filters_test"

SCHEMA = """
CREATE TABLE flt_users (
    id int PRIMARY KEY,
    gh_login text NOT NULL,
    name text,
    gh_access_token text NOT NULL
);
CREATE TABLE flt_crates (id int PRIMARY KEY, name text NOT NULL UNIQUE, downloads int NOT NULL);
CREATE TABLE flt_versions (
    id int PRIMARY KEY,
    crate_id int NOT NULL REFERENCES flt_crates,
    num text NOT NULL,
    published_by int REFERENCES flt_users,
    UNIQUE (crate_id, num)
);
CREATE TABLE flt_crate_owners (
    crate_id int NOT NULL REFERENCES flt_crates,
    owner_id int NOT NULL REFERENCES flt_users,
    created_by int REFERENCES flt_users,
    deleted boolean NOT NULL,
    PRIMARY KEY (crate_id, owner_id)
);
CREATE TABLE flt_follows (
    id int PRIMARY KEY,
    user_id int,
    crate_id int NOT NULL REFERENCES flt_crates
);

INSERT INTO flt_users
SELECT g, 'login' || g, 'name ' || g, 'token-' || md5(g::text) FROM generate_series(1, 3000) g;
INSERT INTO flt_crates SELECT g, 'crate-' || g, g % 1000 FROM generate_series(1, 2000) g;
-- publishers among users 1..900, one version in 7 without one
INSERT INTO flt_versions
SELECT g, 1 + g % 2000, '1.' || g, CASE WHEN g % 7 <> 0 THEN 1 + (g * 17) % 900 END
FROM generate_series(1, 12000) g;
-- owners among users 1..1200, one row in 10 deleted; created_by any user, or NULL
INSERT INTO flt_crate_owners
SELECT 1 + g % 2000, 1 + ((g % 2000) * 3 + g / 2000) % 1200,
       CASE WHEN g % 4 <> 0 THEN 1 + (g * 13) % 3000 END, g % 10 = 0
FROM generate_series(0, 3999) g;
-- followers: any user, some that do not exist (the key is added NOT VALID below)
INSERT INTO flt_follows SELECT g, 1 + (g * 7) % 3100, 1 + g % 2000 FROM generate_series(1, 3000) g;
ALTER TABLE flt_follows ADD CONSTRAINT flt_follows_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES flt_users NOT VALID;

CREATE TABLE flt_teams (
    org int, team int, name text NOT NULL, hidden boolean NOT NULL, PRIMARY KEY (org, team)
);
CREATE TABLE flt_members (
    id int PRIMARY KEY, org int NOT NULL, team int NOT NULL,
    FOREIGN KEY (org, team) REFERENCES flt_teams
);
CREATE TABLE flt_invites (
    id int PRIMARY KEY, org int, team int,
    UNIQUE (org, team), FOREIGN KEY (org, team) REFERENCES flt_teams
);
CREATE TABLE flt_invite_notes (
    id int PRIMARY KEY, org int, team int, note text NOT NULL,
    FOREIGN KEY (org, team) REFERENCES flt_invites (org, team)
);
INSERT INTO flt_teams
SELECT o, t, 'team ' || o || '/' || t, (o + t) % 5 = 0
FROM generate_series(1, 20) o, generate_series(1, 10) t;
INSERT INTO flt_members SELECT g, 1 + g % 20, 1 + (g / 20) % 10 FROM generate_series(1, 1000) g;
-- one invite per team; one in 13 with its team NULL (MATCH SIMPLE: not checked)
INSERT INTO flt_invites
SELECT g, 1 + (g - 1) % 20, CASE WHEN g % 13 <> 0 THEN 1 + (g - 1) / 20 END
FROM generate_series(1, 200) g;
INSERT INTO flt_invite_notes
SELECT n * 1000 + i.id, i.org, i.team, 'note ' || n FROM flt_invites i, generate_series(1, 2) n
WHERE i.team IS NOT NULL;
ANALYZE;
"""

USERS_FILTER = (
    "id IN (SELECT owner_id FROM flt_crate_owners WHERE NOT deleted "
    "UNION SELECT published_by FROM flt_versions)"
)
CRATES_IO = f"""
[flt_users]
filter = "{USERS_FILTER}"
[flt_users.columns]
id = "public"
gh_login = "public"
name = "public"
gh_access_token = "private"

[flt_crates.columns]
id = "public"
name = "public"
downloads = "public"

[flt_versions]
dependencies = ["flt_crates", "flt_users"]
[flt_versions.columns]
id = "public"
crate_id = "public"
num = "public"
published_by = "public"

[flt_crate_owners]
dependencies = ["flt_crates", "flt_users"]
filter = "NOT deleted"
[flt_crate_owners.columns]
crate_id = "public"
owner_id = "public"
created_by = "public"
deleted = "private"

[flt_follows]
dependencies = ["flt_crates", "flt_users"]
columns = {{ id = "public", user_id = "public", crate_id = "public" }}
"""
TEAMS = """
[tables.flt_teams]
columns = { org = "public", team = "public", name = "public", hidden = "private" }
filter = "NOT hidden"
[tables.flt_members]
columns = { id = "public", org = "public", team = "public" }
[tables.flt_invites]
columns = { id = "public", org = "public", team = "public" }
[tables.flt_invite_notes]
columns = { id = "public", org = "public", team = "public", note = "public" }
"""

# crates.io's semantics, in plain SQL: the users its filter keeps, and the other tables
# as its export gives them, with a reference to a user left out set to NULL.
KEPT_USERS = f"SELECT id FROM flt_users WHERE {USERS_FILTER}"
EXPECTED = {
    "public.flt_users": f"SELECT id, gh_login, name FROM flt_users WHERE {USERS_FILTER}",
    "public.flt_crates": "SELECT id, name, downloads FROM flt_crates",
    "public.flt_versions": "SELECT id, crate_id, num, published_by FROM flt_versions",
    "public.flt_crate_owners": f"""
        SELECT crate_id, owner_id, CASE WHEN created_by IN ({KEPT_USERS}) THEN created_by END
        FROM flt_crate_owners WHERE NOT deleted""",
    "public.flt_follows": f"""
        SELECT id, CASE WHEN user_id IN ({KEPT_USERS}) THEN user_id END, crate_id
        FROM flt_follows""",
}


def db_dsn(cluster: LocalCluster, index: int) -> str:
    return database_dsn(cluster, index, DB)


@pytest.fixture(scope="module")
def fltdb(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster with the test database created, filled and replayed."""
    with filled_database(cluster, DB, SCHEMA):
        yield cluster


@pytest.fixture
def settings(fltdb: LocalCluster) -> Settings:
    replicas = [db_dsn(fltdb, i) for i in (1, 2)]
    return Settings.from_dict(
        {"databases": {"main": {"primary": db_dsn(fltdb, 0), "replicas": replicas}}},
        environ={},
    )


def write(tmp_path: Path, text: str, name: str = "dump-db.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def rows_of(cluster: LocalCluster, sql: str) -> list[tuple[str | None, ...]]:
    """The rows of ``sql`` on the primary, as the CSV files spell them."""
    with psycopg.connect(db_dsn(cluster, 0), autocommit=True) as conn:
        rows = conn.execute(sql).fetchall()
    return sorted(tuple(None if v is None else str(v) for v in row) for row in rows)


def csv_rows(path: Path) -> tuple[list[str], list[tuple[str | None, ...]]]:
    """Header and rows of a dump's CSV file (an empty unquoted field is NULL)."""
    with path.open(newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    return header, sorted(tuple(v if v != "" else None for v in row) for row in rows)


def exported(result_out: Path) -> dict[str, Any]:
    metadata = json.loads((result_out / "metadata.json").read_text())
    return {t["name"]: t for t in metadata["tables"]}


def run_dump(cluster: LocalCluster, settings: Settings, vis: Path, out: Path) -> dict[str, Any]:
    """Dump, check the output against its own row_filter, and verify the re-import."""
    result = dump(settings, Visibility.load(vis), out, quiet=True, stderr=io.StringIO())
    assert result.role == "replica"
    tables = exported(out)
    # metadata.json's row_filter alone selects the rows the export holds.
    with psycopg.connect(db_dsn(cluster, 1), autocommit=True) as conn:
        for name, table in tables.items():
            where = f" WHERE {table['row_filter']}" if table["row_filter"] else ""
            schema, _, relation = name.partition(".")
            count = conn.execute(
                f'SELECT count(*) FROM "{schema}"."{relation}" AS _pgr_0{where}'
            ).fetchone()
            assert count == (table["rows"],), name
    report = io.StringIO()
    checked = verify(out, settings, out=report)
    assert checked.tables == {name: t["rows"] for name, t in tables.items()}, report.getvalue()
    assert checked.foreign_keys == len(
        json.loads((out / "metadata.json").read_text())["foreign_keys"]
    )
    return tables


# ---------------------------------------------------------------------- crates.io's rows


def test_crates_io_filter_gives_crates_io_rows_with_dangling_references_as_null(
    fltdb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """crates.io's configuration as written: every table holds exactly the rows of
    crates.io's own semantics. A live ownership whose created_by is a user left out stays,
    with created_by NULL (it was dropped with the whole row before); so does a follow whose
    user is left out or never existed (a NOT VALID key)."""
    out = tmp_path / "dump"
    tables = run_dump(fltdb, settings, write(tmp_path, CRATES_IO), out)
    assert set(tables) == set(EXPECTED)
    for name, sql in EXPECTED.items():
        header, rows = csv_rows(out / tables[name]["file"])
        assert header == tables[name]["columns"]
        assert rows == rows_of(fltdb, sql), name

    live = rows_of(fltdb, "SELECT count(*) FROM flt_crate_owners WHERE NOT deleted")[0][0]
    assert str(tables["public.flt_crate_owners"]["rows"]) == live  # no ownership lost
    dangling = f"""
        SELECT count(*) FROM flt_crate_owners
        WHERE NOT deleted AND created_by IS NOT NULL AND created_by NOT IN ({KEPT_USERS})"""
    nulled = int(rows_of(fltdb, dangling)[0][0])
    assert nulled > 100  # the case at hand: about 3 in 5 such references are left out
    _, rows = csv_rows(out / tables["public.flt_crate_owners"]["file"])
    source_nulls = rows_of(
        fltdb, "SELECT count(*) FROM flt_crate_owners WHERE NOT deleted AND created_by IS NULL"
    )[0][0]
    assert sum(r[2] is None for r in rows) == int(source_nulls) + nulled
    assert (
        str(tables["public.flt_follows"]["rows"])
        == rows_of(fltdb, "SELECT count(*) FROM flt_follows")[0][0]
    )
    # Rows are only ever left out by a filter or a NOT NULL key: no condition on these.
    assert tables["public.flt_versions"]["row_filter"] is None
    assert tables["public.flt_follows"]["row_filter"] is None
    assert "IN (SELECT" in tables["public.flt_crate_owners"]["row_filter"]


def test_on_filtered_parent_drop_leaves_the_row_out_instead(
    fltdb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """``on_filtered_parent = { created_by = "drop" }`` (by column) and the same by
    constraint name: the ownership rows whose creator is left out are not exported."""
    expected = rows_of(
        fltdb,
        f"""SELECT crate_id, owner_id, created_by FROM flt_crate_owners
            WHERE NOT deleted AND (created_by IS NULL OR created_by IN ({KEPT_USERS}))""",
    )
    for key in ("created_by", "flt_crate_owners_created_by_fkey"):
        text = CRATES_IO.replace(
            "[flt_crate_owners]\n",
            f'[flt_crate_owners]\non_filtered_parent = {{ {key} = "drop" }}\n',
        )
        out = tmp_path / key
        tables = run_dump(fltdb, settings, write(tmp_path, text, f"{key}.toml"), out)
        _, rows = csv_rows(out / tables["public.flt_crate_owners"]["file"])
        assert rows == expected
        assert '"created_by" IS NULL OR' in tables["public.flt_crate_owners"]["row_filter"]
        # the other tables are as before
        _, follows = csv_rows(out / tables["public.flt_follows"]["file"])
        assert follows == rows_of(fltdb, EXPECTED["public.flt_follows"])
    live = rows_of(fltdb, "SELECT count(*) FROM flt_crate_owners WHERE NOT deleted")[0][0]
    assert len(expected) < int(live)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            'on_filtered_parent = { owner_id = "null" }',
            'flt_crate_owners.on_filtered_parent.owner_id: "null" needs nullable columns, '
            "and owner_id of foreign key flt_crate_owners_owner_id_fkey is NOT NULL",
        ),
        (
            'on_filtered_parent = { created_bye = "drop" }',
            "flt_crate_owners.on_filtered_parent.created_bye: public.flt_crate_owners has no "
            "foreign key created_bye to an exported table",
        ),
        (
            'on_filtered_parent = { created_by = "keep" }',
            'flt_crate_owners.on_filtered_parent: expected a table such as { created_by = "drop" }',
        ),
    ],
    ids=["null-on-not-null", "unknown-key", "bad-value"],
)
def test_on_filtered_parent_mistakes_name_the_setting(
    fltdb: LocalCluster, settings: Settings, tmp_path: Path, setting: str, message: str
) -> None:
    text = CRATES_IO.replace("[flt_crate_owners]\n", f"[flt_crate_owners]\n{setting}\n")
    with pytest.raises(VisibilityError) as info:
        dump(settings, Visibility.load(write(tmp_path, text)), tmp_path / "d", quiet=True)
    assert message in str(info.value)
    if "created_bye" in setting:
        assert "did you mean created_by?" in str(info.value)
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------- composite keys


def test_composite_keys_drop_null_together_and_follow_a_nulled_unique_key(
    fltdb: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """Hidden teams are left out: a member (NOT NULL (org, team)) of one is dropped; an
    invite to one keeps its row with org and team both NULL, while an invite whose team
    is NULL on the source (MATCH SIMPLE) keeps its org; a note on an invite whose
    (org, team) was exported as NULL gets NULL too, though the invite itself is kept."""
    out = tmp_path / "dump"
    tables = run_dump(fltdb, settings, write(tmp_path, TEAMS, "teams.toml"), out)
    visible = "SELECT org, team FROM flt_teams WHERE NOT hidden"
    expected = {
        "public.flt_teams": "SELECT org, team, name FROM flt_teams WHERE NOT hidden",
        "public.flt_members": f"""
            SELECT id, org, team FROM flt_members WHERE (org, team) IN ({visible})""",
        "public.flt_invites": f"""
            SELECT id, CASE WHEN ok THEN org END, CASE WHEN ok THEN team END FROM (
                SELECT *, team IS NULL OR (org, team) IN ({visible}) AS ok FROM flt_invites
            ) AS i""",
        "public.flt_invite_notes": f"""
            SELECT id, CASE WHEN ok THEN org END, CASE WHEN ok THEN team END, note FROM (
                SELECT *, team IS NULL OR (org, team) IN ({visible}) AS ok FROM flt_invite_notes
            ) AS n""",
    }
    for name, sql in expected.items():
        _, rows = csv_rows(out / tables[name]["file"])
        assert rows == rows_of(fltdb, sql), name
    assert tables["public.flt_members"]["rows"] < 1000
    assert tables["public.flt_invites"]["rows"] == 200
    _, invites = csv_rows(out / tables["public.flt_invites"]["file"])
    assert any(org is None and team is None for _, org, team in invites)
    assert any(org is not None and team is None for _, org, team in invites)  # as on source
    _, notes = csv_rows(out / tables["public.flt_invite_notes"]["file"])
    assert any(org is None and team is None for _, org, team, _ in notes)
    assert '(_pgr_0."org", _pgr_0."team") IN (SELECT' in tables["public.flt_members"]["row_filter"]


# ---------------------------------------------------------------------- the plan


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def test_explain_runs_each_parent_filter_once_per_query(
    fltdb: LocalCluster, tmp_path: Path
) -> None:
    """The queries of crate_owners (a NOT NULL and a nullable key to the filtered users)
    and versions: no subplan at all, every node runs once (nothing re-executed per child
    row), the users filter's tables are scanned once per checked key. With a tiny
    work_mem, so that no hash table fits in memory: joins spill to disk and still run
    once, while the correlated EXISTS the dump used before, whose hashed subplan no
    longer fits, re-runs the users filter for every row."""
    vis = Visibility.load(write(tmp_path, CRATES_IO))
    with psycopg.connect(db_dsn(fltdb, 1)) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        plan = _build_plan(conn, vis)
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        conn.execute("SET LOCAL work_mem = '64kB'")
        tables = {t.qualified: t for t in plan.tables}
        for name, checked in (("public.flt_crate_owners", 2), ("public.flt_versions", 1)):
            sql = tables[name].select_sql()
            row = conn.execute(f"EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) {sql}").fetchone()
            assert row is not None
            text = json.dumps(row[0], indent=1)
            assert "SubPlan" not in text, text  # no subplan, hashed or per row
            nodes = list(plan_nodes(row[0][0]["Plan"]))
            assert {n["Actual Loops"] for n in nodes} == {1}, text
            assert any(n["Node Type"] == "Hash Join" for n in nodes), text
            scans = [n for n in nodes if n.get("Relation Name") == "flt_crate_owners"]
            own = name == "public.flt_crate_owners"
            assert len(scans) == checked + own, text

        # The same export as correlated semi-joins re-runs the users filter per row.
        exists = (
            "SELECT count(*) FROM flt_crate_owners AS c WHERE c.crate_id <= 100 AND EXISTS ("
            f"SELECT 1 FROM flt_users AS u WHERE u.id = c.owner_id AND ({USERS_FILTER}))"
            " AND (c.created_by IS NULL OR EXISTS ("
            f"SELECT 1 FROM flt_users AS u WHERE u.id = c.created_by AND ({USERS_FILTER})))"
        )
        row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {exists}").fetchone()
        assert row is not None
        loops = [
            n["Actual Loops"]
            for n in plan_nodes(row[0][0]["Plan"])
            if n.get("Relation Name") == "flt_versions"
        ]
        assert max(loops) > 50
