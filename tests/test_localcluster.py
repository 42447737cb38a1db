"""LocalCluster and ``pgreplica cluster`` against real PostgreSQL servers."""

from __future__ import annotations

import os
import shutil
import stat
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from pgreplica import localcluster
from pgreplica.cli import main
from pgreplica.localcluster import format_delay, parse_delay
from pgreplica.testing import ClusterError, LocalCluster, lsn_to_int, make_cluster_directory


def new_table(cluster: LocalCluster) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    cluster.execute(0, f"CREATE TABLE {name} (v int)")
    return name


def count(cluster: LocalCluster, index: int, table: str) -> int:
    return int(cluster.execute(index, f"SELECT count(*) FROM {table}")[0][0])


def password_of(cluster: LocalCluster) -> str:
    return (cluster.directory / "pwfile").read_text().strip()


def wait_for(check: object, timeout: float = 10) -> float:
    """Poll ``check()`` until true; return the seconds it took."""
    assert callable(check)
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - start


# ---------------------------------------------------------------- without servers


@pytest.mark.parametrize(
    ("delay", "ms"),
    [(0, 0), (0.3, 300), (2, 2000), ("0", 0), ("300ms", 300), ("2s", 2000), ("1min", 60_000)],
)
def test_parse_delay(delay: float | str, ms: int) -> None:
    assert parse_delay(delay) == ms


@pytest.mark.parametrize("delay", ["300", "-1s", "fast", -0.5, float("nan")])
def test_parse_delay_rejects(delay: float | str) -> None:
    with pytest.raises(ClusterError):
        parse_delay(delay)


def test_format_delay_and_lsn() -> None:
    assert format_delay(0) == "0"
    assert format_delay(300) == "300ms"
    assert lsn_to_int("0/3000148") == 0x3000148
    assert lsn_to_int("1/0") > lsn_to_int("0/FFFFFFFF")
    with pytest.raises(ClusterError, match="not a WAL position"):
        lsn_to_int("3000148")


def test_root_without_postgres_user_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_user(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(localcluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(localcluster.pwd, "getpwnam", no_user)
    with pytest.raises(ClusterError, match="running as root: create an unprivileged user"):
        LocalCluster(tmp_path / "c").up()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the servers to 'postgres'")
def test_untraversable_parent_is_reported() -> None:
    parent = make_cluster_directory()
    try:
        os.chmod(parent, 0o700)
        with pytest.raises(ClusterError, match=f"{parent} is not traversable"):
            LocalCluster(parent / "cluster").up()
    finally:
        shutil.rmtree(parent)


def test_missing_binaries_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGREPLICA_PG_BINDIR", str(tmp_path))
    with pytest.raises(ClusterError, match="no initdb"):
        localcluster.find_bindir()


# ---------------------------------------------------------------- the session cluster


def test_up_gives_a_primary_and_streaming_replicas(cluster: LocalCluster) -> None:
    servers = cluster.status()
    assert [(s["index"], s["role"], s["port"]) for s in servers] == [
        (0, "primary", cluster.port(0)),
        (1, "replica", cluster.port(0) + 1),
        (2, "replica", cluster.port(0) + 2),
    ]
    assert all(s["running"] and not s["frozen"] for s in servers)
    assert servers[0]["in_recovery"] is False
    assert all(s["in_recovery"] is True and s["streaming"] is True for s in servers[1:])
    senders = cluster.execute(
        0,
        "SELECT s.slot_name, r.state FROM pg_stat_replication r"
        " JOIN pg_replication_slots s ON s.active_pid = r.pid ORDER BY 1",
    )
    assert senders == [("replica1", "streaming"), ("replica2", "streaming")]
    assert cluster.replica_dsns == [cluster.dsn(1), cluster.dsn(2)]
    assert cluster.config() == {
        "databases": {"main": {"primary": cluster.primary_dsn, "replicas": cluster.replica_dsns}}
    }


def test_rows_written_on_the_primary_reach_both_replicas(healthy_cluster: LocalCluster) -> None:
    table = new_table(healthy_cluster)
    healthy_cluster.execute(0, f"INSERT INTO {table} VALUES (1), (2)")
    healthy_cluster.wait_replayed()
    assert count(healthy_cluster, 1, table) == 2
    assert count(healthy_cluster, 2, table) == 2


def test_lag_delays_replay_and_zero_removes_it(healthy_cluster: LocalCluster) -> None:
    c = healthy_cluster
    table = new_table(c)
    c.wait_replayed()
    c.lag(1, "300ms")
    assert c.execute(1, "SHOW recovery_min_apply_delay") == [("300ms",)]
    c.execute(0, f"INSERT INTO {table} VALUES (1)")
    c.wait_replayed(replicas=[2])
    assert count(c, 2, table) == 1
    assert count(c, 1, table) == 0
    assert wait_for(lambda: count(c, 1, table) == 1) > 0.15
    c.lag(1, 0)
    assert c.execute(1, "SHOW recovery_min_apply_delay") == [("0",)]
    c.execute(0, f"INSERT INTO {table} VALUES (2)")
    c.wait_replayed(timeout=5)
    assert count(c, 1, table) == 2


def test_pause_stops_replay_and_resume_restarts_it(healthy_cluster: LocalCluster) -> None:
    c = healthy_cluster
    table = new_table(c)
    c.wait_replayed()
    c.pause(2)
    replayed = c.execute(2, "SELECT pg_last_wal_replay_lsn()::text")[0][0]
    c.execute(0, f"INSERT INTO {table} VALUES (1)")
    target = lsn_to_int(c.execute(0, "SELECT pg_current_wal_lsn()::text")[0][0])

    def received() -> bool:
        lsn = c.execute(2, "SELECT pg_last_wal_receive_lsn()::text")[0][0]
        return lsn_to_int(lsn) >= target

    wait_for(received)
    assert c.execute(2, "SELECT pg_last_wal_replay_lsn()::text")[0][0] == replayed
    assert count(c, 2, table) == 0
    assert c.status()[2]["paused"] is True
    with pytest.raises(ClusterError, match="replica 2 did not replay"):
        c.wait_replayed(replicas=[2], timeout=0.2)
    c.resume(2)
    c.wait_replayed()
    assert count(c, 2, table) == 1


def test_kill_and_start(healthy_cluster: LocalCluster) -> None:
    c = healthy_cluster
    table = new_table(c)
    c.kill(2)
    assert c.status()[2]["running"] is False
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(c.dsn(2), connect_timeout=2).close()
    c.execute(0, f"INSERT INTO {table} VALUES (1)")
    c.wait_replayed()  # only the running replicas
    c.start(2)
    assert c.execute(2, "SELECT pg_is_in_recovery()") == [(True,)]
    c.wait_replayed()
    assert count(c, 2, table) == 1


def test_freeze_hangs_the_server_and_thaw_restores_it(healthy_cluster: LocalCluster) -> None:
    c = healthy_cluster
    c.freeze(1)
    assert c.status()[1]["frozen"] is True
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        psycopg.connect(c.dsn(1), connect_timeout=1).close()
    assert time.monotonic() - start < 10
    c.thaw(1)
    assert c.status()[1]["frozen"] is False
    assert c.execute(1, "SELECT 1") == [(1,)]


def test_load_reopens_the_cluster(cluster: LocalCluster) -> None:
    again = LocalCluster.load(cluster.directory)
    assert again.dsn(2) == cluster.dsn(2)
    assert again.status()[1]["running"] is True
    with pytest.raises(ClusterError, match="already holds a cluster with 2 replicas"):
        LocalCluster(cluster.directory, replicas=3)


def test_out_of_range_indexes_name_the_valid_range(cluster: LocalCluster) -> None:
    with pytest.raises(ClusterError, match=r"^no replica 3: this cluster has replicas 1\.\.2$"):
        cluster.pause(3)
    with pytest.raises(ClusterError, match=r"no replica 0: .*replicas 1\.\.2 \(0 is the primary\)"):
        cluster.lag(0, "1s")
    with pytest.raises(ClusterError, match=r"no server 3: .*primary \(0\) and replicas 1\.\.2"):
        cluster.kill(3)


def test_password_stays_out_of_repr_and_files_are_private(cluster: LocalCluster) -> None:
    password = password_of(cluster)
    assert len(password) == 32
    assert password in cluster.primary_dsn
    assert password not in repr(cluster)
    assert password not in cluster.redacted_dsn(1)
    assert password not in (cluster.directory / "cluster.json").read_text()
    assert stat.S_IMODE((cluster.directory / "pwfile").stat().st_mode) == 0o600


# ---------------------------------------------------------------- promotion and the CLI


def test_promote_makes_the_replica_a_primary(scratch_cluster: LocalCluster) -> None:
    c = scratch_cluster
    table = new_table(c)
    c.wait_replayed()
    c.promote(1)
    assert c.execute(1, "SELECT pg_is_in_recovery()") == [(False,)]
    c.execute(1, f"INSERT INTO {table} VALUES (1)")
    assert count(c, 1, table) == 1
    assert count(c, 0, table) == 0  # the old primary keeps running on its own
    assert c.status()[1]["role"] == "primary"


def test_cli_up_status_down(capsys: pytest.CaptureFixture[str]) -> None:
    directory = make_cluster_directory()
    try:
        assert main(["cluster", "up", "--dir", str(directory), "--replicas", "1"]) == 0
        up = capsys.readouterr()
        cluster = LocalCluster.load(directory)
        password = password_of(cluster)
        assert f"primary   postgresql://postgres:***@127.0.0.1:{cluster.port(0)}/postgres" in up.out
        assert f"replica1  postgresql://postgres:***@127.0.0.1:{cluster.port(1)}/" in up.out
        assert f"config: {directory / 'pgreplica.toml'}" in up.out
        toml = directory / "pgreplica.toml"
        assert stat.S_IMODE(toml.stat().st_mode) == 0o600
        assert f'primary = "{cluster.primary_dsn}"' in toml.read_text()

        assert (
            main(["cluster", "lag", "--dir", str(directory), "--replica", "1", "--delay", "2s"])
            == 0
        )
        assert capsys.readouterr().out == "lag: replica1 ok\n"
        assert main(["cluster", "status", "--dir", str(directory)]) == 0
        status = capsys.readouterr().out.splitlines()
        assert status[0].split() == ["server", "role", "port", "state", "lsn", "replay", "delay"]
        assert status[1].split()[:4] == ["primary", "primary", str(cluster.port(0)), "running"]
        assert status[2].split()[:4] == ["replica1", "replica", str(cluster.port(1)), "streaming"]
        assert status[2].split()[-1] == "2s"

        assert main(["cluster", "pause", "--dir", str(directory), "--replica", "2"]) == 1
        assert capsys.readouterr().err == "pgreplica: no replica 2: this cluster has replica 1\n"

        assert main(["cluster", "down", "--dir", str(directory)]) == 0
        assert main(["cluster", "status", "--dir", str(directory)]) == 0
        assert [line.split()[3] for line in capsys.readouterr().out.splitlines()[-2:]] == [
            "stopped",
            "stopped",
        ]
        assert main(["cluster", "destroy", "--dir", str(directory)]) == 0
        assert not directory.exists()
        assert main(["cluster", "status", "--dir", str(directory)]) == 1
        out, err = capsys.readouterr()
        assert err.startswith("pgreplica: no cluster in")
        for text in (up.out, up.err, out, err, *status):
            assert password not in text
    finally:
        if directory.exists():
            LocalCluster.load(directory).destroy()


def test_replay_holdups_name_the_replicas_that_do_not_replay_at_once(
    healthy_cluster: LocalCluster,
) -> None:
    c = healthy_cluster
    assert c.replay_holdups() == {}
    assert not c.paused(1) and not c.frozen(0)
    c.lag(1, "2s")
    c.pause(2)
    assert c.paused(2)
    assert c.replay_holdups() == {1: "apply delay 2000ms", 2: "replay paused"}
    c.freeze(2)
    assert c.frozen(2)
    assert c.replay_holdups() == {1: "apply delay 2000ms", 2: "frozen"}
    c.thaw(2)
    c.kill(1)
    assert c.replay_holdups() == {1: "stopped", 2: "replay paused"}
    started = time.monotonic()
    assert c.create_database("holdups-db") is True  # waits for none of them
    assert time.monotonic() - started < 20
    c.heal()
    assert c.replay_holdups() == {}
    c.execute(0, 'DROP DATABASE "holdups-db"')
