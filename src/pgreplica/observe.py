"""What routed work did, for those who watch: per-request usage summaries, and the
sinks (Prometheus, OpenTelemetry) that want every statement.

Nothing here costs anything until someone watches: the routing code asks ``WATCH.on``
(one attribute read) and records only then. Watching starts when a sink is added
(:func:`add_sink`) or a :class:`usage` scope is entered anywhere in the process.

A :class:`usage` scope counts, for the current context (a request, a job), statements
and their durations by role and ``db_config_name``, with the names GitLab's request
and job logs use::

    with pgreplica.observe.usage() as used:
        handle(request)
    logger.info("done", extra=used.summary())
    # {"db_count": 3, "db_write_count": 1, "db_primary_count": 1,
    #  "db_primary_main_count": 1, "db_replica_count": 2, "db_replica_ci_count": 2,
    #  "db_replica_wal_count": 1, "db_replica_ci_wal_count": 1,
    #  "db_replica_wal_cached_count": 1, ..., "db_replica_ci_duration_s": 0.0021, ...}

``db_replica_<name>_*`` names the database whose replicas served (``ci`` for
``ci_replica``), ``db_primary_<name>_*`` the primary's configuration (``main`` for
``ci``'s primary work when it reuses main's primary). ``wal`` counts reads that went to
a replica proven caught up by asking it, ``wal_cached`` those proven by the prober's
cache; a read without a token needs neither.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import NamedTuple

from pgreplica._fork import ForkSafeLock
from pgreplica._scope import EitherWith

__all__ = [
    "CatchUpWait",
    "Event",
    "Fallback",
    "JobOutcome",
    "UnitDone",
    "add_sink",
    "current_usage",
    "remove_sink",
    "usage",
]


class Event(NamedTuple):
    """One routed statement (a write unit counts as one)."""

    database: str
    db_config_name: str
    primary: bool
    reason: str
    seconds: float
    write: bool
    host: str


class Fallback(NamedTuple):
    """A read moved off a host that failed it (``db_routing_fallback``)."""

    host: str
    reason: str


class JobOutcome(NamedTuple):
    """Where a job ran (``job_data_consistency``), after how long a wait."""

    job: str
    outcome: str
    waited: float = 0.0


class UnitDone(NamedTuple):
    """A read or write unit of work ended (``lb.read()``, ``lb.write()``)."""

    db_config_name: str
    primary: bool
    reason: str


class CatchUpWait(NamedTuple):
    """A read waited (``max_wait``) for a replica to replay its token."""

    db_config_name: str
    seconds: float
    caught_up: bool


Observed = Event | Fallback | JobOutcome | CatchUpWait | UnitDone


class _Watch:
    __slots__ = ("lock", "on", "scopes", "sinks")

    def __init__(self) -> None:
        self.on = False
        self.scopes = 0
        self.sinks: list[Callable[[Observed], None]] = []
        self.lock = ForkSafeLock()  # a forked child must not inherit it held

    def update(self) -> None:
        self.on = bool(self.sinks) or self.scopes > 0


WATCH = _Watch()
_USAGE: ContextVar[Usage | None] = ContextVar("pgreplica_usage", default=None)
current_usage = _USAGE.get
#: Reasons of a replica read whose replica was proven caught up by asking it, and by
#: the prober's cache (with a token to satisfy).
WAL_CHECKED = frozenset({"replica_checked", "fallback_replica_checked"})


def add_sink(sink: Callable[[Observed], None]) -> None:
    """Call ``sink(event)`` for every routed statement (:class:`Event`), fallback
    (:class:`Fallback`) and job decision (:class:`JobOutcome`) from now on."""
    with WATCH.lock:
        if sink not in WATCH.sinks:
            WATCH.sinks.append(sink)
        WATCH.update()


def remove_sink(sink: Callable[[Observed], None]) -> None:
    with WATCH.lock:
        if sink in WATCH.sinks:
            WATCH.sinks.remove(sink)
        WATCH.update()


def record(event: Event, cached: bool) -> None:
    """The routing code saw ``event`` (only called while ``WATCH.on``). ``cached``: a
    replica read whose token the prober's cache proved."""
    used = _USAGE.get()
    if used is not None:
        used.add(event, cached)
    notify(event)


def notify(event: Observed) -> None:
    """Hand ``event`` to every sink (a failing sink never fails the caller)."""
    for sink in WATCH.sinks:
        try:
            sink(event)
        except Exception:
            continue


class Usage:
    """Counts and durations of the statements of one context (see the module doc)."""

    __slots__ = ("counts", "durations")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.durations: dict[str, float] = {}

    def add(self, event: Event, cached: bool) -> None:
        counts, durations = self.counts, self.durations
        role = "primary" if event.primary else "replica"
        name = event.db_config_name.removesuffix("_replica")
        counts["db_count"] += 1
        durations["db"] = durations.get("db", 0.0) + event.seconds
        if event.write:
            counts["db_write_count"] += 1
        for prefix in (f"db_{role}", f"db_{role}_{name}"):
            counts[f"{prefix}_count"] += 1
            durations[prefix] = durations.get(prefix, 0.0) + event.seconds
        if not event.primary:
            if event.reason in WAL_CHECKED:
                counts["db_replica_wal_count"] += 1
                counts[f"db_replica_{name}_wal_count"] += 1
            elif cached:
                counts["db_replica_wal_cached_count"] += 1
                counts[f"db_replica_{name}_wal_cached_count"] += 1

    def summary(self) -> dict[str, int | float]:
        """Every count and duration so far (``*_count`` and ``*_duration_s``)."""
        result: dict[str, int | float] = dict(self.counts)
        for prefix, seconds in self.durations.items():
            result[f"{prefix}_duration_s"] = round(seconds, 6)
        return result


class usage(EitherWith[Usage]):
    """Count the routed statements of this context (and of tasks it starts) until the
    block ends; ``with`` or ``async with``; yields the :class:`Usage`."""

    __slots__ = ("_token", "used")

    def __init__(self) -> None:
        self.used = Usage()
        self._token: Token[Usage | None] | None = None

    def __enter__(self) -> Usage:
        self._token = _USAGE.set(self.used)
        with WATCH.lock:
            WATCH.scopes += 1
            WATCH.update()
        return self.used

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with WATCH.lock:
            WATCH.scopes -= 1
            WATCH.update()
        if self._token is not None:
            _USAGE.reset(self._token)
