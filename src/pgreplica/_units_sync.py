"""GENERATED from ``_units_async.py`` by ``tools/gen_sync.py``: the sync twin of
the asyncio code. Do not edit; edit the asyncio file and regenerate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import Connection, Cursor
from psycopg.pq import TransactionStatus

from pgreplica._routing_sync import CursorProxy
from pgreplica.balancer import (
    COMMIT_SQL,
    LSN_SQL,
    is_connection_error,
    is_recovery_conflict,
    log_fallback,
    log_routed,
    query_text,
    record_commit,
    standby_refusal,
)
from pgreplica.comments import comment_for, with_comment
from pgreplica.context import current_state, note_read
from pgreplica.errors import PgReplicaError, PrimaryUnavailable, RoutingError
from pgreplica.health import Host, error_reason
from pgreplica.observe import WATCH, Event, UnitDone, notify, record

if TYPE_CHECKING:
    from pgreplica._balancer_sync import LoadBalancer

__all__ = ["ReadConnection", "ReadCursor"]

AConn = Connection[Any]


class _ReadUnit:
    """``with lb.read() as conn``: one read unit of work."""

    __slots__ = (
        "_conn",
        "_database",
        "_host",
        "_lb",
        "_max_staleness",
        "_max_wait",
        "_need",
        "_read_route",
        "_route",
        "_t0",
        "in_transaction",
        "moved",
        "reason",
        "retried",
        "served",
    )

    def __init__(
        self,
        lb: LoadBalancer,
        database: str | None,
        max_staleness: float | None,
        max_wait: float | None,
    ) -> None:
        self._lb = lb
        self._database = database
        self._max_staleness = max_staleness
        self._max_wait = lb.settings.max_wait if max_wait is None else max_wait
        self._need = 0
        self.in_transaction = 0
        self.retried = False
        self.served = False
        self._t0 = 0.0
        self.moved = False
        """The unit moved to the primary for a statement a standby refuses: what it
        runs there may write, so its position is recorded after each statement."""

    @property
    def host(self) -> Host:
        return self._host

    @property
    def db_config_name(self) -> str:
        """``main_replica``, ``ci_replica``, or the primary's ``main``/``ci``."""
        if self._host is self._route.primary:
            return self._route.primary_config_name
        return self._read_route.replica_config_name

    def __enter__(self) -> ReadConnection:
        lb = self._lb
        if not lb._opened:
            lb.open()
        route = self._route = lb._router.route(self._database)
        # A database in a rollout reads from another's replicas until it reaches it.
        read_route = route if route.rollout_from is None else lb._router.read_route(route)
        self._read_route = read_route
        state = current_state()
        if state.use_primary or not read_route.replicas:
            reason = "primary_scope" if state.use_primary else "no_replicas"
            host = route.primary
            conn = lb._primary_for_read(route, reason)
        else:
            need = 0 if self._max_staleness is not None else state.token.get(route.name)
            if need:  # bounded by the primary, bound to its history
                need = lb._router.required(route, state.token, state.grown_at)
            self._need = need
            host, conn, reason = lb._connect_read(
                read_route, self._need, self._max_staleness, self._max_wait, set()
            )
        self._host = host
        self._conn = conn
        self.reason = reason
        note_read(state, route.name, host)
        log_routed(host, reason, route.name)
        return ReadConnection(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        host = self._host
        if exc is not None and is_connection_error(exc):
            self._lb._host_failed(host, exc)
        self._lb._checkin(host, self._conn)
        if WATCH.on:
            notify(UnitDone(self.db_config_name, host is self._route.primary, self.reason))

    def before(self, query: Any) -> AConn:
        """The connection for ``query``: the primary's at once for a statement a
        standby of this database has refused before (outside a transaction)."""
        route = self._route
        if WATCH.on:
            self._t0 = time.perf_counter()
        if (
            route.refused
            and self._host is not route.primary
            and not self.in_transaction
            and query_text(query) in route.refused
        ):
            self._move_to_primary("standby_refused")
        return self._conn

    def tagged(self, query: Any, params: Any) -> Any:
        """``query`` with its SQL comment (``sql_comments``), for the host serving now."""
        if not self._lb._comments:
            return query
        return with_comment(query, comment_for(self.db_config_name), params)

    def after(self) -> None:
        """After a statement succeeded: on the primary a refused statement may have
        written, so the context's token follows the server (autocommit: it committed)."""
        self.served = True
        if WATCH.on and self._t0:
            self._observe()
        if self.moved and not self.in_transaction:
            try:
                cur = self._conn.execute(LSN_SQL)
                row = cur.fetchone()
            except psycopg.Error:
                row = None  # unknown: reads go to the primary until a probe bounds it
            record_commit(self._route, row)

    def _observe(self) -> None:
        route, host = self._route, self._host
        event = Event(
            route.name,
            self.db_config_name,
            host is route.primary,
            self.reason,
            time.perf_counter() - self._t0,
            self.moved,
            host.label,
        )
        record(event, cached=self.reason == "replica" and self._need > 0)
        self._t0 = 0.0

    def _move_to_primary(self, reason: str) -> None:
        lb, route, host = self._lb, self._route, self._host
        lb._checkin(host, self._conn)
        self._conn = lb._primary_for_read(route, reason)
        self._host = route.primary
        self.reason = reason
        self.moved = True
        note_read(current_state(), route.name, route.primary)
        log_routed(route.primary, reason, route.name)

    def recover(self, exc: psycopg.Error, query: Any) -> AConn:
        """A statement failed: raise, or move the unit to another host and return its
        connection for one retry."""
        host = self._host
        lb = self._lb
        if standby_refusal(exc) and host is not self._route.primary:
            self._route.learn_refusal(query_text(query), exc, host)
            if self.retried or self.in_transaction:
                raise RoutingError(
                    f"replica {host.label} refused a statement only the primary can run"
                    f" ({exc.sqlstate}), inside a transaction of a read unit, which cannot"
                    " move: use lb.write() or lb.primary()",
                    host=host.label,
                ) from exc
            self.retried = True
            log_fallback(host, exc, "read_only_retry")
            self._move_to_primary("read_only_retry")
            return self._conn
        connection_error = is_connection_error(exc)
        if not connection_error and not is_recovery_conflict(exc):
            raise exc
        if connection_error:
            lb._host_failed(host, exc)
        if self.retried or host is self._route.primary or self.in_transaction:
            raise exc
        self.retried = True
        log_fallback(host, exc, "connection_error" if connection_error else "recovery_conflict")
        lb._checkin(host, self._conn)
        route = self._route
        if self.served:
            # Earlier statements saw this replica's data; only the primary is sure to be
            # at least as recent, so later statements never go back in time.
            new_host, reason = route.primary, "fallback_primary"
            conn = lb._primary_for_read(route, reason)
        else:
            new_host, conn, reason = lb._connect_read(
                self._read_route, self._need, self._max_staleness, 0.0, {host}
            )
            reason = f"fallback_{reason}"
        self._host = new_host
        self._conn = conn
        self.reason = reason
        note_read(current_state(), route.name, new_host)
        log_routed(new_host, reason, route.name)
        return conn


class ReadConnection:
    """The connection a read unit yields: a psycopg connection that retries a failed
    statement once on another host. Attributes it does not define come from the
    underlying :class:`psycopg.Connection` (``raw``)."""

    __slots__ = ("_unit",)

    def __init__(self, unit: _ReadUnit) -> None:
        self._unit = unit

    @property
    def raw(self) -> AConn:
        """The psycopg connection currently serving the unit."""
        return self._unit._conn

    @property
    def host(self) -> str:
        """``host:port/dbname`` of the server that serves the unit."""
        return self._unit._host.label

    @property
    def db_config_name(self) -> str:
        """Which configuration serves the unit: ``<database>_replica`` on a replica (the
        database whose replicas it reads, during a rollout), else the primary's name."""
        return self._unit.db_config_name

    @property
    def reason(self) -> str:
        """Why the unit went where it did (``replica``, ``replicas_behind``, ...)."""
        return self._unit.reason

    @property
    def on_replica(self) -> bool:
        return self._unit._host is not self._unit._route.primary

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> Cursor[Any]:
        unit = self._unit
        conn = unit.before(query)
        try:
            cur = conn.execute(unit.tagged(query, params), params, prepare=prepare, binary=binary)
        except psycopg.Error as exc:
            conn = unit.recover(exc, query)
            cur = conn.execute(unit.tagged(query, params), params, prepare=prepare, binary=binary)
        unit.after()
        return cur

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """A cursor; client-side cursors retry like :meth:`execute`, named (server-side)
        cursors are returned as they are."""
        if args or kwargs.get("name"):
            return self._unit._conn.cursor(*args, **kwargs)
        return ReadCursor(self._unit, kwargs)

    @contextmanager
    def transaction(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """A transaction on the current host; statements inside are not retried (a
        retry elsewhere would change the snapshot)."""
        unit = self._unit
        unit.in_transaction += 1
        try:
            with unit._conn.transaction(*args, **kwargs) as tx:
                yield tx
        finally:
            unit.in_transaction -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unit._conn, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host} reason={self.reason}>"


class ReadCursor(CursorProxy):
    """A client-side cursor of a read unit: ``execute`` retries like the connection's."""

    def __init__(self, unit: _ReadUnit, kwargs: dict[str, Any]) -> None:
        self._unit = unit
        self._kwargs = kwargs
        self._cursor: Cursor[Any] = unit._conn.cursor(**kwargs)

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> ReadCursor:
        unit = self._unit
        self._follow(unit.before(query))
        try:
            self._cursor.execute(unit.tagged(query, params), params, prepare=prepare, binary=binary)
        except psycopg.Error as exc:
            self._follow(unit.recover(exc, query))
            self._cursor.execute(unit.tagged(query, params), params, prepare=prepare, binary=binary)
        unit.after()
        return self

    def _follow(self, conn: AConn) -> None:
        """A cursor of ``conn``, the connection now serving the unit."""
        if self._cursor.connection is not conn:
            self._cursor.close()
            self._cursor = conn.cursor(**self._kwargs)

    def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> None:
        unit = self._unit
        params_list = list(params_seq)
        self._follow(unit.before(query))
        tagged = unit.tagged(query, params_list or None)
        try:
            self._cursor.executemany(tagged, params_list, **kwargs)
        except psycopg.Error as exc:
            self._follow(unit.recover(exc, query))
            tagged = unit.tagged(query, params_list or None)
            self._cursor.executemany(tagged, params_list, **kwargs)
        unit.after()


class _WriteUnit:
    """``with lb.write() as conn``: one transaction on the primary."""

    __slots__ = ("_conn", "_database", "_host", "_lb", "_route", "_t0")

    def __init__(self, lb: LoadBalancer, database: str | None) -> None:
        self._lb = lb
        self._database = database

    def __enter__(self) -> AConn:
        lb = self._lb
        if not lb._opened:
            lb.open()
        route = self._route = lb._router.route(self._database)
        host = self._host = route.primary
        self._t0 = time.perf_counter() if WATCH.on else 0.0
        conn = lb._primary_conn(route)
        try:
            conn.set_autocommit(False)
        except BaseException:
            lb._checkin(host, conn)
            raise
        self._conn = conn
        log_routed(host, "write", route.name)
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lb, host, conn = self._lb, self._host, self._conn
        try:
            if exc is not None:
                if is_connection_error(exc):
                    lb._host_failed(host, exc)
                    # What the unit committed before (conn.commit() in a batch) is
                    # unknown: reads must not trust replicas until a probe bounds it.
                    record_commit(self._route, None)
                    raise PrimaryUnavailable(
                        f"lost the primary {host.label} of {self._route.name!r} during a"
                        f" write unit ({error_reason(exc)})",
                        host=host.label,
                        reason="connection_lost",
                    ) from exc
                if not conn.closed:
                    conn.rollback()
                    # The unit may have committed part of its work (conn.commit() in a
                    # batch) before it failed: reads must see that. Error path only.
                    self._record_position(conn)
                return
            self._commit(conn)
        finally:
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                conn.set_autocommit(True)
            lb._checkin(host, conn)
            if self._t0 and WATCH.on:
                route = self._route
                seconds = time.perf_counter() - self._t0
                event = Event(
                    route.name, route.primary_config_name, True, "write", seconds, True, host.label
                )
                record(event, cached=False)
                notify(UnitDone(route.primary_config_name, True, "write"))

    def _commit(self, conn: AConn) -> None:
        status = conn.info.transaction_status
        if status == TransactionStatus.INERROR:
            conn.rollback()
            raise PgReplicaError(
                "the transaction was aborted by an earlier error and has been rolled back"
            )
        try:
            # One round trip: commit, then read the WAL position, which is at or past the
            # end of the commit record: a replica that replayed it has the write.
            if status == TransactionStatus.INTRANS:
                cur = conn.execute(COMMIT_SQL)
                cur.nextset()  # past COMMIT's result to the SELECT's
            else:
                # Nothing open (nothing ran, or the caller committed): read the position
                # outside a transaction, so no BEGIN and no rollback at check-in.
                conn.set_autocommit(True)
                cur = conn.execute(LSN_SQL)
            row = cur.fetchone()
        except psycopg.Error as exc:
            if not is_connection_error(exc):
                raise
            self._lb._host_failed(self._host, exc)
            raise PrimaryUnavailable(
                f"lost the primary {self._host.label} while committing: the outcome of the"
                " transaction is unknown",
                host=self._host.label,
                reason="commit_unknown",
            ) from exc
        record_commit(self._route, row)

    def _record_position(self, conn: AConn) -> None:
        """Advance the token to the primary's WAL position now (autocommit, no
        transaction); if it cannot be read, to the unknown position."""
        try:
            conn.set_autocommit(True)
            cur = conn.execute(LSN_SQL)
            row = cur.fetchone()
        except psycopg.Error:
            row = None
        record_commit(self._route, row)
