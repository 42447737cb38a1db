"""Shared fixtures: real PostgreSQL servers from :class:`pgreplica.testing.LocalCluster`.

``cluster``          one primary + 2 streaming replicas for the whole session.
``healthy_cluster``  ``cluster``, healed before and after the test (for failure injection).
``scratch_cluster``  a throwaway primary + 1 replica per test (for promotion).

The secret scan (tests/secret_scan.py) checks everything the session prints and logs
for the secrets of tests/secrets_registry.py; the cluster fixtures register their
passwords there.

The cluster directories are made with ``make_cluster_directory`` rather than pytest's
``tmp_path``: when the tests run as root the servers run as ``postgres``, which cannot
enter pytest's 0700 temp directories.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

# The example Django project (tests/django_project.py) for the Django and Channels tests.
from django_project import project, replicas_up  # noqa: F401
from pgreplica.context import isolated
from pgreplica.testing import LocalCluster, make_cluster_directory

# Session-scoped Redis server (tests/redis_server.py) for the sticking tests.
from redis_server import redis_server  # noqa: F401

# The secrets of the tests, for the secret scan (tests/secret_scan.py).
from secrets_registry import register_cluster

pytest_plugins = ("secret_scan",)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A running primary with replicas 1 and 2, both streaming; removed after the session.

    Tests that inject failures should use ``healthy_cluster`` so that the next test finds
    every server running again.
    """
    local = LocalCluster(make_cluster_directory(), replicas=2)
    try:
        yield register_cluster(local.up(), "session cluster password")
    finally:
        local.destroy()


@pytest.fixture
def healthy_cluster(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster with every server running, thawed, unpaused and undelayed,
    and every replica streaming and caught up; restored again after the test.

    Promotion cannot be undone: use ``scratch_cluster`` for that.
    """
    cluster.heal()
    yield cluster
    cluster.heal()


@pytest.fixture
def scratch_cluster() -> Iterator[LocalCluster]:
    """A fresh primary with one streaming replica, destroyed after the test."""
    local = LocalCluster(make_cluster_directory(), replicas=1)
    try:
        yield register_cluster(local.up(), "scratch cluster password")
    finally:
        local.destroy()


# More shared fixtures go below.


@pytest.fixture(autouse=True)
def _isolated_routing_state() -> Iterator[None]:
    """Each test starts from an empty routing state in pytest's thread, whatever an
    earlier test wrote outside lb.isolated()."""
    with isolated():
        yield


class Database:
    """A database of its own on the session cluster, for objects that must not meet
    other tests (views that call nextval, unlogged tables: a test that reads every
    relation, such as database_to_xml(), would trip over them)."""

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name

    def dsn(self, index: int) -> str:
        base = self.cluster.dsn(index)
        assert base.endswith("/postgres")
        return f"{base[: -len('postgres')]}{self.name}"

    def config(self) -> dict[str, object]:
        replicas = [self.dsn(i) for i in range(1, self.cluster.replicas + 1)]
        return {"databases": {"main": {"primary": self.dsn(0), "replicas": replicas}}}

    def execute(self, index: int, sql: str) -> None:
        with psycopg.connect(self.dsn(index), autocommit=True) as conn:
            conn.execute(sql)


@pytest.fixture(scope="session")
def routing_database(cluster: LocalCluster) -> Database:
    """The database ``routing_catalog`` on the session cluster (created once)."""
    if not cluster.execute(0, "SELECT 1 FROM pg_database WHERE datname = 'routing_catalog'"):
        cluster.execute(0, "CREATE DATABASE routing_catalog")
    cluster.wait_replayed()
    return Database(cluster, "routing_catalog")


def two_databases(
    cluster: LocalCluster, *, ci: dict[str, object] | None = None, **options: object
) -> dict[str, object]:
    """GitLab's shape: ``main`` reads replica 1; ``ci`` reuses main's primary and reads
    replica 2 (``ci`` adds settings of its own, e.g. a rollout)."""
    return {
        "databases": {
            "main": {"primary": cluster.dsn(0), "replicas": [cluster.dsn(1)]},
            "ci": {"primary": "main", "replicas": [cluster.dsn(2)], **(ci or {})},
        },
        **options,
    }
