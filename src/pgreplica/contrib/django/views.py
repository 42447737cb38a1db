"""Opting views into replica reads: ``ReadReplicaMixin`` (class-based views and Django
REST framework viewsets), ``@read_replica`` (function views) and ``replica_reads()``.

Only GET, HEAD and OPTIONS are routed; POST, PUT, PATCH and DELETE never are. The request
state lives in a contextvar and is cleared when the view returns or raises. When no
replica alias is configured, all of this is a true no-op.

The one-shot retry: if the view raises ``OperationalError`` or ``InterfaceError`` and
the last query that failed ran on a replica (or none failed, and a replica was chosen
for the view or served it, e.g. connecting to it failed), and the view wrote nothing, it
runs once more with every read on the primary, and a WARNING ``db_routing_fallback`` is
logged. An error of the primary, or one the view raised with no replica involved, is
raised as it is: running the view again on the primary would not help, and would double
the primary's load just when it is failing. A view that wrote is never run twice.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pgreplica.contrib.django.state import REQUEST, RequestState, integration, track_queries
from pgreplica.health import error_reason

logger = logging.getLogger("pgreplica.django")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def replica_reads() -> Iterator[RequestState]:
    """Reads of allowed apps inside may go to a caught-up replica."""
    outer = REQUEST.get()
    state = RequestState(replica=True)
    if outer is not None:
        state.primary_only = outer.primary_only
        state.http = outer.http
    token = REQUEST.set(state)
    try:
        with track_queries(state):
            yield state
    finally:
        REQUEST.reset(token)
        if outer is not None:
            outer.wrote = outer.wrote or state.wrote
            outer.read_primary = outer.read_primary or state.read_primary
            outer.served |= state.served


def _configured() -> bool:
    from django.db import connections

    return bool(integration().replica_aliases) and all(
        alias in connections.databases for alias in integration().replica_aliases
    )


def run_with_replica(call: Callable[[], Any], where: str) -> Any:
    """Run ``call`` with replica reads; once more on the primary if a replica failed."""
    from django.db import InterfaceError, OperationalError

    with replica_reads() as state:
        try:
            response = call()
        except (OperationalError, InterfaceError) as exc:
            replicas = set(integration().replica_aliases)
            if state.failed is not None:  # a query failed: on which server?
                involved = state.failed in replicas
            else:  # e.g. connecting to the chosen replica failed
                involved = bool(state.served & replicas) or state.alias is not None
            if state.wrote or not involved:
                raise  # the primary's error, or a write that must not run twice
            fallback_to_primary(state, exc, where)
            return call()
        if state.served & set(integration().replica_aliases):
            logger.debug("db_routing routed_to=%s view=%s", state.alias or "read_replica", where)
        return response


def fallback_to_primary(state: RequestState, exc: BaseException, where: str) -> None:
    """After a replica failed: log ``db_routing_fallback``, and send the rest to the primary."""
    logger.warning(
        "db_routing_fallback view=%s alias=%s error=%s reason=%s",
        where,
        state.alias,
        type(exc).__name__,
        error_reason(exc),
    )
    state.primary_only = True
    state.alias = None
    state.aliases.clear()


class ReadReplicaMixin:
    """Routes the reads of safe methods to a replica.

    On a Django REST framework viewset, ``replica_actions`` (e.g. ``("list",
    "retrieve")`` or the name of an ``@action``) limits routing to those actions; by
    default every safe-method action is routed.
    """

    replica_actions: tuple[str, ...] | None = None

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        parent = super().dispatch  # type: ignore[misc]
        if request.method not in SAFE_METHODS or not _configured():
            return parent(request, *args, **kwargs)
        if self.replica_actions is not None:
            action_map = getattr(self, "action_map", None) or {}
            if action_map.get(request.method.lower()) not in self.replica_actions:
                return parent(request, *args, **kwargs)
        return run_with_replica(lambda: parent(request, *args, **kwargs), type(self).__name__)


def read_replica(view: F) -> F:
    """Decorator for function views: the same routing as :class:`ReadReplicaMixin`."""

    @functools.wraps(view)
    def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.method not in SAFE_METHODS or not _configured():
            return view(request, *args, **kwargs)
        return run_with_replica(lambda: view(request, *args, **kwargs), view.__name__)

    return wrapper  # type: ignore[return-value]


def metrics(request: Any) -> Any:
    """The Prometheus exposition of pgreplica's metrics (setting ``metrics = true``):
    ``path("metrics", pgreplica.contrib.django.views.metrics)``."""
    from django.http import HttpResponse

    from pgreplica.metrics import exposition

    body, content_type = exposition()
    return HttpResponse(body, content_type=content_type)
