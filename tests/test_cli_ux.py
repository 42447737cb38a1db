"""The first hour with ``pgreplica``: the command as a user runs it (a real process on
real servers), its errors, its Ctrl-C, and the hints for optional extras."""

from __future__ import annotations

import json
import os
import pickle
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import pytest

from pgreplica import ConfigError, LoadBalancer
from pgreplica._extras import MissingExtra, MissingExtraSetting, extra_imports
from pgreplica.cli import format_hosts, main
from pgreplica.localcluster.ports import _choose_ports
from pgreplica.testing import LocalCluster
from secrets_registry import register_secret

SECRET = register_secret("S3cr3t-pw", "test DSN password")
DEAD_PRIMARY = f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres"


def pgreplica_command() -> list[str]:
    script = Path(sys.executable).parent / "pgreplica"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pgreplica.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGREPLICA_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(args: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pgreplica_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and exactly one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgreplica"), lines[0]
    return lines[0]


class Running:
    """A ``pgreplica`` process whose stdout is read line by line as it comes."""

    def __init__(self, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [*pgreplica_command(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=clean_env(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line is None:
                raise AssertionError(f"exited without printing {needle!r}: {self.out}")
            self.out.append(line)
            if needle in line:
                return

    def interrupt(self, within: float) -> tuple[int, str]:
        """Send SIGINT; return the exit code and stderr, which must come ``within``
        seconds."""
        self.proc.send_signal(signal.SIGINT)
        returncode = self.proc.wait(timeout=within)
        assert self.proc.stderr is not None
        return returncode, self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for process in started:
        process.close()


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# -- --version and python -m ----------------------------------------------------------------


def test_version_prints_the_installed_version() -> None:
    result = run(["--version"])
    assert result.returncode == 0
    assert result.stdout == f"pgreplica {metadata.version('pgreplica')}\n"


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgreplica.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: pgreplica")
    assert result.stderr == ""


# -- pgreplica status ----------------------------------------------------------------------


def test_status_with_a_replica_down_shows_no_lag_and_each_error_once(
    healthy_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = healthy_cluster.write_config(tmp_path / "pgreplica.toml")
    healthy_cluster.kill(2)
    label = f"127.0.0.1:{healthy_cluster.port(2)}/postgres"

    result = run(["status", "--config", str(config)])
    assert result.returncode == 1
    assert result.stderr == ""  # neither psycopg_pool's nor pgreplica's log records
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith(label))
    assert row[2:] == ["replica", "down", "-", "-", "-"]  # no lag made of a stale LSN
    assert result.stdout.count("Connection refused") == 1
    assert result.stdout.splitlines()[-1].startswith(f"{label}: OperationalError: ")
    assert healthy_cluster.dsn(0).split("@")[0].split(":")[-1] not in result.stdout

    result = run(["status", "--config", str(config), "--json"])
    assert result.returncode == 1
    assert result.stderr == ""
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON
    assert len(rows) == 3
    down = next(r for r in rows if r["host"] == label)
    assert down["state"] == "down"
    assert down["lag_bytes"] is None and down["lag_seconds"] is None
    assert "Connection refused" in down["last_error"]
    up = [r for r in rows if r["role"] == "replica" and r["host"] != label]
    assert up[0]["state"] == "up" and isinstance(up[0]["lag_bytes"], int)


def test_a_replica_that_goes_down_has_no_lag_in_lb_status(healthy_cluster: LocalCluster) -> None:
    """At the source: ``lb.status()`` (and so metrics and ``manage.py
    pgreplica_status``) reports no lag for a replica that was up and went down, rather
    than one computed from its last, stale replay position."""
    from pgreplica import LoadBalancer
    from pgreplica.workload import wait_until

    config = {
        "databases": {
            "main": {
                "primary": healthy_cluster.dsn(0),
                "replicas": [healthy_cluster.dsn(1), healthy_cluster.dsn(2)],
            }
        },
        "probe_interval": 0.1,
    }
    with LoadBalancer(config=config) as lb:
        lb.open(wait=True)
        wait_until(lambda: all(s.state == "up" for s in lb.status()), timeout=15, what="up")
        assert all(s.lag_bytes is not None for s in lb.status() if s.role == "replica")
        healthy_cluster.execute(0, "SELECT pg_switch_wal()")  # the primary moves on
        healthy_cluster.kill(2)
        label = f"127.0.0.1:{healthy_cluster.port(2)}/postgres"

        def down() -> bool:
            return any(s.host == label and s.state == "down" for s in lb.status())

        wait_until(down, timeout=15, what="replica 2 down")
        row = next(s for s in lb.status() if s.host == label)
        assert row.replay_lsn is not None  # it had been probed
        assert (row.lag_bytes, row.lag_seconds) == (None, None)


def test_format_hosts_renders_a_balancer_status(healthy_cluster: LocalCluster) -> None:
    dead = f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres"
    config = {"databases": {"main": {"primary": healthy_cluster.dsn(0), "replicas": [dead]}}}
    lb = LoadBalancer(config=config)
    try:
        lb.open()
        deadline = time.monotonic() + 10
        while any(s.state == "unknown" for s in lb.status()) and time.monotonic() < deadline:
            time.sleep(0.02)
        rows = lb.status()
    finally:
        lb.close()
    table = format_hosts(rows, as_json=False)
    lines = table.splitlines()
    assert lines[0].split() == [
        "HOST",
        "DATABASES",
        "ROLE",
        "STATE",
        "REPLAY",
        "LSN",
        "LAG",
        "BYTES",
        "LAG",
        "SECONDS",
    ]
    assert lines[1].split()[2:4] == ["primary", "up"]
    assert lines[2].split()[:5] == ["127.0.0.1:1/postgres", "main", "replica", "down", "-"]
    assert lines[2].split()[5:] == ["-", "-"]
    assert lines[3].startswith("127.0.0.1:1/postgres: OperationalError: ")
    assert not table.endswith("\n") and SECRET not in table
    as_json = [json.loads(line) for line in format_hosts(rows, as_json=True).splitlines()]
    assert [r["state"] for r in as_json] == ["up", "down"]
    assert as_json[1]["lag_bytes"] is None and as_json[1]["lag_seconds"] is None
    assert format_hosts([], as_json=True) == ""


def test_ctrl_c_ends_status_watch_at_once(
    healthy_cluster: LocalCluster, tmp_path: Path, running: list[Running]
) -> None:
    config = healthy_cluster.write_config(tmp_path / "pgreplica.toml")
    status = Running(["status", "--config", str(config), "--watch", "60"])
    running.append(status)
    status.wait_for("HOST")
    returncode, stderr = status.interrupt(within=3)  # not after the 60 s of --watch
    assert returncode == 130
    assert stderr == "pgreplica: interrupted\n"


def run_piped(command: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``command`` (``{pgreplica}`` stands for the command) in bash, its stdout piped into
    the process that follows; bash prints the command's exit status after the output."""
    script = command.format(pgreplica=shlex.join(pgreplica_command()))
    return subprocess.run(
        ["bash", "-c", f'{script}; echo "exit ${{PIPESTATUS[0]}}"'],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_output_into_a_closed_pipe_ends_quietly(
    healthy_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = shlex.quote(str(healthy_cluster.write_config(tmp_path / "pgreplica.toml")))
    # head exits after the first round's first line; the second round meets the closed pipe
    result = run_piped(
        f"{{pgreplica}} status --config {config} --json --watch 0.2 --count 100 | head -1"
    )
    assert result.stderr == ""  # neither "Broken pipe" nor "Exception ignored"
    first, status = result.stdout.splitlines()
    assert json.loads(first)["role"] == "primary"
    assert status == "exit 141"  # 128 + SIGPIPE, as for cat or grep; not the 100 rounds
    # the pipe closed before the first write
    result = run_piped(f"{{pgreplica}} status --config {config} --json | true")
    assert (result.stderr, result.stdout) == ("", "exit 141\n")
    for option in ("--help", "--version"):  # argparse's output: it ignores the pipe
        result = run_piped(f"{{pgreplica}} {option} | true")
        assert (result.stderr, result.stdout) == ("", "exit 0\n")


# -- pgreplica demo -------------------------------------------------------------------------


def test_ctrl_c_ends_the_demo_once_its_cluster_is_removed(running: list[Running]) -> None:
    demo = Running(["demo", "--seconds", "120", "--threads", "2"])
    running.append(demo)
    demo.wait_for("workload:")
    ports = [int(line.rsplit(":", 1)[1].split("/")[0]) for line in demo.out if "***@" in line]
    assert len(ports) == 3
    returncode, stderr = demo.interrupt(within=30)  # long before the 120 s of workload
    assert returncode == 130
    assert stderr == "pgreplica: interrupted\n"
    assert all(refused(port) for port in ports)  # its servers are stopped


def test_ctrl_c_leaves_a_running_cluster_as_found(
    healthy_cluster: LocalCluster, running: list[Running]
) -> None:
    healthy_cluster.lag(1, "20ms")  # the user's own setting, to be kept
    demo = Running(
        ["demo", "--dir", str(healthy_cluster.directory), "--seconds", "20", "--threads", "2"]
    )
    running.append(demo)
    demo.wait_for("injected: replica2 killed")
    assert not healthy_cluster.running(2)
    assert healthy_cluster.apply_delay(1) == "300ms"
    returncode, stderr = demo.interrupt(within=60)
    assert (returncode, stderr) == (130, "pgreplica: interrupted\n")
    assert "using the running cluster" in demo.out[0]
    assert [healthy_cluster.running(i) for i in range(3)] == [True, True, True]
    assert healthy_cluster.apply_delay(1) == "20ms"
    states = {s["name"]: s for s in healthy_cluster.status()}
    assert states["replica1"]["apply_delay"] == "20ms"
    assert states["replica2"]["in_recovery"] is True


def test_demo_on_a_stopped_cluster_starts_it_and_stops_it_again(
    scratch_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch_cluster.down()
    directory = str(scratch_cluster.directory)
    assert main(["demo", "--dir", directory, "--seconds", "1", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "injected: replay delay 300ms on replica1" in out
    assert "replica2" not in out  # a cluster of one replica: nothing to kill
    assert out.rstrip().splitlines()[-1] == "stale reads: 0"
    assert not any(scratch_cluster.running(i) for i in range(2))
    assert scratch_cluster.apply_delay(1) == "0"  # the injected delay is gone
    other = scratch_cluster.port(0) + 10
    assert main(["demo", "--dir", directory, "--port", str(other)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"pgreplica: --port {other}: {directory} holds a cluster on port"
        f" {scratch_cluster.port(0)}; leave out --port to use it, or choose another --dir\n"
    )


def test_demo_leaves_frozen_and_paused_replicas_as_found(
    healthy_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    c = healthy_cluster
    c.lag(1, "20ms")
    c.pause(1)
    c.freeze(1)  # frozen with its replay paused: asked once the demo has thawed it
    c.pause(2)  # killed and restarted by the demo, which forgets the pause
    directory = str(c.directory)
    assert main(["demo", "--dir", directory, "--seconds", "2", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "injected: replica2 restarted" in out
    assert out.rstrip().splitlines()[-1] == "stale reads: 0"
    assert [c.running(i) for i in range(3)] == [True, True, True]
    assert [c.frozen(i) for i in range(3)] == [False, True, False]
    assert c.apply_delay(1) == "20ms" and c.apply_delay(2) == "0"
    assert c.paused(2)
    c.thaw(1)
    assert c.paused(1)
    states = {s["name"]: s for s in c.status()}
    assert states["replica1"]["apply_delay"] == "20ms"
    assert states["replica2"]["in_recovery"] is True


def test_ctrl_c_while_restoring_does_not_stop_the_restore(
    healthy_cluster: LocalCluster, running: list[Running]
) -> None:
    c = healthy_cluster
    c.pause(2)
    c.freeze(2)
    demo = Running(["demo", "--dir", str(c.directory), "--seconds", "30", "--threads", "2"])
    running.append(demo)
    demo.wait_for("injected: replica2 killed")
    demo.proc.send_signal(signal.SIGINT)
    demo.wait_for("restoring the cluster in", timeout=60)
    for _ in range(3):  # impatient: Ctrl-C again while replica2 restarts
        demo.proc.send_signal(signal.SIGINT)
    returncode, stderr = demo.interrupt(within=60)  # and once more, harmless
    assert (returncode, stderr) == (130, "pgreplica: interrupted\n")
    assert [c.running(i) for i in range(3)] == [True, True, True]
    assert [c.frozen(i) for i in range(3)] == [False, False, True]
    assert c.apply_delay(1) == "0"
    c.thaw(2)
    assert c.paused(2)


def test_demo_uses_the_given_port(capsys: pytest.CaptureFixture[str]) -> None:
    port = _choose_ports(3, first=26000)
    assert main(["demo", "--port", str(port), "--seconds", "2", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    for offset, name in enumerate(["primary ", "replica1", "replica2"]):
        assert f"  {name}  postgresql://postgres:***@127.0.0.1:{port + offset}/postgres" in out
    assert out.rstrip().splitlines()[-1] == "stale reads: 0"


def test_make_demo_passes_demo_args() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        ["make", "-n", "-C", str(root), "demo", "DEMO_ARGS=--port 6543 --seconds 2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ".venv/bin/pgreplica demo --port 6543 --seconds 2" in result.stdout


# -- errors: one line, the right exit status --------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "names"),
    [
        (["status", "--watch", "soon"], 2, "--watch"),
        (["status", "--count", "0"], 2, "--count"),
        (["demo", "--lag", "5"], 2, "--lag"),
        (["demo", "--port", "70000"], 2, "--port"),
        (["demo", "--threads", "0"], 2, "--threads"),
        (["demo", "--seconds", "-1"], 2, "--seconds"),
        (["cluster", "lag", "--replica", "1", "--delay", "later"], 2, "--delay"),
        (["cluster", "up", "--replicas", "-1"], 2, "--replicas"),
        (["nosuchcommand"], 2, "nosuchcommand"),
        (["status"], 2, "PGREPLICA_PRIMARY_URL"),
        (["status", "--config", "/nonexistent/pgreplica.toml"], 2, "file not found"),
        (["cluster", "status", "--dir", "/nonexistent/cluster"], 1, "no cluster in"),
    ],
)
def test_bad_arguments_get_one_line_and_no_traceback(
    args: list[str], code: int, names: str
) -> None:
    assert names in assert_one_line_error(run(args), code)


def test_a_config_error_is_one_line_with_the_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "pgreplica.toml"
    config.write_text(f'[databases.main]\nprimary = "{DEAD_PRIMARY}"\nreplica = []\n')
    line = assert_one_line_error(run(["status", "--config", str(config)]), 2)
    assert line == (
        "pgreplica: databases.main.replica: unknown setting 'replica' (did you mean 'replicas'?)"
    )
    config.write_text("[databases.main\n")
    assert "is not valid TOML" in assert_one_line_error(run(["check", "--config", str(config)]), 2)
    config.write_text(f'[databases.main]\nprimary = "{DEAD_PRIMARY}"\n')
    assert "did you mean 'main'" in assert_one_line_error(
        run(["status", "--config", str(config), "--database", "mian"]), 2
    )


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "pgreplica.toml"
    config.write_text(f'[databases.main]\nprimary = "{DEAD_PRIMARY}"\n')
    line = assert_one_line_error(run(["demo", "--config", str(config), "--seconds", "1"]), 1)
    assert "127.0.0.1:1/postgres" in line and "Connection refused" in line
    assert SECRET not in line


# -- install hints for the optional extras ---------------------------------------------


def run_without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python where ``module`` cannot be imported."""
    blocker = f"import sys\nsys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", blocker + code],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )


CATCH = """
try:
    {statement}
except ImportError as exc:
    print(type(exc).__name__, isinstance(exc, ModuleNotFoundError), exc.name, sep="|")
    print(exc)
else:
    print("no error")
"""
DNS_CONFIG = (
    "{'databases': {'main': {'primary': 'postgresql://u@127.0.0.1:1/db',"
    " 'replicas_dns': 'replicas.internal'}}}"
)


@pytest.mark.parametrize(
    ("blocked", "statement", "extra", "feature"),
    [
        ("celery", "import pgreplica.contrib.celery", "celery", "pgreplica.contrib.celery"),
        ("django", "import pgreplica.contrib.django", "django", "pgreplica.contrib.django"),
        ("channels", "import pgreplica.contrib.channels", "channels", "pgreplica.contrib.channels"),
        ("django", "import pgreplica.contrib.channels", "channels", "pgreplica.contrib.channels"),
        (
            "sqlalchemy",
            "import pgreplica.contrib.sqlalchemy",
            "sqlalchemy",
            "pgreplica.contrib.sqlalchemy",
        ),
        (
            "redis",
            "from pgreplica.sticking import RedisStickingStore; RedisStickingStore('redis://x')",
            "redis",
            "the Redis sticking store",
        ),
        (
            "prometheus_client",
            "from pgreplica import metrics; metrics.exposition()",
            "prometheus",
            "metrics",
        ),
        (
            "opentelemetry",
            "from pgreplica import otel; otel.enable()",
            "opentelemetry",
            "opentelemetry",
        ),
        (
            "dns",
            f"from pgreplica import Settings; Settings.from_dict({DNS_CONFIG}, environ={{}})",
            "dns",
            "databases.main.replicas_dns",
        ),
    ],
)
def test_a_missing_extra_says_what_to_install(
    blocked: str, statement: str, extra: str, feature: str
) -> None:
    result = run_without(blocked, CATCH.format(statement=statement))
    assert result.returncode == 0, result.stderr
    kind, message = result.stdout.splitlines()
    _, not_found, name = kind.split("|")
    assert not_found == "True" and name.split(".")[0] == blocked  # the module that is missing
    assert message.startswith(f"{feature} needs ")
    assert message.endswith(f": pip install 'pgreplica[{extra}]'")


def test_a_setting_whose_extra_is_missing_is_a_config_error() -> None:
    statement = (
        "import pgreplica\n"
        "    config = {'databases': {'main': {'primary': 'postgresql://u@127.0.0.1:1/db'}},"
        " 'metrics': True}\n"
        "    try:\n"
        "        pgreplica.LoadBalancer(config=config)\n"
        "    except pgreplica.ConfigError as exc:\n"
        "        print(exc.setting)\n"
        "        raise"
    )
    result = run_without("prometheus_client", CATCH.format(statement=statement))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "metrics",
        "MissingExtraSetting|True|prometheus_client",
        "metrics needs prometheus_client: pip install 'pgreplica[prometheus]'",
    ]


def test_the_command_reports_a_missing_extra_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "pgreplica.toml"
    config.write_text(f'metrics = true\n[databases.main]\nprimary = "{DEAD_PRIMARY}"\n')
    code = (
        f"from pgreplica.cli import main\nsys.exit(main(['status', '--config', {str(config)!r}]))"
    )
    result = run_without("prometheus_client", code)
    assert_one_line_error(result, 2)
    assert result.stderr == (
        "pgreplica: metrics needs prometheus_client: pip install 'pgreplica[prometheus]'\n"
    )


def test_other_import_errors_go_through_unchanged() -> None:
    with pytest.raises(ModuleNotFoundError) as info, extra_imports("celery", feature="x"):
        import pgreplica_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert type(info.value) is ModuleNotFoundError
    with pytest.raises(ValueError, match="no extra 'celeri'"), extra_imports("celeri", feature="x"):
        pass


def test_missing_extra_errors_pickle() -> None:
    for error in (
        MissingExtra("pgreplica.contrib.celery", "celery", "celery"),
        MissingExtraSetting("metrics", "prometheus_client", "prometheus"),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error) and copy.name == error.name
    assert isinstance(copy, ConfigError) and copy.setting == "metrics"


def test_cluster_createdb_creates_once_and_the_replicas_have_it(
    healthy_cluster: LocalCluster,
) -> None:
    name = "createdb-test"
    directory = str(healthy_cluster.directory)
    try:
        first = run(["cluster", "createdb", name, "--dir", directory])
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == (
            f"database {name!r} created, on the primary and every replica"
        )
        again = run(["cluster", "createdb", name, "--dir", directory])
        assert again.returncode == 0 and "already there" in again.stdout
        for index in (1, 2):  # replayed before the command returned
            assert healthy_cluster.execute(
                index, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"
            ) == [(1,)]
        bad = run(["cluster", "createdb", "x" * 64, "--dir", directory])
        assert "not a database name" in assert_one_line_error(bad, 1)
    finally:
        healthy_cluster.execute(0, f'DROP DATABASE IF EXISTS "{name}"')


def test_cluster_createdb_waits_only_for_the_replicas_that_replay_at_once(
    healthy_cluster: LocalCluster,
) -> None:
    c = healthy_cluster
    name = "createdb-held"
    c.lag(1, "1min")  # waiting for it would take a minute
    c.pause(2)  # waiting for it would never end
    try:
        started = time.monotonic()
        result = run(["cluster", "createdb", name, "--dir", str(c.directory)])
        assert time.monotonic() - started < 50  # generous; not the 1 min of the delay
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout == (
            f"database {name!r} created on the primary; replica1 replays it later"
            " (apply delay 60000ms), replica2 replays it later (replay paused)\n"
        )
        assert c.execute(0, f"SELECT 1 FROM pg_database WHERE datname = '{name}'") == [(1,)]
        assert c.execute(2, f"SELECT 1 FROM pg_database WHERE datname = '{name}'") == []
        c.lag(1, 0)
        c.resume(2)
        c.kill(2)  # and a replica that is down: not waited for either
        again = run(["cluster", "createdb", name, "--dir", str(c.directory)])
        assert (again.returncode, again.stderr) == (0, "")
        assert again.stdout == (
            f"database {name!r} already there on the primary; replica2 replays it later (stopped)\n"
        )
        assert c.execute(1, f"SELECT 1 FROM pg_database WHERE datname = '{name}'") == [(1,)]
    finally:
        c.heal()
        c.execute(0, f'DROP DATABASE IF EXISTS "{name}"')
