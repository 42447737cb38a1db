"""What the Django integration keeps per process and per request.

Per process: a :class:`~pgreplica.LoadBalancer` built from ``DATABASES`` (the primary
alias and its replica aliases). Only its background prober is used — Django keeps making
the connections that run queries — so its pools hold no connection.

Per request: a :class:`RequestState` in a contextvar (threads and ASGI alike).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pgreplica._balancer_sync import LoadBalancer
from pgreplica._fork import ForkSafeLock
from pgreplica.balancer import DatabaseRoute, shutdown_socket
from pgreplica.comments import comment_for, with_comment
from pgreplica.config import parse_rollout
from pgreplica.contrib.django.settings import REPLICA_ALIAS, conninfo
from pgreplica.errors import ConfigError
from pgreplica.health import TCP_DEFAULTS, Host
from pgreplica.observe import WATCH, Event, record
from pgreplica.sql import classify

logger = logging.getLogger("pgreplica.django")
_lock = ForkSafeLock()
_integration: Integration | None = None


@dataclass
class RequestState:
    """Routing state of one request (or one decorated call)."""

    replica: bool = False
    """The view asked for replica reads (safe method, opted-in endpoint)."""
    primary_only: bool = False
    """A write happened, or a fallback: the rest of the request reads the primary."""
    alias: str | None = None
    """The replica alias pinned for this request, once chosen."""
    http: bool = False
    """Inside ``PgReplicaMiddleware``: the request's writes go into its token."""
    failed: str | None = None
    """The alias whose query raised ``OperationalError`` or ``InterfaceError`` last."""
    decided: bool = False
    """Whether the primary alias's reads were placed: a request decides once (a replica
    caught up, or the primary), not before every query."""
    wrote: bool = False
    read_primary: bool = False
    """A replica-enabled part of the request read the primary (a fallback): the next
    request must not see older data (monotonic reads)."""
    served: set[str] = field(default_factory=set)
    """Aliases that ran a query during the request."""
    aliases: dict[str, str | None] = field(default_factory=dict)
    """The replica alias pinned per other logical database (``PGREPLICA["DATABASES"]``)."""
    read_routes: dict[str, Any] = field(default_factory=dict)
    """Per logical database, whose replicas this request reads (a rollout draws once)."""


REQUEST: ContextVar[RequestState | None] = ContextVar("pgreplica_django_request", default=None)


#: Django's connection wrappers of each replica alias, in every thread: when the prober
#: marks the replica down, their sockets are shut (see :class:`_DjangoBalancer`).
REPLICA_CONNECTIONS: dict[str, weakref.WeakSet[Any]] = {}
# A forked worker (gunicorn --preload) must never shut its parent's sockets.
os.register_at_fork(after_in_child=REPLICA_CONNECTIONS.clear)


class _DjangoBalancer(LoadBalancer):
    """The integration's balancer. Django, not the balancer's pools, holds the
    connections that run queries; so when the prober marks a replica down (it crashed,
    or hangs), the connections Django's threads hold on its alias are aborted as the
    pools' are: a query blocked on a frozen replica fails at once (the view's one-shot
    retry then reads the primary) instead of waiting for the server to wake up."""

    aliases: dict[Host, str] = {}

    def _abort_lent(self, host: Host) -> None:
        super()._abort_lent(host)
        alias = self.aliases.get(host)
        wrappers = list(REPLICA_CONNECTIONS.get(alias, ())) if alias else []
        aborted = 0
        for wrapper in wrappers:
            conn = wrapper.connection
            if conn is not None and not conn.closed:
                shutdown_socket(conn)
                wrapper.errors_occurred = True  # checked, and closed, at its next request
                aborted += 1
        if aborted:
            logger.warning("db_routing_replica_aborted alias=%s connections=%d", alias, aborted)


class Integration:
    """The balancer and the alias <-> host maps for one Django project."""

    def __init__(self, databases: dict[str, dict[str, Any]], options: dict[str, Any]) -> None:
        self.primary_alias: str = options.get("PRIMARY_ALIAS", "default")
        self.logical = logical_databases(options, databases)
        claimed = {a for db in self.logical.values() for a in db.aliases}
        self.replica_aliases = replicas_of_primary(options, databases)
        self.replica_aliases += [a for a in sorted(claimed) if a not in self.replica_aliases]
        primary = conninfo(databases[self.primary_alias])
        # In Django's test database a replica alias mirrors the primary (TEST MIRROR):
        # it is the primary itself, so it is always caught up and never probed.
        self.mirror_aliases = [
            a
            for a in self.replica_aliases
            if a not in claimed and conninfo(databases[a]) == primary
        ]
        self.mirrors_of: dict[str, list[str]] = {self.primary_alias: self.mirror_aliases}
        probed_of: dict[str, list[str]] = {
            self.primary_alias: [
                a for a in self.replica_aliases if a not in claimed and a not in self.mirror_aliases
            ]
        }
        config_databases: dict[str, Any] = {
            self.primary_alias: {
                "primary": primary,
                "replicas": [conninfo(databases[a]) for a in probed_of[self.primary_alias]],
            }
        }
        for db in self.logical.values():
            mirrors = [a for a in db.aliases if conninfo(databases[a]) == primary]
            self.mirrors_of[db.name] = mirrors
            probed_of[db.name] = [a for a in db.aliases if a not in mirrors]
            config_databases[db.name] = {
                "primary": self.primary_alias,  # one primary, one pool: Django writes there
                "replicas": [conninfo(databases[a]) for a in probed_of[db.name]],
                "rollout": db.rollout,
            }
        config = {
            "databases": config_databases,
            "pool_min_size": 0,
            **{k.lower(): v for k, v in (options.get("SETTINGS") or {}).items()},
        }
        self.lb = _DjangoBalancer(config=config)
        route = self.lb._router.route(self.primary_alias)
        self.route = route
        # With the kill switch on, the balancer has no replica host: no alias maps.
        self.alias_of: dict[Host, str] = {}
        self.route_of_alias: dict[str, DatabaseRoute] = {self.primary_alias: route}
        for name, probed in probed_of.items():
            logical_route = self.lb._router.route(name)
            if logical_route.replicas:
                self.alias_of.update(zip(logical_route.replicas, probed, strict=True))
            for alias in (*probed, *self.mirrors_of[name]):
                self.route_of_alias[alias] = logical_route
        self.host_of: dict[str, Host] = {a: h for h, a in self.alias_of.items()}
        # Django opens the replica connections itself: bound their connect and their
        # dead peers as the balancer bounds its own (options the alias sets win).
        bounds = {"connect_timeout": str(max(2, math.ceil(self.lb.settings.connect_timeout)))}
        for alias in self.host_of:
            options = databases[alias].setdefault("OPTIONS", {})
            for key, value in {**bounds, **TCP_DEFAULTS}.items():
                options.setdefault(key, value)
        self.database_of_model: dict[str, str] = {}
        self.database_of_app: dict[str, str] = {}
        for db in self.logical.values():
            self.database_of_model.update(dict.fromkeys(db.models, db.name))
            self.database_of_app.update(dict.fromkeys(db.apps, db.name))
        if self.alias_of and self.lb.settings.enabled:
            self.lb.open(wait=True)

        self.lb.aliases = self.alias_of

    def database_of(self, model: Any) -> str:
        """The logical database a model's reads belong to (``PGREPLICA["DATABASES"]``
        by model label, then by app label; else the primary alias's)."""
        meta = model._meta
        name = self.database_of_model.get(meta.label_lower)
        if name is None:
            name = self.database_of_app.get(meta.app_label, self.primary_alias)
        return name

    def close(self) -> None:
        self.lb.close()


def configured_aliases() -> tuple[str, list[str]]:
    """The primary alias and the replica aliases, from Django's settings alone."""
    from django.conf import settings

    options = dict(getattr(settings, "PGREPLICA", {}) or {})
    aliases = replicas_of_primary(options, settings.DATABASES)
    for entry in (options.get("DATABASES") or {}).values():
        if isinstance(entry, dict):
            aliases += [a for a in entry.get("REPLICAS") or () if a not in aliases]
    return options.get("PRIMARY_ALIAS", "default"), aliases


def replicas_of_primary(options: dict[str, Any], databases: Collection[str]) -> list[str]:
    """The primary alias's replica aliases: those from the environment
    (``read_replica``, ``read_replica_2``, ...) and ``PGREPLICA["REPLICAS"]``, in that
    order. Aliases ``REPLICAS`` names that ``DATABASES`` lacks are left out here (the
    system check ``pgreplica.E006`` reports them)."""
    aliases = [a for a in databases if a == REPLICA_ALIAS or a.startswith(REPLICA_ALIAS + "_")]
    named = options.get("REPLICAS") or ()
    if isinstance(named, (list, tuple)):
        aliases += [a for a in named if a in databases and a not in aliases]
    return aliases


@dataclass(frozen=True)
class LogicalDatabase:
    """One entry of ``PGREPLICA["DATABASES"]``: a logical database that shares the
    primary alias and reads its own replica aliases."""

    name: str
    apps: frozenset[str]
    models: frozenset[str]
    aliases: tuple[str, ...]
    rollout: float | None


def logical_databases(
    options: dict[str, Any], databases: dict[str, dict[str, Any]]
) -> dict[str, LogicalDatabase]:
    """``PGREPLICA["DATABASES"] = {"ci": {"APPS": [...], "MODELS": ["app.Model"],
    "REPLICAS": ["ci_replica"], "ROLLOUT": 50}}``, validated (names the bad entry)."""
    raw = options.get("DATABASES") or {}
    if not isinstance(raw, dict):
        raise ConfigError('PGREPLICA["DATABASES"]', "expected a dict of logical databases")
    result: dict[str, LogicalDatabase] = {}
    for name, entry in raw.items():
        where = f'PGREPLICA["DATABASES"][{name!r}]'
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a dict with APPS, MODELS, REPLICAS, ROLLOUT")
        unknown = set(entry) - {"APPS", "MODELS", "REPLICAS", "ROLLOUT"}
        if unknown:
            raise ConfigError(f"{where}[{sorted(unknown)[0]!r}]", "unknown key")
        if name == options.get("PRIMARY_ALIAS", "default"):
            raise ConfigError(where, "the primary alias's database is not configured here")
        aliases = tuple(entry.get("REPLICAS") or ())
        for alias in aliases:
            if alias not in databases:
                raise ConfigError(f"{where}['REPLICAS']", f"no DATABASES alias {alias!r}")
        models = frozenset(str(m).lower() for m in entry.get("MODELS") or ())
        result[name] = LogicalDatabase(
            name,
            frozenset(entry.get("APPS") or ()),
            models,
            aliases,
            parse_rollout(f"{where}['ROLLOUT']", entry.get("ROLLOUT")),
        )
    return result


def integration() -> Integration:
    """The process-wide integration, built on first use from Django's settings."""
    global _integration
    if _integration is None:
        with _lock:
            if _integration is None:
                from django.conf import settings
                from django.db import connections

                # The connections' settings, not settings.DATABASES: in a test database
                # a replica alias mirrors the primary through its connection only.
                databases = {a: connections[a].settings_dict for a in settings.DATABASES}
                _integration = Integration(
                    databases, dict(getattr(settings, "PGREPLICA", {}) or {})
                )
                watch_open_connections()
    return _integration


def reset_integration() -> None:
    """Forget the integration (tests that change DATABASES, process shutdown)."""
    global _integration
    with _lock:
        if _integration is not None:
            _integration.close()
        _integration = None


@contextmanager
def track_queries(state: RequestState) -> Iterator[None]:
    """Note which aliases run queries, and whether one wrote on the primary: a write
    sends the rest of the request to the primary."""
    from django.db import InterfaceError, OperationalError, connections

    lb = integration()
    primary = lb.primary_alias
    comments = lb.lb._comments

    def wrapper(alias: str) -> Callable[..., Any]:
        on_primary = alias == primary
        route = lb.route_of_alias.get(alias, lb.route)
        config_name = route.primary_config_name if on_primary else route.replica_config_name

        def run(
            execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
        ) -> Any:
            state.served.add(alias)
            if on_primary and state.replica:
                state.read_primary = True
            wrote = False
            if on_primary and not classify(sql if isinstance(sql, str) else str(sql)).replica:
                state.wrote = wrote = True
                state.primary_only = True
            tagged = with_comment(sql, comment_for(config_name), params) if comments else sql
            try:
                if not WATCH.on:
                    return execute(tagged, params, many, context)
                started = time.perf_counter()
                try:
                    return execute(tagged, params, many, context)
                finally:
                    event = Event(
                        route.name,
                        config_name,
                        on_primary,
                        "primary" if on_primary else "replica",
                        time.perf_counter() - started,
                        wrote,
                        alias,
                    )
                    record(event, cached=False)
            except (OperationalError, InterfaceError):
                state.failed = alias  # which server failed decides the one-shot retry
                raise

        return run

    with ExitStack() as stack:
        for alias in (primary, *lb.replica_aliases):
            if alias in connections.databases:
                stack.enter_context(connections[alias].execute_wrapper(wrapper(alias)))
        yield


class OutsideRequests:
    """Writes committed on the primary outside HTTP handling (management commands,
    fixtures, ``setUp``, factories, ``replica_reads()`` blocks of a job): ``committed``
    counts them, ``floor`` is the primary's position read after the first ``read`` of
    them. Kept in :data:`OUTSIDE_REQUESTS`: contexts copied from the one that wrote
    (the threads Django runs an ASGI request's sync code in, for one) share it, so the
    position is read once for all of them, not once per request."""

    __slots__ = ("committed", "floor", "owner", "read")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        """The thread that counts into it; another thread (an ASGI request's, say) that
        writes gets its own copy, so that its writes do not hold back its siblings."""
        self.committed = 0
        self.read = 0
        self.floor = 0


OUTSIDE_REQUESTS: ContextVar[OutsideRequests | None] = ContextVar(
    "pgreplica_django_outside_requests", default=None
)
"""The writes outside HTTP handling of the current context (thread or task) and of the
contexts it was copied from. The next routed read reads the primary's position once
after new ones (:func:`context_floor`), and no routed read goes below it, as the core's
token would do. Contexts that never saw those writes are not held back."""

IN_HTTP: ContextVar[bool] = ContextVar("pgreplica_django_in_http", default=False)
"""Between Django's ``request_started`` and ``request_finished``: the writes of a request
(the middleware's token covers them) and of the middleware around it (a session save)
are not the context's own: another user's request in the same worker thread must not
wait for them."""


def _outside_commit() -> None:
    state = OUTSIDE_REQUESTS.get()
    me = threading.get_ident()
    if state is None or state.owner != me:
        own = OutsideRequests(me)
        if state is not None:  # what the context it was copied from wrote, it saw
            own.floor = state.floor
            own.committed = int(state.committed != state.read)
        OUTSIDE_REQUESTS.set(own)
        state = own
    state.committed += 1


def context_floor(integ: Integration) -> int:
    """The position a routed read of this context must see: past every write the
    context committed outside HTTP handling. One query on the primary after new ones;
    a reader that finds the count moved while another reads reads too (the floor is
    published before the count it covers)."""
    state = OUTSIDE_REQUESTS.get()
    if state is None:
        return 0
    committed = state.committed
    if committed != state.read:
        from pgreplica.balancer import LSN_SQL
        from pgreplica.lsn import parse_lsn

        row = internal_query(integ.primary_alias, LSN_SQL)
        if row and row[0]:
            state.floor = max(state.floor, parse_lsn(row[0]))
        state.read = max(state.read, committed)
    return state.floor


def internal_query(alias: str, sql: str) -> Any:
    """The first row of pgreplica's own ``sql`` on Django's connection of ``alias``,
    past Django's execute wrappers: it is not the application's query, so it is not
    counted, tagged, classified as the request's write, or seen by ``served_by()``.
    Errors are Django's (``OperationalError``...), as for any query."""
    from django.db import connections

    connection = connections[alias]
    connection.ensure_connection()
    with connection.wrap_database_errors, connection.connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()


#: Longer statements (bulk inserts, ``IN`` lists of thousands of ids) are counted as
#: writes without being classified: parsing them would cost milliseconds per query, and
#: counting a read costs at most one read of the primary's position.
CLASSIFY_LIMIT = 4096


def _note_writes(connection: Any) -> Callable[..., Any]:
    """The execute wrapper of the primary alias's connections: count the writes made
    outside HTTP handling, when they commit."""

    def run(execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if not IN_HTTP.get():
            request = REQUEST.get()
            if request is None or not request.http:  # a request's writes are its token's
                _note(connection, sql)
        return result

    return run


def _note(connection: Any, sql: Any) -> None:
    atomic = connection.in_atomic_block
    if atomic:
        blocks = connection.atomic_blocks
        if blocks and getattr(blocks[0], "_from_testcase", False):
            return  # Django's TestCase: never committed, and its reads stay on the primary
        if any(entry[1] is _outside_commit for entry in connection.run_on_commit):
            return  # counted once per transaction
    else:
        state = OUTSIDE_REQUESTS.get()
        if state is not None and state.committed != state.read:
            return  # already counted, not read yet
    text = sql if isinstance(sql, str) else str(sql)
    if len(text) <= CLASSIFY_LIMIT and classify(text).replica:
        return
    if atomic:
        connection.on_commit(_outside_commit)
    else:
        # Autocommit: committed already. (In manual transaction management, before the
        # commit: a routed read of this context in between reads an earlier position.)
        _outside_commit()


def _watch(connection: Any) -> None:
    if getattr(connection, "_pgreplica_watched", False):
        return
    primary, replicas = configured_aliases()
    if connection.alias in replicas:
        REPLICA_CONNECTIONS.setdefault(connection.alias, weakref.WeakSet()).add(connection)
        return
    if connection.alias == primary and replicas:
        # first: a request's execute_wrapper() pops the last one when it ends
        connection.execute_wrappers.insert(0, _note_writes(connection))
        connection._pgreplica_watched = True


def on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    """``connection_created``: watch the primary alias's connections for writes outside
    requests; and before Django creates or drops a test database (its connection to the
    maintenance database), let the integration's probe connections go, so that
    ``DROP DATABASE`` finds no other user, with Django's own test runner and
    pytest-django alike."""
    from django.db.backends.base.base import NO_DB_ALIAS

    if connection.alias == NO_DB_ALIAS:
        if _integration is not None:
            from django.db import connections

            replicas = _integration.replica_aliases
            reset_integration()
            for alias in replicas:  # this thread's replica connections to the test database
                if alias in connections.databases:
                    connections[alias].close()
        return
    _watch(connection)


def _request_started(sender: Any, **kwargs: Any) -> None:
    IN_HTTP.set(True)


def _request_finished(sender: Any, **kwargs: Any) -> None:
    IN_HTTP.set(False)


def watch_connections() -> None:
    """Connect the signals (idempotent): at import of the package, and when the app is
    ready; watch the primary connections already open in this thread."""
    from django.core.signals import request_finished, request_started
    from django.db.backends.signals import connection_created

    uid = "pgreplica.contrib.django"
    connection_created.connect(on_connection_created, dispatch_uid=uid)
    request_started.connect(_request_started, dispatch_uid=uid)
    request_finished.connect(_request_finished, dispatch_uid=uid)


def watch_open_connections() -> None:
    """The primary connections this thread opened before the integration was built."""
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.connection is not None:
            _watch(connection)
