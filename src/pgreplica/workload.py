"""Write-then-read workloads that count stale reads, shared by tests, demo and bench.

Each worker owns one counter row. A cycle increments it on the primary through
``lb.write()`` (the commit advances the context's causal token) and reads it back through
``lb.read()``: a read that returns less than the value just written is a stale read.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pgreplica

SETUP_SQL = "CREATE TABLE IF NOT EXISTS rw_counters (id int PRIMARY KEY, v bigint NOT NULL)"


@dataclass
class Tally:
    cycles: int = 0
    stale: int = 0
    errors: list[BaseException] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    hosts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, other: Tally) -> None:
        with self.lock:
            self.cycles += other.cycles
            self.stale += other.stale
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


def prepare(lb: pgreplica.LoadBalancer, keys: range) -> None:
    """Create the counter rows (in an isolated scope: the caller's token is untouched)."""
    with lb.isolated(), lb.write() as conn:
        conn.execute(SETUP_SQL)
        conn.execute(
            "INSERT INTO rw_counters (id, v) SELECT k, 0 FROM unnest(%s::int[]) AS k"
            " ON CONFLICT (id) DO NOTHING",
            (list(keys),),
        )


def sync_cycles(
    lb: pgreplica.LoadBalancer,
    key: int,
    *,
    cycles: int | None = None,
    until: float | None = None,
    read_kwargs: dict[str, Any] | None = None,
) -> Tally:
    """Run write-then-read cycles for one key in the current thread."""
    tally = Tally()
    kwargs = read_kwargs or {}
    with lb.isolated():
        while (cycles is None or tally.cycles < cycles) and (
            until is None or time.monotonic() < until
        ):
            try:
                with lb.write() as conn:
                    row = conn.execute(
                        "UPDATE rw_counters SET v = v + 1 WHERE id = %s RETURNING v", (key,)
                    ).fetchone()
                written = row[0]
                with lb.read(**kwargs) as conn:
                    seen = conn.execute(
                        "SELECT v FROM rw_counters WHERE id = %s", (key,)
                    ).fetchone()[0]
                    tally.reasons[conn.reason] += 1
                    tally.hosts[conn.host] += 1
                if seen < written:
                    tally.stale += 1
            except Exception as exc:  # counted, and the test asserts there are none
                tally.errors.append(exc)
            tally.cycles += 1
    return tally


def threaded(
    lb: pgreplica.LoadBalancer,
    keys: range,
    *,
    cycles: int | None = None,
    until: float | None = None,
    read_kwargs: dict[str, Any] | None = None,
) -> Tally:
    total = Tally()

    def work(key: int) -> None:
        total.add(sync_cycles(lb, key, cycles=cycles, until=until, read_kwargs=read_kwargs))

    threads = [threading.Thread(target=work, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total


async def async_cycles(
    alb: pgreplica.AsyncLoadBalancer,
    key: int,
    *,
    cycles: int | None = None,
    until: float | None = None,
) -> Tally:
    tally = Tally()
    while (cycles is None or tally.cycles < cycles) and (until is None or time.monotonic() < until):
        try:
            async with alb.write() as conn:
                cur = await conn.execute(
                    "UPDATE rw_counters SET v = v + 1 WHERE id = %s RETURNING v", (key,)
                )
                written = (await cur.fetchone())[0]
            async with alb.read() as conn:
                cur = await conn.execute("SELECT v FROM rw_counters WHERE id = %s", (key,))
                seen = (await cur.fetchone())[0]
                tally.reasons[conn.reason] += 1
                tally.hosts[conn.host] += 1
            if seen < written:
                tally.stale += 1
        except Exception as exc:
            tally.errors.append(exc)
        tally.cycles += 1
    return tally


async def gathered(
    alb: pgreplica.AsyncLoadBalancer,
    keys: range,
    *,
    cycles: int | None = None,
    until: float | None = None,
) -> Tally:
    total = Tally()
    for tally in await asyncio.gather(
        *(async_cycles(alb, k, cycles=cycles, until=until) for k in keys)
    ):
        total.add(tally)
    return total
