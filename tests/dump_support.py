"""What the dump tests share: a database of their own on the session cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from pgreplica.testing import LocalCluster


def database_dsn(cluster: LocalCluster, index: int, database: str) -> str:
    """Server ``index``'s DSN, for ``database`` instead of ``postgres``."""
    dsn = cluster.dsn(index)
    assert dsn.endswith("/postgres")
    return dsn[: -len("postgres")] + database


@contextlib.contextmanager
def filled_database(cluster: LocalCluster, database: str, sql: str) -> Iterator[LocalCluster]:
    """``database`` created afresh on the healed cluster, ``sql`` run in it on the
    primary and replayed by every replica; dropped (and the cluster healed) after."""
    cluster.heal()
    cluster.execute(0, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    cluster.execute(0, f"CREATE DATABASE {database}")
    with psycopg.connect(database_dsn(cluster, 0, database), autocommit=True) as conn:
        conn.execute(sql)
    cluster.wait_replayed()
    try:
        yield cluster
    finally:
        cluster.heal()
        cluster.execute(0, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
