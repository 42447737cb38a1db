"""Write-then-read workloads that count stale reads: the demo, the tests and the
benchmarks use them, and so can an application's own tests.

Each worker owns one counter row. A cycle increments it on the primary through
``lb.write()`` (the commit advances the context's causal token) and reads it back through
``lb.read()`` (or both through one ``lb.connection()`` in autocommit, ``api="connection"``):
a read that returns less than the value just written is a stale read.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pgreplica._balancer_async import AsyncLoadBalancer
from pgreplica._balancer_sync import LoadBalancer

SETUP_SQL = "CREATE TABLE IF NOT EXISTS rw_counters (id int PRIMARY KEY, v bigint NOT NULL)"
INCREMENT_SQL = "UPDATE rw_counters SET v = v + 1 WHERE id = %s RETURNING v"
READ_SQL = "SELECT v FROM rw_counters WHERE id = %s"


def _value(row: Any) -> int:
    if row is None:
        raise LookupError("counter row missing: call prepare() first")
    return int(row[0])


@dataclass
class Tally:
    cycles: int = 0
    stale: int = 0
    errors: list[BaseException] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    hosts: Counter[str] = field(default_factory=Counter)
    worst_read: float = 0.0
    """The longest read, in seconds."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, other: Tally) -> None:
        with self.lock:
            self.cycles += other.cycles
            self.stale += other.stale
            self.worst_read = max(self.worst_read, other.worst_read)
            self.errors.extend(other.errors)
            self.reasons.update(other.reasons)
            self.hosts.update(other.hosts)

    @property
    def replica_reads(self) -> int:
        return sum(n for reason, n in self.reasons.items() if reason.startswith("replica"))


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> float:
    """Poll ``predicate`` until true; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def prepare(lb: LoadBalancer, keys: range) -> None:
    """Create the counter rows (in an isolated scope: the caller's token is untouched)."""
    with lb.isolated(), lb.write() as conn:
        conn.execute(SETUP_SQL)
        conn.execute(
            "INSERT INTO rw_counters (id, v) SELECT k, 0 FROM unnest(%s::int[]) AS k"
            " ON CONFLICT (id) DO NOTHING",
            (list(keys),),
        )


def sync_cycles(
    lb: LoadBalancer,
    key: int,
    *,
    cycles: int | None = None,
    until: float | None = None,
    stop: threading.Event | None = None,
    read_kwargs: dict[str, Any] | None = None,
    api: str = "read",
) -> Tally:
    """Run write-then-read cycles for one key in the current thread, until ``cycles``
    are done, the ``until`` (monotonic) time has passed, or ``stop`` is set; through
    ``lb.write()``/``lb.read()``, or one ``lb.connection()`` (``api="connection"``)."""
    _check_api(api)
    tally = Tally()
    kwargs = read_kwargs or {}
    with lb.isolated(), contextlib.ExitStack() as stack:
        rconn = stack.enter_context(lb.connection()) if api == "connection" else None
        if rconn is not None:
            rconn.autocommit = True
        while (
            (cycles is None or tally.cycles < cycles)
            and (until is None or time.monotonic() < until)
            and (stop is None or not stop.is_set())
        ):
            try:
                if rconn is None:
                    with lb.write() as conn:
                        written = _value(conn.execute(INCREMENT_SQL, (key,)).fetchone())
                    t0 = time.monotonic()
                    with lb.read(**kwargs) as conn:
                        seen = _value(conn.execute(READ_SQL, (key,)).fetchone())
                        host, reason = conn.host, conn.reason
                else:
                    written = _value(rconn.execute(INCREMENT_SQL, (key,)).fetchone())
                    t0 = time.monotonic()
                    seen = _value(rconn.execute(READ_SQL, (key,)).fetchone())
                    host, reason = rconn.host or "", rconn.reason or ""
                tally.worst_read = max(tally.worst_read, time.monotonic() - t0)
                tally.reasons[reason] += 1
                tally.hosts[host] += 1
                if seen < written:
                    tally.stale += 1
            except Exception as exc:  # counted, and the test asserts there are none
                tally.errors.append(exc)
            tally.cycles += 1
    return tally


def _check_api(api: str) -> None:
    if api not in ("read", "connection"):
        raise ValueError(f"api must be 'read' or 'connection', not {api!r}")


def threaded(
    lb: LoadBalancer,
    keys: range,
    *,
    cycles: int | None = None,
    until: float | None = None,
    stop: threading.Event | None = None,
    read_kwargs: dict[str, Any] | None = None,
    api: str = "read",
) -> Tally:
    """:func:`sync_cycles` in one thread per key; the tallies added up."""
    total = Tally()

    def work(key: int) -> None:
        total.add(
            sync_cycles(
                lb,
                key,
                cycles=cycles,
                until=until,
                stop=stop,
                read_kwargs=read_kwargs,
                api=api,
            )
        )

    threads = [threading.Thread(target=work, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total


async def async_cycles(
    alb: AsyncLoadBalancer,
    key: int,
    *,
    cycles: int | None = None,
    until: float | None = None,
    api: str = "read",
) -> Tally:
    """:func:`sync_cycles` for :class:`AsyncLoadBalancer`, in the current task."""
    _check_api(api)
    tally = Tally()
    async with contextlib.AsyncExitStack() as stack:
        rconn = await stack.enter_async_context(alb.connection()) if api == "connection" else None
        if rconn is not None:
            await rconn.set_autocommit(True)
        while (cycles is None or tally.cycles < cycles) and (
            until is None or time.monotonic() < until
        ):
            try:
                if rconn is None:
                    async with alb.write() as conn:
                        cur = await conn.execute(INCREMENT_SQL, (key,))
                        written = _value(await cur.fetchone())
                    t0 = time.monotonic()
                    async with alb.read() as conn:
                        seen = _value(await (await conn.execute(READ_SQL, (key,))).fetchone())
                        host, reason = conn.host, conn.reason
                else:
                    written = _value(await (await rconn.execute(INCREMENT_SQL, (key,))).fetchone())
                    t0 = time.monotonic()
                    seen = _value(await (await rconn.execute(READ_SQL, (key,))).fetchone())
                    host, reason = rconn.host or "", rconn.reason or ""
                tally.worst_read = max(tally.worst_read, time.monotonic() - t0)
                tally.reasons[reason] += 1
                tally.hosts[host] += 1
                if seen < written:
                    tally.stale += 1
            except Exception as exc:
                tally.errors.append(exc)
            tally.cycles += 1
    return tally


async def gathered(
    alb: AsyncLoadBalancer,
    keys: range,
    *,
    cycles: int | None = None,
    until: float | None = None,
    api: str = "read",
) -> Tally:
    total = Tally()
    for tally in await asyncio.gather(
        *(async_cycles(alb, k, cycles=cycles, until=until, api=api) for k in keys)
    ):
        total.add(tally)
    return total
