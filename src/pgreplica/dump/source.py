"""Choosing the host to dump from: a healthy replica, or the primary only when allowed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pgreplica.balancer import Router
from pgreplica.config import Settings
from pgreplica.dump._util import APPLICATION_NAME
from pgreplica.dump.progress import _Reporter
from pgreplica.errors import ConfigError, HostUnavailable, PgReplicaError
from pgreplica.health import Host, Prober, ProberThread


@dataclass(frozen=True)
class _Source:
    conninfo: str = field(repr=False)  # holds the password
    label: str
    role: str
    """``replica``, or ``primary`` (only with ``--allow-primary``)."""
    reason: str = ""


def _choose_source(
    settings: Settings, database: str | None, allow_primary: bool, report: _Reporter
) -> _Source:
    """The replica to dump from: up, in recovery and in the read set, per the prober.

    Only the replicas are probed (the primary receives nothing from a dump unless it is
    allowed and needed). Without a healthy replica this is an error that names the
    problem, unless ``allow_primary``: then the primary, announced on stderr.
    """
    config = settings.database(database)  # ConfigError naming an unknown database
    name = config.name
    advice = (
        "the dump runs on a replica and never falls back to the primary; "
        "pass --allow-primary to dump from the primary"
    )
    error: PgReplicaError
    if not settings.enabled:
        problem = "PGREPLICA_ENABLED=false switches replicas off"
        error = ConfigError("PGREPLICA_ENABLED", f"false switches replicas off: {advice}")
    elif not config.replicas:
        problem = f"no replicas configured for {name!r}"
        error = ConfigError(f"databases.{name}.replicas", f"{problem}: {advice}")
    else:
        settings = settings.with_options(application_name=APPLICATION_NAME)
        chosen, states = _probe_replicas(settings, Router(settings), name)
        if chosen is not None:
            return _Source(chosen.dsn.conninfo, chosen.label, "replica")
        problem = f"no healthy replica of database {name!r} ({'; '.join(states)})"
        error = HostUnavailable(f"{problem}: {advice}", reason="no_healthy_replica")
    if not allow_primary:
        raise error
    report.warning(f"dumping from the PRIMARY {config.primary.label} (--allow-primary): {problem}")
    return _Source(config.primary.conninfo, config.primary.label, "primary", problem)


def _probe_replicas(settings: Settings, router: Router, name: str) -> tuple[Host | None, list[str]]:
    """Probe the replicas of database ``name`` once each (the balancer's prober, without
    the primary); return the most advanced one in the read set, and every replica's state."""
    route = router.route(name)
    prober = Prober(
        list(route.replicas),
        interval=settings.probe_interval,
        timeout=settings.probe_timeout,
        connect_timeout=settings.connect_timeout,
        statement_timeout=settings.probe_statement_timeout,
        application_name=settings.application_name,
        on_change=router.refresh,
    )
    runner = ProberThread(prober)
    runner.start()
    try:
        deadline = time.monotonic() + settings.connect_timeout + settings.probe_timeout + 1
        while not prober.first_round.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        runner.stop()
    router.refresh()
    states = [
        f"{h.label} {h.status().state}" + (f": {h.last_error}" if h.last_error else "")
        for h in route.replicas
    ]
    if not route.read_set:
        return None, states
    return max(route.read_set, key=lambda h: h.replay_lsn), states
