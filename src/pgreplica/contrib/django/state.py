"""What the Django integration keeps per process and per request.

Per process: a :class:`~pgreplica.LoadBalancer` built from ``DATABASES`` (the primary
alias and its replica aliases). Only its background prober is used — Django keeps making
the connections that run queries — so its pools hold no connection.

Per request: a :class:`RequestState` in a contextvar (threads and ASGI alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pgreplica._balancer_sync import LoadBalancer
from pgreplica._fork import ForkSafeLock
from pgreplica.comments import comment_for, with_comment
from pgreplica.contrib.django.settings import REPLICA_ALIAS, conninfo
from pgreplica.health import Host
from pgreplica.observe import WATCH, Event, record
from pgreplica.sql import classify

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
    wrote: bool = False
    read_primary: bool = False
    """A replica-enabled part of the request read the primary (a fallback): the next
    request must not see older data (monotonic reads)."""
    served: set[str] = field(default_factory=set)
    """Aliases that ran a query during the request."""


REQUEST: ContextVar[RequestState | None] = ContextVar("pgreplica_django_request", default=None)


class Integration:
    """The balancer and the alias <-> host maps for one Django project."""

    def __init__(self, databases: dict[str, dict[str, Any]], options: dict[str, Any]) -> None:
        self.primary_alias: str = options.get("PRIMARY_ALIAS", "default")
        self.replica_aliases = [
            a for a in databases if a == REPLICA_ALIAS or a.startswith(REPLICA_ALIAS + "_")
        ]
        primary = conninfo(databases[self.primary_alias])
        # In Django's test database a replica alias mirrors the primary (TEST MIRROR):
        # it is the primary itself, so it is always caught up and never probed.
        self.mirror_aliases = [a for a in self.replica_aliases if conninfo(databases[a]) == primary]
        probed = [a for a in self.replica_aliases if a not in self.mirror_aliases]
        replicas = [conninfo(databases[a]) for a in probed]
        config = {
            "databases": {self.primary_alias: {"primary": primary, "replicas": replicas}},
            "pool_min_size": 0,
            **{k.lower(): v for k, v in (options.get("SETTINGS") or {}).items()},
        }
        self.lb = LoadBalancer(config=config)
        route = self.lb._router.route(self.primary_alias)
        self.route = route
        # With the kill switch on, the balancer has no replica host: no alias maps.
        self.alias_of: dict[Host, str] = (
            dict(zip(route.replicas, probed, strict=True)) if route.replicas else {}
        )
        self.host_of: dict[str, Host] = {a: h for h, a in self.alias_of.items()}
        if replicas and self.lb.settings.enabled:
            self.lb.open(wait=True)

    def close(self) -> None:
        self.lb.close()


def configured_aliases() -> tuple[str, list[str]]:
    """The primary alias and the replica aliases, from Django's settings alone."""
    from django.conf import settings

    options = dict(getattr(settings, "PGREPLICA", {}) or {})
    aliases = [
        a for a in settings.DATABASES if a == REPLICA_ALIAS or a.startswith(REPLICA_ALIAS + "_")
    ]
    return options.get("PRIMARY_ALIAS", "default"), aliases


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
    from django.db import connections

    lb = integration()
    primary = lb.primary_alias
    route = lb.route
    comments = lb.lb._comments

    def wrapper(alias: str) -> Callable[..., Any]:
        on_primary = alias == primary
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

        return run

    with ExitStack() as stack:
        for alias in (primary, *lb.replica_aliases):
            if alias in connections.databases:
                stack.enter_context(connections[alias].execute_wrapper(wrapper(alias)))
        yield
