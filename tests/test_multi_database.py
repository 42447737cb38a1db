"""Several logical databases on one primary (GitLab's main and ci): one shared primary
pool, each database on its own replicas, names for every routed unit, and a percentage
rollout that moves a database's reads from another's replicas to its own."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import pytest

import pgreplica
from conftest import two_databases
from pgreplica import ConfigError, Settings
from pgreplica.testing import LocalCluster


def multi(cluster: LocalCluster) -> dict[str, object]:
    """Two databases, pools of two connections, an application name to count them by."""
    return two_databases(
        cluster, pool_min_size=2, pool_max_size=2, application_name="pgreplica-multi"
    )


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    healthy_cluster.execute(
        0,
        "CREATE TABLE IF NOT EXISTS md_main (v text); CREATE TABLE IF NOT EXISTS md_ci (v text)",
    )
    healthy_cluster.wait_replayed()
    config = multi(healthy_cluster)
    with pgreplica.LoadBalancer(config=config) as balancer, balancer.isolated():
        yield balancer


# -- configuration ---------------------------------------------------------------------------


def test_reuse_primary_from_the_environment() -> None:
    data = {
        "databases": {
            "main": {"primary": "host=p dbname=app", "replicas": ["host=r1 dbname=app"]},
            "ci": {"primary": "host=elsewhere dbname=ci", "replicas": ["host=r2 dbname=app"]},
        }
    }
    alone = Settings.from_dict(data, environ={})
    assert alone.databases["ci"].primary_from is None
    shared = Settings.from_dict(data, environ={"PGREPLICA_REUSE_PRIMARY_CI": "main"})
    assert shared.databases["ci"].primary_from == "main"
    assert shared.databases["ci"].primary == shared.databases["main"].primary
    with pytest.raises(ConfigError, match=r"PGREPLICA_REUSE_PRIMARY_CI.*'nope'"):
        Settings.from_dict(data, environ={"PGREPLICA_REUSE_PRIMARY_CI": "nope"})
    with pytest.raises(ConfigError, match=r"PGREPLICA_REUSE_PRIMARY_CI.*configured database"):
        Settings.from_dict(data, environ={"PGREPLICA_REUSE_PRIMARY_CI": "host=x"})


@pytest.mark.parametrize(
    ("value", "problem"),
    [(101, "0 to 100"), (-1, "0 to 100"), ("half", "'half'"), (True, "True"), ("nan", "nan")],
)
def test_a_bad_rollout_names_the_setting(value: object, problem: str) -> None:
    data = {
        "databases": {
            "main": {"primary": "host=p"},
            "ci": {"primary": "main", "rollout": value},
        }
    }
    with pytest.raises(ConfigError, match=rf"databases.ci.rollout.*{problem}"):
        Settings.from_dict(data, environ={})


def test_a_rollout_needs_a_shared_primary() -> None:
    data = {"databases": {"main": {"primary": "host=p", "rollout": 5}}}
    with pytest.raises(ConfigError, match=r"databases.main.rollout.*shared primary"):
        Settings.from_dict(data, environ={})
    ok = Settings.from_dict(
        {
            "databases": {
                "main": {"primary": "host=p"},
                "ci": {"primary": "main", "rollout": "0.01%"},
            }
        },
        environ={},
    )
    assert ok.databases["ci"].rollout == 0.01


# -- one primary, two read sets ----------------------------------------------------------------


def primary_backends(cluster: LocalCluster) -> int:
    rows = cluster.execute(
        0,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgreplica-multi'"
        " AND backend_type = 'client backend'",
    )
    return int(rows[0][0])


def test_both_databases_share_one_primary_pool(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    for database in ("main", "ci", "main", "ci"):
        with lb.write(database) as conn:
            conn.execute("SELECT 1")
    assert primary_backends(healthy_cluster) == 2  # pool_max_size, once: not two pools
    # one transaction writes rows of both databases on the one primary connection
    with lb.isolated():
        with lb.write("ci") as conn:
            conn.execute("INSERT INTO md_main VALUES ('both')")
            conn.execute("INSERT INTO md_ci VALUES ('both')")
        token = lb.token()
        assert token.get("main") and token.get("main") == token.get("ci")
        with lb.read("main") as conn:
            assert conn.execute("SELECT count(*) FROM md_main WHERE v = 'both'").fetchone()
        with lb.read("ci") as conn:
            row = conn.execute("SELECT count(*) FROM md_ci WHERE v = 'both'").fetchone()
            assert row is not None and row[0] >= 1


def test_every_unit_is_named_by_its_configuration(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    with lb.read("main") as conn:
        assert conn.db_config_name == "main_replica"
        assert conn.host.endswith(f":{healthy_cluster.port(1)}/postgres")
    with lb.read("ci") as conn:
        assert conn.db_config_name == "ci_replica"
        assert conn.host.endswith(f":{healthy_cluster.port(2)}/postgres")
    with lb.primary():
        with lb.read("ci") as conn:
            assert conn.db_config_name == "main"  # ci's primary work shows as main's
        with lb.read("main") as conn:
            assert conn.db_config_name == "main"
    with lb.connection("ci") as rc:
        rc.autocommit = True
        rc.execute("SELECT 1")
        assert rc.db_config_name == "ci_replica"
        rc.execute("INSERT INTO md_ci VALUES ('rc')")
        assert rc.db_config_name == "main"


# -- the rollout ------------------------------------------------------------------------------


def read_names(lb: pgreplica.LoadBalancer, units: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for _ in range(units):
        with lb.read("ci") as conn:
            conn.execute("SELECT 1")
            names[conn.db_config_name] += 1
    return names


def test_a_rollout_moves_reads_to_the_database_own_replicas(
    lb: pgreplica.LoadBalancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_names(lb, 20) == {"ci_replica": 20}  # no rollout configured: its own
    lb.set_rollout("ci", 0)
    assert read_names(lb, 20) == {"main_replica": 20}  # configured, not enabled yet
    lb.set_rollout("ci", "0.01%")
    assert read_names(lb, 50)["main_replica"] >= 49
    lb.set_rollout("ci", 50)
    half = read_names(lb, 400)
    assert 140 <= half["ci_replica"] <= 260, half  # binomial(400, 0.5): 3.3 sigma
    assert half["ci_replica"] + half["main_replica"] == 400
    lb.set_rollout("ci", 100)
    assert read_names(lb, 20) == {"ci_replica": 20}
    # a feature flag: asked at each decision
    flag = {"percent": 0.0}
    lb.set_rollout("ci", lambda: flag["percent"])
    assert read_names(lb, 10) == {"main_replica": 10}
    flag["percent"] = 100.0
    assert read_names(lb, 10) == {"ci_replica": 10}
    # the environment, read at decision time, when nothing is set at run time
    lb.set_rollout("ci", None)
    monkeypatch.setenv("PGREPLICA_ROLLOUT_CI", "0")
    assert read_names(lb, 10) == {"main_replica": 10}
    monkeypatch.setenv("PGREPLICA_ROLLOUT_CI", "100%")
    assert read_names(lb, 10) == {"ci_replica": 10}
    with pytest.raises(ConfigError, match="set_rollout"):
        lb.set_rollout("ci", 250)
    with pytest.raises(ConfigError, match="reuses another's primary"):
        lb.set_rollout("main", 50)


def test_an_unreadable_rollout_keeps_reads_where_they_were(
    lb: pgreplica.LoadBalancer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PGREPLICA_ROLLOUT_CI", "lots")
    with caplog.at_level(logging.WARNING, logger="pgreplica"):
        assert read_names(lb, 5) == {"main_replica": 5}

    def broken() -> float:
        raise RuntimeError("flag service down")

    lb.set_rollout("ci", broken)
    lb._router.databases["ci"].clamp_warned_at = -1e9
    with caplog.at_level(logging.WARNING, logger="pgreplica"):
        assert read_names(lb, 5) == {"main_replica": 5}
    assert "rollout_unreadable database=ci error=ConfigError" in caplog.text
    assert "rollout_unreadable database=ci error=RuntimeError" in caplog.text


def test_read_your_writes_holds_across_the_rollout(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    """A ci write, then ci reads from either read set: never stale (replay paused on
    both replicas, so a stale read would miss the row)."""
    lb.set_rollout("ci", 50)
    healthy_cluster.pause(1)
    healthy_cluster.pause(2)
    try:
        for i in range(20):
            with lb.isolated():
                with lb.write("ci") as conn:
                    conn.execute("INSERT INTO md_ci VALUES (%s)", (f"ryw{i}",))
                with lb.read("ci") as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM md_ci WHERE v = %s", (f"ryw{i}",)
                    ).fetchone()
                    assert row == (1,), conn.db_config_name
    finally:
        healthy_cluster.resume(1)
        healthy_cluster.resume(2)


def test_connections_per_primary_are_one_pool_with_a_second_client(
    healthy_cluster: LocalCluster,
) -> None:
    """The same DSN in two databases without ``primary = "main"`` is still one host and
    one pool (hosts are keyed by connection string)."""
    config = multi(healthy_cluster)
    config["databases"]["ci"]["primary"] = healthy_cluster.dsn(0)  # type: ignore[index]
    with pgreplica.LoadBalancer(config=config) as balancer:
        for database in ("main", "ci"):
            with balancer.write(database) as conn:
                conn.execute("SELECT 1")
        assert primary_backends(healthy_cluster) == 2
