"""``ReadReplicaRouter``: Django's database router, lag- and causality-aware.

Reads go to a replica alias only when all of these hold:

- the current request (or block) asked for replica reads (``ReadReplicaMixin``,
  ``@read_replica``, or ``replica_reads()``), and did not write yet;
- the model's app label is in the allow-list (``PGREPLICA["REPLICA_APPS"]``; all apps
  when unset);
- no ``transaction.atomic()`` block is open on the primary;
- a replica is up, within the lag bounds, and has replayed the request's causal token
  (the prober's cached replay LSN, or one direct check).

Otherwise the router returns the primary alias. Writes always go to the primary alias.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import psycopg

from pgreplica.balancer import UNKNOWN_POSITION
from pgreplica.context import current_state
from pgreplica.contrib.django.state import (
    REQUEST,
    configured_aliases,
    context_floor,
    integration,
)
from pgreplica.health import Host

logger = logging.getLogger("pgreplica.django")


class ReadReplicaRouter:
    """For ``DATABASE_ROUTERS``. Every method may answer None ("no opinion")."""

    def __init__(self) -> None:
        from django.conf import settings

        options = dict(getattr(settings, "PGREPLICA", {}) or {})
        apps: Collection[str] | None = options.get("REPLICA_APPS")
        self.replica_apps = None if apps is None else frozenset(apps)

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        state = REQUEST.get()
        if state is None or not state.replica or state.primary_only:
            return None
        if current_state().use_primary:
            return None  # lb.primary(), e.g. the sticking store unreachable
        if self.replica_apps is not None and model._meta.app_label not in self.replica_apps:
            return None
        lb = integration()
        if not lb.alias_of and not lb.mirror_aliases:
            return None
        from django.db import connections

        if connections[lb.primary_alias].in_atomic_block:
            return lb.primary_alias
        database = lb.database_of(model) if lb.logical else lb.primary_alias
        if database == lb.primary_alias:
            if not state.decided:
                state.alias = choose_replica(lb)
                state.decided = True
            return state.alias or lb.primary_alias
        if database not in state.aliases:
            state.aliases[database] = choose_replica(lb, database)
        return state.aliases[database] or lb.primary_alias

    # The methods below only need alias names: they never build the integration (and
    # so never start its prober), e.g. while Django creates a test database.

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        state = REQUEST.get()
        if state is not None and state.replica:
            # The rest of the block reads its own write: the primary. (Where the query
            # runs is tracked too, but not in the threads an async consumer's ORM calls
            # run in, which see this state through the context.)
            state.wrote = state.primary_only = True
        primary, replicas = configured_aliases()
        return primary if replicas else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        primary, replicas = configured_aliases()
        same_database = {primary, *replicas}
        if obj1._state.db in same_database and obj2._state.db in same_database:
            return True
        return None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        if db in configured_aliases()[1]:
            return False
        return None


def choose_replica(lb: Any, database: str | None = None) -> str | None:
    """The alias of a replica that has replayed the context's token and every write
    the context made outside a request (``OUTSIDE_REQUESTS``), or None. For a logical
    database of ``PGREPLICA["DATABASES"]``, among the replicas its rollout gives this
    request (drawn once per request).

    Replicas the prober's cache cannot prove caught up are asked by the balancer's own
    catch-up wait, on Django's connections: once each, then those expected to catch up
    within ``max_wait`` again with a short backoff, as :meth:`LoadBalancer.read` does. A
    request calls this once per logical database."""
    router = lb.lb._router
    route = lb.route if database is None else router.route(database)
    read_route = route
    if route.rollout_from is not None:
        request = REQUEST.get()
        if request is None:
            read_route = router.read_route(route)
        else:
            if route.name not in request.read_routes:
                request.read_routes[route.name] = router.read_route(route)
            read_route = request.read_routes[route.name]
    state = current_state()
    need = router.required(route, state.token, state.grown_at)
    if need == UNKNOWN_POSITION:
        return None  # no replica can prove it: the primary serves it
    need = max(need, context_floor(lb))
    candidates = router.caught_up(read_route, need, None)
    if candidates:
        host = candidates[router.next_index(len(candidates))]
        return str(lb.alias_of[host])
    mirrors = lb.mirrors_of.get(read_route.name, ())
    if mirrors:
        return str(mirrors[router.next_index(len(mirrors))])
    if not need:
        return None
    found = lb.lb._await_replica(
        read_route, need, lb.lb.settings.max_wait, set(), _django_connection(lb), _give_back(lb)
    )
    return None if found is None else str(lb.alias_of[found[0]])


def _django_connection(lb: Any) -> Callable[[Host], Any]:
    """The balancer's catch-up wait asks each replica on the psycopg connection of
    Django's alias for it (opened if need be); a failure to connect is psycopg's, as
    the wait expects from a pool."""

    def connect(host: Host) -> Any:
        from django.db import DatabaseError, connections

        connection = connections[lb.alias_of[host]]
        try:
            connection.ensure_connection()
        except DatabaseError as exc:
            cause = exc.__cause__
            if isinstance(cause, psycopg.OperationalError):
                raise cause from None
            raise psycopg.OperationalError(type(exc).__name__) from None
        return connection.connection

    return connect


def _give_back(lb: Any) -> Callable[[Host, Any], None]:
    """Nothing to give back, but a connection a failed check broke is closed, so that
    Django opens a new one for the alias's next query."""

    def release(host: Host, conn: Any) -> None:
        if conn.broken:
            from django.db import connections

            connections[lb.alias_of[host]].close()

    return release
