"""Per-host health: probe results, a circuit breaker, and the background prober.

The prober is written once, for asyncio. An :class:`~pgreplica.AsyncLoadBalancer` runs
it as a task in its own loop; a sync :class:`~pgreplica.LoadBalancer` runs the same
code in one background thread with a private loop. Requests never wait for a probe:
they read the last published results (:class:`Host` attributes and the router's read
sets), which the prober replaces after every probe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgreplica.config import Dsn
from pgreplica.errors import TokenError
from pgreplica.lsn import origin_of, parse_lsn, replayed_through

__all__ = ["Backoff", "BreakerState", "Host", "HostStatus", "Prober", "ProberThread"]

logger = logging.getLogger("pgreplica.health")

PROBE_SQL = """\
SELECT pg_is_in_recovery(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_insert_lsn() END)::text,
       pg_last_wal_receive_lsn()::text,
       EXTRACT(EPOCH FROM (now() - pg_last_xact_replay_timestamp()))::float8,
       (CASE WHEN pg_is_in_recovery()
             THEN (SELECT received_tli FROM pg_stat_wal_receiver)
             ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int
        END),
       (CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_flush_lsn() END)::text"""
#: Asked once per probe connection: which cluster the server belongs to.
SYSTEM_SQL = "SELECT system_identifier::text FROM pg_control_system()"
#: Read when a primary's timeline changes: where each earlier timeline ended.
HISTORY_SQL = "SELECT pg_read_file(%s)"


class BreakerState(enum.Enum):
    CLOSED = "up"
    OPEN = "down"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter; pure, so it is testable without sleeping.

    The n-th consecutive failure waits ``min(maximum, initial * multiplier**(n-1))``
    shortened by up to ``jitter`` of itself, so hosts marked down together do not all
    come back to be probed at the same instant.
    """

    initial: float = 0.2
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay(self, failures: int, rand: float) -> float:
        exponent = max(0, failures - 1)
        base = self.maximum if exponent > 64 else self.initial * self.multiplier**exponent
        return min(self.maximum, base) * (1.0 - self.jitter * rand)


@dataclass(frozen=True)
class HostStatus:
    """A snapshot of one host for ``lb.status()`` and ``pgreplica status``."""

    host: str
    role: str
    """``primary``, ``replica``, or ``promoted`` (a replica that left recovery)."""
    state: str
    """``up``, ``down``, ``half_open``, ``lagging`` or ``unknown`` (not probed yet)."""
    databases: tuple[str, ...]
    replay_lsn: str | None
    lag_bytes: int | None
    lag_seconds: float | None
    last_error: str | None = None


class Host:
    """One server: its last probe results and its circuit breaker.

    ``replay_lsn`` is what the router compares with causal tokens. The prober sets it
    to what the server reported; a direct check on the request path may only raise it
    (:meth:`note_replay_lsn`): both are positions the server had reached, so the value
    never claims more than the server has replayed.
    """

    def __init__(self, dsn: Dsn, *, configured_primary: bool, backoff: Backoff) -> None:
        self.dsn = dsn
        self.label = dsn.label
        self.configured_primary = configured_primary
        """The primary now: fixed by the configuration, or found by probing when
        :attr:`discovered`."""
        self.discovered = False
        """Its role is found by probing (``hosts = [...]``), not configured."""
        self.databases: tuple[str, ...] = ()
        self.backoff = backoff
        self.in_recovery: bool | None = None
        self.replay_lsn = 0
        """Replayed WAL position of a replica; insert position of the primary; 0 for a
        replica out of recovery (what it holds of the old timeline is unknown)."""
        self.receive_lsn: int | None = None
        self.flush_lsn: int | None = None
        """The primary's flushed WAL position: what replicas can have. Its insert
        position may be past a page header that no replica ever replays."""
        self.replay_age: float | None = None
        self.probed_at: float | None = None
        self.probe_started_at = 0.0
        """When the last successful probe was sent: a position it reported was reached
        after that moment (tokens adopted earlier cannot be ahead of it)."""
        self.system_identifier: str | None = None
        """``pg_control_system().system_identifier``: which cluster the server is in."""
        self.timeline: int | None = None
        """The timeline the primary writes (or a replica receives), when known."""
        self.origin: str | None = None
        """``"<timeline>-<system identifier>"`` once both are known: the history a
        position written here belongs to (see :class:`~pgreplica.CausalToken`)."""
        self.history: dict[int, int] = {}
        """Of a server out of recovery: each earlier timeline of its history and the
        position where that timeline ended (its timeline history file), when readable."""
        self.history_timeline = 0
        """The timeline :attr:`history` was read for."""
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.replay_delays: collections.deque[float] = collections.deque(maxlen=3)
        """Of a replica, its last probes' replay delay: 0 when it had replayed all it
        had received, else the age of its last replayed commit (an apply delay, a
        paused or a slow replay). What the adaptive catch-up wait expects of it."""
        self.missed_at = 0.0
        """When a read last waited for this replica in vain: it is not waited for again
        until a probe has started since."""
        self.lagging = False
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.on_down: Callable[[Host], None] | None = None
        """Called when the host goes from up to down (the balancer drains its pool)."""
        self.on_up: Callable[[Host], None] | None = None
        """Called when the host comes back up (the balancer renews its pool)."""
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Host {self.label} {self.state.value}>"

    @property
    def up(self) -> bool:
        return self.state is BreakerState.CLOSED

    @property
    def role(self) -> str:
        if self.configured_primary:
            return "primary"
        return "promoted" if self.in_recovery is False else "replica"

    def note_replay_lsn(self, position: int) -> None:
        """A direct check saw the server at ``position``: raise the cache if lower."""
        if position > self.replay_lsn:
            self.replay_lsn = position

    def expected_delay(self) -> float | None:
        """How long this replica is expected to take to replay a commit made now: the
        median of its last probes' replay delays (one slow probe does not count; a
        replica that keeps lagging does); None when unknown."""
        delays = sorted(self.replay_delays)
        return delays[len(delays) // 2] if delays else None

    def hopeful(self, within: float) -> bool:
        """Worth waiting for: expected to replay a commit made now within ``within``
        seconds (:meth:`expected_delay`; unknown counts as yes), and no read has
        waited for it in vain since its last probe started. The adaptive catch-up wait
        polls these only; a paused or delayed replica is not waited for."""
        if self.missed_at > self.probe_started_at:
            return False
        delay = self.expected_delay()
        return delay is None or delay <= within

    def after_fork(self) -> None:
        """In a forked child: a lock another thread of the parent held stays held."""
        self._lock = threading.Lock()

    def record_probe(
        self,
        in_recovery: bool,
        lsn: int,
        receive_lsn: int | None,
        replay_age: float | None,
        *,
        started_at: float | None = None,
        timeline: int | None = None,
        system_identifier: str | None = None,
        flush_lsn: int | None = None,
    ) -> None:
        with self._lock:
            was = self.state
            promoted = self.in_recovery is True and not in_recovery
            self.in_recovery = in_recovery
            # A replica out of recovery writes its own timeline: its insert position
            # says nothing about what it replayed of the old one, so it proves nothing.
            if in_recovery:
                self.replay_lsn = replayed_through(lsn)
            else:
                self.replay_lsn = lsn if self.configured_primary else 0
            self.receive_lsn = receive_lsn
            self.flush_lsn = flush_lsn
            self.replay_age = replay_age
            if in_recovery and receive_lsn is not None:
                if receive_lsn <= lsn:
                    self.replay_delays.append(0.0)
                elif replay_age is not None:
                    self.replay_delays.append(max(0.0, replay_age))
            self.probed_at = now = time.monotonic()
            self.probe_started_at = now if started_at is None else started_at
            if timeline:
                self.timeline = timeline
            if system_identifier:
                self.system_identifier = system_identifier
            self.origin = origin_of(self.timeline, self.system_identifier)
            self.state = BreakerState.CLOSED
            self.failures = 0
            self.last_error = None
        if was is not BreakerState.CLOSED:
            logger.info("host_online host=%s role=%s", self.label, self.role)
            if self.on_up is not None:
                self.on_up(self)
        if promoted and not self.configured_primary and not self.discovered:
            logger.warning("replica_promoted host=%s: out of the read set", self.label)

    def record_failure(
        self, error_class: str, reason: str, *, rand: float | None = None, probe: bool = True
    ) -> bool:
        """Open the breaker. True when this call took the host from up to down.

        Only the prober's failures lengthen the backoff: failures that requests see
        while the host is already down must not push its next probe further away, or a
        short fault would keep the host out for many seconds after it recovered."""
        with self._lock:
            was = self.state
            if was is BreakerState.OPEN and not probe:
                return False
            self.failures += 1
            wait = self.backoff.delay(self.failures, random.random() if rand is None else rand)
            self.retry_at = time.monotonic() + wait
            self.state = BreakerState.OPEN
            self.last_error = f"{error_class}: {reason}"
        if was is not BreakerState.CLOSED:
            return False
        logger.warning(
            "host_offline host=%s error=%s reason=%s retry_in=%.2fs",
            self.label,
            error_class,
            reason,
            wait,
        )
        if self.on_down is not None:
            self.on_down(self)
        return True

    def begin_half_open(self) -> bool:
        """If the breaker is open and its wait is over, move to half-open: probe once."""
        with self._lock:
            if self.state is BreakerState.OPEN and time.monotonic() >= self.retry_at:
                self.state = BreakerState.HALF_OPEN
                return True
            return False

    def status(self) -> HostStatus:
        if self.probed_at is None and self.state is BreakerState.CLOSED:
            state = "unknown"
        elif self.state is BreakerState.CLOSED and self.lagging:
            state = "lagging"
        else:
            state = self.state.value
        # A host that is down, half-open or not probed yet has no known lag: its replay
        # position is stale (status, metrics and the CLI show none).
        known = state in ("up", "lagging")
        return HostStatus(
            host=self.label,
            role=self.role,
            state=state,
            databases=self.databases,
            replay_lsn=_fmt(self.replay_lsn) if self.replay_lsn else None,
            lag_bytes=self.lag_bytes if known else None,
            lag_seconds=self.lag_seconds if known else None,
            last_error=self.last_error,
        )


def _fmt(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


#: TCP settings for every connection pgreplica opens, unless its DSN sets them: a server
#: whose network path died is noticed in about 11 s on an idle connection (keepalives)
#: and in 10 s when sent data goes unacknowledged (``tcp_user_timeout``, Linux), instead
#: of the operating system's defaults of two hours and about 15 minutes. A server that
#: is hung but reachable still acknowledges: the prober and the catch-up bounds cover it.
TCP_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def tcp_options(conninfo: str) -> dict[str, str]:
    """:data:`TCP_DEFAULTS` that ``conninfo`` does not set itself."""
    given = conninfo_to_dict(conninfo)
    return {k: v for k, v in TCP_DEFAULTS.items() if k not in given}


def error_reason(exc: BaseException) -> str:
    """A short, password-free description of a connection or probe failure."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return f"sqlstate {sqlstate}"
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    # libpq's messages name host and port, never the password; keep them short.
    return first[:160]


class Prober:
    """Probes every host every ``interval`` seconds, each host in its own task.

    A host that does not answer within ``timeout`` is marked down at once, without
    waiting for the stuck query to be cancelled, so a hung server leaves the read set
    within ``interval + timeout``.
    """

    def __init__(
        self,
        hosts: list[Host],
        *,
        interval: float,
        timeout: float,
        connect_timeout: float,
        statement_timeout: float,
        application_name: str,
        on_change: Callable[[], None],
    ) -> None:
        self.hosts = hosts
        self.interval = interval
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = max(1, int(statement_timeout * 1000))
        self.application_name = application_name
        self.on_change = on_change
        self.first_round = threading.Event()
        self._stop = asyncio.Event()
        self._pending_first = set(hosts)
        self.connections: dict[Host, psycopg.AsyncConnection[tuple[object, ...]]] = {}
        """The open probe connection of each host (a forked child releases them)."""
        self.watchers: list[Callable[[], Awaitable[None]]] = []
        """More loops to run with the probes (the DNS lookups of ``replicas_dns``)."""
        self._tasks: dict[Host, asyncio.Future[None]] = {}

    async def run(self) -> None:
        if not self.hosts:
            self.first_round.set()
        for host in self.hosts:
            self._tasks[host] = asyncio.ensure_future(self._probe_loop(host))
        watchers = [asyncio.ensure_future(w()) for w in self.watchers]
        try:
            await self._stop.wait()
        finally:
            tasks = [*self._tasks.values(), *watchers]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def add_host(self, host: Host) -> None:
        """Probe ``host`` from now on (in the prober's event loop)."""
        if host not in self._tasks:
            self.hosts.append(host)
            self._tasks[host] = asyncio.ensure_future(self._probe_loop(host))

    def remove_host(self, host: Host) -> None:
        """Stop probing ``host`` (in the prober's event loop)."""
        task = self._tasks.pop(host, None)
        if task is not None:
            task.cancel()
        if host in self.hosts:
            self.hosts.remove(host)

    def stop(self) -> None:
        self._stop.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or return True early when the prober is stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=max(0.0, seconds))
        return self._stop.is_set()

    async def _probe_loop(self, host: Host) -> None:
        conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        stuck: set[asyncio.Future[object]] = set()
        try:
            while True:
                if host.state is BreakerState.OPEN and not host.begin_half_open():
                    if await self._sleep(min(self.interval, host.retry_at - time.monotonic())):
                        return
                    continue
                conn = await self._probe_once(host, conn, stuck)
                if conn is None:
                    self.connections.pop(host, None)
                else:
                    self.connections[host] = conn
                self.on_change()
                self._first_done(host)
                if await self._sleep(self.interval):
                    return
        finally:
            self.connections.pop(host, None)
            if conn is not None:
                await _close_quietly(conn)
            for future in stuck:
                future.cancel()

    def _first_done(self, host: Host) -> None:
        """Every host has been probed once (whatever the outcome): not a count of
        probes, which a fast host probed twice could reach before a slow one answered."""
        if not self.first_round.is_set():
            self._pending_first.discard(host)
            if not self._pending_first:
                self.first_round.set()

    async def _probe_once(
        self,
        host: Host,
        conn: psycopg.AsyncConnection[tuple[object, ...]] | None,
        stuck: set[asyncio.Future[object]],
    ) -> psycopg.AsyncConnection[tuple[object, ...]] | None:
        given = conn
        try:
            if conn is None or conn.closed:
                conn = await self._connect_bounded(host)
                answered, system = await self._bounded(_system_identifier(conn), host, conn, stuck)
                if not answered:
                    return None
                host.system_identifier = str(system) if system else host.system_identifier
            started_at = time.monotonic()
            answered, row = await self._bounded(
                _query(conn, self.statement_timeout_ms), host, conn, stuck
            )
            if not answered:
                return None
            assert isinstance(row, tuple)
            in_recovery, lsn_text, receive_text, replay_age, timeline, flush_text = row
            host.record_probe(
                bool(in_recovery),
                parse_lsn(str(lsn_text)) if lsn_text else 0,
                parse_lsn(str(receive_text)) if receive_text else None,
                float(str(replay_age)) if replay_age is not None else None,
                started_at=started_at,
                timeline=int(str(timeline)) if timeline is not None else None,
                flush_lsn=parse_lsn(str(flush_text)) if flush_text else None,
            )
            if not in_recovery and host.timeline and host.timeline != host.history_timeline:
                tli = host.timeline
                answered, history = await self._bounded(_history(conn, tli), host, conn, stuck)
                if not answered:
                    return None
                assert isinstance(history, dict)
                host.history, host.history_timeline = history, tli
            return conn
        except asyncio.CancelledError:
            # Stopping: a connection opened in this round is nobody else's to close.
            if conn is not None and conn is not given:
                _abandon(conn)
            raise
        except Exception as exc:
            host.record_failure(type(exc).__name__, error_reason(exc))
            if conn is not None:
                await _close_quietly(conn)
            return None

    async def _connect_bounded(self, host: Host) -> psycopg.AsyncConnection[tuple[object, ...]]:
        """A new probe connection within ``connect_timeout`` (plus slack). One that
        completes after the wait was given up, or while the prober stops, is closed
        rather than left open for the garbage collector."""
        task = asyncio.ensure_future(self._connect(host))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.connect_timeout + 0.5)
        except asyncio.CancelledError:
            _discard_when_done(task)
            raise
        if not done:
            _discard_when_done(task)
            raise TimeoutError
        return task.result()

    async def _bounded(
        self,
        query: Coroutine[object, object, object],
        host: Host,
        conn: psycopg.AsyncConnection[tuple[object, ...]],
        stuck: set[asyncio.Future[object]],
    ) -> tuple[bool, object]:
        """``(True, result)`` of a probe query within ``timeout``; else ``(False, None)``,
        the host marked down at once and the connection abandoned, without waiting
        for the stuck query to be cancelled (a hung server, or a pooler that holds the
        query while it has no server connection, may never answer the cancel)."""
        future: asyncio.Future[object] = asyncio.ensure_future(query)
        future.add_done_callback(_retrieve)
        try:
            done, _ = await asyncio.wait({future}, timeout=self.timeout)
        except asyncio.CancelledError:
            # Stopping: let the query finish or be cancelled before the connection
            # is closed under it (bounded: the server may be hung).
            future.cancel()
            await asyncio.wait({future}, timeout=1.0)
            raise
        if not done:
            future.cancel()
            stuck.add(future)
            future.add_done_callback(stuck.discard)
            host.record_failure("ProbeTimeout", f"no answer within {self.timeout:g}s")
            _abandon(conn)
            return False, None
        return True, future.result()

    async def _connect(self, host: Host) -> psycopg.AsyncConnection[tuple[object, ...]]:
        return await psycopg.AsyncConnection.connect(
            make_conninfo(host.dsn.conninfo, **tcp_options(host.dsn.conninfo)),
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name=f"{self.application_name}-prober",
            # No startup options (a pooler such as PgBouncer refuses them) and no
            # prepared statements (a pooler in transaction mode cannot keep them): the
            # probe sets its statement timeout in its own query.
            prepare_threshold=None,
        )


async def _system_identifier(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> str | None:
    try:
        cur = await conn.execute(SYSTEM_SQL)
        row = await cur.fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    return str(row[0]) if row and row[0] else None


async def _history(
    conn: psycopg.AsyncConnection[tuple[object, ...]], timeline: int
) -> dict[int, int]:
    """Earlier timeline -> the position where it ended, from the server's timeline
    history file (reading it needs superuser or ``pg_read_server_files``; without that,
    or on timeline 1, the history is empty and tokens of earlier timelines go to the
    primary)."""
    if timeline <= 1:
        return {}
    try:
        cur = await conn.execute(HISTORY_SQL, (f"pg_wal/{timeline:08X}.history",))
        row = await cur.fetchone()
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFile):
        return {}
    return parse_history(str(row[0])) if row and row[0] else {}


def parse_history(text: str) -> dict[int, int]:
    """``"1\t0/3000198\tno recovery target specified\n"`` -> ``{1: 0x3000198}``."""
    ended: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip().isdigit():
            continue  # comments and blank lines
        try:
            ended[int(fields[0])] = parse_lsn(fields[1].strip())
        except TokenError:
            continue
    return ended


def _retrieve(future: asyncio.Future[object]) -> None:
    """Consume the outcome of a probe query nobody waits for any more."""
    if not future.cancelled():
        future.exception()


async def _query(
    conn: psycopg.AsyncConnection[tuple[object, ...]], timeout_ms: int
) -> tuple[object, ...]:
    """The probe, in one query that bounds itself: the server cancels it after
    ``timeout_ms`` (SET LOCAL holds for this implicit transaction only)."""
    cur = await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}; {PROBE_SQL}")
    cur.nextset()  # past SET's result to the probe's
    row = await cur.fetchone()
    assert row is not None
    return row


def _abandon(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """Drop a connection to a hung server without waiting for it."""
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def _discard_when_done(task: asyncio.Future[psycopg.AsyncConnection[tuple[object, ...]]]) -> None:
    """Cancel a connection attempt nobody waits for; close what it opened anyway."""

    def close(done: asyncio.Future[psycopg.AsyncConnection[tuple[object, ...]]]) -> None:
        if not done.cancelled() and done.exception() is None:
            _abandon(done.result())

    task.cancel()
    task.add_done_callback(close)


async def _close_quietly(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


class ProberThread:
    """Runs a :class:`Prober` in a daemon thread with its own event loop (sync API)."""

    def __init__(self, prober: Prober) -> None:
        self.prober = prober
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pgreplica-prober", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            task = loop.create_task(self.prober.run())
            self._ready.set()
            loop.run_until_complete(task)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.prober.stop)
        if self._thread.is_alive():
            self._thread.join(timeout)
