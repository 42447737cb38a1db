"""SQL comments on routed statements (sqlcommenter format): what the server receives
names the configuration that served it and the context's tags, and no tag value can
close the comment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg import sql

import pgreplica
from conftest import two_databases
from pgreplica.comments import comment_for, with_comment
from pgreplica.testing import LocalCluster

OWN_QUERY = "SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()"


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    with (
        pgreplica.LoadBalancer(config=two_databases(healthy_cluster)) as balancer,
        balancer.isolated(),
    ):
        yield balancer


def received(conn: object, query: object = OWN_QUERY, params: object = None) -> str:
    row = conn.execute(query, params).fetchone()  # type: ignore[attr-defined]
    assert row is not None
    return str(row[-1])


def test_the_server_receives_the_configuration_name(lb: pgreplica.LoadBalancer) -> None:
    with lb.read("ci") as conn:
        assert received(conn).endswith("\n/*db_config_name='ci_replica'*/")
    with lb.read("main") as conn:
        assert received(conn).endswith("\n/*db_config_name='main_replica'*/")
    with lb.primary(), lb.read("ci") as conn:
        assert received(conn).endswith("\n/*db_config_name='main'*/")
    with lb.connection("ci") as rc:
        rc.autocommit = True
        assert received(rc).endswith("/*db_config_name='ci_replica'*/")
        with lb.primary():
            assert received(rc).endswith("/*db_config_name='main'*/")


def test_application_tags_are_sorted_and_encoded(lb: pgreplica.LoadBalancer) -> None:
    with pgreplica.tags(application="web", endpoint_id="Books#index"), lb.read() as conn:
        text = received(conn)
        with pgreplica.tags(endpoint_id=None, job="nightly run"):
            inner = received(conn)
        assert received(conn) == text  # the outer tags are back
    assert text.endswith(
        "/*application='web',db_config_name='main_replica',endpoint_id='Books%23index'*/"
    )
    assert inner.endswith("/*application='web',db_config_name='main_replica',job='nightly%20run'*/")


def test_percent_signs_survive_parameters(lb: pgreplica.LoadBalancer) -> None:
    with pgreplica.tags(note="100% sure"), lb.read() as conn:
        value = conn.execute(f"SELECT %s::text, ({OWN_QUERY})", ("p",)).fetchone()
        assert value is not None and value[0] == "p"
        assert str(value[1]).endswith("note='100%25%20sure'*/")
        assert received(conn).endswith("note='100%25%20sure'*/")  # without parameters
        cur = conn.cursor()
        cur.executemany("SELECT %s::int", [(1,), (2,)])


@pytest.mark.parametrize(
    "hostile",
    [
        "x'*/; SELECT pg_sleep(5); --",
        "*/ DROP TABLE t /*",
        "'\\'; --\n",
        "é\u0000\r\n*/",
    ],
)
def test_a_tag_cannot_close_the_comment(lb: pgreplica.LoadBalancer, hostile: str) -> None:
    with pgreplica.tags(endpoint_id=hostile), lb.read() as conn:
        text = received(conn)
    comment = text[text.index("/*db") if "/*db" in text else text.index("/*") :]
    assert text.count("*/") == 1 and text.endswith("*/")
    assert "'" not in comment.split("endpoint_id=")[1][1:-3]  # only the quotes around it
    assert ";" not in comment and "\n" not in comment


def test_comments_can_be_turned_off(healthy_cluster: LocalCluster) -> None:
    with pgreplica.LoadBalancer(config=two_databases(healthy_cluster, sql_comments=False)) as lb:
        with pgreplica.tags(application="web"), lb.read() as conn:
            assert received(conn) == OWN_QUERY
        with lb.connection() as rc:
            rc.autocommit = True
            assert received(rc) == OWN_QUERY


def test_bytes_and_composed_queries_are_tagged(lb: pgreplica.LoadBalancer) -> None:
    with lb.read("ci") as conn:
        assert received(conn, OWN_QUERY.encode()).endswith("/*db_config_name='ci_replica'*/")
        composed = sql.SQL("SELECT query FROM {} WHERE pid = pg_backend_pid()").format(
            sql.Identifier("pg_stat_activity")
        )
        assert received(conn, composed).endswith("/*db_config_name='ci_replica'*/")


def test_the_classifier_and_prepared_statements_see_one_text(lb: pgreplica.LoadBalancer) -> None:
    with lb.connection("ci") as rc:
        rc.autocommit = True
        for _ in range(3):
            rc.execute("SELECT 1 AS prepared_probe", prepare=True)
        row = rc.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
            ("%prepared_probe%",),
        ).fetchone()
        assert row == (1,)  # one prepared statement: the tagged text does not vary
    route = lb._router.route("ci")
    assert "SELECT 1 AS prepared_probe" in route.classified  # cached without its comment


def test_invalid_tag_keys_are_refused() -> None:
    for key in ("db_config_name",):
        with pytest.raises(ValueError, match="invalid SQL comment tag"):
            pgreplica.tags(**{key: "x"})
    with pytest.raises(ValueError, match="invalid SQL comment tag '1x'"):
        pgreplica.tags(**{"1x": "y"})


def test_with_comment_keeps_other_query_types() -> None:
    assert with_comment(object, comment_for("main"), None) is object
    assert comment_for("main") == "/*db_config_name='main'*/"
