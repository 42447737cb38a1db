"""The asyncio load balancer. ``_balancer_sync.py`` is generated from this file by
``tools/gen_sync.py``: edit this one, then run ``make sync``.

A read unit (``lb.read()``) checks out a connection from the pool of a replica that
the router proves fresh enough, or checks one replica directly, or waits, or uses the
primary. The connection it yields retries a statement once, on another host, when the
replica fails with a connection error or a recovery conflict. A write unit
(``lb.write()``) runs one transaction on the primary and, on commit, advances the
context's causal token to the primary's WAL insert position in the same round trip.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence  # async-only

# sync-only: from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolClosed

from pgreplica._routing_async import AsyncRoutingConnection
from pgreplica._units_async import (
    AsyncReadConnection,
    AsyncReadCursor,
    _AsyncReadUnit,
    _AsyncWriteUnit,
)
from pgreplica.balancer import (
    CHECK_SQL,
    CHECKOUT_ERRORS,
    FUNCTIONS_SQL,
    OPERATORS_SQL,
    POLL_FIRST,
    POLL_MAX,
    POOL_ERRORS,
    RELATIONS_SQL,
    UNKNOWN_POSITION,
    BalancerBase,
    DatabaseRoute,
    bare,
    build_settings,
    catalog_of,
    function_volatility,
    is_connection_error,
    log_fallback,
    log_no_replica_caught_up,
    query_text,
    refused_classification,
    store_operators,
    store_relations,
    warn_suspects,
)
from pgreplica.config import Settings
from pgreplica.errors import HostUnavailable, PgReplicaError, PrimaryUnavailable
from pgreplica.health import Host, error_reason

# sync-only: from pgreplica.health import ProberThread
from pgreplica.lsn import parse_lsn, replayed_through
from pgreplica.observe import WATCH, CatchUpWait, notify
from pgreplica.sql import (
    MAX_VIEW_DEPTH,
    PRIMARY,
    Classification,
    Missing,
    classify,
    resolve_catalog,
)

__all__ = ["AsyncLoadBalancer", "AsyncReadConnection", "AsyncReadCursor"]  # re-exported

AConn = AsyncConnection[Any]
_Connect = Callable[[Host], Awaitable[AConn]]  # async-only
_Release = Callable[[Host, AConn], Awaitable[None]]  # async-only
# sync-only: _Connect = Callable[[Host], AConn]
# sync-only: _Release = Callable[[Host, AConn], None]
#: Reads on the primary that are not fallbacks: fallback_limit does not count them.
_NOT_FALLBACK = frozenset({"primary_scope", "no_replicas"})
_FALLBACK_POLL = 0.002
_CLASSIFIED_MAX = 8192
#: How long closing a down host's pool waits for its workers before failing waiters.
_WORKERS_STOP = 0.1


class AsyncLoadBalancer(BalancerBase):
    """Sends reads to caught-up replicas and writes to the primary (asyncio).

    ``AsyncLoadBalancer(primary=..., replicas=[...], **settings)`` or
    :meth:`from_config`. Pools and the prober start on first use or on :meth:`open`.
    """

    def __init__(
        self,
        primary: str | None = None,
        replicas: Sequence[str] = (),
        *,
        config: str | os.PathLike[str] | Mapping[str, Any] | Settings | None = None,
        **options: Any,
    ) -> None:
        super().__init__(build_settings(config, primary, replicas, options))
        self._pools: dict[Host, AsyncConnectionPool[AConn]] = {}
        self._open_lock = asyncio.Lock()
        self._started = False  # pools open and prober running
        self._opened = False  # ... and the first probes done (or waited for)
        self._closed = False
        self._prober = self._make_prober()
        self._prober_runner: Any = None
        self._background: set[asyncio.Future[None]] = set()  # async-only
        # sync-only: self._renew_lock = threading.Lock()

    def _inherited_resources(self) -> list[Any]:
        """After a fork: hand over the parent's pools and prober, start afresh."""
        inherited: list[Any] = [*self._pools.values(), self._prober, self._prober_runner]
        inherited.extend(self._background)  # async-only
        self._background = set()  # async-only
        self._pools = {}
        self._open_lock = asyncio.Lock()
        # sync-only: self._renew_lock = threading.Lock()
        self._started = self._opened = False
        self._prober = self._make_prober()
        self._prober_runner = None
        return inherited

    @classmethod
    def from_config(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any] | Settings | None = None,
        **options: Any,
    ) -> AsyncLoadBalancer:
        """From a TOML file, a mapping, a Settings object, or (None) the environment."""
        return cls(config=source, **options)

    async def open(self, *, wait: bool = True) -> None:
        """Open the pools and start the prober; with ``wait``, let the first probes
        finish (at most ``connect_timeout``) so the first reads can use replicas."""
        self._check_pid()
        if self._opened:
            return
        async with self._open_lock:
            if self._closed:
                raise PgReplicaError("the load balancer is closed")
            if not self._started:
                for host in self._router.hosts.values():
                    pool: AsyncConnectionPool[AConn] = AsyncConnectionPool(
                        **self._pool_kwargs(host)
                    )
                    await pool.open(wait=False)
                    self._pools[host] = pool
                    host.on_down = self._host_down
                    host.on_up = self._renew_pool
                self._start_prober()
                self._started = True
        if wait:
            # Every caller waits here, not only the one that started the prober: until
            # `_opened` is set, concurrent first users all come through this path.
            deadline = time.monotonic() + self.settings.connect_timeout
            while not self._prober.first_round.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(POLL_FIRST)
        self._opened = True

    async def close(self) -> None:
        """Stop the prober and close every pool."""
        async with self._open_lock:
            if self._closed:
                return
            self._closed = True
            self._opened = False  # later use raises "closed" instead of a KeyError
            if self._prober_runner is not None:
                await self._stop_prober()
            await self._wait_background()
            for pool in list(self._pools.values()):
                await pool.close()
            self._pools.clear()

    def _host_down(self, host: Host) -> None:
        """The prober marked ``host`` down. Its pool is closed, which fails every
        caller waiting for one of its connections at once (writes fail fast, instead
        of waiting out ``connect_timeout``). A replica's lent connections are aborted;
        the primary's are not (writes in flight on a slow primary are left to finish).
        A fresh pool comes when the host is back."""
        self._router.refresh()  # out of the read sets before its callers fail over
        if host.configured_primary:
            self._retire_pool(host)
            return
        self._retire_pool(host)
        self._abort_lent(host)

    # async-only-begin
    async def _wait_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _in_background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _retire_pool(self, host: Host) -> None:
        pool = self._pools.get(host)
        if pool is not None and not host.up:  # not if it came back meanwhile
            # The pool fails its waiting callers only once its workers stop, and one may
            # be connecting to the hung server for connect_timeout: do not wait for it.
            self._in_background(pool.close(timeout=_WORKERS_STOP))

    async def _add_pool(self, host: Host) -> None:
        pool: AsyncConnectionPool[AConn] = AsyncConnectionPool(**self._pool_kwargs(host))
        await pool.open(wait=False)
        self._pools[host] = pool

    def _remove_pool(self, host: Host) -> None:
        # Connections lent from it are closed when they come back: work in flight ends.
        pool = self._pools.pop(host, None)
        if pool is not None:
            self._in_background(pool.close(timeout=_WORKERS_STOP))

    def _start_prober(self) -> None:
        self._prober_runner = asyncio.ensure_future(self._prober.run())

    async def _stop_prober(self) -> None:
        self._prober.stop()
        await self._prober_runner

    def _drain(self, host: Host) -> None:
        # Connections opened before the host went down are dead or suspect: drop them,
        # so that they do not fail (and mark the host down again) once it is back.
        pool = self._pools.get(host)
        if pool is not None:
            self._in_background(pool.drain())

    def _renew_pool(self, host: Host) -> None:
        # A host back up: a new pool connects at once, where the old one could still be
        # waiting out its own reconnection backoff (up to minutes) while reads time out.
        self._in_background(self._replace_pool(host))

    async def _replace_pool(self, host: Host) -> None:
        old = self._pools.get(host)
        if old is None or self._closed:
            return
        pool: AsyncConnectionPool[AConn] = AsyncConnectionPool(**self._pool_kwargs(host))
        await pool.open(wait=False)
        if self._closed or self._pools.get(host) is not old:
            # Closed while opening (close() no longer sees this pool), or replaced.
            await pool.close()
            return
        self._pools[host] = pool
        await old.close()

    # async-only-end
    # sync-only: def _renew_pool(self, host: Host, only: Any = None) -> None:
    # sync-only:     with self._renew_lock:
    # sync-only:         old = self._pools.get(host)
    # sync-only:         if old is None or self._closed or (only is not None and old is not only):
    # sync-only:             return
    # sync-only:         pool: ConnectionPool[AConn] = ConnectionPool(**self._pool_kwargs(host))
    # sync-only:         pool.open(wait=False)
    # sync-only:         self._pools[host] = pool
    # sync-only:     # Closing joins the pool's workers: not in the prober's thread.
    # sync-only:     threading.Thread(target=old.close, name="pgreplica-pool-close").start()
    # sync-only:
    # sync-only: def _add_pool(self, host: Host) -> None:
    # sync-only:     pool: ConnectionPool[AConn] = ConnectionPool(**self._pool_kwargs(host))
    # sync-only:     pool.open(wait=False)
    # sync-only:     self._pools[host] = pool
    # sync-only:
    # sync-only: def _remove_pool(self, host: Host) -> None:
    # sync-only:     # Connections lent from it are closed when they come back: work in flight
    # sync-only:     # ends. Closing joins the pool's workers: not in the prober's thread.
    # sync-only:     pool = self._pools.pop(host, None)
    # sync-only:     if pool is not None:
    # sync-only:         threading.Thread(
    # sync-only:             target=pool.close, args=(_WORKERS_STOP,), name="pgreplica-pool-close"
    # sync-only:         ).start()
    # sync-only:
    # sync-only: def _drain(self, host: Host) -> None:
    # sync-only:     pool = self._pools.get(host)
    # sync-only:     if pool is not None:
    # sync-only:         pool.drain()
    # sync-only:
    # sync-only: def _retire_pool(self, host: Host) -> None:
    # sync-only:     # Closing fails the waiting callers and joins the pool's workers (one may
    # sync-only:     # be connecting to the hung server): not in the prober's thread.
    # sync-only:     pool = self._pools.get(host)
    # sync-only:     if pool is not None and not host.up:  # not if it came back meanwhile
    # sync-only:         threading.Thread(
    # sync-only:             target=pool.close, args=(_WORKERS_STOP,), name="pgreplica-pool-close"
    # sync-only:         ).start()
    # sync-only:
    # sync-only: def _wait_background(self) -> None:
    # sync-only:     pass
    # sync-only:
    # sync-only: def _start_prober(self) -> None:
    # sync-only:     self._prober_runner = ProberThread(self._prober)
    # sync-only:     self._prober_runner.start()
    # sync-only:
    # sync-only: def _stop_prober(self) -> None:
    # sync-only:     self._prober_runner.stop()

    async def __aenter__(self) -> AsyncLoadBalancer:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def read(
        self,
        database: str | None = None,
        *,
        max_staleness: float | None = None,
        max_wait: float | None = None,
    ) -> _AsyncReadUnit:
        """A connection for reads: a replica that has replayed the context's token,
        else the primary. ``max_staleness`` (seconds) ignores the token and accepts any
        replica at most that far behind; ``max_wait`` waits for a replica to catch up
        before using the primary (default: the ``max_wait`` setting)."""
        return _AsyncReadUnit(self, database, max_staleness, max_wait)

    def write(self, database: str | None = None) -> _AsyncWriteUnit:
        """A connection to the primary in a transaction; the commit advances the token."""
        return _AsyncWriteUnit(self, database)

    def connection(self, database: str | None = None) -> AsyncRoutingConnection:
        """A psycopg-compatible connection that routes every statement (see
        ``docs/routing-connection.md``): reads to caught-up replicas, writes and
        transactions to the primary, read-only transactions to a replica."""
        return AsyncRoutingConnection(self, database)

    async def classify(self, sql: Any, database: str | None = None) -> Classification:
        """Like :func:`pgreplica.sql.classify`, refined with this database's catalog
        (looked up once per name and cached): the volatility of the user functions a
        statement calls, the functions behind user-defined operators, unlogged tables,
        and what a view's definition does; then the ``read_only_functions`` /
        ``write_functions`` settings, and the statements a standby refused before."""
        route = self._router.route(database)
        text = query_text(sql)
        cached = route.classified.get(text)
        if cached is not None:
            return cached
        static = classify(text)
        if route.refused and text in route.refused:
            result = refused_classification(static)
        elif not (static.functions or static.relations or static.operators):
            result = static
        else:
            settings = self.settings
            read_only = frozenset(settings.read_only_functions)
            write = frozenset(settings.write_functions)
            resolved = resolve_catalog(static, catalog_of(route), read_only, write)
            for _ in range(MAX_VIEW_DEPTH + 2):  # each view level may name new objects
                if isinstance(resolved, Classification):
                    break
                await self._load_catalog(route, resolved)
                resolved = resolve_catalog(static, catalog_of(route), read_only, write)
            if not isinstance(resolved, Classification):
                resolved = Classification(PRIMARY, "catalog_unresolved", static.kind)
            result = resolved
        if len(route.classified) >= _CLASSIFIED_MAX:
            route.classified.clear()
        route.classified[text] = result
        return result

    def refresh_functions(self, database: str | None = None) -> None:
        """Forget what the catalog said (function volatility, operators, relations and
        view definitions), after ``CREATE OR REPLACE FUNCTION``, ``CREATE VIEW`` and the
        like."""
        route = self._router.route(database)
        route.functions.clear()
        route.relations.clear()
        route.operators.clear()
        route.classified.clear()

    async def _load_catalog(self, route: DatabaseRoute, missing: Missing) -> None:
        hosts = [route.primary, *route.read_set]
        last_error: BaseException | None = None
        for host in hosts:
            try:
                conn = await self._checkout(host)
            except CHECKOUT_ERRORS as exc:
                last_error = exc
                continue
            try:
                if missing.functions:
                    names = missing.functions
                    cur = await conn.execute(FUNCTIONS_SQL, ([bare(n) for n in names],))
                    rows = await cur.fetchall()
                    route.functions.update(function_volatility(names, rows))
                    warn_suspects(route, [(f"{r[1]}.{r[0]}", r[3]) for r in rows])
                if missing.relations:
                    names = missing.relations
                    cur = await conn.execute(RELATIONS_SQL, ([bare(n) for n in names],))
                    store_relations(route, names, await cur.fetchall())
                if missing.operators:
                    names = missing.operators
                    cur = await conn.execute(OPERATORS_SQL, ([bare(n) for n in names],))
                    store_operators(route, names, await cur.fetchall())
            except psycopg.Error as exc:
                last_error = exc
                continue
            finally:
                await self._checkin(host, conn)
            return
        raise HostUnavailable(
            f"cannot read the catalog of {route.name!r} to classify a statement"
            f" ({error_reason(last_error) if last_error else 'no host'})",
            reason="catalog_unavailable",
        )

    # -- internals shared by the units -----------------------------------------------

    async def _checkout(self, host: Host) -> AConn:
        if not self._opened:
            await self.open()
        pool = self._pools[host]
        try:
            conn = await pool.getconn(timeout=self.settings.connect_timeout)
        except PoolClosed:
            if self._closed or not host.up:
                raise
            if self._pools.get(host) is pool:
                # Up, but its pool was closed when it went down (or closed late, after
                # the renewal): open a fresh one now rather than fail until next time.
                await self._replace_pool(host)  # async-only
                # sync-only: self._renew_pool(host, pool)
            # The host came back and its pool was renewed under us: use the new one.
            conn = await self._pools[host].getconn(timeout=self.settings.connect_timeout)
        self._lend(host, conn)
        if not host.up:
            # Marked down while this connection was handed out: the abort may have
            # missed it, and the server may not answer.
            await self._checkin(host, conn)
            raise PoolClosed(f"{host.label} is down")
        return conn

    async def _checkin(self, host: Host, conn: AConn) -> None:
        # Back to the pool it came from: a host's pool may have been renewed meanwhile
        # (a closed pool closes the connection).
        self._unlend(host, conn)
        pool = getattr(conn, "_pool", None)
        if pool is None:
            await conn.close()
        else:
            await pool.putconn(conn)

    def _host_failed(self, host: Host, exc: BaseException) -> None:
        """A request saw ``host`` fail with a connection error."""
        if isinstance(exc, POOL_ERRORS):
            return  # no connection in time: a busy pool, not proof of a sick host
        if host.configured_primary:
            # Drop the pool's connections (they may predate a restart) but let the
            # prober decide whether the primary is down: one stale connection must not
            # turn into failing every write for a backoff period.
            self._drain(host)
        elif host.record_failure(type(exc).__name__, error_reason(exc), probe=False):
            self._router.refresh()

    async def _replay_lsn(self, host: Host, conn: AConn) -> int:
        """Ask a replica directly how far it has replayed (one round trip)."""
        cur = await conn.execute(CHECK_SQL)
        row = await cur.fetchone()
        position = replayed_through(parse_lsn(row[0])) if row and row[0] else 0
        host.note_replay_lsn(position)
        return position

    async def _connect_read(
        self,
        route: DatabaseRoute,
        need: int,
        max_staleness: float | None,
        max_wait: float,
        excluded: set[Host],
    ) -> tuple[Host, AConn, str]:
        """Pick and check out the connection for a read: (host, connection, reason)."""
        host, conn, reason = await self._pick_read(route, need, max_staleness, max_wait, excluded)
        if conn is None:
            conn = await self._primary_for_read(route, reason)
        return host, conn, reason

    async def _pick_read(
        self,
        route: DatabaseRoute,
        need: int,
        max_staleness: float | None,
        max_wait: float,
        excluded: set[Host],
    ) -> tuple[Host, AConn | None, str]:
        """:meth:`_connect_read`, except that a read that falls back to the primary
        gets no connection (None): the caller makes its own, or holds one already.

        Each replica is tried at most once per call (``excluded`` grows), so a read
        never loops over hosts whose pools cannot hand out a connection."""
        router = self._router
        candidates = router.caught_up(route, need, max_staleness)
        if excluded:
            candidates = [h for h in candidates if h not in excluded]
        while candidates:
            host = candidates[router.next_index(len(candidates))]
            try:
                return host, await self._checkout(host), "replica"
            except CHECKOUT_ERRORS as exc:
                self._host_failed(host, exc)
                log_fallback(host, exc, "connect_failed")
                excluded.add(host)
                candidates = [h for h in candidates if h is not host]
        if need and max_staleness is None and need != UNKNOWN_POSITION:
            found = await self._await_replica(
                route, need, max_wait, excluded, self._checkout, self._checkin
            )
            if found is not None:
                return found[0], found[1], "replica_checked"
        if need == UNKNOWN_POSITION:
            reason = "position_unprovable"
        else:
            reason = "replicas_behind" if route.read_set else "no_healthy_replica"
        if need:
            log_no_replica_caught_up(route, need)
        return route.primary, None, reason

    async def _await_replica(
        self,
        route: DatabaseRoute,
        need: int,
        max_wait: float,
        excluded: set[Host],
        connect: _Connect,
        release: _Release,
    ) -> tuple[Host, AConn] | None:
        """A replica that has replayed ``need``, asked directly, or None.

        Every usable replica the cache cannot prove caught up is asked once (one round
        trip on a replica, none on the primary). With ``max_wait`` (the adaptive
        catch-up wait), the replicas expected to replay ``need`` within ``max_wait``
        (:meth:`Host.hopeful`) are asked again, on the connections held from the
        first check, with a short backoff until one has or ``max_wait`` is over; none
        expected means no wait at all. A replica that did not catch up in time is not
        waited for again until its next probe.
        ``connect``/``release`` get and give back a host's connection (the pool's, or
        the one a routing connection holds); ``excluded`` grows with failing hosts."""
        router = self._router
        started = time.monotonic()
        held: list[tuple[Host, AConn]] = []
        found: tuple[Host, AConn] | None = None
        delay = POLL_FIRST
        waited = False
        try:
            for host in router.behind(route, need, excluded):
                try:
                    conn = await connect(host)
                except CHECKOUT_ERRORS as exc:
                    self._host_failed(host, exc)
                    excluded.add(host)
                    continue
                held.append((host, conn))
                found = await self._ask(held, host, conn, need, excluded, release)
                if found is not None:
                    break
            if found is None and max_wait > 0:
                # after the first check, keep asking only the hopeful replicas
                for host, conn in [(h, c) for h, c in held if not h.hopeful(max_wait)]:
                    held.remove((host, conn))
                    await release(host, conn)
            while found is None and held and max_wait > 0:
                now = time.monotonic()
                if now >= started + max_wait:
                    for host, _ in held:
                        host.missed_at = now
                    break
                waited = True
                await asyncio.sleep(min(delay, started + max_wait - now))
                delay = min(delay * 2, POLL_MAX)
                for host, conn in list(held):
                    found = await self._ask(held, host, conn, need, excluded, release)
                    if found is not None:
                        break
            if found is not None:
                held.remove(found)
            return found
        finally:
            for host, conn in held:
                await release(host, conn)
            if waited and WATCH.on:
                notify(
                    CatchUpWait(
                        route.replica_config_name, time.monotonic() - started, found is not None
                    )
                )

    async def _ask(
        self,
        held: list[tuple[Host, AConn]],
        host: Host,
        conn: AConn,
        need: int,
        excluded: set[Host],
        release: _Release,
    ) -> tuple[Host, AConn] | None:
        """``(host, conn)`` if ``host`` has replayed ``need``. A replica whose check
        fails is given back (and dropped from ``held``): not this replica, this time (a
        cancelled check, a recovery conflict); a lost connection marks it failed."""
        try:
            if await self._replay_lsn(host, conn) >= need:
                return host, conn
        except psycopg.Error as exc:
            if is_connection_error(exc):
                self._host_failed(host, exc)
                excluded.add(host)
            held.remove((host, conn))
            await release(host, conn)
        return None

    async def _primary_for_read(self, route: DatabaseRoute, reason: str) -> AConn:
        """The primary's connection for a read no replica serves; one that falls back
        there (not ``lb.primary()``, not a database without replicas) counts against
        ``fallback_limit``, and over it waits up to ``fallback_wait`` for a place."""
        if not self.settings.fallback_limit or reason in _NOT_FALLBACK:
            return await self._primary_conn(route, read_reason=reason)
        await self._fallback_place(route, reason)
        try:
            conn = await self._primary_conn(route, read_reason=reason)
        except BaseException:
            self._fallback_done(route.name)
            raise
        self._fallback_conns[conn] = route.name
        return conn

    async def _fallback_place(self, route: DatabaseRoute, reason: str) -> None:
        """Take a place among ``fallback_limit`` fallback reads of ``route`` on its
        primary, waiting up to ``fallback_wait`` for one; else raise HostUnavailable
        (reason ``fallback_limit``). :meth:`_fallback_done` gives it back."""
        deadline = time.monotonic() + self.settings.fallback_wait
        while not self._fallback_begin(route.name):
            now = time.monotonic()
            if now >= deadline:
                raise self._fallback_refused(route, reason)
            await asyncio.sleep(min(_FALLBACK_POLL, deadline - now))

    async def _primary_conn(self, route: DatabaseRoute, *, read_reason: str | None = None) -> AConn:
        """A connection to the primary, for a write or (``read_reason``) a read no
        replica could take. Every path uses this one verdict: a primary that the prober
        holds down, or whose pool cannot hand out a connection, raises at once
        (:class:`PrimaryUnavailable` for writes, :class:`HostUnavailable` for reads)."""
        primary = route.primary
        problem = route.primary_problem
        if problem is not None:
            what = (
                "no host claims the primary role (a failover?)"
                if problem == "no_primary"
                else "more than one host claims the primary role (split brain)"
            )
            if read_reason is None:
                raise PrimaryUnavailable(
                    f"no primary for {route.name!r}: {what}; writes fail fast until one"
                    " primary is found",
                    host=primary.label,
                    reason=problem,
                )
            raise HostUnavailable(
                f"no host can serve this read of {route.name!r}:"
                f" {read_reason.replace('_', ' ')} and {what}",
                host=primary.label,
                reason=problem,
            )
        if not primary.up:
            if read_reason is None:
                raise PrimaryUnavailable(
                    f"primary {primary.label} of {route.name!r} is down ({primary.last_error});"
                    " writes fail fast until a probe succeeds",
                    host=primary.label,
                    reason="primary_down",
                )
            raise HostUnavailable(
                f"no host can serve this read of {route.name!r}:"
                f" {read_reason.replace('_', ' ')} and the primary {primary.label} is down",
                host=primary.label,
                reason=read_reason,
            )
        try:
            return await self._checkout(primary)
        except CHECKOUT_ERRORS as exc:
            self._host_failed(primary, exc)
            if read_reason is None:
                raise PrimaryUnavailable(
                    f"primary {primary.label} of {route.name!r} is unavailable"
                    f" ({error_reason(exc)})",
                    host=primary.label,
                    reason="primary_unavailable",
                ) from exc
            raise HostUnavailable(
                f"no host can serve this read of {route.name!r}: the primary"
                f" {primary.label} failed ({error_reason(exc)})",
                host=primary.label,
                reason="primary_unavailable",
            ) from exc
