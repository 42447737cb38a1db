"""GENERATED from ``_routing_async.py`` by ``tools/gen_sync.py``: the sync twin of
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

from pgreplica.balancer import (
    CHECKOUT_ERRORS,
    LSN_SQL,
    UNKNOWN_POSITION,
    XID_COMMIT_SQL,
    is_connection_error,
    log_fallback,
    log_routed,
    query_text,
    record_commit,
    refused_classification,
    standby_refusal,
)
from pgreplica.comments import comment_for, with_comment
from pgreplica.context import current_state, note_read
from pgreplica.errors import PgReplicaError, PrimaryUnavailable
from pgreplica.health import Host, error_reason
from pgreplica.observe import WATCH, Event, record
from pgreplica.sql import Classification, could_write

if TYPE_CHECKING:
    from pgreplica._balancer_sync import LoadBalancer

__all__ = ["CursorProxy", "RoutingConnection", "RoutingCursor"]

AConn = Connection[Any]

_SESSION_KINDS = frozenset({"set", "session_set"})
#: Statements on the primary only because no replica could take them: they count
#: against ``fallback_limit`` while they run (as ``lb.read()`` does).
_FALLBACK_REASONS = frozenset({"replicas_behind", "no_healthy_replica", "fallback_primary"})


def _refuse_session_state(c: Classification) -> None:
    """With ``transaction_pooling``: session state outlives the transaction on a server
    connection the pooler hands to other clients next, and is gone from the next
    transaction of this one. Refused before it runs; ``SET LOCAL`` is fine."""
    what = None
    if c.kind in _SESSION_KINDS or c.reason in ("set_config", "set_config_mixed"):
        what = "a session-level SET (use SET LOCAL inside a transaction)"
    elif any(op == "+" for op, _ in c.effects):
        what = "session state (a temporary object, LISTEN, or a session setting)"
    elif c.kind in ("prepare", "execute", "deallocate"):
        what = "a prepared statement (PREPARE lives on one server connection)"
    if what is not None:
        raise PgReplicaError(
            f"transaction_pooling is on: {what} would leak to other clients of the"
            " pooler's server connection; refused"
        )


_CONNECTION_BOUND = frozenset({"prepare", "execute", "deallocate", "cursor"})
_IDLE = TransactionStatus.IDLE


class RoutingConnection:
    """Routes each statement to the primary or a replica; see the module docstring.

    Use it like :class:`psycopg.Connection`: ``execute``, ``cursor``,
    ``transaction()``, ``pipeline()``, ``commit``, ``rollback``, ``autocommit``
    (default False, as in psycopg), and ``async with``.
    """

    def __init__(self, lb: LoadBalancer, database: str | None) -> None:
        self._lb = lb
        self._route = route = lb._router.route(database)
        # The replicas this connection reads from, decided once (a rollout in progress
        # may keep a database on another's replicas).
        self._read_route = route if route.rollout_from is None else lb._router.read_route(route)
        self._conns: dict[Host, AConn] = {}
        self._dirty: set[Host] = set()  # hosts whose connection has session state
        self._pinned: Host | None = None
        self._pin_depth = 0  # open transaction() / pipeline() blocks
        self._wrote = False  # the pinned transaction may have written on the primary
        self._primary_only = False  # session state that lives on the primary connection
        self._pins: set[str] = set()  # session state a standby cannot hold (Classification.effects)
        self._session: list[tuple[Any, Any]] = []  # (query, params) to replay
        self._autocommit = False
        self._read_only: bool | None = None
        self._isolation_level: Any = None
        self._deferrable: bool | None = None
        self._closed = False
        self.host: str | None = None
        """``host:port/dbname`` of the server that ran the last statement."""
        self.reason: str | None = None
        """Why the last statement went where it did."""
        self.db_config_name: str | None = None
        """Which configuration served the last statement (``main_replica``,
        ``ci_replica``, or the primary's ``main``)."""

    def __repr__(self) -> str:
        pinned = f" pinned to {self._pinned.label}" if self._pinned else ""
        return f"<{type(self).__name__} {self._route.name}{pinned}>"

    # -- psycopg connection attributes ----------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self.set_autocommit(value)

    def set_autocommit(self, value: bool) -> None:
        self._set_characteristic("autocommit", bool(value))

    @property
    def read_only(self) -> bool | None:
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self.set_read_only(value)

    def set_read_only(self, value: bool | None) -> None:
        self._set_characteristic("read_only", value)

    @property
    def isolation_level(self) -> Any:
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self.set_isolation_level(value)

    def set_isolation_level(self, value: Any) -> None:
        self._set_characteristic("isolation_level", value)

    @property
    def deferrable(self) -> bool | None:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self.set_deferrable(value)

    def set_deferrable(self, value: bool | None) -> None:
        self._set_characteristic("deferrable", value)

    def _set_characteristic(self, name: str, value: Any) -> None:
        """Set a psycopg connection characteristic here and on every held connection."""
        self._check_no_transaction(name)
        setattr(self, f"_{name}", value)
        for conn in self._conns.values():
            getattr(conn, f"set_{name}")(value)

    def _check_no_transaction(self, what: str) -> None:
        if self._pinned is not None:
            raise psycopg.ProgrammingError(
                f"can't change '{what}' now: connection in transaction status INTRANS"
            )

    # -- statements ---------------------------------------------------------------------

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> Cursor[Any]:
        cur = self.cursor()
        cur.execute(query, params, prepare=prepare, binary=binary)
        return cur._raw_cursor()

    def cursor(self, *args: Any, **kwargs: Any) -> RoutingCursor:
        """A cursor whose statements are routed like the connection's. A named
        (server-side) cursor is bound to the host of its DECLARE."""
        if self._closed:
            raise psycopg.OperationalError("the connection is closed")
        return RoutingCursor(self, args, kwargs)

    def commit(self) -> None:
        host = self._pinned
        if host is None:
            return
        conn = self._conns[host]
        if (
            host is self._route.primary
            and not self._pin_depth
            and conn.info.transaction_status == TransactionStatus.INTRANS
        ):
            # One round trip: whether the server assigned the transaction an id (it
            # wrote, whatever the parser saw), the commit, and the WAL position past
            # the commit record.
            self._pinned, self._wrote = None, False
            try:
                cur = conn.execute(XID_COMMIT_SQL)
                wrote = cur.fetchone()
                cur.nextset()
                cur.nextset()
                row = cur.fetchone()
            except psycopg.Error as exc:
                self._primary_failed(host, exc, unknown=True)
                raise
            if wrote and wrote[0]:
                record_commit(self._route, row)
            return
        conn.commit()
        self._transaction_ended(host, committed=True)

    def rollback(self) -> None:
        host = self._pinned
        if host is None:
            return
        conn = self._conns[host]
        conn.rollback()
        self._transaction_ended(host, committed=False)

    @contextmanager
    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> Iterator[Any]:
        """A transaction block pinned to one host (the primary unless read-only)."""
        host = self._pinned or self._begin_host()
        conn = self._conn_for(host)
        self._pinned = host
        self._pin_depth += 1
        try:
            with conn.transaction(savepoint_name, force_rollback) as tx:
                yield tx
        finally:
            self._pin_depth -= 1
            self._after_statement(host, conn, None)

    @contextmanager
    def pipeline(self) -> Iterator[Any]:
        """A psycopg pipeline on one host (the primary unless read-only)."""
        host = self._pinned or self._begin_host()
        conn = self._conn_for(host)
        self._pinned = host
        self._pin_depth += 1
        try:
            with conn.pipeline() as pipeline:
                yield pipeline
        finally:
            self._pin_depth -= 1
            self._after_statement(host, conn, None)

    def close(self) -> None:
        """Give every server connection back to its pool (rolling back an open
        transaction and discarding session state first)."""
        if self._closed:
            return
        self._closed = True
        conns, self._conns = self._conns, {}
        for host, conn in conns.items():
            try:
                if not conn.closed:
                    if conn.info.transaction_status != _IDLE:
                        conn.rollback()
                    if host in self._dirty:
                        conn.set_autocommit(True)
                        conn.execute("DISCARD ALL")
                    _reset_characteristics(conn)
            except psycopg.Error:
                conn.close()
            self._lb._checkin(host, conn)
        self._pinned = None

    def __enter__(self) -> RoutingConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._closed:
                if exc is None:
                    self.commit()
                else:
                    self.rollback()
        finally:
            self.close()

    # -- routing ------------------------------------------------------------------------

    def _run(
        self, query: Any, params: Any, run: Any, *, server_cursor: bool = False
    ) -> tuple[Host, AConn]:
        """Classify ``query``, pick its host, and ``run(conn, host)`` there, retrying
        once elsewhere where that is safe. Returns the host and connection used."""
        c = self._lb.classify(query, self._route.name)
        if self._lb.settings.transaction_pooling:
            _refuse_session_state(c)
        host, reason = self._choose(c, server_cursor)
        host, conn, reason = self._connect(host, reason)
        if (c.kind in _SESSION_KINDS or c.reason == "set_config") and self._pinned is None:
            host, conn = self._run_session((query, params), c, host, conn, run)
            self._apply_effects(c, host)
            return host, conn
        if c.reason == "set_config_mixed":
            # Session state set by a statement that also does something else: it is
            # not replayed elsewhere, so everything after it stays on this connection.
            self._primary_only = True
            self._dirty.add(host)
        started = time.perf_counter() if WATCH.on else 0.0
        counted = (
            reason in _FALLBACK_REASONS
            and self._lb.settings.fallback_limit > 0
            and host is self._route.primary
            and bool(self._read_route.replicas)
        )
        if counted:  # a read on the primary only because no replica could take it
            self._lb._fallback_place(self._route, reason)
        try:
            run(conn, host)
        except psycopg.Error as exc:
            try:
                host, conn, reason = self._recover(exc, host, run, query)
            except BaseException:
                self._pin_if_in_transaction(host)
                raise
            if reason == "read_only_retry":
                c = refused_classification(c)  # it ran on the primary: it may have written
        finally:
            if counted:
                self._lb._fallback_done(self._route.name)
        self.host, self.reason = host.label, reason
        self.db_config_name = self._config_name(host)
        note_read(current_state(), self._route.name, host)
        log_routed(host, reason, self._route.name)
        if c.effects:
            self._apply_effects(c, host)
        if started and WATCH.on:
            self._observe(host, reason, c, time.perf_counter() - started)
        self._after_statement(host, conn, c)
        return host, conn

    def _observe(self, host: Host, reason: str, c: Classification, seconds: float) -> None:
        primary = host is self._route.primary
        event = Event(
            self._route.name,
            self._config_name(host),
            primary,
            reason,
            seconds,
            primary and could_write(c),
            host.label,
        )
        cached = reason == "replica" and bool(current_state().token.get(self._route.name))
        record(event, cached=cached)

    def _tagged(self, query: Any, params: Any, host: Host) -> Any:
        """``query`` with its SQL comment (``sql_comments``) for ``host``."""
        if not self._lb._comments:
            return query
        return with_comment(query, comment_for(self._config_name(host)), params)

    def _config_name(self, host: Host) -> str:
        if host is self._route.primary:
            return self._route.primary_config_name
        return self._read_route.replica_config_name

    def _apply_effects(self, c: Classification, host: Host) -> None:
        """Track session state a standby cannot hold (a serializable or read-write
        default, a temporary object, a LISTEN): while any is in force, every statement
        goes to the primary connection that holds it."""
        pins = self._pins
        for op, key in c.effects:
            if op == "+":
                pins.add(key)
                self._dirty.add(host)  # DISCARD ALL before the pool gets it back
            elif key == "*":
                pins.clear()
            elif key.endswith(":*"):
                prefix = key[:-1]
                pins.difference_update([p for p in pins if p.startswith(prefix)])
            else:
                pins.discard(key)

    def _pin_if_in_transaction(self, host: Host) -> None:
        """A failed statement may leave its connection in a (failed) transaction: keep
        the connection pinned until the caller rolls back."""
        conn = self._conns.get(host)
        if conn is not None and not conn.closed and conn.info.transaction_status != _IDLE:
            self._pinned = host

    def _choose(self, c: Classification, server_cursor: bool) -> tuple[Host, str]:
        if self._pinned is not None:
            return self._pinned, "pinned"
        route = self._route
        state = current_state()
        if self._primary_only or self._pins:
            return route.primary, "session_primary"
        starts_transaction = c.kind == "begin" or not self._autocommit or server_cursor
        if starts_transaction:
            if c.kind == "begin":
                read_only = c.read_only
            else:
                read_only = (self._read_only is True or state.read_only) and c.replica
            if read_only and not state.use_primary:
                replica = self._caught_up_replica(self._need(state))
                if replica is not None:
                    return replica, "read_only_transaction"
            return route.primary, "transaction"
        if not c.replica or c.kind in _CONNECTION_BOUND:
            # Also a read PREPARE or DECLARE ... WITH HOLD: the EXECUTE or FETCH that
            # follows must find it on the same server connection, the primary's.
            return route.primary, c.reason
        if state.use_primary:
            return route.primary, "primary_scope"
        replica = self._caught_up_replica(self._need(state))
        if replica is not None:
            return replica, "replica"
        return (
            route.primary,
            "replicas_behind" if self._read_route.read_set else "no_healthy_replica",
        )

    def _begin_host(self) -> Host:
        """The host for a transaction started by transaction() or pipeline()."""
        state = current_state()
        if (
            (self._read_only is True or state.read_only)
            and not state.use_primary
            and not self._primary_only
        ):
            replica = self._caught_up_replica(self._need(state))
            if replica is not None:
                return replica
        return self._route.primary

    def _need(self, state: Any) -> int:
        return self._lb._router.required(self._route, state.token, state.grown_at)

    def _connect(
        self, host: Host, reason: str, excluded: set[Host] | None = None
    ) -> tuple[Host, AConn, str]:
        """The server connection for a statement routed to ``host``. A replica whose
        connection cannot be had (down, hung, pool closed or exhausted) gives way to
        another caught-up replica or the primary, as ``lb.read()`` does."""
        excluded = set() if excluded is None else excluded
        while True:
            try:
                return host, self._conn_for(host), reason
            except CHECKOUT_ERRORS as exc:
                if host is self._route.primary or self._pinned is not None:
                    raise
                self._lb._host_failed(host, exc)
                log_fallback(host, exc, "connect_failed")
                excluded.add(host)
            replica = self._caught_up_replica(self._need(current_state()), excluded=excluded)
            if replica is None:
                host, reason = self._route.primary, "fallback_primary"
            else:
                host, reason = replica, "fallback_replica"

    def _caught_up_replica(self, need: int, *, excluded: set[Host] | None = None) -> Host | None:
        """A replica proven to have replayed ``need``: by the cache, preferring one this
        connection already holds, else by asking held or pooled replicas directly."""
        router = self._lb._router
        route = self._read_route
        candidates = router.caught_up(route, need, None)
        if excluded:
            candidates = [h for h in candidates if h not in excluded]
        if candidates:
            for host in candidates:
                if host in self._conns:
                    return host
            return candidates[router.next_index(len(candidates))]
        if not need or need == UNKNOWN_POSITION:
            return None
        lb = self._lb
        found = lb._await_replica(
            route,
            need,
            lb.settings.max_wait,
            set() if excluded is None else excluded,
            self._check_conn,
            self._checked,
        )
        if found is None:
            return None
        host, conn = found
        if self._conns.get(host) is not conn:
            # a pooled connection did the check: the statement runs on it (no second
            # checkout), its snapshot taken after the check
            try:
                self._conn_for(host, lent=conn)
            except CHECKOUT_ERRORS as exc:
                self._lb._host_failed(host, exc)
                return None
        return host

    def _check_conn(self, host: Host) -> AConn:
        """A connection to ask ``host`` how far it has replayed: the one this connection
        holds when in autocommit, else one from the pool, so that no transaction of
        this connection takes its snapshot before the check saw the replica caught up."""
        conn = self._conns.get(host)
        if conn is not None and not conn.closed and conn.autocommit:
            return conn
        return self._lb._checkout(host)

    def _checked(self, host: Host, conn: AConn) -> None:
        """Give back a connection :meth:`_check_conn` lent: a pooled one to its pool, a
        held one stays held unless it broke."""
        if self._conns.get(host) is not conn:
            self._lb._checkin(host, conn)
        elif conn.closed or conn.broken:
            del self._conns[host]
            self._dirty.discard(host)
            self._lb._checkin(host, conn)

    def _conn_for(self, host: Host, *, lent: AConn | None = None) -> AConn:
        """The connection this routing connection holds to ``host``, or a new one,
        set up like the others: ``lent`` (from the pool, already checked out) when
        given, else one from the pool."""
        conn = self._conns.get(host)
        if conn is not None and not conn.closed and lent is not None:
            # the held one (in a transaction mode, so the check used a pooled one) serves
            self._lb._checkin(host, lent)
            lent = None
        if conn is not None and not conn.closed:
            if host is self._route.primary and not host.up and self._pinned is None:
                # The same verdict as lb.write(): no statement starts on a primary the
                # prober holds down.
                self._lb._primary_conn(self._route)
            return conn
        if lent is not None:
            conn = lent
        elif host is self._route.primary:
            conn = self._lb._primary_conn(self._route)
        else:
            conn = self._lb._checkout(host)
        try:
            conn.set_autocommit(self._autocommit)
            if self._read_only is not None:
                conn.set_read_only(self._read_only)
            if self._isolation_level is not None:
                conn.set_isolation_level(self._isolation_level)
            if self._deferrable is not None:
                conn.set_deferrable(self._deferrable)
            if self._session:
                _replay(conn, self._session)
                self._dirty.add(host)
        except BaseException:
            _reset_characteristics(conn)
            self._lb._checkin(host, conn)
            raise
        self._conns[host] = conn
        return conn

    def _run_session(
        self, statement: tuple[Any, Any], c: Classification, host: Host, conn: AConn, run: Any
    ) -> tuple[Host, AConn]:
        """A session-level SET (or RESET, DISCARD): on every held connection, then kept
        to be replayed on connections taken later."""
        run(conn, host)
        self._dirty.add(host)
        for other, other_conn in list(self._conns.items()):
            if other is not host:
                _replay(other_conn, [statement])
                self._dirty.add(other)
        if ("-", "*") in c.effects or ("-", "settings") in c.effects:
            # DISCARD ALL / RESET ALL: a connection taken later starts that way anyway;
            # nothing before it is replayed, nor it (DISCARD ALL cannot run in a
            # transaction block, which a later connection may be in).
            self._session.clear()
        else:
            self._session.append(statement)
        self.host, self.reason = host.label, "session_set"
        self.db_config_name = self._config_name(host)
        log_routed(host, "session_set", self._route.name)
        self._after_statement(host, conn, c)
        return host, conn

    def _recover(
        self, exc: psycopg.Error, host: Host, run: Any, query: Any
    ) -> tuple[Host, AConn, str]:
        """A statement failed: retry it once on another host when nothing can have
        happened (a replica, outside a transaction), else raise."""
        route = self._route
        if host is route.primary:
            if is_connection_error(exc):
                # An autocommit statement may have committed before the connection
                # went: its position is unknown until the primary is probed again.
                self._primary_failed(host, exc, unknown=self._pinned is None)
            raise exc
        if self._pinned is not None:
            raise exc
        if standby_refusal(exc):
            # The replica refused what only a primary can do and the classifier could
            # not see (a function declared STABLE that writes, a view that locks, an
            # unlogged table): nothing happened; the primary runs it, and runs it at
            # once from now on.
            route.learn_refusal(query_text(query), exc, host)
            log_fallback(host, exc, "read_only_retry")
            new_host, reason = route.primary, "read_only_retry"
        elif is_connection_error(exc):
            self._drop(host, exc)
            log_fallback(host, exc, "connection_error")
            replica = self._caught_up_replica(self._need(current_state()), excluded={host})
            if replica is None:
                new_host, reason = route.primary, "fallback_primary"
            else:
                new_host, reason = replica, "fallback_replica"
        else:
            raise exc
        new_host, new_conn, reason = self._connect(new_host, reason, {host})
        run(new_conn, new_host)
        return new_host, new_conn, reason

    def _primary_failed(self, host: Host, exc: psycopg.Error, *, unknown: bool) -> None:
        """A statement or commit on the primary failed. On a lost connection, raise
        :class:`PrimaryUnavailable` (as ``lb.write()`` does), and when work may have
        committed unseen, move the token to the unknown position."""
        if not is_connection_error(exc):
            return
        self._drop(host, exc)
        self._pinned, self._wrote = None, False
        if unknown:
            record_commit(self._route, None)
        raise PrimaryUnavailable(
            f"lost the primary {host.label} of {self._route.name!r} ({error_reason(exc)}):"
            " the outcome of the statement is unknown",
            host=host.label,
            reason="connection_lost",
        ) from exc

    def _drop(self, host: Host, exc: BaseException) -> None:
        self._lb._host_failed(host, exc)
        conn = self._conns.pop(host, None)
        self._dirty.discard(host)
        if conn is not None:
            self._lb._checkin(host, conn)

    def _after_statement(self, host: Host, conn: AConn, c: Classification | None) -> None:
        """Track the transaction the statement left open, and the writes it made."""
        primary = host is self._route.primary
        may_write = primary and (c is None or could_write(c))
        status = _IDLE if conn.closed else conn.info.transaction_status
        if status != _IDLE or self._pin_depth:
            self._pinned = host
            if may_write and c is not None:
                self._wrote = True
            return
        if self._pinned is not None:
            self._transaction_ended(host, committed=c is None or c.kind != "rollback")
        elif may_write and c is not None:
            self._capture_lsn(conn)

    def _transaction_ended(self, host: Host, *, committed: bool) -> None:
        wrote = self._wrote
        self._pinned = None
        self._wrote = False
        if committed and wrote and host is self._route.primary:
            self._capture_lsn(self._conns[host])

    def _capture_lsn(self, conn: AConn) -> None:
        """Read the primary's WAL position after a write committed (autocommit is
        switched on for the query, so that it opens no transaction). The write has
        committed whatever happens here: if the position cannot be read, on this
        connection or a fresh one, the token moves to the unknown position, which
        sends reads to the primary until the next probe bounds it. Never an error
        for a write that committed."""
        try:
            row = _read_position(conn)
        except psycopg.Error:
            row = self._position_elsewhere()
        except BaseException:
            record_commit(self._route, None)
            raise  # cancelled: the unknown position stands in for the write
        record_commit(self._route, row)

    def _position_elsewhere(self) -> Any:
        primary = self._route.primary
        try:
            fresh = self._lb._checkout(primary)
        except CHECKOUT_ERRORS:
            return None
        try:
            return _read_position(fresh)
        except psycopg.Error:
            return None
        finally:
            self._lb._checkin(primary, fresh)


class CursorProxy:
    """What the proxy cursors share: results are read from the server cursor that ran
    the last statement (``self._cursor``, None before the first execute)."""

    _cursor: Any

    def _raw_cursor(self) -> Cursor[Any]:
        if self._cursor is None:
            raise psycopg.ProgrammingError("no statement executed yet")
        cursor: Cursor[Any] = self._cursor
        return cursor

    def fetchone(self) -> Any:
        return self._raw_cursor().fetchone()

    def fetchmany(self, size: int = 0) -> list[Any]:
        return self._raw_cursor().fetchmany(size)

    def fetchall(self) -> list[Any]:
        return self._raw_cursor().fetchall()

    def __iter__(self) -> Iterator[Any]:
        return self._raw_cursor().__iter__()

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # description, rowcount, nextset(), scroll(), statusmessage, ...
        return getattr(self._raw_cursor(), name)


class RoutingCursor(CursorProxy):
    """A cursor of a routing connection. Each ``execute`` is routed on its own; the
    results are read from the server cursor of the host that ran it."""

    def __init__(
        self, conn: RoutingConnection, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._conn = conn
        self._args = args
        self._kwargs = kwargs
        self._named = bool(args) or bool(kwargs.get("name"))
        self._cursor: Any = None
        self._host: Host | None = None

    def _bind(self, conn: AConn) -> Any:
        if self._cursor is not None and self._cursor.connection is conn:
            return self._cursor
        if self._cursor is not None:
            if self._named:
                raise PgReplicaError("a named cursor stays on the host of its first execute()")
            self._cursor.close()
        self._cursor = conn.cursor(*self._args, **self._kwargs)
        return self._cursor

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> RoutingCursor:
        def run(conn: AConn, host: Host) -> None:
            cursor = self._bind(conn)
            tagged = self._conn._tagged(query, params, host)
            if self._named:
                cursor.execute(tagged, params, binary=binary)
            else:
                cursor.execute(tagged, params, prepare=prepare, binary=binary)

        self._host, _ = self._conn._run(query, params, run, server_cursor=self._named)
        return self

    def executemany(
        self, query: Any, params_seq: Iterable[Any], *, returning: bool = False
    ) -> None:
        params_list = list(params_seq)

        def run(conn: AConn, host: Host) -> None:
            cursor = self._bind(conn)
            tagged = self._conn._tagged(query, params_list or None, host)
            cursor.executemany(tagged, params_list, returning=returning)

        self._host, _ = self._conn._run(query, None, run)

    @contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        """``COPY ... FROM STDIN`` on the primary, ``COPY ... TO STDOUT`` on a replica."""
        routing = self._conn
        c = routing._lb.classify(statement, routing._route.name)
        host, reason = routing._choose(c, False)
        conn = routing._conn_for(host)
        cursor = self._bind(conn)
        routing.host, routing.reason = host.label, reason
        log_routed(host, reason, routing._route.name)
        with cursor.copy(statement, params, **kwargs) as copy:
            yield copy
        routing._after_statement(host, conn, c)

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        """Rows one at a time from the host the statement is routed to."""
        routing = self._conn
        c = routing._lb.classify(query, routing._route.name)
        host, reason = routing._choose(c, False)
        conn = routing._conn_for(host)
        cursor = self._bind(conn)
        routing.host, routing.reason = host.label, reason
        for row in cursor.stream(query, params, **kwargs):  # noqa: RUF100, UP028
            yield row
        routing._after_statement(host, conn, c)


def _read_position(conn: AConn) -> Any:
    autocommit = conn.autocommit
    if not autocommit:
        conn.set_autocommit(True)
    try:
        cur = conn.execute(LSN_SQL)
        return cur.fetchone()
    finally:
        if not autocommit and not conn.closed:
            conn.set_autocommit(False)


def _replay(conn: AConn, statements: list[tuple[Any, Any]]) -> None:
    for query, params in statements:
        conn.execute(query, params)
    if conn.info.transaction_status != _IDLE:
        conn.commit()


def _reset_characteristics(conn: AConn) -> None:
    """Back to the pool's defaults (autocommit, no transaction characteristics)."""
    if conn.closed or conn.info.transaction_status != _IDLE:
        return
    conn.set_autocommit(True)
    conn.set_read_only(None)
    conn.set_isolation_level(None)
    conn.set_deferrable(None)
