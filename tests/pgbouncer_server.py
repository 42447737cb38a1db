"""Real PgBouncer processes in front of a :class:`~pgreplica.testing.LocalCluster`.

:class:`PgBouncer` writes a configuration with one ``[databases]`` entry per server of
the cluster (``server0`` is the primary, ``serverN`` replica N, all of them the
cluster's database ``dbname``: ``postgres``, or ``pgbouncer_tests`` for the fixtures),
starts ``pgbouncer`` on a free port of 127.0.0.1 in the given pool mode, waits until a
query goes through it, and stops it again.
:meth:`PgBouncer.dsn` is the URL of server ``index`` through it, password included.

The session fixtures ``pgbouncer_session`` and ``pgbouncer_transaction`` run one
process each, in front of the session ``cluster``, and stop it at the end of the
session; ``pgbouncer_factory`` starts more (other settings) for one test. Without a
``pgbouncer`` binary the tests that use them are skipped, with the reason. The
benchmark (``bench/pgbouncer.py``) uses the class directly.

:func:`UnpreparedLoadBalancer` is a :class:`~pgreplica.LoadBalancer` whose pooled and
probe connections never prepare statements (``prepare_threshold=None``), which
transaction pooling needs: pgreplica has no setting for it yet.

PgBouncer refuses to run as root: as root it is started with ``-u postgres`` (the
user the cluster's servers run as), and its files belong to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgreplica import LoadBalancer
from pgreplica.testing import LocalCluster, make_cluster_directory

__all__ = [
    "PGBOUNCER",
    "PgBouncer",
    "PgBouncerError",
    "UnpreparedLoadBalancer",
    "find_pgbouncer",
    "pgbouncer_binary",
    "pgbouncer_database",
    "pgbouncer_factory",
    "pgbouncer_session",
    "pgbouncer_transaction",
]

PGBOUNCER = "/usr/sbin/pgbouncer"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
RUN_AS = "postgres"
#: The database of the cluster behind the fixtures' PgBouncers.
DATABASE = "pgbouncer_tests"
HOST = "127.0.0.1"

#: What the test configuration sets besides the pool mode (PgBouncer's defaults
#: otherwise: pgreplica sends no startup ``options``).
#: ``server_login_retry`` is short so that a replica restarted after a kill is reachable
#: through PgBouncer at once (the default waits 15 s after a failed server login).
#: ``query_wait_timeout`` bounds how long a client waits for a server connection that
#: cannot be had (the default is 120 s).
SETTINGS: dict[str, str] = {
    "max_client_conn": "500",
    "default_pool_size": "20",
    "server_login_retry": "1",
    "query_wait_timeout": "10",
    "server_connect_timeout": "5",
    "admin_users": "postgres",
    "unix_socket_dir": "",
}


class PgBouncerError(Exception):
    """PgBouncer did not start; the message ends with its log."""


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` binary: ``/usr/sbin/pgbouncer`` (Debian), else on PATH."""
    if os.access(PGBOUNCER, os.X_OK):
        return PGBOUNCER
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class PgBouncer:
    """One PgBouncer process in ``pool_mode`` (``session`` or ``transaction``) in
    front of every server of ``cluster``. Use :meth:`start` and :meth:`stop`, or the
    context manager."""

    def __init__(
        self,
        cluster: LocalCluster,
        pool_mode: str,
        *,
        binary: str | None = None,
        settings: dict[str, str] | None = None,
        dbname: str = "postgres",
    ) -> None:
        if pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(f"unknown pool mode {pool_mode!r}")
        found = binary or find_pgbouncer()
        if found is None:
            raise PgBouncerError(f"pgbouncer not found ({PGBOUNCER} nor on PATH)")
        self.binary = found
        self.cluster = cluster
        self.pool_mode = pool_mode
        self.dbname = dbname
        self.settings = {**SETTINGS, **(settings or {})}
        self.port = 0
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        params = conninfo_to_dict(cluster.dsn(0))
        self._user = str(params["user"])
        self._password = str(params["password"])

    def __repr__(self) -> str:
        return f"<PgBouncer {self.pool_mode} {HOST}:{self.port}>"

    # -- addresses ------------------------------------------------------------------

    @staticmethod
    def database(index: int) -> str:
        """The PgBouncer database name of server ``index`` (0 = primary)."""
        return f"server{index}"

    def dsn(self, index: int) -> str:
        """The URL of server ``index`` through this PgBouncer, password included."""
        return (
            f"postgresql://{self._user}:{self._password}@{HOST}:{self.port}/{self.database(index)}"
        )

    @property
    def primary_dsn(self) -> str:
        return self.dsn(0)

    @property
    def replica_dsns(self) -> list[str]:
        return [self.dsn(i) for i in range(1, self.cluster.replicas + 1)]

    def admin_dsn(self) -> str:
        """The admin console (``SHOW POOLS``, ``SHOW CONFIG``; simple queries only)."""
        return f"postgresql://{self._user}:{self._password}@{HOST}:{self.port}/pgbouncer"

    def log(self) -> str:
        """PgBouncer's log so far ("" before it started)."""
        if self.directory is None:
            return ""
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- lifecycle --------------------------------------------------------------------

    def _config(self) -> str:
        assert self.directory is not None
        databases = "\n".join(
            f"{self.database(i)} = host={HOST} port={self.cluster.port(i)} dbname={self.dbname}"
            for i in range(self.cluster.replicas + 1)
        )
        settings = "\n".join(f"{key} = {value}" for key, value in self.settings.items())
        return (
            f"[databases]\n{databases}\n\n"
            "[pgbouncer]\n"
            f"listen_addr = {HOST}\n"
            f"listen_port = {self.port}\n"
            f"pool_mode = {self.pool_mode}\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.directory / 'userlist.txt'}\n"
            f"logfile = {self.directory / 'pgbouncer.log'}\n"
            f"{settings}\n"
        )

    def start(self) -> PgBouncer:
        """Write the configuration, start PgBouncer and wait until a query of the
        primary goes through it. Raises :class:`PgBouncerError` if it does not."""
        if self.process is not None:
            return self
        self.directory = make_cluster_directory("pgbouncer-")
        self.port = free_port()
        userlist = self.directory / "userlist.txt"
        config = self.directory / "pgbouncer.ini"
        userlist.write_text(f'"{self._user}" "{self._password}"\n')
        config.write_text(self._config())
        command = [self.binary]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: it switches to -u's user after reading
            # its configuration; the files it reopens later (log, auth file on reload)
            # belong to that user.
            entry = pwd.getpwnam(RUN_AS)
            for path in (self.directory, userlist, config):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command += ["-u", RUN_AS]
        for path in (userlist, config):
            os.chmod(path, 0o600)
        command.append(str(config))
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        last_error = ""
        while True:
            if self.process.poll() is not None:
                raise PgBouncerError(
                    f"pgbouncer on port {self.port} exited with code {self.process.returncode}:"
                    f"\n{self.log()[-2000:]}"
                )
            try:
                with psycopg.connect(self.dsn(0), connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_error = str(exc).strip()
            if time.monotonic() > deadline:
                raise PgBouncerError(
                    f"pgbouncer on port {self.port} did not answer within {START_TIMEOUT:g}s"
                    f" ({last_error}):\n{self.log()[-2000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL) and remove its directory."""
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def UnpreparedLoadBalancer(*args: Any, **kwargs: Any) -> LoadBalancer:
    """A LoadBalancer for transaction pooling (``transaction_pooling = true``): its
    pooled connections never prepare statements (PgBouncer before 1.21 cannot route
    protocol-level prepared statements), and its routing connections refuse session
    state."""
    return LoadBalancer(*args, transaction_pooling=True, **kwargs)


def _require_binary() -> str:
    binary = find_pgbouncer()
    if binary is None:
        reason = f"pgbouncer not found ({PGBOUNCER} nor on PATH): PgBouncer tests skipped"
        print(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def pgbouncer_binary() -> str:
    """The pgbouncer binary; the test is skipped (before a cluster starts) without it."""
    return _require_binary()


@pytest.fixture(scope="session")
def pgbouncer_database(cluster: LocalCluster) -> str:
    """The database behind the test PgBouncers (created once), so that what their
    tests create meets no other test."""
    if not cluster.execute(0, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
        cluster.execute(0, f"CREATE DATABASE {DATABASE}")
    cluster.wait_replayed()
    return DATABASE


def _bouncer(cluster: LocalCluster, pool_mode: str, binary: str) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(cluster, pool_mode, binary=binary, dbname=DATABASE)
    try:
        bouncer.start()
    except PgBouncerError as exc:
        pytest.fail(str(exc))
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="session")
def pgbouncer_session(
    pgbouncer_binary: str, cluster: LocalCluster, pgbouncer_database: str
) -> Iterator[PgBouncer]:
    """PgBouncer in session pooling mode in front of the session cluster."""
    yield from _bouncer(cluster, "session", pgbouncer_binary)


@pytest.fixture(scope="session")
def pgbouncer_transaction(
    pgbouncer_binary: str, cluster: LocalCluster, pgbouncer_database: str
) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of the session cluster."""
    yield from _bouncer(cluster, "transaction", pgbouncer_binary)


@pytest.fixture
def pgbouncer_factory(
    pgbouncer_binary: str, cluster: LocalCluster, pgbouncer_database: str
) -> Iterator[Callable[..., PgBouncer]]:
    """``start(pool_mode, **settings)``: a PgBouncer of this test in front of the
    session cluster, with these settings on top of :data:`SETTINGS`; stopped after it."""
    binary = pgbouncer_binary
    started: list[PgBouncer] = []

    def start(pool_mode: str, **settings: str) -> PgBouncer:
        bouncer = PgBouncer(
            cluster, pool_mode, binary=binary, settings=settings, dbname=pgbouncer_database
        )
        started.append(bouncer)
        try:
            return bouncer.start()
        except PgBouncerError as exc:
            pytest.fail(str(exc))

    try:
        yield start
    finally:
        for bouncer in started:
            bouncer.stop()
