"""SQLAlchemy 2: a routing ``Session`` (and its asyncio counterpart) over pgreplica.

::

    lb = pgreplica.LoadBalancer.from_env()                 # or config=...
    Session = sessionmaker(class_=RoutingSession, lb=lb)
    with Session() as session:
        item = session.get(Item, 7)                        # a caught-up replica
        item.title = "new"
        session.commit()                                   # the primary; the token advances

    alb = pgreplica.AsyncLoadBalancer(config=...)
    AsyncSession = async_sessionmaker(class_=AsyncRoutingSession, lb=alb)

How a session routes, per transaction and per logical database:

- Until it writes, its reads go to a healthy replica that has replayed the context's
  causal token (the same choice as ``lb.read()``: the prober's cached positions, one
  direct check, a bounded wait, else the primary).
- A flush, a DML statement, a ``SELECT ... FOR UPDATE`` (``with_for_update()``), a
  textual statement the classifier does not call a read, DDL, or ``session.connection()``
  sends the rest of the transaction to the primary. The read-only transaction on the
  replica is ended then (rolled back): no database transaction ever spans two hosts,
  and everything from the first write on runs in one transaction on the primary.
- ``commit()`` of a transaction that wrote advances the context's token to the
  primary's WAL position after the commit, so the next reads of this context (or of the
  next request, through the web middleware) see the write.
- ``with lb.primary():`` (or ``RoutingSession(..., primary=True)``) keeps everything on
  the primary; the kill switch and every balancer setting apply.
- A replica that fails (a connection error, a hang the prober cuts off) or refuses the
  statement as a standby: a session that has not written and has nothing pending runs
  the statement once more on another host (rolled back first, as after any error).

Engines are one per host and share the balancer's pools, prober and health state:
a connection is checked out of pgreplica's pool for the length of a transaction and
given back at its end, so a hung replica's connections are aborted as for ``lb.read()``.

Tables (or mapped classes) may belong to other logical databases of the configuration:
``RoutingSession(lb=lb, databases={"ci": [Build, "ci_pipelines"]})``.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from pgreplica._extras import extra_imports

with extra_imports("sqlalchemy", feature="pgreplica.contrib.sqlalchemy"):
    from sqlalchemy import event
    from sqlalchemy.dialects.postgresql import psycopg as _sa_psycopg
    from sqlalchemy.engine import Engine, create_engine
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.orm.attributes import set_committed_value
    from sqlalchemy.pool import NullPool
    from sqlalchemy.sql.elements import TextClause
    from sqlalchemy.sql.selectable import TextualSelect
    from sqlalchemy.util import await_only

from pgreplica._balancer_async import AsyncLoadBalancer
from pgreplica._balancer_sync import LoadBalancer
from pgreplica._fork import ForkSafeLock
from pgreplica.balancer import (
    CHECKOUT_ERRORS,
    COMMIT_SQL,
    LSN_SQL,
    UNKNOWN_POSITION,
    DatabaseRoute,
    is_connection_error,
    log_fallback,
    log_routed,
    record_commit,
    standby_refusal,
)
from pgreplica.comments import comment_for, with_comment
from pgreplica.context import current_state, note_read
from pgreplica.health import Host, error_reason
from pgreplica.observe import WATCH, Event, record
from pgreplica.sql import classify

__all__ = ["AsyncRoutingSession", "RoutingSession", "engine_for"]

logger = logging.getLogger("pgreplica.sqlalchemy")
T = TypeVar("T")
Balancer = LoadBalancer | AsyncLoadBalancer

PRIMARY = "primary"
REPLICA = "replica"
IDLE = TransactionStatus.IDLE
INTRANS = TransactionStatus.INTRANS


# -- engines: one per host, over the balancer's pools ------------------------------------


class _LentPool(NullPool):
    """SQLAlchemy's view of one host: each checkout takes a connection from the
    balancer's pool of that host (lent, so a host marked down aborts it), each return
    gives it back."""

    _pgreplica: tuple[Balancer, Host]

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        lb, host = self._pgreplica
        raw = _raw(connection)
        _forget_sqlalchemy_hooks(raw)
        if isinstance(lb, AsyncLoadBalancer):
            await_only(_acheckin(lb, host, raw, terminate))
        else:
            if terminate:
                raw.close()
            elif not raw.closed and raw.info.transaction_status == IDLE:
                raw.read_only = None
                raw.autocommit = True  # as the balancer's pools keep them
            lb._checkin(host, raw)

    def recreate(self) -> _LentPool:
        pool = super().recreate()
        assert isinstance(pool, _LentPool)
        pool._pgreplica = self._pgreplica
        return pool


def _forget_sqlalchemy_hooks(raw: Any) -> None:
    """Undo what SQLAlchemy's psycopg dialect does to each connection it sees connect
    (a notice handler): the connection goes back to the balancer's pool, and comes
    back as a "new" connection, which would otherwise collect one handler per use."""
    handler = getattr(_sa_psycopg, "_log_notices", None)
    if handler is None:
        return
    while True:
        try:
            raw.remove_notice_handler(handler)
        except ValueError:  # none left
            return


async def _acheckin(lb: AsyncLoadBalancer, host: Host, raw: Any, terminate: bool) -> None:
    if terminate:
        await raw.close()
    elif not raw.closed and raw.info.transaction_status == IDLE:
        await raw.set_read_only(None)
        await raw.set_autocommit(True)
    await lb._checkin(host, raw)


class _Engines:
    """The engines of one balancer (shared by all its sessions), made on first use."""

    def __init__(self, lb: Balancer, options: Mapping[str, Any]) -> None:
        self.lb = lb
        self.options = dict(options)
        self._engines: dict[Host, Engine] = {}
        self._lock = ForkSafeLock()

    def engine(self, host: Host, route: DatabaseRoute) -> Engine:
        engine = self._engines.get(host)
        if engine is None:
            with self._lock:
                engine = self._engines.get(host)
                if engine is None:
                    engine = self._engines[host] = self._make(host, route)
        return engine

    def _make(self, host: Host, route: DatabaseRoute) -> Engine:
        lb = self.lb
        options = {**self.options, "poolclass": _LentPool}
        if isinstance(lb, AsyncLoadBalancer):

            async def aconnect() -> Any:
                primary = host is route.primary
                conn = await (lb._primary_conn(route) if primary else _acheckout(lb, host))
                try:
                    await conn.set_autocommit(False)
                    await conn.set_read_only(None if primary else True)
                except BaseException:
                    await lb._checkin(host, conn)
                    raise
                return conn

            engine = create_async_engine(
                "postgresql+psycopg://", async_creator=aconnect, **options
            ).sync_engine
        else:

            def connect() -> Any:
                primary = host is route.primary
                if primary:
                    conn = lb._primary_conn(route)  # fails fast when the primary is down
                else:
                    try:
                        conn = lb._checkout(host)
                    except CHECKOUT_ERRORS as exc:
                        lb._host_failed(host, exc)
                        raise psycopg.OperationalError(
                            f"no connection to {host.label} ({error_reason(exc)})"
                        ) from exc
                try:
                    conn.autocommit = False
                    conn.read_only = None if primary else True  # BEGIN READ ONLY
                except BaseException:
                    lb._checkin(host, conn)
                    raise
                return conn

            engine = create_engine("postgresql+psycopg://", creator=connect, **options)
        pool = engine.pool
        assert isinstance(pool, _LentPool)
        pool._pgreplica = (lb, host)
        _observe(engine, lb, host, route)
        dialect = engine.dialect
        # The end of a read-only transaction on a replica that died meanwhile: nothing
        # was written, so nothing is lost; the reads already returned. Not an error.
        asynchronous = isinstance(lb, AsyncLoadBalancer)
        dialect.do_commit = _commit_reading_position(dialect.do_commit, asynchronous)  # type: ignore[method-assign]
        for name in ("do_commit", "do_rollback"):
            setattr(dialect, name, _read_only_tolerant(getattr(dialect, name), lb, host))
        return engine

    def dispose(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.dispose()


def _observe(engine: Engine, lb: Balancer, host: Host, route: DatabaseRoute) -> None:
    """What core units do per statement, for this engine's statements: the
    ``db_config_name`` comment (setting ``sql_comments``) and, while anything watches
    (metrics, usage, OpenTelemetry), one :class:`~pgreplica.observe.Event` each."""
    comments = lb._comments

    def config_name() -> tuple[bool, str]:
        primary = host is route.primary
        return primary, route.primary_config_name if primary else route.replica_config_name

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        if WATCH.on:
            conn.info["pgreplica_started"] = time.perf_counter()
        if comments:
            statement = with_comment(statement, comment_for(config_name()[1]), parameters)
        return statement, parameters

    @event.listens_for(engine, "after_cursor_execute")
    def after(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        started = conn.info.pop("pgreplica_started", None)
        if started is None or not WATCH.on:
            return
        primary, name = config_name()
        wrote = bool(
            context is not None and (context.isinsert or context.isupdate or context.isdelete)
        )
        reason = "primary" if primary else "replica"
        elapsed = time.perf_counter() - started
        record(Event(route.name, name, primary, reason, elapsed, wrote, host.label), cached=False)


#: The WAL position read in the same round trip as a read-write transaction's COMMIT,
#: per connection, until the session that committed takes it (:meth:`_pg_record`).
_COMMITTED_AT: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _commit_reading_position(commit: Callable[[Any], None], asynchronous: bool) -> Any:
    """COMMIT and read the WAL position after it in one round trip, as ``lb.write()``
    does (the position is at or past the commit record: a replica that replayed it has
    the transaction). Read-only transactions (replicas) and idle connections commit as
    SQLAlchemy would."""

    def call(dbapi_connection: Any) -> None:
        raw = _raw(dbapi_connection)
        if raw.read_only or raw.info.transaction_status != INTRANS:
            commit(dbapi_connection)
            return
        _COMMITTED_AT[raw] = await_only(_acommit(raw)) if asynchronous else _commit(raw)

    return call


def _raw(connection: Any) -> Any:
    """The psycopg connection behind SQLAlchemy's pooled proxy and asyncio adapter."""
    connection = getattr(connection, "dbapi_connection", connection)
    return getattr(connection, "_connection", connection)


def _commit(raw: Any) -> Any:
    cursor = raw.execute(COMMIT_SQL)
    cursor.nextset()  # past COMMIT's result to the SELECT's
    return cursor.fetchone()


async def _acommit(raw: Any) -> Any:
    cursor = await raw.execute(COMMIT_SQL)
    cursor.nextset()
    return await cursor.fetchone()


def _read_only_tolerant(end: Callable[[Any], None], lb: Balancer, host: Host) -> Any:
    def call(dbapi_connection: Any) -> None:
        try:
            end(dbapi_connection)
        except psycopg.Error as exc:
            raw = _raw(dbapi_connection)
            if not (raw.read_only and is_connection_error(exc)):
                raise
            lb._host_failed(host, exc)
            log_fallback(host, exc, "replica_lost_at_end")

    return call


async def _acheckout(lb: AsyncLoadBalancer, host: Host) -> Any:
    try:
        return await lb._checkout(host)
    except CHECKOUT_ERRORS as exc:
        lb._host_failed(host, exc)
        raise psycopg.OperationalError(
            f"no connection to {host.label} ({error_reason(exc)})"
        ) from exc


_ENGINES: weakref.WeakKeyDictionary[Any, _Engines] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = ForkSafeLock()


def _engines_of(lb: Balancer, options: Mapping[str, Any] | None = None) -> _Engines:
    engines = _ENGINES.get(lb)
    if engines is None or (options is not None and options != engines.options):
        with _ENGINES_LOCK:
            engines = _ENGINES.get(lb)
            if engines is None or (options is not None and options != engines.options):
                if engines is not None:
                    engines.dispose()
                engines = _ENGINES[lb] = _Engines(lb, options or {})
    return engines


def engine_for(lb: Balancer, host: Host, database: str | None = None) -> Engine:
    """The (sync) engine a routing session uses for ``host`` of ``database``: for
    code that wants a plain SQLAlchemy connection to one host."""
    return _engines_of(lb).engine(host, lb._router.route(database))


# -- the session ---------------------------------------------------------------------------


class _KeepOpen(Exception):
    """The replica's transaction has a savepoint: leave it to SQLAlchemy."""


class _Unit:
    """Where one logical database's part of the current transaction runs."""

    __slots__ = ("engine", "host", "kind", "route", "wrote")

    def __init__(self, route: DatabaseRoute, host: Host, kind: str, engine: Engine) -> None:
        self.route = route
        self.host = host
        self.kind = kind
        self.engine = engine
        self.wrote = False


#: A bound parameter of text(): ``:name``, not ``::type`` nor ``\:`` (SQLAlchemy's rule).
_PLACEHOLDER = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")


def _writes(clause: Any) -> bool:
    """Whether a statement must run on the primary. ``None`` (``session.connection()``,
    a flush) may be anything: the primary."""
    if clause is None:
        return True
    if isinstance(clause, TextualSelect):  # text(...).columns(...)
        clause = clause.element
    if isinstance(clause, TextClause):
        # SQLAlchemy's :name placeholders, in the driver's style the classifier reads
        return not classify(_PLACEHOLDER.sub(r"%(\1)s", clause.text)).replica
    if getattr(clause, "is_select", False):
        return getattr(clause, "_for_update_arg", None) is not None  # a lock
    return True  # DML, DDL, anything else


class RoutingSession(Session):
    """A :class:`~sqlalchemy.orm.Session` that routes each transaction's reads to a
    caught-up replica and its writes to the primary (see the module's documentation).

    ``lb`` is a :class:`~pgreplica.LoadBalancer` (or an
    :class:`~pgreplica.AsyncLoadBalancer` under :class:`AsyncRoutingSession`);
    ``databases`` maps logical databases to the tables or mapped classes they hold;
    ``engine_options`` are given to ``create_engine`` for every host (``echo``...);
    ``primary=True`` keeps the session on the primary."""

    def __init__(
        self,
        *args: Any,
        lb: Balancer,
        databases: Mapping[str, Iterable[Any]] | None = None,
        engine_options: Mapping[str, Any] | None = None,
        primary: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(lb, (LoadBalancer, AsyncLoadBalancer)):
            raise TypeError(
                "RoutingSession needs lb=LoadBalancer or AsyncLoadBalancer,"
                f" got {type(lb).__name__}"
            )
        super().__init__(*args, **kwargs)
        self._pg_lb = lb
        self._pg_async = isinstance(lb, AsyncLoadBalancer)
        self._pg_engines = _engines_of(lb, engine_options)
        self._pg_primary = primary
        self._pg_tables: dict[str, str] = {}
        for name, members in (databases or {}).items():
            lb._router.route(name)  # an unknown database fails here, by name
            for member in members:
                self._pg_tables[_table_name(member)] = name
        self._pg_units: dict[str | None, _Unit] = {}
        self._pg_connections: dict[Engine, Any] = {}
        self._pg_last: _Unit | None = None
        self._pg_excluded: set[Host] = set()
        self._pg_force_primary = False
        self._pg_nested = False

    # SQLAlchemy asks for a bind before each statement of a transaction and at flush.
    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: Any = None,
        bind: Any = None,
        _sa_skip_events: bool | None = None,
        _sa_skip_for_implicit_returning: bool = False,
        **kw: Any,
    ) -> Any:
        if bind is not None:
            return bind
        database = self._pg_database(mapper, clause)
        # A statement a standby refused, run again on the primary, may write there.
        write = self._flushing or self._pg_force_primary or _writes(clause)
        unit = self._pg_units.get(database)
        if unit is None:
            unit = self._pg_units[database] = self._pg_begin(database, write)
        elif write and unit.kind != PRIMARY:
            self._pg_to_primary(unit)
        if write:
            unit.wrote = True
        self._pg_last = unit
        return unit.engine

    def _pg_database(self, mapper: Any, clause: Any) -> str | None:
        if not self._pg_tables:
            return None
        names: list[str] = []
        if mapper is not None:
            table = getattr(getattr(mapper, "mapper", mapper), "local_table", None)
            if table is not None:
                names.append(str(getattr(table, "name", "")))
        if clause is not None:
            table = getattr(clause, "table", None)  # DML
            if table is not None:
                names.append(str(getattr(table, "name", "")))
            elif hasattr(clause, "get_final_froms"):
                names.extend(str(getattr(f, "name", "")) for f in clause.get_final_froms())
        for name in names:
            database = self._pg_tables.get(name)
            if database is not None:
                return database
        return None

    def _pg_begin(self, database: str | None, write: bool) -> _Unit:
        lb = self._pg_lb
        if not lb._opened:
            self._pg_call(lb.open)
        route = lb._router.route(database)
        read_route = route if route.rollout_from is None else lb._router.read_route(route)
        state = current_state()
        if write or self._pg_primary or self._pg_force_primary or state.use_primary:
            host, kind, reason = route.primary, PRIMARY, "write" if write else "primary_scope"
        elif not read_route.replicas:
            host, kind, reason = route.primary, PRIMARY, "no_replicas"
        else:
            host, reason = self._pg_replica(route, read_route)
            kind = REPLICA if host is not route.primary else PRIMARY
        log_routed(host, reason, route.name)
        note_read(state, route.name, host)  # what a job or message enqueued now must see
        return _Unit(route, host, kind, self._pg_engines.engine(host, route))

    def _pg_replica(self, route: DatabaseRoute, read_route: DatabaseRoute) -> tuple[Host, str]:
        """A replica that has replayed the context's token, or the primary."""
        lb = self._pg_lb
        router = lb._router
        state = current_state()
        need = state.token.get(route.name)
        if need:
            need = router.required(route, state.token, state.grown_at)
        excluded = self._pg_excluded
        if need != UNKNOWN_POSITION:
            candidates = router.caught_up(read_route, need, None)
            if excluded:
                candidates = [h for h in candidates if h not in excluded]
            if candidates:
                return candidates[router.next_index(len(candidates))], "replica"
        # Behind, excluded or unprovable: the balancer's own path (a direct check of
        # the replicas the cache shows behind, the bounded wait, then the primary).
        # A replica it checks out is given back (the engine checks one out again); the
        # primary is not checked out at all: this transaction may hold its connection.
        host, conn, reason = self._pg_call(
            lb._pick_read, read_route, need, None, lb.settings.max_wait, set(excluded)
        )
        if conn is not None:
            self._pg_call(lb._checkin, host, conn)
        return (route.primary if host is read_route.primary else host), reason

    def _pg_call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Call a balancer method, awaiting it for an asyncio balancer (SQLAlchemy runs
        an AsyncSession's sync code in a greenlet that may await)."""
        result = func(*args)
        return await_only(result) if self._pg_async else result

    def _pg_to_primary(self, unit: _Unit) -> None:
        """The first write of a transaction that read a replica: end the replica's
        read-only transaction, and run the rest on the primary. (With a savepoint
        open there, SQLAlchemy still has to release it on that connection: its read-only
        transaction then ends with the session's.)"""
        try:
            if self._pg_nested:
                raise _KeepOpen
            connection = self.connection(bind_arguments={"bind": unit.engine})
            dbapi = connection.connection.dbapi_connection
            if dbapi is not None:
                dbapi.rollback()
        except _KeepOpen:
            pass
        except Exception as exc:  # the replica's transaction ends with its connection
            logger.debug("replica_transaction_end_failed error=%s", type(exc).__name__)
        route = unit.route
        unit.host, unit.kind = route.primary, PRIMARY
        unit.engine = self._pg_engines.engine(route.primary, route)
        log_routed(route.primary, "write", route.name)

    # -- the token after commit, the state after the transaction ------------------------

    def _pg_committed(self) -> None:
        for unit in self._pg_units.values():
            if unit.wrote:
                self._pg_record(unit)

    def _pg_record(self, unit: _Unit) -> None:
        """Advance the context's token to the primary's WAL position after the commit,
        read with the COMMIT (or else on the transaction's own connection, still
        checked out): no second connection to wait for while holding one."""
        connection = self._pg_connections.get(unit.engine)
        if connection is None:
            return  # nothing ran on the primary: nothing committed there
        raw = _raw(connection.connection)
        row = _COMMITTED_AT.pop(raw, None)
        if row is None:
            if raw.closed or raw.info.transaction_status != IDLE:
                return  # a savepoint released: the transaction has not committed yet
            # committed another way: ask now
            row = await_only(_aposition(raw)) if self._pg_async else _position(raw)
        # None: the position is unknown; reads go to the primary until a probe bounds it
        record_commit(unit.route, row)

    def _pg_ended(self) -> None:
        self._pg_units.clear()
        self._pg_connections.clear()
        self._pg_last = None
        self._pg_nested = False

    # -- one transparent retry of a read-only transaction ----------------------------------

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._pg_retry(super().execute, args, kwargs)

    def scalars(self, *args: Any, **kwargs: Any) -> Any:
        return self._pg_retry(super().scalars, args, kwargs)

    def scalar(self, *args: Any, **kwargs: Any) -> Any:
        return self._pg_retry(super().scalar, args, kwargs)

    def _pg_rollback_keeping_loaded(self) -> None:
        restore = _keep_loaded(self)
        self.rollback()
        restore()

    def _pg_retry(self, run: Callable[..., T], args: Any, kwargs: Any) -> T:
        try:
            return run(*args, **kwargs)
        except DBAPIError as exc:
            unit = self._pg_last
            error = exc.orig
            if (
                unit is None
                or unit.kind != REPLICA
                or any(u.wrote for u in self._pg_units.values())
                or self.new
                or self.dirty
                or self.deleted
                or error is None
            ):
                raise
            refused = standby_refusal(error)
            if not refused and not (is_connection_error(error) or exc.connection_invalidated):
                raise
            host = unit.host
            if refused:
                self._pg_force_primary = True  # the primary can run what a standby refused
                log_fallback(host, error, "standby_refused")
            else:
                self._pg_lb._host_failed(host, error)
                log_fallback(host, error, "replica_failed")
                self._pg_excluded.add(host)
        self._pg_rollback_keeping_loaded()
        try:
            return run(*args, **kwargs)
        finally:
            self._pg_excluded.clear()
            self._pg_force_primary = False


def _keep_loaded(session: Session) -> Callable[[], None]:
    """What the objects loaded so far hold, to put back after a rollback (which expires
    them): the retried statement must not turn objects the caller already has into
    expired ones (a detached or asyncio caller could not load them again)."""
    saved = []
    for state in session.identity_map.all_states():
        obj = state.obj()
        if obj is None:
            continue
        manager = state.manager
        values = {}
        for key, value in state.dict.items():
            attribute = manager.get(key)
            if attribute is None:
                continue
            values[key] = list(value) if attribute.impl.collection else value
        saved.append((obj, values))

    def restore() -> None:
        for obj, values in saved:
            for key, value in values.items():
                set_committed_value(obj, key, value)

    return restore


@event.listens_for(RoutingSession, "after_commit")
def _after_commit(session: Session) -> None:
    if isinstance(session, RoutingSession):
        session._pg_committed()


@event.listens_for(RoutingSession, "after_transaction_create")
def _after_transaction_create(session: Session, transaction: Any) -> None:
    if isinstance(session, RoutingSession) and transaction.nested:
        session._pg_nested = True


@event.listens_for(RoutingSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: Any) -> None:
    if isinstance(session, RoutingSession) and transaction.parent is None:
        session._pg_ended()


@event.listens_for(RoutingSession, "after_begin")
def _after_begin(session: Session, transaction: Any, connection: Any) -> None:
    if isinstance(session, RoutingSession):
        session._pg_connections[connection.engine] = connection


def _position(raw: Any) -> Any:
    """The primary's WAL position now, in autocommit (no BEGIN, nothing to roll back)."""
    try:
        raw.autocommit = True
        try:
            return raw.execute(LSN_SQL).fetchone()
        finally:
            raw.autocommit = False
    except psycopg.Error:
        return None


async def _aposition(raw: Any) -> Any:
    try:
        await raw.set_autocommit(True)
        try:
            cursor = await raw.execute(LSN_SQL)
            return await cursor.fetchone()
        finally:
            await raw.set_autocommit(False)
    except psycopg.Error:
        return None


def _table_name(member: Any) -> str:
    if isinstance(member, str):
        return member
    table = getattr(member, "__table__", None)
    if table is None:
        raise TypeError(f"databases: expected a table name or a mapped class, got {member!r}")
    return str(table.name)


class AsyncRoutingSession(AsyncSession):
    """The asyncio :class:`~sqlalchemy.ext.asyncio.AsyncSession` over
    :class:`RoutingSession`: ``AsyncRoutingSession(lb=alb)`` with an
    :class:`~pgreplica.AsyncLoadBalancer`, or ``async_sessionmaker(class_=
    AsyncRoutingSession, lb=alb)``."""

    sync_session_class = RoutingSession

    def __init__(self, *args: Any, lb: AsyncLoadBalancer, **kwargs: Any) -> None:
        if not isinstance(lb, AsyncLoadBalancer):
            raise TypeError(
                f"AsyncRoutingSession needs lb=AsyncLoadBalancer, got {type(lb).__name__}"
                " (a LoadBalancer goes with RoutingSession)"
            )
        super().__init__(*args, lb=lb, **kwargs)
