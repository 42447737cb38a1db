"""The :class:`LocalCluster` class: creating the cluster, its lifecycle, failure injection
and inspection."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from pgreplica.localcluster._util import HOST, SUPERUSER, ClusterError, lsn_to_int
from pgreplica.localcluster.binaries import _chown, _RunAs
from pgreplica.localcluster.files import (
    _CONFIG_FILE,
    _PASSWORD_FILE,
    _STATE_FILE,
    _STATE_FORMAT,
    DEFAULT_DIRECTORY,
    _prepare_directory,
    _read_state_file,
    _write_private,
)
from pgreplica.localcluster.ports import _choose_ports, _release_ports
from pgreplica.localcluster.processes import _stop_tree, _tree_stopped
from pgreplica.localcluster.serverconf import _add_shared_settings, format_delay, parse_delay
from pgreplica.localcluster.servers import _WAIT_TIMEOUT, _Servers


class LocalCluster(_Servers):
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
        state = _read_state_file(path)
        if state is None:
            raise ClusterError(
                f"no cluster in {path} ({_STATE_FILE} not found): "
                f"run 'pgreplica cluster up --dir {path}' first"
            )
        return cls(path, replicas=int(cast(int, state["replicas"])))

    # ------------------------------------------------------------------ description
    # (bindir, port, name, data_directory and log_file come from _Servers)

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

    # ------------------------------------------------------------------ lifecycle

    def up(self) -> LocalCluster:
        """Create the cluster if needed, start every stopped server, thaw frozen ones.

        Returns when every replica is in recovery and streaming from the primary.
        """
        _prepare_directory(self.directory, self._user())
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

    def stop(self, index: int) -> None:
        """Stop server ``index`` (0 = primary) cleanly (fast shutdown); a frozen one is
        thawed first. Nothing to do when it is not running."""
        self._check_server(index)
        if self._postmaster_pid(index) is not None:
            self._thaw(index)
            self._stop_server(index, "fast")

    def freeze(self, replica: int) -> None:
        """Hang server ``replica`` (0 = primary): SIGSTOP the postmaster and its children.

        The kernel still accepts TCP connections on its port, but nothing answers, as with
        a hung server. :meth:`thaw` undoes it.
        """
        self._check_server(replica)
        pid = self._postmaster_pid(replica)
        if pid is None:
            raise ClusterError(f"{self.name(replica)} is not running, so it cannot be frozen")
        pids = _stop_tree(pid)

        def stopped() -> bool:
            return _tree_stopped(pids)

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

    def running(self, index: int) -> bool:
        """Whether server ``index`` (0 = primary) is running (frozen or not)."""
        self._check_server(index)
        return self._postmaster_pid(index) is not None

    def apply_delay(self, replica: int) -> str:
        """The apply delay set on ``replica`` (by :meth:`lag`), as :meth:`lag` takes it:
        ``"0"`` or ``"300ms"``. A stopped replica gets it when it starts."""
        self._check_replica(replica)
        ms = parse_delay(self._read_server_conf(replica).get("recovery_min_apply_delay", "0"))
        return format_delay(ms)

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
                row["apply_delay"] = self.apply_delay(index)
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

    def create_database(
        self, name: str, *, wait_for: Sequence[int] | None = None, timeout: float = 30
    ) -> bool:
        """Create database ``name`` on the primary unless it exists, then wait (up to
        ``timeout`` seconds) until the replicas in ``wait_for`` have replayed it. True if it
        was created.

        ``wait_for`` defaults to the replicas that replay at once: every replica not in
        :meth:`replay_holdups` (running, not frozen, not paused, without an apply delay).
        The others get the database when they replay that far.
        """
        from psycopg import sql

        if not name or len(name.encode()) > 63 or "\x00" in name:
            raise ClusterError(f"not a database name: {name[:70]!r} (1 to 63 bytes)")
        if wait_for is None:
            held = self.replay_holdups()
            wait_for = [i for i in range(1, self.replicas + 1) if i not in held]
        with self._connect(0, connect_timeout=10) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            exists = row.fetchone() is not None
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.wait_replayed(timeout=timeout, replicas=wait_for)
        return not exists

    def replay_holdups(self) -> dict[int, str]:
        """The replicas that do not replay the primary's WAL as it comes, each with why:
        ``"stopped"``, ``"frozen"``, ``"promoted"``, ``"replay paused"``, ``"apply delay
        300ms"`` or ``"not answering"``. The replicas not in it replay at once."""
        held: dict[int, str] = {}
        query = "SELECT pg_is_in_recovery(), pg_is_wal_replay_paused()"
        for replica in range(1, self.replicas + 1):
            if self._postmaster_pid(replica) is None:
                held[replica] = "stopped"
            elif self._is_frozen(replica):
                held[replica] = "frozen"
            elif not self._is_standby(replica):
                held[replica] = "promoted"
            else:
                rows = self._try_query(replica, query, connect_timeout=3)
                delay = self.apply_delay(replica)
                if rows is None:
                    held[replica] = "not answering"
                elif not rows[0][0]:
                    held[replica] = "promoted"
                elif rows[0][1]:
                    held[replica] = "replay paused"
                elif delay != "0":
                    held[replica] = f"apply delay {delay}"
        return held

    def paused(self, replica: int) -> bool:
        """Whether WAL replay is paused on ``replica`` (:meth:`pause`); it must be running
        and not frozen."""
        self._check_replica(replica)
        self._require_answering(replica)
        return bool(self.execute(replica, "SELECT pg_is_wal_replay_paused()")[0][0])

    def frozen(self, index: int) -> bool:
        """Whether server ``index`` (0 = primary) is frozen (:meth:`freeze`)."""
        self._check_server(index)
        return self._postmaster_pid(index) is not None and self._is_frozen(index)

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

    def _require_answering(self, index: int) -> None:
        if self._postmaster_pid(index) is None:
            raise ClusterError(f"{self.name(index)} is not running: start it first")
        if self._is_frozen(index):
            raise ClusterError(f"{self.name(index)} is frozen: thaw it first")

    # state and new servers

    def _read_state(self) -> dict[str, object] | None:
        return _read_state_file(self.directory)

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

    def _init_primary(self) -> None:
        data = self.data_directory(0)
        if data.exists():
            shutil.rmtree(data)
        password_file = self.directory / _PASSWORD_FILE
        if not password_file.exists():
            _write_private(password_file, secrets.token_hex(16) + "\n")
        _chown(password_file, self._user())
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
        _add_shared_settings(data)
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
