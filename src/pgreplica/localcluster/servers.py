"""The servers of a local cluster, the base class of
:class:`~pgreplica.localcluster.LocalCluster`: where they are (ports, data directories,
logs), and running, starting, stopping, querying and waiting for them."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from pgreplica.localcluster._util import HOST, SUPERUSER, ClusterError
from pgreplica.localcluster.binaries import _has_initdb, _resolve_run_as, _RunAs, find_bindir
from pgreplica.localcluster.files import _PASSWORD_FILE, _log_tail
from pgreplica.localcluster.ports import _port_free
from pgreplica.localcluster.processes import _continue_tree, _is_stopped, _read_postmaster_pid
from pgreplica.localcluster.serverconf import _read_server_conf_file, _write_server_conf_file

_WAIT_TIMEOUT = 60.0
_COMMAND_TIMEOUT = 300.0
_APP_NAME = "pgreplica-localcluster"


class _Servers:
    """The servers of a :class:`~pgreplica.localcluster.LocalCluster`: where they are, and
    the machinery to run, start, stop, query and wait for them.

    :class:`LocalCluster` sets the attributes and adds the public operations.
    """

    directory: Path
    replicas: int
    _port: int | None
    _bindir: str | None
    _password: str | None
    _run_as: _RunAs | None

    # ------------------------------------------------------------------ where the servers are

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

    def _range_text(self) -> str:
        if self.replicas == 0:
            return "no replicas"
        if self.replicas == 1:
            return "replica 1"
        return f"replicas 1..{self.replicas}"

    def _error(self, message: str, index: int | None = None) -> ClusterError:
        if index is not None:
            message += _log_tail(self.log_file(index))
        if self._password:
            message = message.replace(self._password, "***")
        return ClusterError(message)

    # password, user and settings

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

    def _write_server_conf(self, index: int, *, apply_delay_ms: int | None = None) -> None:
        _write_server_conf_file(
            self.data_directory(index),
            self.port(index),
            self._user(),
            replica=index > 0,
            apply_delay_ms=apply_delay_ms,
        )

    def _read_server_conf(self, index: int) -> dict[str, str]:
        return _read_server_conf_file(self.data_directory(index))

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
        return _read_postmaster_pid(self.data_directory(index))

    def _is_frozen(self, index: int) -> bool:
        return _is_stopped(self._postmaster_pid(index))

    def _thaw(self, index: int) -> None:
        pid = self._postmaster_pid(index)
        if pid is None or not self._is_frozen(index):
            return
        _continue_tree(pid)

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

    # connections and waiting

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
