"""``pgreplica status`` and ``pgreplica demo`` on real servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgreplica.cli import main
from pgreplica.testing import LocalCluster
from secrets_registry import register_secret

register_secret("S3cr3t-pw", "test DSN password")


def password_of(cluster: LocalCluster) -> str:
    return cluster.primary_dsn.split(":")[2].split("@")[0]


def test_status_prints_every_host_without_secrets(
    healthy_cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = healthy_cluster.write_config(tmp_path / "pgreplica.toml")
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["HOST", "DATABASES", "ROLE", "STATE"]
    roles = [line.split()[2] for line in lines[1:4]]
    assert roles == ["primary", "replica", "replica"]
    assert all(line.split()[3] == "up" for line in lines[1:4])
    assert password_of(healthy_cluster) not in out


def test_status_exits_non_zero_when_a_host_is_down(
    healthy_cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pgreplica.toml"
    dead = "postgresql://postgres:S3cr3t-pw@127.0.0.1:1/postgres"
    config.write_text(
        f'[databases.main]\nprimary = "{healthy_cluster.primary_dsn}"\nreplicas = ["{dead}"]\n'
    )
    assert main(["status", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "127.0.0.1:1/postgres" in out and " down " in out
    assert "S3cr3t-pw" not in out


def test_status_reports_a_bad_config_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pgreplica.toml"
    config.write_text('max_lag_bytes = -1\n[databases.main]\nprimary = "host=x"\n')
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgreplica: max_lag_bytes: ") and err.count("\n") == 1


def test_demo_ends_with_zero_stale_reads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "3", "--threads", "4"]) == 0
    out = capsys.readouterr().out
    assert "injected: replay delay 300ms on replica1" in out
    assert "injected: replica2 killed" in out
    assert "errors seen by the caller: 0" in out
    assert out.rstrip().splitlines()[-1] == "stale reads: 0"
    assert "***" in out


def test_check_shows_where_each_database_goes_and_the_tag_received(
    healthy_cluster: LocalCluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "multi.toml"
    config.write_text(
        "[databases.main]\n"
        f'primary = "{healthy_cluster.dsn(0)}"\n'
        f'replicas = ["{healthy_cluster.dsn(1)}"]\n'
        "[databases.ci]\n"
        'primary = "main"\n'
        f'replicas = ["{healthy_cluster.dsn(2)}"]\n'
        "rollout = 0\n"
    )
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    lines = {tuple(line.split()[:2]): line for line in out.splitlines() if line}
    assert "main_replica" in lines[("main", "read")]
    assert "/*db_config_name='main_replica'*/" in lines[("main", "read")]
    assert " main " in lines[("ci", "write")]  # ci's primary work shows as main's
    # rollout 0: ci reads from main's replicas, as in the seed before the flag is on
    assert "/*db_config_name='main_replica'*/" in lines[("ci", "read")]
    assert "ci: primary shared with main; rollout 0% of units read ci_replica" in out
    assert healthy_cluster.dsn(0).split("@")[0].split(":")[-1] not in out  # no password
    monkeypatch.setenv("PGREPLICA_ROLLOUT_CI", "100")  # the flag on, read at decision time
    assert main(["check", "--config", str(config), "--database", "ci"]) == 0
    out = capsys.readouterr().out
    read_line = next(
        line for line in out.splitlines() if line.startswith("ci ") and " read " in line
    )
    assert "/*db_config_name='ci_replica'*/" in read_line


def test_status_as_json_and_watched(
    healthy_cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = healthy_cluster.write_config(tmp_path / "pgreplica.toml")
    assert main(["status", "--config", str(config), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["role"] for r in rows} == {"primary", "replica"} and len(rows) == 3
    assert all(r["state"] == "up" and r["databases"] == ["main"] for r in rows)
    assert main(["status", "--config", str(config), "--watch", "0.05", "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("HOST ") == 2 and "\x1b[2J" in out  # two redraws
