"""Choosing a host for a unit of work: the IO-free core shared by both balancers.

:class:`Router` holds the hosts of every logical database and, for each database, the
*read set*: the replicas that are up, in recovery and within the lag bounds. The prober
recomputes read sets after every probe; a read only filters its database's read set by
the context's causal token, which is a comparison of integers. Everything here is free
of I/O so that :class:`~pgreplica.LoadBalancer` and :class:`~pgreplica.AsyncLoadBalancer`
share it instead of keeping two copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import psycopg
import psycopg_pool

from pgreplica import dns
from pgreplica.config import DatabaseConfig, Dsn, Settings, parse_rollout
from pgreplica.context import Scope, current_state, isolated, record_write
from pgreplica.errors import ConfigError, HostUnavailable
from pgreplica.health import Backoff, Host, HostStatus, Prober, tcp_options
from pgreplica.lsn import CausalToken, format_lsn, parse_lsn, split_origin
from pgreplica.observe import WATCH, Fallback, notify
from pgreplica.sql import PRIMARY, Catalog, Classification, OperatorRow, RelationRow

__all__ = ["BalancerBase", "Router"]

logger = logging.getLogger("pgreplica")
routing_logger = logging.getLogger("pgreplica.routing")

#: The adaptive catch-up wait polls the replicas expected to catch up this soon after
#: the first check, then backs off (doubling) to POLL_MAX.
POLL_FIRST = 0.0002
POLL_MAX = 0.05
#: Replay position of a standby, NULL on a server that is not in recovery.
CHECK_SQL = "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() END)::text"
#: Commit and read the WAL insert position in one round trip.
COMMIT_SQL = "COMMIT; SELECT pg_current_wal_insert_lsn()::text"
#: The same, for a transaction that may or may not have written: the first result
#: says whether the server assigned it a transaction id (it wrote), in the same trip.
XID_COMMIT_SQL = (
    "SELECT pg_current_xact_id_if_assigned() IS NOT NULL;"
    " COMMIT; SELECT pg_current_wal_insert_lsn()::text"
)
LSN_SQL = "SELECT pg_current_wal_insert_lsn()::text"
#: The position of a write that committed but whose WAL position could not be read
#: back: no replica can prove it has it, until a later probe of the primary bounds it
#: (:meth:`Router.required`).
UNKNOWN_POSITION = (1 << 64) - 1

#: The fourth column flags a function declared STABLE or IMMUTABLE whose body calls a
#: lock or sequence function: its declaration is probably wrong (logged, see
#: ``write_functions``).
_SUSPECT = (
    "(p.provolatile <> 'v' AND p.prosrc ~* '(pg_(try_)?advisory_(xact_)?lock|nextval|setval)')"
)
FUNCTIONS_SQL = f"""\
SELECT p.proname, n.nspname, p.provolatile::text, {_SUSPECT}
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = ANY(%s)"""
#: Relations by name (temporary ones belong to one session: a routing connection that
#: made one stays on the primary anyway), with a view's definition.
RELATIONS_SQL = """\
SELECT c.relname, n.nspname, c.relkind::text, c.relpersistence::text,
       CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY(%s) AND c.relpersistence <> 't'"""
#: User-defined operators by name, with the function each one runs.
OPERATORS_SQL = f"""\
SELECT o.oprname, ons.nspname, pns.nspname || '.' || p.proname, p.provolatile::text, {_SUSPECT}
FROM pg_operator o
JOIN pg_namespace ons ON ons.oid = o.oprnamespace
JOIN pg_proc p ON p.oid = o.oprcode
JOIN pg_namespace pns ON pns.oid = p.pronamespace
WHERE o.oprname = ANY(%s) AND o.oid >= 16384"""
_VOLATILITY_ORDER = {"i": 0, "s": 1, "v": 2}

POOL_ERRORS = (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)
_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def is_connection_error(exc: BaseException) -> bool:
    """A failure of the server or the connection, not of the statement."""
    if isinstance(exc, POOL_ERRORS) or not isinstance(
        exc, (psycopg.OperationalError, psycopg.InterfaceError)
    ):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return True  # connection lost: libpq reports no SQLSTATE
    return sqlstate.startswith("08") or sqlstate in _CONNECTION_SQLSTATES


def is_recovery_conflict(exc: BaseException) -> bool:
    """A standby cancelled the query to replay WAL: the query is fine elsewhere."""
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate == "57P04":
        return True
    return exc.sqlstate == "40001" and "conflict with recovery" in str(exc)


#: SQLSTATEs a standby uses to refuse what only a primary can do, when the message says
#: why (recovery, hot standby): 0A000 for unlogged or temporary relations and
#: serializable mode, 55000 for WAL control functions.
_REFUSAL_SQLSTATES = frozenset({"0A000", "55000"})
_REFUSAL_WORDS = ("during recovery", "hot standby", "recovery is in progress")
#: How many refused statements a database remembers.
REFUSED_MAX = 4096


def standby_refusal(exc: BaseException) -> bool:
    """The server refused the statement because it is a standby: it cannot have done
    anything, and the primary can run it (25006 read-only transaction, or 0A000/55000
    naming recovery or hot standby; the message check needs English server messages,
    ``lc_messages`` C or en)."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate == "25006":
        return True
    if sqlstate not in _REFUSAL_SQLSTATES:
        return False
    text = str(exc)
    return any(word in text for word in _REFUSAL_WORDS)


def refused_classification(static: Classification) -> Classification:
    """What a statement a standby refused is from now on: primary work that may write."""
    return Classification(PRIMARY, "standby_refused", static.kind, static.functions)


class DatabaseRoute:
    """Routing data of one logical database."""

    __slots__ = (
        "clamp_warned_at",
        "classified",
        "discover",
        "dns_name",
        "functions",
        "members",
        "name",
        "operators",
        "patroni",
        "primary",
        "primary_config_name",
        "primary_problem",
        "primary_source",
        "read_set",
        "refused",
        "relations",
        "replica_config_name",
        "replicas",
        "rollout",
        "rollout_env",
        "rollout_from",
        "rollout_override",
        "shares_primary_with",
        "static_replicas",
    )

    def __init__(self, name: str, primary: Host, replicas: tuple[Host, ...]) -> None:
        self.name = name
        self.primary = primary
        self.replicas = replicas
        self.read_set: tuple[Host, ...] = ()
        self.shares_primary_with: tuple[str, ...] = (name,)
        self.functions: dict[str, str] = {}
        """Catalog volatility of the non-built-in functions seen so far."""
        self.relations: dict[str, tuple[RelationRow, ...]] = {}
        """Catalog rows of the relations seen so far (persistence, view definitions)."""
        self.operators: dict[str, tuple[OperatorRow, ...]] = {}
        """Catalog rows of the user-defined operators seen so far."""
        self.classified: dict[str, Classification] = {}
        """Catalog-aware classifications by statement text (bounded)."""
        self.refused: dict[str, str] = {}
        """Statement texts a standby refused (the server's truth), with the SQLSTATE:
        they go to the primary at once from then on (:meth:`learn_refusal`)."""
        self.clamp_warned_at = -1e9
        self.primary_config_name = name
        """``db_config_name`` of this database's primary work: the name of the database
        whose primary it reuses (``ci`` shows as ``main``), else its own."""
        self.replica_config_name = f"{name}_replica"
        self.rollout_from: DatabaseRoute | None = None
        """The database whose replicas serve the reads a rollout has not moved yet."""
        self.rollout: float | None = None
        self.rollout_env = f"PGREPLICA_ROLLOUT_{name.upper()}"
        self.rollout_override: Any = None
        """Set by :meth:`BalancerBase.set_rollout`: a percentage or a callable."""
        self.discover = False
        """Roles are found by probing :attr:`members` (no fixed primary)."""
        self.members: tuple[Host, ...] = (primary, *replicas)
        self.primary_problem: str | None = None
        """Why there is no primary to write to: ``no_primary`` (none claims the role,
        e.g. during a failover) or ``split_brain`` (more than one does); None when
        :attr:`primary` may take writes."""
        self.primary_source: DatabaseRoute | None = None
        """The database whose primary this one reuses (it follows its failovers)."""
        self.patroni: tuple[str, ...] = ()
        """Patroni REST API URLs whose ``/cluster`` members are :attr:`members`."""
        self.dns_name: str | None = None
        """``replicas_dns``: more replicas, from DNS (:mod:`pgreplica.dns`)."""
        self.static_replicas: tuple[Host, ...] = replicas
        """The configured replicas; :attr:`replicas` adds those DNS gives."""

    def learn_refusal(self, text: str, exc: BaseException, host: Host) -> None:
        """A standby refused ``text``: remember it, so that it goes to the primary."""
        if text in self.refused:
            return
        if len(self.refused) >= REFUSED_MAX:
            self.refused.clear()
        sqlstate = getattr(exc, "sqlstate", None) or "?"
        self.refused[text] = sqlstate
        self.classified.pop(text, None)
        logger.warning(
            "standby_refused database=%s host=%s sqlstate=%s: the statement goes to the"
            " primary from now on (%s)",
            self.name,
            host.label,
            sqlstate,
            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
        )


class Router:
    """Hosts and read sets of every configured database (no I/O)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self.hosts: dict[str, Host] = {}
        self.databases: dict[str, DatabaseRoute] = {}
        self.default_database = settings.default_database
        self.stale_after = max(1.0, 3 * settings.probe_interval + settings.probe_timeout)
        self.refreshed_at = time.monotonic()
        self._round_robin = itertools.count()
        for db in settings.databases.values():
            if db.discover:
                # No fixed roles: every host is probed (with the kill switch too: the
                # primary has to be found); refresh() picks the primary.
                members = tuple(
                    self._host(d, None, backoff, f"databases.{db.name}.hosts[{i}]")
                    for i, d in enumerate((db.primary, *db.replicas))
                )
                route = DatabaseRoute(db.name, members[0], members[1:])
                route.discover = True
                route.patroni = db.patroni
                route.primary_problem = "no_primary"  # until the first probe says
                self.databases[db.name] = route
                continue
            primary = self._host(db.primary, True, backoff, f"databases.{db.name}.primary")
            replicas: tuple[Host, ...] = ()
            if settings.enabled:  # the kill switch: no replica host, no connection, no probe
                replicas = tuple(
                    self._host(r, False, backoff, f"databases.{db.name}.replicas[{i}]")
                    for i, r in enumerate(db.replicas)
                )
            self.databases[db.name] = route = DatabaseRoute(db.name, primary, replicas)
            route.rollout = db.rollout
            if settings.enabled:
                route.dns_name = db.replicas_dns
        for db in settings.databases.values():
            if db.primary_from is not None:
                route = self.databases[db.name]
                source = self.databases[db.primary_from]
                route.primary_config_name = db.primary_from
                route.rollout_from = source
                if source.discover:
                    route.primary_source = source
                    route.primary = source.primary
                    route.primary_problem = source.primary_problem
        for route in self.databases.values():
            route.shares_primary_with = tuple(
                other.name for other in self.databases.values() if other.primary is route.primary
            )
            for host in (route.primary, *route.replicas):
                host.databases = (*host.databases, route.name)

    def _host(self, dsn: Dsn, primary: bool | None, backoff: Backoff, setting: str) -> Host:
        """The host of ``dsn``: a fixed primary (True), a fixed replica (False), or one
        whose role is found by probing (None)."""
        host = self.hosts.get(dsn.conninfo)
        if host is None:
            host = Host(dsn, configured_primary=bool(primary), backoff=backoff)
            host.discovered = primary is None
            self.hosts[dsn.conninfo] = host
        elif host.discovered != (primary is None):
            raise ConfigError(
                setting, f"{dsn.label} has a fixed role elsewhere and none here (hosts)"
            )
        elif primary is not None and host.configured_primary != primary:
            raise ConfigError(setting, f"{dsn.label} is configured both as primary and replica")
        return host

    def read_route(self, route: DatabaseRoute) -> DatabaseRoute:
        """The database whose replicas serve a unit of work of ``route``: its own, or,
        while a rollout has not reached it, those of the database whose primary it
        reuses (decided once per unit, like GitLab's ``use_model_load_balancing``)."""
        fallback = route.rollout_from
        if fallback is None:
            return route
        percent = self.rollout_percent(route)
        if percent is None or percent >= 100.0:
            return route
        if percent <= 0.0:
            return fallback
        return route if random.random() * 100.0 < percent else fallback

    def rollout_percent(self, route: DatabaseRoute) -> float | None:
        """The rollout now: :meth:`~BalancerBase.set_rollout`, else the environment
        (``PGREPLICA_ROLLOUT_<NAME>``, read each time), else the configuration. A value
        that cannot be read keeps the reads where a rollout starts (0 %), and warns."""
        override = route.rollout_override
        try:
            if override is not None:
                value = override() if callable(override) else override
                return parse_rollout(f"set_rollout({route.name!r})", value)
            text = os.environ.get(route.rollout_env)
            if text is not None and text.strip():
                return parse_rollout(route.rollout_env, text)
        except ConfigError as exc:
            self._warn_rollout(route, exc)
            return 0.0
        except Exception as exc:  # a user callable that failed
            self._warn_rollout(route, exc)
            return 0.0
        return route.rollout

    def _warn_rollout(self, route: DatabaseRoute, exc: BaseException) -> None:
        now = time.monotonic()
        if now - route.clamp_warned_at >= 10.0:
            route.clamp_warned_at = now
            logger.warning(
                "rollout_unreadable database=%s error=%s: reads use %s until it is fixed (%s)",
                route.name,
                type(exc).__name__,
                route.rollout_from.replica_config_name if route.rollout_from else "its own",
                str(exc)[:200],
            )

    def route(self, database: str | None) -> DatabaseRoute:
        try:
            return self.databases[database or self.default_database]
        except KeyError:
            known = ", ".join(self.databases)
            raise ConfigError(
                "database", f"no database {database!r} (configured: {known})"
            ) from None

    def next_index(self, count: int) -> int:
        return next(self._round_robin) % count

    def refresh(self) -> None:
        """Recompute lag and the read set of every database from the probe results."""
        settings = self.settings
        now = time.monotonic()
        for route in self.databases.values():
            if route.discover:
                self._find_primary(route)
        for route in self.databases.values():
            source = route.primary_source
            if source is not None:
                route.primary, route.primary_problem = source.primary, source.primary_problem
                route.shares_primary_with = source.shares_primary_with
        for route in self.databases.values():
            primary_lsn = route.primary.flush_lsn or route.primary.replay_lsn
            usable: list[Host] = []
            for host in route.replicas:
                lag_bytes: int | None
                if primary_lsn:
                    lag_bytes = max(0, primary_lsn - host.replay_lsn)
                elif host.receive_lsn is not None:
                    lag_bytes = max(0, host.receive_lsn - host.replay_lsn)
                else:
                    lag_bytes = None
                # Nothing left to replay means no lag; otherwise the age of the last
                # replayed commit, and None (unknown, never zero) when there is none.
                lag_seconds = 0.0 if lag_bytes == 0 else host.replay_age
                if lag_seconds is not None:
                    lag_seconds = max(0.0, lag_seconds)
                host.lag_bytes, host.lag_seconds = lag_bytes, lag_seconds
                host.lagging = not (
                    (lag_bytes is not None and lag_bytes <= settings.max_lag_bytes)
                    or (lag_seconds is not None and lag_seconds <= settings.max_lag_seconds)
                )
                fresh = host.probed_at is not None and now - host.probed_at <= self.stale_after
                if (
                    host.up
                    and host.in_recovery is True
                    and fresh
                    and not host.lagging
                    and same_history(route.primary, host)
                ):
                    usable.append(host)
            route.read_set = tuple(usable)
        self.refreshed_at = now

    def _find_primary(self, route: DatabaseRoute) -> None:
        """The primary of a database without fixed roles: the one member that is up and
        out of recovery. None claiming it (a failover in progress) or more than one (a
        split brain: an old primary back without having been demoted) leaves the
        database without a primary to write to until exactly one does: pgreplica does
        not pick a side, the failover manager's fencing does."""
        claims = [h for h in route.members if h.up and h.in_recovery is False]
        problem: str | None = None
        if len(claims) == 1:
            new = claims[0]
        else:
            new = route.primary
            problem = "no_primary" if not claims else "split_brain"
        if new is not route.primary:
            old = route.primary
            old.configured_primary = False
            logger.warning(
                "primary_changed database=%s from=%s to=%s", route.name, old.label, new.label
            )
            route.primary = new
        if problem is None:
            route.primary.configured_primary = True
            route.replicas = (
                tuple(m for m in route.members if m is not new) if self.settings.enabled else ()
            )
        if problem != route.primary_problem:
            if problem == "split_brain":
                logger.error(
                    "split_brain database=%s hosts=%s: no writes until one primary remains",
                    route.name,
                    ",".join(h.label for h in claims),
                )
            elif problem == "no_primary":
                logger.warning(
                    "no_primary database=%s: writes fail fast until a primary is found",
                    route.name,
                )
            else:
                logger.info("primary_found database=%s host=%s", route.name, new.label)
            route.primary_problem = problem

    def required(self, route: DatabaseRoute, token: CausalToken, grown_at: float) -> int:
        """The position a read of ``route`` must see for a context holding ``token``
        (last grown at ``grown_at``, ``time.monotonic()``); :data:`UNKNOWN_POSITION`
        when no replica can prove it and the read belongs on the primary.

        - A position bound to another history than the primary's (another cluster, a
          timeline that a failover ended before that position, a timeline the primary
          has not reached) proves nothing about any replica: the primary serves it.
          One of an earlier timeline at or before the point where that timeline ended
          in the primary's history is kept.
        - A position beyond the primary's last probed insert position is either newer
          than that probe (a write that just committed) or not from this primary's
          history (a forged or unbound token from elsewhere, or a write whose position
          could not be read back). It is the latter once the primary has been probed
          after the token last grew: the probed position then bounds it, so such a
          token costs nothing after one probe interval."""
        name = route.name
        need = token.get(name)
        if not need:
            return 0
        primary = route.primary
        origin = token.origin(name)
        if origin != primary.origin and not _in_history(primary, need, origin):
            self._warn_token(route, "token_from_other_history", origin)
            return UNKNOWN_POSITION
        if need <= primary.replay_lsn:
            return need
        if primary.replay_lsn and primary.probe_started_at > grown_at:
            if need != UNKNOWN_POSITION:
                self._warn_token(route, "token_ahead_of_primary", origin)
            return primary.replay_lsn
        return need

    def _warn_token(self, route: DatabaseRoute, event: str, origin: str | None) -> None:
        now = time.monotonic()
        if now - route.clamp_warned_at >= 10.0:
            route.clamp_warned_at = now
            why = (
                "a token position the primary never reached (another cluster, a lost"
                " timeline or a forged token) is bounded by the primary's position"
                if event == "token_ahead_of_primary"
                else "a token position from another cluster or from a timeline that"
                " ended before it is read on the primary"
            )
            logger.warning(
                "%s database=%s primary=%s primary_origin=%s token_origin=%s: %s",
                event,
                route.name,
                route.primary.label,
                route.primary.origin,
                origin,
                why,
            )

    def caught_up(
        self, route: DatabaseRoute, need: int, max_staleness: float | None
    ) -> Sequence[Host]:
        """Replicas of the read set that the cache proves fresh enough."""
        if time.monotonic() - self.refreshed_at > self.stale_after:
            self.refresh()  # the prober has stalled: drop hosts whose data is too old
        read_set = route.read_set
        if max_staleness is not None:
            now = time.monotonic()
            return [
                h
                for h in read_set
                if h.lag_seconds is not None
                and h.probed_at is not None
                and h.lag_seconds + (now - h.probed_at) <= max_staleness
            ]
        if not need:
            return read_set
        return [h for h in read_set if h.replay_lsn >= need]

    def behind(self, route: DatabaseRoute, need: int, excluded: set[Host]) -> list[Host]:
        """Usable replicas the cache cannot prove caught up, in round-robin order."""
        hosts = [h for h in route.read_set if h.replay_lsn < need and h not in excluded]
        if len(hosts) > 1:
            start = self.next_index(len(hosts))
            hosts = hosts[start:] + hosts[:start]
        return hosts

    def set_dns_replicas(
        self, route: DatabaseRoute, dsns: Sequence[Dsn]
    ) -> tuple[list[Host], list[Host]]:
        """Make the replicas DNS gave ``route`` these (besides its configured ones):
        ``(added, removed)``, hosts new to the router and hosts no database uses any
        more. An added host reads once probed; a removed one leaves the read set now.
        The primary, or a host with another role, is not taken as a replica."""
        hosts, added = self._hosts_for(dsns, discovered=False)
        hosts = [h for h in hosts if h not in route.static_replicas]
        leaving = [h for h in route.replicas if h not in hosts and h not in route.static_replicas]
        route.replicas = (*route.static_replicas, *hosts)
        return added, self._rejoin(route, hosts, leaving)

    def set_members(
        self, route: DatabaseRoute, dsns: Sequence[Dsn]
    ) -> tuple[list[Host], list[Host]]:
        """The hosts of a database without fixed roles are now these (from Patroni):
        ``(added, removed)``. Roles are found by probing, as for configured hosts."""
        members, added = self._hosts_for(dsns, discovered=True)
        if not members:
            return added, []
        leaving = [h for h in route.members if h not in members]
        route.members = tuple(members)
        return added, self._rejoin(route, members, leaving)

    def _hosts_for(self, dsns: Sequence[Dsn], *, discovered: bool) -> tuple[list[Host], list[Host]]:
        """``(hosts, added)`` of ``dsns``: known hosts of the same kind (a replica from
        DNS, or a member without a fixed role), and new ones."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        hosts: list[Host] = []
        added: list[Host] = []
        for dsn in dsns:
            host = self.hosts.get(dsn.conninfo)
            if host is None:
                host = Host(dsn, configured_primary=False, backoff=backoff)
                host.discovered = discovered
                self.hosts[dsn.conninfo] = host
                added.append(host)
            elif host.discovered != discovered or (host.configured_primary and not discovered):
                continue  # a host with another role
            if host not in hosts:
                hosts.append(host)
        return hosts, added

    def _rejoin(self, route: DatabaseRoute, hosts: list[Host], leaving: list[Host]) -> list[Host]:
        """Record which databases use ``hosts`` and the hosts ``leaving`` ``route``;
        the hosts no database uses any more (but the primary) are dropped, and
        returned. The read sets are computed again."""
        for host in hosts:
            if route.name not in host.databases:
                host.databases = (*host.databases, route.name)
        removed: list[Host] = []
        for host in leaving:
            host.databases = tuple(d for d in host.databases if d != route.name)
            if not host.databases and host is not route.primary:
                self.hosts.pop(host.dsn.conninfo, None)
                removed.append(host)
        self.refresh()
        return removed

    def make_prober(self) -> Prober:
        s = self.settings
        return Prober(
            list(self.hosts.values()),
            interval=s.probe_interval,
            timeout=s.probe_timeout,
            connect_timeout=s.connect_timeout,
            statement_timeout=s.probe_statement_timeout,
            application_name=s.application_name,
            on_change=self.refresh,
        )


def patroni_members(url: str) -> list[tuple[str, int | None]]:
    """``(host, port)`` of each member of the Patroni cluster that ``url`` (a REST API)
    belongs to, from ``GET /cluster`` (blocking: run it in a thread)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/cluster", timeout=2.0) as response:
        body = json.loads(response.read(1_000_000))
    members = body.get("members") if isinstance(body, dict) else None
    if not isinstance(members, list):
        raise ValueError("no members in the answer of /cluster")
    targets: list[tuple[str, int | None]] = []
    for member in members:
        host, port = member.get("host"), member.get("port")
        if isinstance(host, str) and host and isinstance(port, int):
            targets.append((host, port))
    return targets


def _in_history(primary: Host, position: int, origin: str | None) -> bool:
    """``position`` of ``origin`` may be part of ``primary``'s history: unbound, or the
    primary's history unknown, or the same cluster and an earlier timeline that ended
    at or after ``position`` (the primary's timeline history file says where)."""
    if origin is None or primary.origin is None:
        return True
    timeline, system = split_origin(origin)
    current, primary_system = split_origin(primary.origin)
    if system != primary_system or timeline >= current:
        return False
    ended = primary.history.get(timeline)
    return ended is not None and position <= ended


def same_history(primary: Host, replica: Host) -> bool:
    """The replica replays the primary's WAL: the same cluster (system identifier) and,
    when both are known, the same timeline. A replica of another cluster (a wrong DSN)
    or still on the timeline of a former primary proves nothing about this primary's
    positions, however far it has replayed."""
    if (
        primary.system_identifier
        and replica.system_identifier
        and primary.system_identifier != replica.system_identifier
    ):
        return False
    return not (primary.timeline and replica.timeline and primary.timeline != replica.timeline)


def build_settings(
    source: str | os.PathLike[str] | Mapping[str, Any] | Settings | None,
    primary: str | None,
    replicas: Sequence[str],
    options: Mapping[str, Any],
) -> Settings:
    """Settings from a TOML path, a mapping, a Settings object, DSNs, or the environment."""
    if primary is not None:
        if source is not None:
            raise ConfigError("primary", "give either a configuration or primary/replicas")
        if isinstance(replicas, str):
            raise ConfigError("replicas", "expected a list of connection strings, not one string")
        data: dict[str, Any] = {"databases": {"main": {"primary": primary, "replicas": replicas}}}
        return Settings.from_dict({**data, **options})
    if isinstance(source, Settings):
        return source.with_options(**options) if options else source
    if isinstance(source, Mapping):
        return Settings.from_dict({**source, **options})
    settings = Settings.from_env() if source is None else Settings.from_toml(source)
    return settings.with_options(**options) if options else settings


class BalancerBase:
    """What both balancers share: configuration, scopes, tokens and status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._router = Router(settings)
        self._prober: Prober  # made by the subclass (_make_prober)
        self._comments = settings.sql_comments
        self._pid = os.getpid()
        if settings.metrics:
            from pgreplica import metrics

            metrics.enable(self)
        if settings.opentelemetry:
            from pgreplica import otel

            otel.enable()
        self._lent: dict[Host, set[Any]] = {h: set() for h in self._router.hosts.values()}
        """Connections out of the pools, per host: aborted when the prober marks their
        replica down, so a caller never waits on a server that stopped answering."""
        self._fallback_lock = threading.Lock()
        self._fallback_reads: dict[str, int] = {}
        """Per database, reads on its primary because no replica could serve them
        (``fallback_limit``), each with its connection in :attr:`_fallback_conns`."""
        self._fallback_conns: dict[Any, str] = {}
        self._fallback_logged: dict[str, float] = {}
        _BALANCERS.add(self)

    def __repr__(self) -> str:
        dbs = ", ".join(
            f"{r.name}: {r.primary.label} + {len(r.replicas)} replicas"
            for r in self._router.databases.values()
        )
        enabled = "" if self.settings.enabled else " disabled"
        return f"<{type(self).__name__}{enabled} {dbs}>"

    @property
    def databases(self) -> tuple[str, ...]:
        return tuple(self._router.databases)

    def database_config(self, name: str | None = None) -> DatabaseConfig:
        return self.settings.database(name)

    # Scopes: no I/O, so they work with `with` and `async with` alike.

    def primary(self) -> Scope:
        """Everything inside goes to the primary."""
        return Scope(use_primary=True)

    def read_only(self) -> Scope:
        """Transactions a routing connection starts inside are read-only, so they may
        be pinned to a caught-up replica."""
        return Scope(read_only=True)

    def set_rollout(self, database: str, value: Any) -> None:
        """Change ``database``'s rollout at run time: a percentage (``0`` to ``100``,
        ``"0.01%"``), ``None`` to go back to the environment and the configuration, or a
        callable returning either, asked at each decision (a feature flag). Only a
        database that reuses another's primary has a rollout."""
        route = self._router.route(database)
        if route.rollout_from is None:
            raise ConfigError(
                f"databases.{route.name}.rollout",
                "a rollout needs a database that reuses another's primary",
            )
        if value is not None and not callable(value):
            parse_rollout(f"set_rollout({database!r})", value)  # refuse bad input now
        route.rollout_override = value

    def causal(self, token: CausalToken | str) -> Scope:
        """Reads inside see at least ``token`` (from a cookie, a job or a message)."""
        if isinstance(token, str):
            token = CausalToken.parse(token)
        return Scope(adopt=token)

    def isolated(self) -> Scope:
        """A fresh routing state inside; the outer one restored, unchanged, on exit."""
        return isolated()

    def token(self) -> CausalToken:
        """The current context's causal token."""
        return current_state().token

    def status(self) -> list[HostStatus]:
        """One entry per host: role, state, replay LSN and lag."""
        self._router.refresh()
        return [host.status() for host in self._router.hosts.values()]

    # -- connections lent to units of work --------------------------------------------

    def _make_prober(self) -> Prober:
        prober = self._router.make_prober()
        routes = self._router.databases.values()
        prober.watchers = [self._watch_dns(route) for route in routes if route.dns_name]
        prober.watchers += [self._watch_patroni(route) for route in routes if route.patroni]
        return prober

    def _watch_patroni(self, route: DatabaseRoute) -> Callable[[], Awaitable[None]]:
        """The loop (run by the prober) that keeps ``route``'s members those of its
        Patroni cluster (``GET /cluster`` on the first REST API that answers)."""
        setting = f"databases.{route.name}.patroni"

        async def watch() -> None:
            while True:
                targets = None
                for url in route.patroni:
                    try:
                        targets = await asyncio.to_thread(patroni_members, url)
                        break
                    except (OSError, ValueError) as exc:
                        logger.warning(
                            "patroni_unavailable database=%s url=%s reason=%s",
                            route.name,
                            url,
                            str(exc)[:120],
                        )
                if targets:
                    seed = route.members[0].dsn
                    dsns = dns.replica_dsns(seed, targets, setting)
                    await self._apply_hosts(route, dsns, members=True)
                if await self._prober._sleep(self.settings.patroni_interval):
                    return

        return watch

    def _watch_dns(self, route: DatabaseRoute) -> Callable[[], Awaitable[None]]:
        """The loop (run by the prober, in its event loop) that keeps ``route``'s
        replicas from DNS up to date."""
        name = route.dns_name
        assert name is not None
        setting = f"databases.{route.name}.replicas_dns"

        async def watch() -> None:
            settings = self.settings
            while True:
                ttl = 0.0
                try:
                    targets, ttl = await dns.lookup(name, settings.dns_servers)
                except LookupError as exc:
                    logger.warning(
                        "dns_lookup_failed database=%s name=%s reason=%s: the"
                        " replicas stay as they are",
                        route.name,
                        name,
                        exc,
                    )
                else:
                    dsns = dns.replica_dsns(route.primary.dsn, targets, setting)
                    await self._apply_hosts(route, dsns, members=False)
                if await self._prober._sleep(dns.next_lookup_in(ttl, settings.dns_interval)):
                    return

        return watch

    async def _apply_hosts(self, route: DatabaseRoute, dsns: list[Dsn], *, members: bool) -> None:
        """Hosts discovery gave ``route``: its members (Patroni) or its replicas from
        DNS. Pools and probes follow; a change is logged (``members`` or
        ``dns_replicas``)."""
        attribute = "members" if members else "replicas"
        before = {h.label for h in getattr(route, attribute)}
        if members:
            added, removed = self._router.set_members(route, dsns)
        else:
            added, removed = self._router.set_dns_replicas(route, dsns)
        await self._track(added, removed)
        after = {h.label for h in getattr(route, attribute)}
        if after != before:
            logger.info(
                "%s database=%s added=%s removed=%s",
                "members" if members else "dns_replicas",
                route.name,
                ",".join(sorted(after - before)) or "-",
                ",".join(sorted(before - after)) or "-",
            )

    async def _track(self, added: list[Host], removed: list[Host]) -> None:
        """Pools and probes for hosts that joined; none for hosts that left."""
        for host in added:
            self._lent[host] = set()
            host.on_down = self._host_down
            host.on_up = self._renew_pool
            opened = self._add_pool(host)
            if inspect.isawaitable(opened):
                await opened
            self._prober.add_host(host)
        for host in removed:
            self._prober.remove_host(host)
            self._remove_pool(host)

    def _add_pool(self, host: Host) -> Any:
        """A pool for a host DNS added, opening (the subclass's kind of pool)."""
        raise NotImplementedError

    def _remove_pool(self, host: Host) -> None:
        """Close the pool of a host DNS removed, gently: work in flight finishes."""
        raise NotImplementedError

    def _host_down(self, host: Host) -> None:
        raise NotImplementedError

    def _renew_pool(self, host: Host) -> None:
        raise NotImplementedError

    def _lend(self, host: Host, conn: Any) -> None:
        self._lent[host].add(conn)

    def _unlend(self, host: Host, conn: Any) -> None:
        self._lent[host].discard(conn)  # before the pool may close it
        if self._fallback_conns:
            name = self._fallback_conns.pop(conn, None)
            if name is not None:
                self._fallback_done(name)

    # -- protecting the primary (fallback_limit) ----------------------------------------

    def _fallback_begin(self, name: str) -> bool:
        """Take a place for one more fallback read of database ``name`` on its primary;
        False when ``fallback_limit`` of them are running."""
        with self._fallback_lock:
            running = self._fallback_reads.get(name, 0)
            if running >= self.settings.fallback_limit:
                return False
            self._fallback_reads[name] = running + 1
            return True

    def _fallback_done(self, name: str) -> None:
        with self._fallback_lock:
            self._fallback_reads[name] = max(0, self._fallback_reads.get(name, 0) - 1)

    def _fallback_refused(self, route: DatabaseRoute, reason: str) -> HostUnavailable:
        """The error for a read over ``fallback_limit``; logged at most once a second
        per database, counted by the observers (``Fallback``, reason ``fallback_limit``)."""
        limit = self.settings.fallback_limit
        now = time.monotonic()
        if now - self._fallback_logged.get(route.name, -1.0) >= 1.0:
            self._fallback_logged[route.name] = now
            logger.warning(
                "db_fallback_limited database=%s limit=%d reason=%s: reads beyond the"
                " limit fail until replicas serve again",
                route.name,
                limit,
                reason,
            )
        if WATCH.on:
            notify(Fallback(route.primary.label, "fallback_limit"))
        return HostUnavailable(
            f"no replica can serve this read of {route.name!r} ({reason.replace('_', ' ')})"
            f" and the primary already serves {limit} such reads (fallback_limit);"
            " retry later",
            host=route.primary.label,
            reason="fallback_limit",
        )

    def _abort_lent(self, host: Host) -> None:
        """The prober marked ``host`` down: shut the sockets of the connections lent
        on it, so that every caller blocked on it (or about to use it) gets a
        connection error now, which a read unit retries elsewhere when that is safe."""
        lent = self._lent[host]
        conns = list(lent)
        for conn in conns:
            shutdown_socket(conn, still=lambda c=conn: c in lent)
        if conns:
            logger.warning(
                "host_aborted host=%s connections=%d: in-flight work on it fails over",
                host.label,
                len(conns),
            )

    # -- fork -------------------------------------------------------------------------

    def _check_pid(self) -> None:
        # Forks through os.fork() (multiprocessing, gunicorn, Celery's billiard) run
        # the at-fork hook; this catches the others when a child opens the balancer.
        if self._pid != os.getpid():
            self._after_fork()

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's pools, prober and connections
        without closing them or sending anything on their sockets (the parent still
        uses them); fresh ones start on first use."""
        self._pid = os.getpid()
        for host in self._router.hosts.values():
            host.after_fork()
        inherited: list[Any] = [conn for conns in self._lent.values() for conn in conns]
        self._lent = {h: set() for h in self._router.hosts.values()}
        self._fallback_lock = threading.Lock()
        self._fallback_reads, self._fallback_conns = {}, {}
        inherited.extend(self._inherited_resources())
        for item in inherited:
            release_inherited(item)
        _INHERITED.extend(inherited)

    def _inherited_resources(self) -> list[Any]:
        """What the subclass keeps per process (pools, prober); it resets itself."""
        raise NotImplementedError

    def _pool_kwargs(self, host: Host) -> dict[str, Any]:
        s = self.settings
        return {
            "conninfo": host.dsn.conninfo,
            "min_size": s.pool_min_size,
            "max_size": s.pool_max_size,
            "kwargs": {
                "autocommit": True,
                "application_name": s.application_name,
                "connect_timeout": max(1, round(s.connect_timeout)),
                # a prepared statement lives on one server connection: not through a
                # pooler in transaction mode
                **({"prepare_threshold": None} if s.transaction_pooling else {}),
                **tcp_options(host.dsn.conninfo),
            },
            "open": False,
            "timeout": s.connect_timeout,
            "name": host.label,
        }


#: Every balancer of the process, for the fork hook.
_BALANCERS: weakref.WeakSet[BalancerBase] = weakref.WeakSet()
#: What forked children inherited: kept, never used, never finalised (a finaliser
#: could send a Terminate message on a socket the parent still uses).
_INHERITED: list[Any] = []


def _after_fork_in_child() -> None:
    for lb in list(_BALANCERS):
        lb._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _socket_of(conn: Any) -> int | None:
    pgconn = getattr(conn, "pgconn", None)
    if pgconn is None or getattr(conn, "closed", True):
        return None
    try:
        fd = pgconn.socket
    except psycopg.Error:
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def shutdown_socket(conn: Any, still: Any = None) -> None:
    """Shut a connection's socket down (both ways): a thread or task blocked on it
    sees the connection lost at once, and nothing more is sent to the server.

    No lock with the threads that use ``conn``: the descriptor is duplicated first,
    and shut down only if the connection is still open (and ``still()`` holds)
    afterwards. A connection is never reopened, so then the duplicate is its socket,
    not a descriptor number that a close and a new socket could have reused."""
    fd = _socket_of(conn)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            if not conn.closed and (still is None or still()):
                sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


def release_inherited(item: Any) -> None:
    """Make an inherited connection (or every connection of an inherited pool or
    prober) point at /dev/null, so that nothing the child does, finalisers included,
    reaches the parent's socket, and the child does not keep it open."""
    conns: list[Any]
    if hasattr(item, "pgconn"):
        conns = [item]
    else:
        conns = list(getattr(item, "_pool", ()) or ())
        conns.extend(getattr(item, "connections", {}).values())
    for conn in conns:
        fd = _socket_of(conn)
        if fd is None:
            continue
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)


def record_commit(route: DatabaseRoute, row: Any) -> None:
    """The current context committed on ``route``'s primary; ``row`` holds the WAL
    position read after the commit (none: the position is unknown, and reads go to
    the primary until a probe bounds it, see :meth:`Router.required`). Every database
    sharing that primary advances."""
    position = parse_lsn(row[0]) if row and row[0] else UNKNOWN_POSITION
    if position != UNKNOWN_POSITION:
        route.primary.note_replay_lsn(position)  # no need to wait for the next probe
    record_write(primary_token(route, position))


def bound_positions(router: Router, positions: dict[str, int]) -> CausalToken:
    """A token of ``positions`` (database -> a position of its primary's history, asked
    just now), each bound to its primary's origin when known."""
    origins: dict[str, str] = {}
    for name in positions:
        origin = router.databases[name].primary.origin
        if origin is not None:
            origins[name] = origin
    return CausalToken(positions, origins)


def primary_token(route: DatabaseRoute, position: int) -> CausalToken:
    """``position`` of ``route``'s primary for every database sharing that primary,
    bound to the primary's history (timeline and system identifier) when known."""
    names = route.shares_primary_with
    origin = route.primary.origin
    if origin is None or position == UNKNOWN_POSITION:
        return CausalToken(dict.fromkeys(names, position))
    return CausalToken(dict.fromkeys(names, position), dict.fromkeys(names, origin))


def log_fallback(host: Host, exc: BaseException, reason: str) -> None:
    if WATCH.on:
        notify(Fallback(host.label, reason))
    logger.warning(
        "db_routing_fallback host=%s error=%s reason=%s",
        host.label,
        type(exc).__name__,
        reason,
    )


def log_no_replica_caught_up(route: DatabaseRoute, need: int) -> None:
    """DEBUG ``no_replica_caught_up``: a read with a token went to the primary."""
    if routing_logger.isEnabledFor(logging.DEBUG):
        routing_logger.debug(
            "no_replica_caught_up database=%s need=%s replicas=%d",
            route.name,
            format_lsn(need) if need != UNKNOWN_POSITION else "unknown",
            len(route.read_set),
        )


def log_routed(host: Host, reason: str, database: str) -> None:
    if routing_logger.isEnabledFor(logging.DEBUG):
        routing_logger.debug("routed_to=%s reason=%s database=%s", host.label, reason, database)


#: What checking out a connection can raise; only OperationalError says the host is sick.
CHECKOUT_ERRORS = (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, psycopg.OperationalError)


def bare(name: str) -> str:
    """``schema.name`` -> ``name``: what the catalog queries match."""
    return name.rpartition(".")[2]


def catalog_of(route: DatabaseRoute) -> Catalog:
    return Catalog(route.functions, route.relations, route.operators)


def store_relations(route: DatabaseRoute, names: Sequence[str], rows: Sequence[Any]) -> None:
    """Cache RELATIONS_SQL rows under each name as written (none found: empty)."""
    for name in names:
        bare = name.rpartition(".")[2]
        route.relations[name] = tuple(
            (str(nsp), str(kind), str(persistence), None if view is None else str(view))
            for relname, nsp, kind, persistence, view in rows
            if relname == bare
        )


def store_operators(route: DatabaseRoute, names: Sequence[str], rows: Sequence[Any]) -> None:
    """Cache OPERATORS_SQL rows under each name as written (none found: empty)."""
    for name in names:
        bare = name.rpartition(".")[2]
        route.operators[name] = tuple(
            (str(nsp), str(function), str(volatility))
            for oprname, nsp, function, volatility, _ in rows
            if oprname == bare
        )
    warn_suspects(route, [(str(r[2]), r[4]) for r in rows])


def warn_suspects(route: DatabaseRoute, functions: Sequence[tuple[str, Any]]) -> None:
    """Warn about functions declared STABLE or IMMUTABLE whose body calls a lock or
    sequence function (they route to replicas as declared: the user's to fix)."""
    for name, suspect in functions:
        if suspect:
            logger.warning(
                "function_volatility_suspect database=%s function=%s: declared STABLE or"
                " IMMUTABLE but its body calls an advisory lock or sequence function; a"
                " standby would take the lock or refuse the call. Declare it VOLATILE or"
                " list it in write_functions",
                route.name,
                name,
            )


def function_volatility(names: Sequence[str], rows: Sequence[Any]) -> dict[str, str]:
    """The worst volatility of each requested function name ("" if none exists).

    An unqualified name counts every schema's overloads, a qualified one only its own:
    when in doubt the answer is the more volatile one, which routes to the primary."""
    result: dict[str, str] = {}
    for name in names:
        schema, _, bare = name.rpartition(".")
        worst = ""
        for proname, nspname, volatility, *_ in rows:
            if proname != bare or (schema and nspname != schema):
                continue
            if not worst or _VOLATILITY_ORDER.get(volatility, 2) > _VOLATILITY_ORDER[worst]:
                worst = volatility if volatility in _VOLATILITY_ORDER else "v"
        result[name] = worst
    return result


def query_text(query: Any) -> str:
    """The SQL text of what psycopg accepts as a query (str, bytes, sql.Composable)."""
    if isinstance(query, str):
        return query
    if isinstance(query, (bytes, bytearray, memoryview)):
        return bytes(query).decode("utf-8", "replace")
    as_string = getattr(query, "as_string", None)
    if as_string is not None:
        text: str = as_string(None)
        return text
    raise TypeError(f"a query must be a string or a psycopg.sql object, got {type(query).__name__}")
