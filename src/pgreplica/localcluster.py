"""A local replicated PostgreSQL cluster for development and tests.

:class:`LocalCluster` runs a primary and N hot-standby streaming replicas on 127.0.0.1,
each in its own data directory under one cluster directory::

    DIR/cluster.json      replica count, ports, binaries, run-as user (never the password)
    DIR/pwfile            the superuser password (mode 0600)
    DIR/primary           data directory of the primary
    DIR/replica1 ...      data directories of the replicas (numbered from 1)
    DIR/logs/*.log        one server log per server
    DIR/pgreplica.toml    written by :meth:`LocalCluster.write_config`

The servers listen on TCP only (no Unix sockets) and authenticate with SCRAM; every replica
streams through its own physical replication slot, so a paused, delayed or stopped replica
never loses WAL. Failures can be injected per replica: an apply delay (:meth:`lag`), a
paused replay (:meth:`pause`), a crash (:meth:`kill`), a hung server that accepts TCP
connections but never answers (:meth:`freeze`) and a failover (:meth:`promote`).

PostgreSQL refuses to run as root. When this process runs as root the servers run as the
unprivileged system user ``postgres`` (the Debian/Ubuntu ``postgresql`` package creates
it) and the cluster directory is handed over to that user, so every parent directory must
be traversable by it: ``/tmp/pgreplica-xyz`` works, pytest's ``tmp_path`` (under a 0700
directory owned by root) does not. :func:`pgreplica.testing.make_cluster_directory`
creates a suitable directory.

Only Linux is supported: :meth:`freeze` and :meth:`thaw` find the server processes in
``/proc``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import psycopg

__all__ = ["ClusterError", "LocalCluster", "lsn_to_int"]

BINDIR_ENV = "PGREPLICA_PG_BINDIR"
DEFAULT_DIRECTORY = ".pgreplica-cluster"
DEFAULT_FIRST_PORT = 5432
SUPERUSER = "postgres"
HOST = "127.0.0.1"

_STATE_FILE = "cluster.json"
_PASSWORD_FILE = "pwfile"
_CONFIG_FILE = "pgreplica.toml"
_SERVER_CONF = "pgreplica.conf"  # per-server settings, included from postgresql.conf
_STATE_FORMAT = 1
_WAIT_TIMEOUT = 60.0
_COMMAND_TIMEOUT = 300.0
_APP_NAME = "pgreplica-localcluster"

# Ports handed out by _choose_ports stay reserved for a while, so that clusters created at
# the same time (parallel test sessions) do not pick the same free ports before either
# has started its servers.
_PORT_CLAIMS = Path(tempfile.gettempdir()) / "pgreplica-port-claims.json"
_PORT_CLAIM_SECONDS = 120.0

_SHARED_SETTINGS = """
# --- settings of the pgreplica local cluster ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 500ms
fsync = off
synchronous_commit = on
full_page_writes = off
shared_buffers = 32MB
max_connections = 100
logging_collector = off
# per-server settings (port, recovery_min_apply_delay), rewritten by pgreplica
include_if_exists = '{server_conf}'
"""


class ClusterError(Exception):
    """The local cluster could not do what was asked; the message says why.

    Messages never contain the cluster's password. Errors about a server that did not
    come up in time end with the last lines of that server's log.
    """


def lsn_to_int(lsn: str) -> int:
    """Return a WAL position such as ``"0/3000148"`` as an integer, for comparisons."""
    high, sep, low = lsn.strip().partition("/")
    try:
        if not sep:
            raise ValueError(lsn)
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise ClusterError(f"not a WAL position: {lsn!r} (expected e.g. '0/3000148')") from None


def parse_delay(delay: float | str) -> int:
    """Return an apply delay in milliseconds.

    Accepts seconds as a number (``0.3``) or a duration string with a unit (``"300ms"``,
    ``"2s"``, ``"1min"``, ``"1h"``); a string without a unit must be ``"0"``.
    """
    if isinstance(delay, bool):
        raise ClusterError(f"bad delay {delay!r}: use seconds or a duration such as '300ms'")
    if isinstance(delay, (int, float)):
        if not math.isfinite(delay) or delay < 0:
            raise ClusterError(f"bad delay {delay!r}: must be a finite number of seconds >= 0")
        return round(delay * 1000)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min|h)?\s*", str(delay))
    if match is None:
        raise ClusterError(f"bad delay {delay!r}: use a duration such as '300ms', '2s' or '1min'")
    value, unit = float(match.group(1)), match.group(2)
    if unit is None:
        if value != 0:
            raise ClusterError(f"delay {delay!r} needs a unit: ms, s, min or h (e.g. '300ms')")
        return 0
    return round(value * {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000}[unit])


def format_delay(ms: int) -> str:
    """Format milliseconds the way PostgreSQL accepts them (``"0"``, ``"300ms"``)."""
    return "0" if ms == 0 else f"{ms}ms"


def find_bindir(bindir: str | None = None) -> str:
    """Find the directory holding the PostgreSQL server binaries (initdb, pg_ctl, ...).

    Order: ``bindir``, ``$PGREPLICA_PG_BINDIR``, ``pg_config --bindir`` (only if it holds
    initdb), ``initdb`` on PATH, then the newest ``/usr/lib/postgresql/*/bin``.
    """
    if bindir is not None:
        if not _has_initdb(bindir):
            raise ClusterError(f"no initdb in bindir {bindir}")
        return str(Path(bindir).absolute())
    env = os.environ.get(BINDIR_ENV)
    if env:
        if not _has_initdb(env):
            raise ClusterError(f"no initdb in {BINDIR_ENV}={env}")
        return str(Path(env).absolute())
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and _has_initdb(out.stdout.strip()):
            return out.stdout.strip()
    initdb = shutil.which("initdb")
    if initdb is not None:
        return str(Path(initdb).resolve().parent)
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_initdb(d)]
    if candidates:
        return max(candidates, key=_version_key)
    raise ClusterError(
        "PostgreSQL server binaries not found (initdb): install the Debian/Ubuntu package "
        f"'postgresql' or set {BINDIR_ENV}"
    )


def _has_initdb(directory: str) -> bool:
    return os.access(os.path.join(directory, "initdb"), os.X_OK)


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


@dataclass(frozen=True)
class _RunAs:
    """The user the servers run as; uid None means the current user."""

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    home: str | None = None


def _resolve_run_as() -> _RunAs:
    if os.geteuid() != 0:
        try:
            name = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            name = str(os.geteuid())
        return _RunAs(name=name)
    try:
        entry = pwd.getpwnam(SUPERUSER)
    except KeyError:
        entry = None
    if entry is None or entry.pw_uid == 0:
        raise ClusterError(
            "running as root: create an unprivileged user 'postgres' (apt-get install "
            "postgresql creates it) or run as a normal user"
        )
    return _RunAs(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        home=entry.pw_dir,
    )


def _can_traverse(path: Path, user: _RunAs) -> bool:
    if user.uid is None:
        return os.access(path, os.X_OK)
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in user.groups or st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like PostgreSQL itself, ignore connections of a stopped server in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _port_claims() -> Iterator[dict[str, float]]:
    """Yield the shared port claims (port -> expiry time), locked; saved on exit.

    Best effort: when the claims file cannot be used, yields an empty dict.
    """
    try:
        fd = os.open(_PORT_CLAIMS, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield {}
        return
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            claims: dict[str, float] = json.loads(handle.read() or "{}")
            if not isinstance(claims, dict):
                claims = {}
        except ValueError:
            claims = {}
        now = time.time()
        claims = {p: t for p, t in claims.items() if isinstance(t, (int, float)) and t > now}
        yield claims
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(claims))


def _choose_ports(count: int, first: int = DEFAULT_FIRST_PORT) -> int:
    """Return the first of ``count`` consecutive free ports at or above ``first``."""
    with _port_claims() as claims:
        now = time.time()
        base = first
        while base + count - 1 <= 65535:
            taken = next(
                (p for p in range(base, base + count) if str(p) in claims or not _port_free(p)),
                None,
            )
            if taken is None:
                for port in range(base, base + count):
                    claims[str(port)] = now + _PORT_CLAIM_SECONDS
                return base
            base = taken + 1
    raise ClusterError(f"no {count} consecutive free ports on {HOST} at or above {first}")


def _release_ports(ports: Sequence[int]) -> None:
    with _port_claims() as claims:
        for port in ports:
            claims.pop(str(port), None)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """Return (state, parent pid) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data.rpartition(")")[2].split()
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None:
                children.setdefault(info[1], []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


class LocalCluster:
    """A primary and ``replicas`` streaming hot standbys on 127.0.0.1.

    Server index 0 is the primary, 1..N are the replicas. The primary listens on
    ``port`` and replica i on ``port + i``; with ``port=None`` :meth:`up` picks N+1
    consecutive free ports starting at 5432. Use as a context manager to stop the
    servers on exit (and remove the directory too when ``keep=False``)::

        with LocalCluster("/tmp/demo", replicas=2) as cluster:
            cluster.execute(0, "CREATE TABLE t (x int)")
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = DEFAULT_DIRECTORY,
        *,
        replicas: int = 2,
        port: int | None = None,
        bindir: str | None = None,
        keep: bool = True,
    ) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ClusterError(f"replicas must be an integer >= 0, not {replicas!r}")
        if port is not None and not 1 <= port <= 65535 - replicas:
            raise ClusterError(f"port {port} out of range: ports {port}..{port + replicas}")
        self.directory = Path(directory).absolute()
        self.replicas = replicas
        self.keep = keep
        self._port = port
        self._bindir = bindir
        self._password: str | None = None
        self._run_as: _RunAs | None = None
        state = self._read_state()
        if state is not None:
            stored_replicas = int(cast(int, state["replicas"]))
            stored_port = int(cast(int, state["port"]))
            if replicas != stored_replicas:
                raise ClusterError(
                    f"{self.directory} already holds a cluster with {stored_replicas} "
                    f"replicas, not {replicas}: {self._reuse_hint()}"
                )
            if port is not None and port != stored_port:
                raise ClusterError(
                    f"{self.directory} already holds a cluster on port {stored_port}, "
                    f"not {port}: {self._reuse_hint()}"
                )
            self._port = stored_port
            if bindir is None:
                self._bindir = cast(str, state.get("bindir")) or None

    def _reuse_hint(self) -> str:
        return (
            "open it with LocalCluster.load() or remove it first "
            f"(pgreplica cluster destroy --dir {self.directory})"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str] = DEFAULT_DIRECTORY) -> LocalCluster:
        """Re-open the cluster described by ``DIR/cluster.json``."""
        path = Path(directory).absolute()
        state = cls._read_state_file(path)
        if state is None:
            raise ClusterError(
                f"no cluster in {path} ({_STATE_FILE} not found): "
                f"run 'pgreplica cluster up --dir {path}' first"
            )
        return cls(path, replicas=int(cast(int, state["replicas"])))

    # ------------------------------------------------------------------ description

    def __repr__(self) -> str:
        ports = "?" if self._port is None else f"{self._port}..{self._port + self.replicas}"
        return f"LocalCluster({str(self.directory)!r}, replicas={self.replicas}, ports={ports})"

    def __enter__(self) -> LocalCluster:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.keep:
            self.down()
        else:
            self.destroy()

    @property
    def bindir(self) -> str:
        """The directory of the PostgreSQL server binaries in use."""
        if self._bindir is None or not _has_initdb(self._bindir):
            self._bindir = find_bindir(self._bindir)
        return self._bindir

    def port(self, index: int) -> int:
        """The TCP port of server ``index`` (0 = primary, 1..N = replicas)."""
        self._check_server(index)
        if self._port is None:
            raise ClusterError("the ports are chosen by up(): call up() first")
        return self._port + index

    def dsn(self, index: int) -> str:
        """The connection URL of server ``index`` (0 = primary), password included."""
        return self._dsn(index, self._read_password())

    def redacted_dsn(self, index: int) -> str:
        """Like :meth:`dsn` with the password replaced by ``***``, safe to print."""
        return self._dsn(index, "***")

    def _dsn(self, index: int, password: str) -> str:
        return f"postgresql://{SUPERUSER}:{password}@{HOST}:{self.port(index)}/postgres"

    @property
    def primary_dsn(self) -> str:
        """The connection URL of the primary."""
        return self.dsn(0)

    @property
    def replica_dsns(self) -> list[str]:
        """The connection URLs of the replicas, replica 1 first."""
        return [self.dsn(i) for i in range(1, self.replicas + 1)]

    def config(self) -> dict[str, object]:
        """The pgreplica configuration that routes database ``main`` to this cluster."""
        return {"databases": {"main": {"primary": self.primary_dsn, "replicas": self.replica_dsns}}}

    def write_config(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write :meth:`config` as TOML (mode 0600), by default to ``DIR/pgreplica.toml``."""
        target = Path(path) if path is not None else self.directory / _CONFIG_FILE
        replicas = ", ".join(json.dumps(dsn) for dsn in self.replica_dsns)
        text = (
            f"# Local cluster in {self.directory} (pgreplica cluster up).\n"
            "[databases.main]\n"
            f"primary = {json.dumps(self.primary_dsn)}\n"
            f"replicas = [{replicas}]\n"
        )
        _write_private(target, text)
        return target

    def name(self, index: int) -> str:
        """``primary`` for index 0, ``replicaN`` for replica N."""
        self._check_server(index)
        return "primary" if index == 0 else f"replica{index}"

    def data_directory(self, index: int) -> Path:
        """The data directory of server ``index``."""
        return self.directory / self.name(index)

    def log_file(self, index: int) -> Path:
        """The server log of server ``index``."""
        return self.directory / "logs" / f"{self.name(index)}.log"

    # ------------------------------------------------------------------ lifecycle

    def up(self) -> LocalCluster:
        """Create the cluster if needed, start every stopped server, thaw frozen ones.

        Returns when every replica is in recovery and streaming from the primary.
        """
        self._prepare_directory()
        if self._port is None:
            self._port = _choose_ports(self.replicas + 1)
        self._write_state()
        if not (self.data_directory(0) / "PG_VERSION").exists():
            self._init_primary()
        self._thaw(0)
        self._start_server(0)
        for index in range(1, self.replicas + 1):
            if not (self.data_directory(index) / "PG_VERSION").exists():
                self._clone_replica(index)
            self._thaw(index)
            self._start_server(index)
        deadline = time.monotonic() + _WAIT_TIMEOUT
        for index in range(1, self.replicas + 1):
            if self._is_standby(index):
                self._wait_streaming(index, deadline)
        return self

    def down(self) -> None:
        """Stop every server (fast shutdown); frozen servers are thawed first."""
        if not self.directory.exists():
            return
        running = [i for i in range(self.replicas + 1) if self._postmaster_pid(i) is not None]
        for index in running:
            self._thaw(index)
        if running:
            with ThreadPoolExecutor(max_workers=len(running)) as pool:
                for future in [pool.submit(self._stop_server, i, "fast") for i in running]:
                    future.result()

    def destroy(self) -> None:
        """Stop every server and remove the cluster directory."""
        if not self.directory.exists():
            return
        if self._read_state() is None and any(self.directory.iterdir()):
            raise ClusterError(
                f"refusing to remove {self.directory}: it holds no {_STATE_FILE}, "
                "so it is not a pgreplica cluster"
            )
        self.down()
        shutil.rmtree(self.directory)
        if self._port is not None:
            _release_ports(range(self._port, self._port + self.replicas + 1))

    # ------------------------------------------------------------------ failure injection

    def lag(self, replica: int, delay: float | str) -> None:
        """Delay replay on ``replica`` by ``delay`` (seconds, or ``"300ms"``, ``"2s"``).

        Sets ``recovery_min_apply_delay`` and reloads the server (no restart); returns
        once the server reports the new value. ``0`` removes the delay. A stopped or
        frozen replica gets the setting when it starts or thaws.
        """
        self._check_replica(replica)
        ms = parse_delay(delay)
        self._write_server_conf(replica, apply_delay_ms=ms)
        if self._postmaster_pid(replica) is None:
            return
        self._pg_ctl(replica, "reload")  # a frozen server gets the signal when thawed
        if self._is_frozen(replica):
            return
        query = "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'"

        def applied() -> bool:
            rows = self._try_query(replica, query)
            return rows is not None and int(rows[0][0]) == ms

        self._poll(applied, replica, f"replica {replica} did not take the apply delay")

    def pause(self, replica: int) -> None:
        """Pause WAL replay on ``replica`` (``pg_wal_replay_pause()``)."""
        self._check_replica(replica)
        self._require_answering(replica)
        self.execute(replica, "SELECT pg_wal_replay_pause()")

    def resume(self, replica: int) -> None:
        """Resume WAL replay on ``replica`` (``pg_wal_replay_resume()``)."""
        self._check_replica(replica)
        self._require_answering(replica)
        self.execute(replica, "SELECT pg_wal_replay_resume()")

    def kill(self, replica: int) -> None:
        """Crash server ``replica`` (immediate shutdown); 0 kills the primary."""
        self._check_server(replica)
        if self._postmaster_pid(replica) is not None:
            self._thaw(replica)
            self._stop_server(replica, "immediate")

    def start(self, replica: int) -> None:
        """Start server ``replica`` (0 = primary) and wait until it accepts connections."""
        self._check_server(replica)
        if self._is_frozen(replica):
            raise ClusterError(f"{self.name(replica)} is frozen: thaw it instead of starting it")
        self._start_server(replica)

    def freeze(self, replica: int) -> None:
        """Hang server ``replica`` (0 = primary): SIGSTOP the postmaster and its children.

        The kernel still accepts TCP connections on its port, but nothing answers, as with
        a hung server. :meth:`thaw` undoes it.
        """
        self._check_server(replica)
        pid = self._postmaster_pid(replica)
        if pid is None:
            raise ClusterError(f"{self.name(replica)} is not running, so it cannot be frozen")
        _signal(pid, signal.SIGSTOP)
        pids = [pid, *_descendants(pid)]
        for child in pids[1:]:
            _signal(child, signal.SIGSTOP)

        def stopped() -> bool:
            # exited children stay zombies until the (stopped) postmaster reaps them
            return all((_proc_stat(p) or ("X", 0))[0] in "TtZX" for p in pids)

        self._poll(stopped, replica, f"{self.name(replica)} did not stop", timeout=10)

    def thaw(self, replica: int) -> None:
        """Undo :meth:`freeze`: SIGCONT the postmaster and all its children."""
        self._check_server(replica)
        self._thaw(replica)

    def promote(self, replica: int) -> None:
        """Promote ``replica`` to a primary; returns once it accepts writes.

        The old primary keeps running: this is a failover test, not a switchover.
        """
        self._check_replica(replica)
        self._require_answering(replica)
        if not self._is_standby(replica):
            return
        self._pg_ctl(replica, "promote", "-w", "-t", str(int(_WAIT_TIMEOUT)))

        def promoted() -> bool:
            rows = self._try_query(replica, "SELECT pg_is_in_recovery()")
            return rows is not None and rows[0][0] is False

        self._poll(promoted, replica, f"replica {replica} did not leave recovery")

    def heal(self, timeout: float = 30) -> None:
        """Undo every injected failure on servers that are still part of the cluster.

        Thaws frozen servers, starts stopped ones, removes apply delays, resumes paused
        replay, then waits until every replica streams and has replayed the primary's
        WAL. A promoted replica stays promoted.
        """
        deadline = time.monotonic() + timeout
        for index in range(self.replicas + 1):
            self._thaw(index)
            if self._postmaster_pid(index) is None:
                self._start_server(index)
        for index in range(1, self.replicas + 1):
            if not self._is_standby(index):
                continue
            if self._read_server_conf(index).get("recovery_min_apply_delay", "0") != "0":
                self.lag(index, 0)
            if self.execute(index, "SELECT pg_is_wal_replay_paused()")[0][0]:
                self.resume(index)
            self._wait_streaming(index, deadline)
        self.wait_replayed(timeout=max(deadline - time.monotonic(), 1.0))

    # ------------------------------------------------------------------ inspection

    def status(self) -> list[dict[str, object]]:
        """One dict per server: index, name, role, port, running, frozen, in_recovery,
        lsn (replay position on a replica, current position on a primary), paused,
        streaming, apply_delay.
        """
        query = (
            "SELECT pg_is_in_recovery(),"
            " (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END)::text,"
            " CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END,"
            " (SELECT status FROM pg_stat_wal_receiver),"
            " current_setting('recovery_min_apply_delay')"
        )
        result: list[dict[str, object]] = []
        for index in range(self.replicas + 1):
            running = self._postmaster_pid(index) is not None
            frozen = running and self._is_frozen(index)
            standby = index > 0 and self._is_standby(index)
            row: dict[str, object] = {
                "index": index,
                "name": self.name(index),
                "role": "replica" if standby else "primary",
                "port": self.port(index),
                "running": running,
                "frozen": frozen,
                "in_recovery": None,
                "lsn": None,
                "paused": None,
                "streaming": None,
                "apply_delay": None,
            }
            if index > 0:
                ms = parse_delay(self._read_server_conf(index).get("recovery_min_apply_delay", "0"))
                row["apply_delay"] = format_delay(ms)
            if running and not frozen:
                rows = self._try_query(index, query, connect_timeout=3)
                if rows:
                    in_recovery, lsn, paused, receiver, delay = rows[0]
                    row.update(in_recovery=in_recovery, lsn=lsn, paused=paused)
                    if in_recovery:
                        row.update(streaming=receiver == "streaming", apply_delay=delay)
            result.append(row)
        return result

    def execute(self, index: int, sql: str) -> list[tuple[Any, ...]]:
        """Run one statement on server ``index`` in autocommit; return its rows (or [])."""
        self._check_server(index)
        with self._connect(index, connect_timeout=10) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description is not None else []

    def wait_replayed(
        self,
        lsn: str | None = None,
        timeout: float = 30,
        *,
        replicas: Sequence[int] | None = None,
    ) -> None:
        """Wait until replicas have replayed the WAL up to ``lsn``.

        ``lsn`` defaults to the primary's current WAL position, ``replicas`` to every
        running, unfrozen replica that is still in recovery. A paused or delayed replica
        makes this wait (and time out, if the pause or delay outlasts ``timeout``).
        """
        if replicas is None:
            replicas = [
                i
                for i in range(1, self.replicas + 1)
                if self._is_standby(i)
                and self._postmaster_pid(i) is not None
                and not self._is_frozen(i)
            ]
        for replica in replicas:
            self._check_replica(replica)
        if lsn is None:
            lsn = cast(str, self.execute(0, "SELECT pg_current_wal_lsn()::text")[0][0])
        target = lsn_to_int(lsn)
        deadline = time.monotonic() + timeout
        for replica in replicas:
            self._wait_replica_replayed(replica, lsn, target, deadline)

    def _wait_replica_replayed(self, replica: int, lsn: str, target: int, deadline: float) -> None:
        replayed: str | None = None

        def caught_up() -> bool:
            nonlocal replayed
            rows = self._try_query(replica, "SELECT pg_last_wal_replay_lsn()::text")
            if rows is None:
                return False
            replayed = rows[0][0]
            return replayed is not None and lsn_to_int(replayed) >= target

        self._poll(
            caught_up,
            replica,
            lambda: f"replica {replica} did not replay up to {lsn} (replayed: {replayed})",
            deadline=deadline,
        )

    # ------------------------------------------------------------------ internals

    def _check_server(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ClusterError(f"server index must be an integer, not {index!r}")
        if not 0 <= index <= self.replicas:
            raise ClusterError(
                f"no server {index}: this cluster has the primary (0) and {self._range_text()}"
            )

    def _check_replica(self, replica: int) -> None:
        if isinstance(replica, bool) or not isinstance(replica, int):
            raise ClusterError(f"replica index must be an integer, not {replica!r}")
        if not 1 <= replica <= self.replicas:
            hint = " (0 is the primary)" if replica == 0 else ""
            raise ClusterError(f"no replica {replica}: this cluster has {self._range_text()}{hint}")

    def _require_answering(self, index: int) -> None:
        if self._postmaster_pid(index) is None:
            raise ClusterError(f"{self.name(index)} is not running: start it first")
        if self._is_frozen(index):
            raise ClusterError(f"{self.name(index)} is frozen: thaw it first")

    def _range_text(self) -> str:
        if self.replicas == 0:
            return "no replicas"
        if self.replicas == 1:
            return "replica 1"
        return f"replicas 1..{self.replicas}"

    def _error(self, message: str, index: int | None = None) -> ClusterError:
        if index is not None:
            message += self._log_tail(index)
        if self._password:
            message = message.replace(self._password, "***")
        return ClusterError(message)

    def _log_tail(self, index: int, lines: int = 15) -> str:
        path = self.log_file(index)
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                tail = handle.readlines()[-lines:]
        except OSError:
            return ""
        if not tail:
            return ""
        return f"\n--- last lines of {path} ---\n" + "".join(tail).rstrip("\n")

    # state and files

    @staticmethod
    def _read_state_file(directory: Path) -> dict[str, object] | None:
        try:
            text = (directory / _STATE_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ClusterError(f"cannot read {directory / _STATE_FILE}: {exc.strerror}") from None
        try:
            state = json.loads(text)
        except ValueError:
            raise ClusterError(f"{directory / _STATE_FILE} is not valid JSON") from None
        if not isinstance(state, dict) or "replicas" not in state or "port" not in state:
            raise ClusterError(f"{directory / _STATE_FILE} does not describe a cluster")
        return cast(dict[str, object], state)

    def _read_state(self) -> dict[str, object] | None:
        return self._read_state_file(self.directory)

    def _write_state(self) -> None:
        assert self._port is not None
        state = {
            "format": _STATE_FORMAT,
            "replicas": self.replicas,
            "port": self._port,
            "ports": [self._port + i for i in range(self.replicas + 1)],
            "bindir": self.bindir,
            "user": self._user().name,
            "password_file": _PASSWORD_FILE,
        }
        _write_private(self.directory / _STATE_FILE, json.dumps(state, indent=2) + "\n")

    def _read_password(self) -> str:
        if self._password is None:
            path = self.directory / _PASSWORD_FILE
            try:
                self._password = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                raise ClusterError(f"no password file {path}: call up() first") from None
            except OSError as exc:
                raise ClusterError(f"cannot read {path}: {exc.strerror}") from None
        return self._password

    def _user(self) -> _RunAs:
        if self._run_as is None:
            self._run_as = _resolve_run_as()
        return self._run_as

    def _chown(self, path: Path) -> None:
        user = self._user()
        if user.uid is not None and user.gid is not None:
            os.chown(path, user.uid, user.gid)

    def _prepare_directory(self) -> None:
        user = self._user()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClusterError(f"cannot create {self.directory}: {exc.strerror}") from None
        if self._read_state() is None and any(
            p.name not in (_PASSWORD_FILE, "logs") for p in self.directory.iterdir()
        ):
            raise ClusterError(
                f"{self.directory} is not empty and holds no {_STATE_FILE}: "
                "use a new or empty directory for the cluster"
            )
        if user.uid is not None:
            for parent in reversed(self.directory.resolve().parents):
                if not _can_traverse(parent, user):
                    mode = stat.S_IMODE(parent.stat().st_mode)
                    raise ClusterError(
                        f"user '{user.name}' (the servers run as it because this process runs "
                        f"as root) cannot reach {self.directory}: {parent} is not traversable "
                        f"(mode {mode:04o}); choose a directory under a world-traversable "
                        "parent such as /tmp (e.g. tempfile.mkdtemp()), or chmod o+x "
                        f"{parent}"
                    )
            self._chown(self.directory)
        logs = self.directory / "logs"
        logs.mkdir(exist_ok=True)
        self._chown(logs)

    def _write_server_conf(self, index: int, *, apply_delay_ms: int | None = None) -> None:
        settings = self._read_server_conf(index)
        settings["port"] = str(self.port(index))
        if apply_delay_ms is not None:
            settings["recovery_min_apply_delay"] = format_delay(apply_delay_ms)
        elif index > 0:
            settings.setdefault("recovery_min_apply_delay", "0")
        lines = ["# Per-server settings of the pgreplica local cluster; rewritten by pgreplica."]
        lines += [f"{key} = '{value}'" for key, value in settings.items()]
        path = self.data_directory(index) / _SERVER_CONF
        _write_private(path, "\n".join(lines) + "\n")
        self._chown(path)

    def _read_server_conf(self, index: int) -> dict[str, str]:
        settings: dict[str, str] = {}
        try:
            text = (self.data_directory(index) / _SERVER_CONF).read_text(encoding="utf-8")
        except OSError:
            return settings
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                settings[key.strip()] = value.strip().strip("'")
        return settings

    def _is_standby(self, index: int) -> bool:
        return index > 0 and (self.data_directory(index) / "standby.signal").exists()

    # processes

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._user().uid is not None:
            env["HOME"] = str(self.directory)
            env["USER"] = env["LOGNAME"] = self._user().name
        env.update(extra or {})
        return env

    def _run(
        self,
        program: str,
        *args: str,
        env: dict[str, str] | None = None,
        log_index: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        user = self._user()
        command = [os.path.join(self.bindir, program), *args]
        try:
            proc = subprocess.run(
                command,
                cwd=self.directory,
                env=self._env(env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT,
                check=False,
                user=user.uid,
                group=user.gid,
                extra_groups=list(user.groups) if user.uid is not None else None,
            )
        except subprocess.TimeoutExpired:
            raise self._error(f"{program} did not finish within {_COMMAND_TIMEOUT:g}s") from None
        except OSError as exc:
            raise self._error(f"cannot run {command[0]}: {exc.strerror}") from None
        if proc.returncode != 0:
            output = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-8:]
            detail = ("\n" + "\n".join(output)) if output else ""
            raise self._error(
                f"{program} {args[0] if args else ''} failed (exit {proc.returncode}){detail}",
                log_index,
            )
        return proc

    def _pg_ctl(self, index: int, action: str, *args: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data_directory(index)), *args, log_index=index)

    def _postmaster_pid(self, index: int) -> int | None:
        try:
            text = (self.data_directory(index) / "postmaster.pid").read_text(encoding="utf-8")
            pid = int(text.split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        info = _proc_stat(pid)
        if info is None or info[0] in "ZX":
            return None
        return pid

    def _is_frozen(self, index: int) -> bool:
        pid = self._postmaster_pid(index)
        info = None if pid is None else _proc_stat(pid)
        return info is not None and info[0] in "Tt"

    def _thaw(self, index: int) -> None:
        pid = self._postmaster_pid(index)
        if pid is None or not self._is_frozen(index):
            return
        for child in _descendants(pid):
            _signal(child, signal.SIGCONT)
        _signal(pid, signal.SIGCONT)

    def _init_primary(self) -> None:
        data = self.data_directory(0)
        if data.exists():
            shutil.rmtree(data)
        password_file = self.directory / _PASSWORD_FILE
        if not password_file.exists():
            _write_private(password_file, secrets.token_hex(16) + "\n")
        self._chown(password_file)
        self._password = None
        self._read_password()
        self._run(
            "initdb",
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            f"--pwfile={password_file}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(_SHARED_SETTINGS.format(server_conf=_SERVER_CONF))
        with open(data / "pg_hba.conf", "a", encoding="utf-8") as hba:
            hba.write(f"host replication {SUPERUSER} {HOST}/32 scram-sha-256\n")
        self._write_server_conf(0)

    def _clone_replica(self, index: int) -> None:
        data = self.data_directory(index)
        if data.exists():
            shutil.rmtree(data)
        slot = self.name(index)
        self.execute(
            0,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            f" WHERE slot_name = '{slot}' AND NOT active",
        )
        self._run(
            "pg_basebackup",
            "-D",
            str(data),
            "-d",
            f"host={HOST} port={self.port(0)} user={SUPERUSER} application_name={slot}",
            "-X",
            "stream",
            "-c",
            "fast",
            "-C",
            "-S",
            slot,
            "-R",
            "--no-sync",
            env={"PGPASSWORD": self._read_password()},
            log_index=0,
        )
        self._write_server_conf(index)

    def _start_server(self, index: int) -> None:
        if self._postmaster_pid(index) is not None:
            return
        port = self.port(index)
        if not _port_free(port):
            raise self._error(
                f"cannot start {self.name(index)}: port {port} on {HOST} is in use by "
                "another program"
            )
        # A crashed server can leave a stale pid file behind; the postmaster removes it
        # itself when the pid in it is not running.
        self._pg_ctl(
            index,
            "start",
            "-w",
            "-t",
            str(int(_WAIT_TIMEOUT)),
            "-l",
            str(self.log_file(index)),
        )

        def accepting() -> bool:
            return self._try_query(index, "SELECT 1") is not None

        self._poll(accepting, index, f"{self.name(index)} does not accept connections")

    def _stop_server(self, index: int, mode: str) -> None:
        self._pg_ctl(index, "stop", "-m", mode, "-w", "-t", str(int(_WAIT_TIMEOUT)))

    def _wait_streaming(self, index: int, deadline: float) -> None:
        query = "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver)"

        def streaming() -> bool:
            rows = self._try_query(index, query)
            return rows is not None and rows[0] == (True, "streaming")

        self._poll(streaming, index, f"replica {index} is not streaming", deadline=deadline)

    def _connect(self, index: int, connect_timeout: int) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            host=HOST,
            port=self.port(index),
            user=SUPERUSER,
            password=self._read_password(),
            dbname="postgres",
            connect_timeout=connect_timeout,
            application_name=_APP_NAME,
            autocommit=True,
        )

    def _try_query(
        self, index: int, sql: str, connect_timeout: int = 5
    ) -> list[tuple[Any, ...]] | None:
        """Run a query; None if the server cannot be reached (yet)."""
        try:
            with self._connect(index, connect_timeout) as conn, conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        except psycopg.OperationalError:
            return None

    def _poll(
        self,
        check: Callable[[], bool],
        index: int,
        what: str | Callable[[], str],
        *,
        timeout: float = _WAIT_TIMEOUT,
        deadline: float | None = None,
    ) -> None:
        """Call ``check`` until it returns true; on timeout raise with the server log."""
        if deadline is None:
            deadline = time.monotonic() + timeout
        start = time.monotonic()
        interval = 0.01
        while not check():
            now = time.monotonic()
            if now >= deadline:
                message = what() if callable(what) else what
                raise self._error(f"{message} within {now - start:.1f}s", index)
            time.sleep(min(interval, max(deadline - now, 0.0)))
            interval = min(interval * 1.5, 0.1)


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (created or truncated)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(fd, 0o600)
        handle.write(text)
