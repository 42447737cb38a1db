"""A real Pgpool-II in front of a :class:`pgreplica.testing.LocalCluster`, for benchmarks.

:class:`Pgpool` writes a configuration for streaming-replication mode
(``backend_clustering_mode = 'streaming_replication'``) with load balancing on, the
cluster's primary as backend 0 and replica i as backend i, the streaming-replication
check (``sr_check_period = 1``) and health checks every second with the cluster's
superuser, and optionally ``delay_threshold`` (bytes of replay lag past which a replica
gets no reads). It starts ``pgpool -n`` (foreground) as a child process on a free port
of 127.0.0.1, with its configuration, pid file, sockets, status file and log in a
directory of its own, and waits until a query goes through it and ``SHOW POOL_NODES``
lists every backend up with its role found. :meth:`Pgpool.__exit__` stops it (SIGTERM,
then SIGKILL for its whole process group after a bound) and removes the directory.

The primary's load-balance weight is 0 by default (``primary_weight``), so every read
Pgpool balances goes to a replica, as pgreplica's reads do. Pgpool chooses the
load-balance node of a session when the session starts (``statement_level_load_balance``
is off, Pgpool's default): one persistent connection reads from one replica.

Authentication: the cluster's servers take ``scram-sha-256`` over TCP, so Pgpool needs
the superuser's password in ``pool_passwd`` (clear text, ``TEXT`` prefix) to log in to
the backends; clients authenticate to Pgpool with the same password (``pool_hba.conf``:
``scram-sha-256`` from 127.0.0.1). Run as root, Pgpool runs as ``postgres`` (the user
the cluster's servers run as), which owns its files.

``python -m bench.pgpool`` starts a 2-replica cluster and Pgpool in front of it, runs
1,000 ``SELECT 1`` through it (in 20 sessions of 50) and prints ``SHOW POOL_NODES``:
the ``select_cnt`` column shows the reads spread over the replicas.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgreplica.localcluster.ports import _choose_ports, _release_ports
from pgreplica.testing import LocalCluster, make_cluster_directory

__all__ = ["PGPOOL", "Pgpool", "PgpoolError", "pgpool_unavailable"]

PGPOOL = "/usr/sbin/pgpool"
HOST = "127.0.0.1"
RUN_AS = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL = 3000


class PgpoolError(Exception):
    """Pgpool-II did not start or did not become ready; the message ends with its log."""


def _find_pgpool() -> str | None:
    if os.access(PGPOOL, os.X_OK):
        return PGPOOL
    return shutil.which("pgpool") or shutil.which("pgpool", path="/usr/sbin:/sbin")


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def pgpool_unavailable() -> str | None:
    """None when Pgpool-II can be run here, else a printable reason why not.

    When ``pgpool`` is missing and this process is root, installs the Debian package
    ``pgpool2`` first (``apt-get update`` and again if the first install fails).
    """
    if _find_pgpool() is not None:
        return _check_user()
    if os.geteuid() != 0:
        return f"pgpool not found ({PGPOOL} nor on PATH), and not root to install pgpool2"
    if shutil.which("apt-get") is None:
        return f"pgpool not found ({PGPOOL} nor on PATH), and no apt-get to install pgpool2"
    print("pgpool not found: installing pgpool2 (apt-get install -y pgpool2) ...", file=sys.stderr)
    try:
        result = _apt_get("install", "-y", "pgpool2")
        if result.returncode != 0:
            print("apt-get install failed: apt-get update, then again ...", file=sys.stderr)
            _apt_get("update")
            result = _apt_get("install", "-y", "pgpool2")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"pgpool not found and installing pgpool2 failed: {exc}"
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return f"pgpool not found and apt-get install pgpool2 failed: {' | '.join(tail)}"
    if _find_pgpool() is None:
        return f"pgpool2 installed but no pgpool binary ({PGPOOL} nor on PATH)"
    return _check_user()


def _check_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        return f"running as root and no {RUN_AS!r} user to run pgpool as"
    return None


def pgpool_version(binary: str | None = None) -> str:
    """``pgpool --version`` without the program name (it prints to stderr)."""
    try:
        out = subprocess.run(
            [binary or _find_pgpool() or PGPOOL, "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (out.stdout + out.stderr).strip()
    return text.removeprefix("pgpool-II version ") or "?"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Pgpool:
    """One Pgpool-II process in streaming-replication mode with load balancing, in front
    of every server of ``cluster`` (which must be up). A context manager: entering starts
    it and waits until it is ready, leaving stops it and removes its files.

    ``delay_threshold``: replay lag in bytes past which Pgpool sends a replica no reads
    (None: Pgpool's default 0, never skipped). ``directory``: where its files go (a new
    temporary directory by default, removed on exit; a given one is kept).
    """

    def __init__(
        self,
        cluster: LocalCluster,
        *,
        delay_threshold: int | None = None,
        num_init_children: int = 32,
        directory: Path | None = None,
        primary_weight: float = 0.0,
    ) -> None:
        binary = _find_pgpool()
        if binary is None:
            raise PgpoolError(f"pgpool not found ({PGPOOL} nor on PATH)")
        self.binary = binary
        self.cluster = cluster
        self.delay_threshold = delay_threshold
        self.num_init_children = num_init_children
        self.primary_weight = primary_weight
        self._given_directory = directory
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pcp_port = 0
        params = conninfo_to_dict(cluster.primary_dsn)
        self.user = str(params.get("user") or "postgres")
        self.dbname = str(params.get("dbname") or "postgres")
        self._password = str(params.get("password") or "")
        self.dsn = ""

    def __repr__(self) -> str:
        return f"<Pgpool {HOST}:{self.port}>"

    # -- files --------------------------------------------------------------------------

    @property
    def log_file(self) -> Path | None:
        return None if self.directory is None else self.directory / "pgpool.log"

    def log(self) -> str:
        """Pgpool's log so far ("" before it started)."""
        path = self.log_file
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")

    def _log_tail(self) -> str:
        text = self.log()
        if self._password:
            text = text.replace(self._password, "***")
        return text[-LOG_TAIL:]

    def _config(self) -> str:
        assert self.directory is not None
        d = str(self.directory)
        settings: dict[str, str | int | float] = {
            "listen_addresses": _quote(HOST),
            "port": self.port,
            "unix_socket_directories": _quote(d),
            "pcp_listen_addresses": _quote(HOST),
            "pcp_port": self.pcp_port,
            "pcp_socket_dir": _quote(d),
            "wd_ipc_socket_dir": _quote(d),
            "pid_file_name": _quote(str(self.directory / "pgpool.pid")),
            "logdir": _quote(d),
            "log_destination": _quote("stderr"),
            "log_line_prefix": _quote("%m: %a pid %p: "),
            "backend_clustering_mode": _quote("streaming_replication"),
            "load_balance_mode": "on",
            "num_init_children": self.num_init_children,
            "max_pool": 1,
            "child_life_time": 0,
            "connection_cache": "on",
            "enable_pool_hba": "on",
            "pool_passwd": _quote("pool_passwd"),
            "sr_check_period": 1,
            "sr_check_user": _quote(self.user),
            "sr_check_password": _quote(self._password),
            "sr_check_database": _quote(self.dbname),
            "health_check_period": 1,
            "health_check_timeout": 5,
            "health_check_user": _quote(self.user),
            "health_check_password": _quote(self._password),
            "health_check_database": _quote(self.dbname),
            "health_check_max_retries": 0,
            "connect_timeout": 5000,
            "search_primary_node_timeout": 10,
            "failover_on_backend_error": "off",
            "use_watchdog": "off",
            "memory_cache_enabled": "off",
        }
        if self.delay_threshold is not None:
            settings["delay_threshold"] = int(self.delay_threshold)
        for i in range(self.cluster.replicas + 1):
            settings[f"backend_hostname{i}"] = _quote(HOST)
            settings[f"backend_port{i}"] = self.cluster.port(i)
            settings[f"backend_weight{i}"] = self.primary_weight if i == 0 else 1
            settings[f"backend_flag{i}"] = _quote("ALLOW_TO_FAILOVER")
            settings[f"backend_application_name{i}"] = _quote(self.cluster.name(i))
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _write_files(self) -> None:
        assert self.directory is not None
        files = {
            "pgpool.conf": self._config(),
            # Clear-text password (TEXT prefix): Pgpool logs in to the backends with
            # SCRAM, which needs it, and checks clients' SCRAM against it.
            "pool_passwd": f"{self.user}:TEXT{self._password}\n",
            "pool_hba.conf": (f"local all all trust\nhost all all {HOST}/32 scram-sha-256\n"),
            "pcp.conf": "",
            "pgpool.log": "",
        }
        owner = pwd.getpwnam(RUN_AS) if os.geteuid() == 0 else None
        if owner is not None:
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
        os.chmod(self.directory, 0o700)
        for name, text in files.items():
            path = self.directory / name
            path.write_text(text)
            os.chmod(path, 0o600)
            if owner is not None:
                os.chown(path, owner.pw_uid, owner.pw_gid)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Pgpool:
        if self.process is not None:
            return self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self._given_directory is not None:
            self.directory = Path(self._given_directory).absolute()
            self.directory.mkdir(parents=True, exist_ok=True)
        else:
            self.directory = make_cluster_directory("pgpool-")
        self.port = _choose_ports(1, 9500)
        self.pcp_port = _choose_ports(1, self.port + 1)
        self.dsn = make_conninfo(
            host=HOST,
            port=self.port,
            user=self.user,
            dbname=self.dbname,
            password=self._password,
        )
        self._write_files()
        command = [
            self.binary,
            "-n",  # foreground: the child of this process
            "-D",  # no pgpool_status from an earlier run
            "-f",
            str(self.directory / "pgpool.conf"),
            "-a",
            str(self.directory / "pool_hba.conf"),
            "-F",
            str(self.directory / "pcp.conf"),
        ]
        user: str | None = RUN_AS if os.geteuid() == 0 else None
        with open(self.directory / "pgpool.log", "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                start_new_session=True,  # its own process group: killed as a whole
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = "no answer yet"
        while True:
            code = self.process.poll()
            if code is not None:
                raise PgpoolError(
                    f"pgpool on port {self.port} exited with code {code}:\n{self._log_tail()}"
                )
            try:
                nodes = self.pool_nodes(connect_timeout=2)
            except psycopg.Error as exc:
                last = str(exc).strip() or type(exc).__name__
            else:
                not_ready = [
                    f"node {n.get('node_id')} {n.get('status')}/{n.get('role')}"
                    for n in nodes
                    if n.get("status") not in ("up", "waiting")
                    or n.get("role") not in ("primary", "standby")
                ]
                if len(nodes) == self.cluster.replicas + 1 and not not_ready:
                    return
                last = f"{len(nodes)} nodes, not ready: {', '.join(not_ready) or '-'}"
            if time.monotonic() > deadline:
                raise PgpoolError(
                    f"pgpool on port {self.port} not ready within {START_TIMEOUT:g}s ({last});"
                    f" its log:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop Pgpool (SIGTERM, then SIGKILL to its process group after a bound) and
        remove its directory (unless it was given)."""
        process, self.process = self.process, None
        if process is not None:
            pgid = process.pid  # start_new_session: its own process group
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_TIMEOUT)
            # Children left behind (or a parent that did not stop): kill the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_TIMEOUT)
        if self.port:
            _release_ports([self.port, self.pcp_port])
        if self.directory is not None and self._given_directory is None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None

    def __enter__(self) -> Pgpool:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection ---------------------------------------------------------------------

    def pool_nodes(self, connect_timeout: int = 5) -> list[dict[str, str]]:
        """The rows of ``SHOW POOL_NODES``, every value a string."""
        with psycopg.connect(self.dsn, connect_timeout=connect_timeout, autocommit=True) as conn:
            cur = conn.execute("SHOW POOL_NODES")
            names = [c.name for c in cur.description or []]
            return [
                {k: "" if v is None else str(v) for k, v in zip(names, row, strict=True)}
                for row in cur.fetchall()
            ]


# -- demo -------------------------------------------------------------------------------


def main() -> int:
    reason = pgpool_unavailable()
    if reason is not None:
        print(f"Pgpool-II unavailable: {reason}")
        return 1
    cluster = LocalCluster(make_cluster_directory("pgpool-demo-"), replicas=2, keep=False)
    try:
        print("starting a local primary with 2 streaming replicas ...", file=sys.stderr, flush=True)
        cluster.up()
        with Pgpool(cluster) as pgpool:
            print(f"Pgpool-II {pgpool_version(pgpool.binary)} on {HOST}:{pgpool.port}")
            sessions, per_session = 20, 50
            started = time.perf_counter()
            servers: dict[int, int] = {}
            for _ in range(sessions):
                with psycopg.connect(pgpool.dsn, autocommit=True) as conn:
                    for _ in range(per_session):
                        row = conn.execute("SELECT 1").fetchone()
                        assert row == (1,), row
                    port = conn.execute("SELECT inet_server_port()").fetchone()
                    if port:
                        servers[int(port[0])] = servers.get(int(port[0]), 0) + 1
            elapsed = time.perf_counter() - started
            print(
                f"{sessions * per_session} SELECT 1 in {sessions} sessions of {per_session}"
                f" (and one SELECT inet_server_port() per session): {elapsed:.2f} s"
            )
            names = {cluster.port(i): cluster.name(i) for i in range(cluster.replicas + 1)}
            print(
                "sessions by server: "
                + ", ".join(f"{names.get(p, p)} {n}" for p, n in sorted(servers.items()))
            )
            print()
            columns = [
                "node_id",
                "port",
                "status",
                "lb_weight",
                "role",
                "select_cnt",
                "load_balance_node",
                "replication_delay",
            ]
            nodes = pgpool.pool_nodes()
            print("  ".join(f"{c:>17}" for c in columns))
            for node in nodes:
                print("  ".join(f"{node.get(c, ''):>17}" for c in columns))
            replica_reads = sum(int(n.get("select_cnt") or 0) for n in nodes[1:])
            primary_reads = int(nodes[0].get("select_cnt") or 0) if nodes else 0
            print(f"\nselects on replicas: {replica_reads}, on the primary: {primary_reads}")
    finally:
        try:
            cluster.destroy()
        except Exception as exc:
            print(f"warning: could not destroy {cluster.directory}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
