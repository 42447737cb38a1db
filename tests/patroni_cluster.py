"""A real Patroni cluster on loopback: one etcd and three PostgreSQL 15 nodes, each run
by its own Patroni process, for the tests of pgreplica against a failover manager.

:class:`PatroniCluster` writes the configurations, starts etcd then the three Patroni
processes, and waits until there is a leader and two replicas streaming from it (from
Patroni's REST API and the leader's ``pg_stat_replication``). Its helpers:

- :meth:`~PatroniCluster.dsn` / :attr:`~PatroniCluster.dsns`: the URL of each node's
  PostgreSQL server (superuser ``postgres``, password included);
- :meth:`~PatroniCluster.leader`: the current leader's name, from ``GET /cluster``;
- :meth:`~PatroniCluster.switchover`: ``POST /switchover`` from the leader to a
  candidate;
- :meth:`~PatroniCluster.kill_leader`: ``kill -9`` of the leader's Patroni process and
  of its postmaster (and the postmaster's children): nothing demotes it, the other
  nodes fail over once the leader key expires (``ttl``);
- :meth:`~PatroniCluster.down` / :meth:`~PatroniCluster.restart`: the killed nodes, and
  starting a killed node's Patroni again;
- :meth:`~PatroniCluster.wait_healthy`: restarts the Patroni process of any killed node
  (it rejoins as a replica, with ``pg_rewind`` if its timeline diverged) and waits for a
  leader and two streaming replicas again.

The session fixture ``patroni_cluster`` runs one cluster for the session and always
stops it (Patroni processes first, then etcd, stragglers killed, directory removed),
even when starting it failed. Without a ``patroni`` or ``etcd`` binary the tests that
use it are skipped, with the reason (Debian: ``apt-get install patroni etcd-server``;
the Debian ``patroni`` package brings ``python3-etcd``).

PostgreSQL refuses to run as root: as root, etcd and Patroni (and so PostgreSQL) run as
the ``postgres`` user, in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from secrets_registry import register_secret

__all__ = ["PatroniCluster", "PatroniError", "patroni_cluster"]

HOST = "127.0.0.1"
PG_BIN = "/usr/lib/postgresql/15/bin"
RUN_AS = "postgres"
SCOPE = "pgreplica-test"
NODES = ("node0", "node1", "node2")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

#: Patroni's timings: a leader that stops renewing its key loses it after ``TTL`` s,
#: and each Patroni runs its loop every ``LOOP_WAIT`` s. Patroni wants
#: ``loop_wait + 2 * retry_timeout <= ttl``, hence a retry_timeout of 4 s.
TTL = 10
LOOP_WAIT = 1
RETRY_TIMEOUT = 4


class PatroniError(Exception):
    """The Patroni cluster did not do what was asked in time; the message ends with the
    last lines of the logs."""


def find_binaries() -> tuple[str | None, str | None]:
    """The ``patroni`` and ``etcd`` binaries, or None for each one missing."""
    path = os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin:/usr/local/bin"
    return shutil.which("patroni", path=path), shutil.which("etcd", path=path)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports of 127.0.0.1 that nothing listens on, below the
    ephemeral range (so that no client connection takes one before its server binds
    it)."""
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randrange(20000, 32000)
        if port in chosen:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def _tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = "".join(handle.readlines()[-lines:]).rstrip("\n")
    except OSError:
        return ""
    return f"\n--- last lines of {path} ---\n{text}" if text else ""


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children = _proc_children()
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


class _Node:
    def __init__(self, name: str, directory: Path, pg_port: int, api_port: int) -> None:
        self.name = name
        self.directory = directory
        self.pg_port = pg_port
        self.api_port = api_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def config_file(self) -> Path:
        return self.directory / "patroni.yml"

    @property
    def log_file(self) -> Path:
        return self.directory / "patroni.log"

    @property
    def pg_log_dir(self) -> Path:
        return self.directory / "pglog"

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def postgres_log_tail(self) -> str:
        logs = sorted(self.pg_log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
        return _tail(logs[-1]) if logs else ""


class PatroniCluster:
    """etcd and three Patroni-managed PostgreSQL 15 nodes on 127.0.0.1 under
    ``directory``. :meth:`start`, then :meth:`stop` (always)."""

    def __init__(self, directory: Path, patroni: str, etcd: str) -> None:
        self.directory = directory
        self.patroni_binary = patroni
        self.etcd_binary = etcd
        self.password = register_secret(secrets.token_hex(12), "Patroni cluster password")
        ports = _free_ports(2 + 2 * len(NODES))
        self.etcd_client_port, self.etcd_peer_port = ports[0], ports[1]
        self.nodes = {
            name: _Node(name, directory / name, ports[2 + 2 * i], ports[3 + 2 * i])
            for i, name in enumerate(NODES)
        }
        self.etcd_process: subprocess.Popen[bytes] | None = None
        self.killed_at = 0.0
        self._run_as = self._resolve_user()

    # -- users and processes ---------------------------------------------------------

    @staticmethod
    def _resolve_user() -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam(RUN_AS)
        return {
            "user": entry.pw_uid,
            "group": entry.pw_gid,
            "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid),
            "home": entry.pw_dir,
        }

    def _chown(self, path: Path) -> None:
        if self._run_as:
            os.chown(path, self._run_as["user"], self._run_as["group"])

    def _mkdir(self, path: Path, mode: int = 0o700) -> None:
        path.mkdir(mode=mode, exist_ok=True)
        os.chmod(path, mode)
        self._chown(path)

    def _spawn(self, argv: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "ETCD"))}
        env["PATH"] = f"{PG_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        run_as = dict(self._run_as)
        if "home" in run_as:
            env["HOME"] = run_as.pop("home")
        with open(log, "ab") as handle:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                **run_as,
            )

    # -- configuration ---------------------------------------------------------------

    def dsn(self, name: str) -> str:
        """The URL of node ``name``'s server (superuser, password included)."""
        port = self.nodes[name].pg_port
        return f"postgresql://postgres:{self.password}@{HOST}:{port}/postgres"

    @property
    def dsns(self) -> list[str]:
        return [self.dsn(name) for name in NODES]

    def name_of_port(self, port: int) -> str:
        return next((n.name for n in self.nodes.values() if n.pg_port == port), str(port))

    def _patroni_config(self, node: _Node) -> dict[str, Any]:
        return {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"{HOST}:{node.api_port}",
                "connect_address": f"{HOST}:{node.api_port}",
            },
            "etcd3": {"hosts": [f"{HOST}:{self.etcd_client_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_log_hints": "on",
                            "hot_standby": "on",
                            "wal_level": "replica",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "256MB",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"{HOST}:{node.pg_port}",
                "connect_address": f"{HOST}:{node.pg_port}",
                "data_dir": str(node.data_dir),
                "bin_dir": PG_BIN,
                "pgpass": str(node.directory / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": self.password},
                    "replication": {"username": "replicator", "password": self.password},
                },
                "pg_hba": [
                    "local all all trust",
                    f"host all all {HOST}/32 scram-sha-256",
                    f"host replication all {HOST}/32 scram-sha-256",
                ],
                "parameters": {
                    "unix_socket_directories": str(node.directory),
                    "password_encryption": "scram-sha-256",
                    "logging_collector": "on",
                    "log_directory": str(node.pg_log_dir),
                    "log_filename": "postgresql-%Y%m%d-%H%M%S.log",
                },
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }

    # -- start and stop --------------------------------------------------------------

    def start(self) -> PatroniCluster:
        self._mkdir(self.directory, 0o755)
        etcd_dir = self.directory / "etcd"
        self._mkdir(etcd_dir)
        client = f"http://{HOST}:{self.etcd_client_port}"
        peer = f"http://{HOST}:{self.etcd_peer_port}"
        self.etcd_process = self._spawn(
            [
                self.etcd_binary,
                "--name=etcd0",
                f"--data-dir={etcd_dir / 'data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=etcd0={peer}",
                "--initial-cluster-state=new",
                f"--initial-cluster-token={SCOPE}-{self.etcd_client_port}",
            ],
            self.directory / "etcd.log",
            etcd_dir,
        )
        self._wait(self._etcd_ready, 20, "etcd answering")
        for node in self.nodes.values():
            self._mkdir(node.directory)
            self._mkdir(node.pg_log_dir)
            # JSON is YAML: no YAML writer needed.
            node.config_file.write_text(json.dumps(self._patroni_config(node), indent=2))
            self._chown(node.config_file)
            os.chmod(node.config_file, 0o600)
        # The first node bootstraps (initdb); the others then take a base backup.
        self._start_patroni(self.nodes[NODES[0]])
        self._wait(lambda: self.leader() == NODES[0], START_TIMEOUT, "node0 to lead")
        for name in NODES[1:]:
            self._start_patroni(self.nodes[name])
        self.wait_healthy(START_TIMEOUT)
        return self

    def _start_patroni(self, node: _Node) -> None:
        node.process = self._spawn(
            [self.patroni_binary, str(node.config_file)], node.log_file, node.directory
        )

    def _etcd_ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{self.etcd_client_port}/health", timeout=1
            ) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        """Stop everything started: Patroni (and its PostgreSQL) first, then etcd; kill
        what did not stop in time; remove the directory."""
        running = [n.process for n in self.nodes.values() if n.process is not None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()  # Patroni stops its PostgreSQL (fast) then exits
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in self.nodes.values():
            self._kill_node(node)  # stragglers: Patroni, the postmaster and its children
        if self.etcd_process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.etcd_process.terminate()
            try:
                self.etcd_process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.etcd_process.kill()
                self.etcd_process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _kill_node(self, node: _Node) -> None:
        """SIGKILL the node's Patroni process and its postmaster with their children."""
        if node.process is not None:
            if node.process.poll() is None:
                _kill(_tree(node.process.pid), signal.SIGKILL)
            node.process.wait(timeout=STOP_TIMEOUT)
        postmaster = node.postmaster_pid()
        if postmaster is not None:
            _kill(_tree(postmaster), signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _alive(postmaster) and time.monotonic() < deadline:
                time.sleep(0.05)

    # -- the REST API ----------------------------------------------------------------

    def _api(self, node: _Node, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{HOST}:{node.api_port}{path}",
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def cluster_state(self) -> dict[str, Any] | None:
        """``GET /cluster`` from the first node whose Patroni answers; None if none."""
        for node in self.nodes.values():
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                state = self._api(node, "/cluster")
            except (OSError, ValueError):
                continue
            if isinstance(state, dict):
                return state
        return None

    def leader(self) -> str | None:
        """The name of the member holding the leader key, per Patroni; None if none."""
        state = self.cluster_state()
        if state is None:
            return None
        return next(
            (m["name"] for m in state.get("members", []) if m.get("role") == "leader"), None
        )

    def leader_port(self) -> int | None:
        name = self.leader()
        return None if name is None else self.nodes[name].pg_port

    def switchover(self, candidate: str) -> str:
        """Ask Patroni to hand the leadership to ``candidate``; its answer."""
        leader = self.leader()
        if leader is None:
            raise PatroniError("switchover: no leader" + self.logs())
        try:
            answer = self._api(
                self.nodes[leader], "/switchover", {"leader": leader, "candidate": candidate}
            )
        except urllib.error.HTTPError as exc:
            raise PatroniError(f"switchover refused: {exc.code} {exc.read()!r}") from None
        return str(answer)

    def kill_leader(self) -> str:
        """``kill -9`` the leader's Patroni process and its postmaster; its name.
        :attr:`killed_at` is when (``time.monotonic()``)."""
        leader = self.leader()
        if leader is None:
            raise PatroniError("kill_leader: no leader" + self.logs())
        node = self.nodes[leader]
        assert node.postmaster_pid() is not None
        self.killed_at = time.monotonic()
        self._kill_node(node)
        return leader

    def down(self) -> list[str]:
        """The nodes whose Patroni process is not running (killed)."""
        return [
            n.name for n in self.nodes.values() if n.process is None or n.process.poll() is not None
        ]

    def restart(self, name: str) -> None:
        """Start the Patroni process of a killed node again (it rejoins as a replica,
        rewound onto the leader's timeline if need be); does not wait."""
        node = self.nodes[name]
        if node.process is not None and node.process.poll() is None:
            raise PatroniError(f"{name} is running")
        self._kill_node(node)  # a postmaster left behind must not linger
        self._start_patroni(node)

    # -- health ----------------------------------------------------------------------

    def _streaming(self, leader: str) -> set[str]:
        """The members streaming from ``leader``, per its ``pg_stat_replication``."""
        try:
            with psycopg.connect(self.dsn(leader), connect_timeout=2, autocommit=True) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone() != (False,):
                    return set()
                rows = conn.execute(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchall()
        except psycopg.Error:
            return set()
        return {r[0] for r in rows}

    def _healthy(self) -> bool:
        state = self.cluster_state()
        if state is None:
            return False
        members = {m["name"]: m for m in state.get("members", [])}
        leaders = [n for n, m in members.items() if m.get("role") == "leader"]
        if len(leaders) != 1 or set(members) != set(NODES):
            return False
        leader = leaders[0]
        if any(m.get("state") != "running" for m in members.values()):
            return False
        timeline = members[leader].get("timeline")
        replicas = set(NODES) - {leader}
        if any(members[r].get("timeline") != timeline for r in replicas):
            return False
        return self._streaming(leader) >= replicas

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Restart the Patroni process of every node that is not running (it rejoins as
        a replica, rewound if need be), then wait for a leader and two replicas on its
        timeline streaming from it."""
        for name in self.down():
            self.restart(name)
        self._wait(self._healthy, timeout, "a leader and two streaming replicas")

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                state = json.dumps(self.cluster_state())
                raise PatroniError(
                    f"not ready after {timeout:.0f} s: {what}; /cluster: {state}" + self.logs()
                )
            time.sleep(0.2)

    def logs(self) -> str:
        """The last lines of every log, for error messages."""
        parts = [_tail(self.directory / "etcd.log", 10)]
        for node in self.nodes.values():
            parts.append(_tail(node.log_file))
            parts.append(node.postgres_log_tail())
        return "".join(parts)


@pytest.fixture(scope="session")
def patroni_cluster() -> Iterator[PatroniCluster]:
    """A running Patroni cluster (etcd + 3 nodes) for the session, always stopped."""
    patroni, etcd = find_binaries()
    if patroni is None or etcd is None:
        missing = " and ".join(n for n, b in (("patroni", patroni), ("etcd", etcd)) if not b)
        reason = f"{missing} not installed (apt-get install patroni etcd-server)"
        print(f"skipping the Patroni tests: {reason}")
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="pgreplica-patroni-"))
    cluster = PatroniCluster(directory, patroni, etcd)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
