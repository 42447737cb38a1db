"""Prometheus metrics, labelled by ``db_config_name`` (extra ``pgreplica[prometheus]``).

Turned on by the setting ``metrics = true`` (``PGREPLICA_METRICS=true``, the
counterpart of GitLab's ``GITLAB_MULTIPLE_DATABASE_METRICS``): each balancer then calls
:func:`enable` when it opens. Off, nothing is imported and nothing is counted.

Counters (``_total``):

- ``pgreplica_statements_total{db_config_name,role,reason}``: routed statements (a
  write unit counts as one), ``role`` ``primary`` or ``replica``;
- ``pgreplica_units_total{db_config_name,role,reason}``: read and write units;
- ``pgreplica_statement_seconds_total{db_config_name,role}``: the statements' time;
- ``pgreplica_caught_up_checks_total{db_config_name,source}``: replica reads whose
  token was proven by the prober's cache (``source="cache"``) or by asking the replica
  (``"query"``), GitLab's ``wal_cached`` and ``wal`` counts;
- ``pgreplica_fallbacks_total{host,reason}``: reads moved off a failing host;
- ``pgreplica_job_outcomes_total{job,outcome}``: where jobs ran;
- ``pgreplica_job_wait_seconds_total{job}``: how long they waited for a replica;
- ``pgreplica_catch_up_wait_seconds_total{db_config_name,caught_up}``: how long reads
  waited (``max_wait``) for a replica to catch up, and whether one did.

Gauges, read from every enabled balancer at each scrape (``host`` is the password-free
label):

- ``pgreplica_host_online{host,database,role}`` (1 or 0),
  ``pgreplica_host_replay_lsn_bytes``, ``pgreplica_host_lag_bytes``,
  ``pgreplica_host_lag_seconds``.

Exposition: :func:`wsgi_app`, :func:`asgi_app`, or the Django view
``pgreplica.contrib.django.views.metrics``; or the application's own registry, passed
to :func:`enable`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pgreplica._extras import require
from pgreplica._fork import ForkSafeLock
from pgreplica.lsn import parse_lsn
from pgreplica.observe import (
    WAL_CHECKED,
    CatchUpWait,
    Event,
    Fallback,
    JobOutcome,
    Observed,
    UnitDone,
    add_sink,
)

if TYPE_CHECKING:
    from pgreplica.balancer import BalancerBase

__all__ = ["asgi_app", "enable", "wsgi_app"]

_LOCK = ForkSafeLock(reentrant=True)  # a registry may collect while enable() registers
_STATE: dict[str, Any] = {}
_BALANCERS: weakref.WeakSet[BalancerBase] = weakref.WeakSet()


def _prometheus() -> Any:
    return require("prometheus_client", extra="prometheus", feature="metrics", setting=True)


class _Shard:
    """One thread's counts: written by that thread only, summed at scrape time (a
    prometheus_client counter takes a lock per increment; this takes none)."""

    __slots__ = (
        "checks",
        "fallbacks",
        "job_waits",
        "jobs",
        "seconds",
        "statements",
        "units",
        "waits",
    )

    def __init__(self) -> None:
        self.statements: dict[tuple[str, str, str], int] = {}
        self.seconds: dict[tuple[str, str], float] = {}
        self.checks: dict[tuple[str, str], int] = {}
        self.fallbacks: dict[tuple[str, str], int] = {}
        self.jobs: dict[tuple[str, str], int] = {}
        self.job_waits: dict[tuple[str], float] = {}
        self.waits: dict[tuple[str, str], float] = {}
        self.units: dict[tuple[str, str, str], int] = {}


class _Local(threading.local):
    def __init__(self) -> None:
        self.shard = _Shard()
        with _LOCK:
            _SHARDS.append(self.shard)


_SHARDS: list[_Shard] = []
_LOCAL = _Local()
#: name, help, label names, the shard attribute, counter or not
_COUNTERS = (
    (
        "pgreplica_statements",
        "Routed statements (a write unit counts as one).",
        ["db_config_name", "role", "reason"],
        "statements",
    ),
    (
        "pgreplica_units",
        "Read and write units of work (lb.read(), lb.write()).",
        ["db_config_name", "role", "reason"],
        "units",
    ),
    (
        "pgreplica_statement_seconds",
        "Time spent in routed statements.",
        ["db_config_name", "role"],
        "seconds",
    ),
    (
        "pgreplica_caught_up_checks",
        "Replica reads whose token was proven by the prober's cache or a query.",
        ["db_config_name", "source"],
        "checks",
    ),
    (
        "pgreplica_fallbacks",
        "Reads moved off a host that failed them.",
        ["host", "reason"],
        "fallbacks",
    ),
    (
        "pgreplica_job_outcomes",
        "Where jobs ran (replica, primary, retry, ...).",
        ["job", "outcome"],
        "jobs",
    ),
    (
        "pgreplica_job_wait_seconds",
        "Time jobs waited for a replica to replay their token.",
        ["job"],
        "job_waits",
    ),
    (
        "pgreplica_catch_up_wait_seconds",
        "Time reads waited (max_wait) for a replica to catch up, by outcome.",
        ["db_config_name", "caught_up"],
        "waits",
    ),
)


def enable(lb: BalancerBase | None = None, *, registry: Any = None) -> None:
    """Count routed work in ``registry`` (default: prometheus_client's), and report
    ``lb``'s hosts at each scrape. Idempotent; the first call picks the registry."""
    prom = _prometheus()
    with _LOCK:
        if not _STATE:
            registry = registry if registry is not None else prom.REGISTRY
            _STATE["registry"] = registry
            registry.register(_CountCollector())
            registry.register(_HostCollector(prom))
            add_sink(_sink)
        if lb is not None:
            _BALANCERS.add(lb)


def _sink(event: Observed) -> None:
    shard = _LOCAL.shard
    if isinstance(event, Event):
        name = event.db_config_name
        role = "primary" if event.primary else "replica"
        key = (name, role, event.reason)
        shard.statements[key] = shard.statements.get(key, 0) + 1
        pair = (name, role)
        shard.seconds[pair] = shard.seconds.get(pair, 0.0) + event.seconds
        if not event.primary:
            source = "query" if event.reason in WAL_CHECKED else "cache"
            if source == "query" or event.reason == "replica":
                check = (name, source)
                shard.checks[check] = shard.checks.get(check, 0) + 1
    elif isinstance(event, Fallback):
        key2 = (event.host, event.reason)
        shard.fallbacks[key2] = shard.fallbacks.get(key2, 0) + 1
    elif isinstance(event, JobOutcome):
        key2 = (event.job, event.outcome)
        shard.jobs[key2] = shard.jobs.get(key2, 0) + 1
        if event.waited:
            job = (event.job,)
            shard.job_waits[job] = shard.job_waits.get(job, 0.0) + event.waited
    elif isinstance(event, UnitDone):
        unit = (event.db_config_name, "primary" if event.primary else "replica", event.reason)
        shard.units[unit] = shard.units.get(unit, 0) + 1
    elif isinstance(event, CatchUpWait):
        wait = (event.db_config_name, "true" if event.caught_up else "false")
        shard.waits[wait] = shard.waits.get(wait, 0.0) + event.seconds


class _CountCollector:
    """The counters, summed over every thread's shard at scrape time."""

    def describe(self) -> list[Any]:
        return []  # nothing to collect at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        with _LOCK:
            shards = list(_SHARDS)
        for name, help_text, labels, attribute in _COUNTERS:
            totals: dict[tuple[str, ...], float] = {}
            for shard in shards:
                for key, value in dict(getattr(shard, attribute)).items():  # an atomic copy
                    totals[key] = totals.get(key, 0) + value
            family = CounterMetricFamily(name, help_text, labels=labels)
            for key, value in sorted(totals.items()):
                family.add_metric(list(key), value)
            yield family


class _HostCollector:
    """Per-host gauges of every enabled balancer, computed at scrape time."""

    def describe(self) -> list[Any]:
        return []

    def __init__(self, prom: Any) -> None:
        from prometheus_client.core import GaugeMetricFamily

        self._gauge = GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        gauge = self._gauge
        labels = ["host", "database", "role"]
        online = gauge("pgreplica_host_online", "1 while the host is up.", labels=labels)
        replay = gauge(
            "pgreplica_host_replay_lsn_bytes", "Replay (or insert) WAL position.", labels=labels
        )
        lag_bytes = gauge("pgreplica_host_lag_bytes", "Replication lag in bytes.", labels=labels)
        lag_seconds = gauge("pgreplica_host_lag_seconds", "Replication lag.", labels=labels)
        for lb in list(_BALANCERS):
            for status in lb.status():
                for database in status.databases:
                    key = [status.host, database, status.role]
                    online.add_metric(key, 1.0 if status.state == "up" else 0.0)
                    if status.replay_lsn:
                        replay.add_metric(key, float(parse_lsn(status.replay_lsn)))
                    if status.lag_bytes is not None:
                        lag_bytes.add_metric(key, float(status.lag_bytes))
                    if status.lag_seconds is not None:
                        lag_seconds.add_metric(key, float(status.lag_seconds))
        yield from (online, replay, lag_bytes, lag_seconds)


def _registry() -> Any:
    if not _STATE:
        enable()
    return _STATE["registry"]


def wsgi_app() -> Any:
    """A WSGI application serving the metrics (prometheus_client's exposition)."""
    return _prometheus().make_wsgi_app(registry=_registry())


def asgi_app() -> Any:
    """An ASGI application serving the metrics."""
    return _prometheus().make_asgi_app(registry=_registry())


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type, for a framework's own view."""
    prom = _prometheus()
    return prom.generate_latest(_registry()), prom.CONTENT_TYPE_LATEST
