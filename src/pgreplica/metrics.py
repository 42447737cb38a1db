"""Prometheus metrics, labelled by ``db_config_name`` (extra ``pgreplica[prometheus]``).

Turned on by the setting ``metrics = true`` (``PGREPLICA_METRICS=true``, the
counterpart of GitLab's ``GITLAB_MULTIPLE_DATABASE_METRICS``): each balancer then calls
:func:`enable` when it opens. Off, nothing is imported and nothing is counted.

Counters (``_total``):

- ``pgreplica_statements_total{db_config_name,role,reason}``: routed statements (a
  write unit counts as one), ``role`` ``primary`` or ``replica``;
- ``pgreplica_statement_seconds_total{db_config_name,role}``: their time;
- ``pgreplica_caught_up_checks_total{db_config_name,source}``: replica reads whose
  token was proven by the prober's cache (``source="cache"``) or by asking the replica
  (``"query"``), GitLab's ``wal_cached`` and ``wal`` counts;
- ``pgreplica_fallbacks_total{host,reason}``: reads moved off a failing host;
- ``pgreplica_job_outcomes_total{job,outcome}``: where jobs ran.

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

from pgreplica.errors import ConfigError
from pgreplica.lsn import parse_lsn
from pgreplica.observe import WAL_CHECKED, Event, Fallback, JobOutcome, Observed, add_sink

if TYPE_CHECKING:
    from pgreplica.balancer import BalancerBase

__all__ = ["asgi_app", "enable", "wsgi_app"]

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}
_BALANCERS: weakref.WeakSet[BalancerBase] = weakref.WeakSet()


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(
            "metrics", "needs prometheus_client: pip install 'pgreplica[prometheus]'"
        ) from exc
    return prometheus_client


def enable(lb: BalancerBase | None = None, *, registry: Any = None) -> None:
    """Count routed work in ``registry`` (default: prometheus_client's), and report
    ``lb``'s hosts at each scrape. Idempotent; the first call picks the registry."""
    prom = _prometheus()
    with _LOCK:
        if not _STATE:
            registry = registry if registry is not None else prom.REGISTRY
            counter = prom.Counter
            _STATE["registry"] = registry
            _STATE["statements"] = counter(
                "pgreplica_statements",
                "Routed statements (a write unit counts as one).",
                ["db_config_name", "role", "reason"],
                registry=registry,
            )
            _STATE["seconds"] = counter(
                "pgreplica_statement_seconds",
                "Time spent in routed statements.",
                ["db_config_name", "role"],
                registry=registry,
            )
            _STATE["checks"] = counter(
                "pgreplica_caught_up_checks",
                "Replica reads whose token was proven by the prober's cache or a query.",
                ["db_config_name", "source"],
                registry=registry,
            )
            _STATE["fallbacks"] = counter(
                "pgreplica_fallbacks",
                "Reads moved off a host that failed them.",
                ["host", "reason"],
                registry=registry,
            )
            _STATE["jobs"] = counter(
                "pgreplica_job_outcomes",
                "Where jobs ran (replica, primary, retry, ...).",
                ["job", "outcome"],
                registry=registry,
            )
            registry.register(_HostCollector(prom))
            add_sink(_sink)
        if lb is not None:
            _BALANCERS.add(lb)


def _sink(event: Observed) -> None:
    if isinstance(event, Event):
        role = "primary" if event.primary else "replica"
        _STATE["statements"].labels(event.db_config_name, role, event.reason).inc()
        _STATE["seconds"].labels(event.db_config_name, role).inc(event.seconds)
        if not event.primary and event.reason in WAL_CHECKED:
            _STATE["checks"].labels(event.db_config_name, "query").inc()
        elif not event.primary and event.reason == "replica":
            _STATE["checks"].labels(event.db_config_name, "cache").inc()
    elif isinstance(event, Fallback):
        _STATE["fallbacks"].labels(event.host, event.reason).inc()
    elif isinstance(event, JobOutcome):
        _STATE["jobs"].labels(event.job, event.outcome).inc()


class _HostCollector:
    """Per-host gauges of every enabled balancer, computed at scrape time."""

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
