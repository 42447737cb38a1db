"""The chaos run: concurrent workers writing and reading their own writes while faults
fire at random on real servers.

    python -m bench.chaos [--seconds 60] [--workers 32] [--seed N]
    make chaos                       # CHAOS_SECONDS=300 make chaos for a longer run

A fresh local cluster (a primary and two streaming replicas), each server behind a
:class:`~pgreplica.testing.FaultProxy`; the balancer only knows the proxies. Half the
workers are threads on a :class:`~pgreplica.LoadBalancer`, half asyncio tasks on an
:class:`~pgreplica.AsyncLoadBalancer`. Each owns a counter row and runs cycles of
"increment it on the primary, read it back", in one of three ways:

- ``read``: ``lb.write()`` then ``lb.read()`` in the worker's context;
- ``connection``: both through one ``lb.connection()`` in autocommit, kept across
  cycles (opened again after an error, as an application would);
- ``handoff``: ``lb.write()``, then the context's token signed, verified and adopted by
  a fresh context (``lb.isolated()`` + ``lb.causal()``) that reads, as a job or the next
  request would.

Meanwhile an injector fires one fault at a time per server, each for 0.3 to 3 s:

- on a replica: killed (immediate shutdown) and started again; frozen (SIGSTOP); its
  network blackholed (new and established connections), reset (RST, new connections
  refused), slow (200 ms per chunk), throttled (20 kB/s); its replay paused beyond the
  lag bound; its replay delayed (300 ms);
- on the primary: killed and restarted; frozen; blackholed; reset; slow (50 ms);
- once, in runs of 30 s or more, replica 2 promoted (it leaves the read set for good).

At the end every fault is healed and each counter is read on the primary. Counted:

- **stale reads**: a read that returned less than the value the worker's own write,
  acknowledged just before, had set;
- **lost writes**: a counter on the primary below the highest value acknowledged to its
  worker;
- **unexpected errors**: any exception that reached a worker other than a connection
  error while the primary was faulted (or within ``GRACE`` seconds after it was healed):
  writes cannot succeed while the primary is down, and a read whose context must see a
  write no replica has replayed needs the primary too. Every error on a replica fault
  is unexpected.

It prints the counts and then one line, ``stale reads: 0, lost writes: 0, unexpected
errors: 0, worst read latency: X s`` (the longest successful read), and exits 1 on any
stale read, lost write or unexpected error (2 when the run itself could not be made).
The secrets the run used (the cluster's password, the signing key) are looked for in
everything it logged and printed: one found is an unexpected error too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import random
import secrets
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgreplica import AsyncLoadBalancer, CausalToken, LoadBalancer
from pgreplica.testing import FaultProxy, LocalCluster, make_cluster_directory
from pgreplica.workload import INCREMENT_SQL, READ_SQL, prepare

MODES = ("read", "connection", "handoff")
#: After the primary is healed, errors of operations that started this long after are
#: unexpected (broken pooled connections are replaced, the prober sees it up again).
GRACE = 3.0
#: Workers still running this long after the end of the run are reported as stuck.
JOIN_SECONDS = 30.0
#: Seconds a fault lasts, and between two injections.
FAULT_SECONDS = (0.3, 3.0)
PAUSE_SECONDS = (0.1, 1.2)
#: Lag bounds low enough that a paused replica exceeds them within the fault.
MAX_LAG_SECONDS = 1.0
MAX_LAG_BYTES = 256 * 1024

#: ``--drop-tokens``: handoff reads drop the token, to show that the run detects the
#: stale reads that follow (its own test).
UNSAFE = threading.Event()


# --------------------------------------------------------------------------- records


@dataclass
class Failure:
    worker: str
    what: str  # "write" or "read"
    started: float
    ended: float
    error: BaseException


@dataclass
class Record:
    """What the workers saw, merged under a lock."""

    cycles: int = 0
    reads: int = 0
    stale: int = 0
    read_seconds: list[float] = field(default_factory=list)
    read_spans: list[tuple[float, float, str]] = field(default_factory=list)
    """(start, end, routing reason) of every successful read."""
    acked: dict[int, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write_acked(self, key: int, value: int) -> None:
        with self.lock:
            self.acked[key] = max(self.acked.get(key, 0), value)

    def read_done(self, mode: str, started: float, written: int, seen: int, reason: str) -> None:
        ended = time.monotonic()
        with self.lock:
            self.cycles += 1
            self.reads += 1
            self.by_mode[mode] += 1
            self.read_seconds.append(ended - started)
            self.read_spans.append((started, ended, reason))
            self.reasons[reason] += 1
            if seen < written:
                self.stale += 1

    def failed(self, failure: Failure) -> None:
        with self.lock:
            self.cycles += 1
            self.failures.append(failure)


@dataclass
class Fault:
    target: int  # 0 = primary
    kind: str
    started: float
    ended: float | None = None


# --------------------------------------------------------------------------- faults


class Injector:
    """Fires faults at random, at most one per server at a time, and remembers when
    each was active."""

    def __init__(
        self,
        cluster: LocalCluster,
        proxies: list[FaultProxy],
        rng: random.Random,
        *,
        promote_at: float | None,
    ) -> None:
        self.cluster = cluster
        self.proxies = proxies
        self.rng = rng
        self.promote_at = promote_at
        self.promoted: set[int] = set()
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self._busy: dict[int, Fault] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _faults(
        self, target: int
    ) -> dict[str, tuple[Callable[[int], None], Callable[[int], None]]]:
        """Each fault that fits server ``target`` (0: the primary): (inject, heal), both
        called with ``target``."""
        c, p = self.cluster, self.proxies
        slow = 0.05 if target == 0 else 0.2
        faults: dict[str, tuple[Callable[[int], None], Callable[[int], None]]] = {
            "kill": (c.kill, c.start),
            "freeze": (c.freeze, c.thaw),
            "blackhole": (lambda i: p[i].blackhole(), lambda i: p[i].heal()),
            "reset": (lambda i: p[i].reset(refuse=True), lambda i: p[i].heal()),
            "slow": (lambda i: p[i].delay(slow), lambda i: p[i].heal()),
        }
        if target:
            faults["throttle"] = (lambda i: p[i].bandwidth(20_000), lambda i: p[i].heal())
            faults["pause"] = (c.pause, c.resume)
            faults["apply-delay"] = (lambda i: c.lag(i, "300ms"), lambda i: c.lag(i, 0))
        return faults

    def run(self, until: float) -> None:
        start = time.monotonic()
        while time.monotonic() < until and not self._stop.is_set():
            if self.promote_at is not None and time.monotonic() - start >= self.promote_at:
                self.promote_at = None
                self._spawn(self._promote, until)
            else:
                self._spawn(self._one_fault, until)
            self._stop.wait(self.rng.uniform(*PAUSE_SECONDS))
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _spawn(self, target: Callable[[float], None], until: float) -> None:
        thread = threading.Thread(target=target, args=(until,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _claim(self, target: int, kind: str) -> Fault | None:
        with self._lock:
            if target in self._busy:
                return None
            fault = Fault(target, kind, time.monotonic())
            self._busy[target] = fault
            self.faults.append(fault)
            return fault

    def _release(self, fault: Fault) -> None:
        with self._lock:
            fault.ended = time.monotonic()
            self._busy.pop(fault.target, None)

    def _one_fault(self, until: float) -> None:
        # Replicas three times as often as the primary: their faults must be invisible.
        target = self.rng.choice([0, 1, 1, 1, 2, 2, 2])
        if target in self.promoted:
            return
        table = self._faults(target)
        kind = self.rng.choice(sorted(table))
        inject, heal = table[kind]
        seconds = self.rng.uniform(*FAULT_SECONDS)
        fault = self._claim(target, kind)
        if fault is None:
            return
        try:
            try:
                inject(target)
                self._stop.wait(min(seconds, max(0.0, until - time.monotonic()) + 0.3))
            finally:
                heal(target)
        except Exception as exc:
            self.errors.append(f"{kind} on server {target}: {type(exc).__name__}: {exc}")
        finally:
            self._release(fault)

    def _promote(self, until: float) -> None:
        fault = None
        while fault is None and time.monotonic() < until:
            fault = self._claim(2, "promote")
            if fault is None:
                time.sleep(0.05)
        if fault is None:
            return
        try:
            self.cluster.promote(2)
            self.promoted.add(2)
        except Exception as exc:
            self.errors.append(f"promote on server 2: {type(exc).__name__}: {exc}")
        finally:
            self._release(fault)

    def primary_faulted(self, started: float, ended: float) -> bool:
        """A fault on the primary overlapped ``[started, ended]``, give or take GRACE."""
        with self._lock:
            return any(
                f.target == 0
                and f.started <= ended
                and (f.ended is None or f.ended + GRACE >= started)
                for f in self.faults
            )


# --------------------------------------------------------------------------- workers


def _value(row: Any) -> int:
    return int(row[0])


def sync_worker(
    lb: LoadBalancer, key: int, mode: str, until: float, key_text: str, record: Record
) -> None:
    name = f"thread-{key}-{mode}"
    with lb.isolated(), contextlib.ExitStack() as held:
        rconn = None
        while time.monotonic() < until:
            started, what = time.monotonic(), "write"
            try:
                if mode == "connection":
                    if rconn is None:
                        rconn = held.enter_context(lb.connection())
                        rconn.autocommit = True
                    written = _value(rconn.execute(INCREMENT_SQL, (key,)).fetchone())
                    record.write_acked(key, written)
                    what, t0 = "read", time.monotonic()
                    seen = _value(rconn.execute(READ_SQL, (key,)).fetchone())
                    reason = rconn.reason or ""
                else:
                    with lb.write() as conn:
                        written = _value(conn.execute(INCREMENT_SQL, (key,)).fetchone())
                    record.write_acked(key, written)
                    what, t0 = "read", time.monotonic()
                    if mode == "read":
                        with lb.read() as conn:
                            seen = _value(conn.execute(READ_SQL, (key,)).fetchone())
                            reason = conn.reason
                    else:
                        token = CausalToken.verify(lb.token().sign(key_text), key_text)
                        if UNSAFE.is_set():
                            token = CausalToken()  # the self-test: the token is dropped
                        with lb.isolated(), lb.causal(token), lb.read() as conn:
                            seen = _value(conn.execute(READ_SQL, (key,)).fetchone())
                            reason = conn.reason
                record.read_done(mode, t0, written, seen, reason)
            except Exception as exc:
                record.failed(Failure(name, what, started, time.monotonic(), exc))
                if rconn is not None:
                    held.close()  # a broken routing connection is opened again
                    rconn = None
                time.sleep(0.05)


async def async_worker(
    alb: AsyncLoadBalancer, key: int, mode: str, until: float, key_text: str, record: Record
) -> None:
    name = f"task-{key}-{mode}"
    with alb.isolated():
        async with contextlib.AsyncExitStack() as held:
            rconn = None
            while time.monotonic() < until:
                started, what = time.monotonic(), "write"
                try:
                    if mode == "connection":
                        if rconn is None:
                            rconn = await held.enter_async_context(alb.connection())
                            await rconn.set_autocommit(True)
                        cur = await rconn.execute(INCREMENT_SQL, (key,))
                        written = _value(await cur.fetchone())
                        record.write_acked(key, written)
                        what, t0 = "read", time.monotonic()
                        cur = await rconn.execute(READ_SQL, (key,))
                        seen = _value(await cur.fetchone())
                        reason = rconn.reason or ""
                    else:
                        async with alb.write() as conn:
                            cur = await conn.execute(INCREMENT_SQL, (key,))
                            written = _value(await cur.fetchone())
                        record.write_acked(key, written)
                        what, t0 = "read", time.monotonic()
                        if mode == "read":
                            async with alb.read() as conn:
                                cur = await conn.execute(READ_SQL, (key,))
                                seen = _value(await cur.fetchone())
                                reason = conn.reason
                        else:
                            token = CausalToken.verify(alb.token().sign(key_text), key_text)
                            if UNSAFE.is_set():
                                token = CausalToken()
                            with alb.isolated(), alb.causal(token):
                                async with alb.read() as conn:
                                    cur = await conn.execute(READ_SQL, (key,))
                                    seen = _value(await cur.fetchone())
                                    reason = conn.reason
                    record.read_done(mode, t0, written, seen, reason)
                except Exception as exc:
                    record.failed(Failure(name, what, started, time.monotonic(), exc))
                    if rconn is not None:
                        await held.aclose()
                        rconn = None
                    await asyncio.sleep(0.05)


async def async_workers(
    config: dict[str, Any], keys: list[int], until: float, key_text: str, record: Record
) -> None:
    async with AsyncLoadBalancer(config=config) as alb:
        await asyncio.gather(
            *(async_worker(alb, k, MODES[k % len(MODES)], until, key_text, record) for k in keys)
        )


# --------------------------------------------------------------------------- the run


def expected(failure: Failure, injector: Injector) -> bool:
    """Outside the fault model unless it is a connection-level failure (pgreplica's
    HostUnavailable among them) while the primary was faulted."""
    connection_error = isinstance(failure.error, psycopg.OperationalError)
    return connection_error and injector.primary_faulted(failure.started, failure.ended)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Captured(logging.Handler):
    """Every log record of the run (pgreplica's at DEBUG), kept for the secret scan and
    counted by event (the first word of the message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.text = io.StringIO()
        self.events: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.text.write(line + "\n")
        if record.levelno >= logging.WARNING:
            self.events[record.getMessage().split(" ", 1)[0]] += 1


@contextlib.contextmanager
def captured_logs() -> Iterator[Captured]:
    handler = Captured()
    root, ours = logging.getLogger(), logging.getLogger("pgreplica")
    old_level = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        ours.setLevel(old_level)


def run(seconds: float, workers: int, seed: int, out: Callable[[str], None]) -> int:
    rng = random.Random(seed)
    key_text = secrets.token_hex(16)
    cluster = LocalCluster(make_cluster_directory("pgreplica-chaos-"), replicas=2)
    proxies: list[FaultProxy] = []
    try:
        cluster.up()
        password = cluster.dsn(0).split(":")[2].split("@")[0]
        proxies = [FaultProxy(("127.0.0.1", cluster.port(i))).start() for i in range(3)]
        main = {
            "primary": proxies[0].dsn(cluster.dsn(0)),
            "replicas": [proxies[i].dsn(cluster.dsn(i)) for i in (1, 2)],
        }
        config: dict[str, Any] = {
            "databases": {"main": main},
            "max_lag_seconds": MAX_LAG_SECONDS,
            "max_lag_bytes": MAX_LAG_BYTES,
            "connect_timeout": 1.0,
        }
        keys = list(range(1, workers + 1))
        record = Record()
        with captured_logs() as logs, LoadBalancer(config=config) as lb:
            prepare(lb, range(1, workers + 1))
            cluster.wait_replayed()
            if UNSAFE.is_set():
                cluster.lag(1, "300ms")  # stale reads certain for a read without its token
            injector = Injector(
                cluster, proxies, rng, promote_at=seconds * 0.6 if seconds >= 30 else None
            )
            started = time.monotonic()
            until = started + seconds
            half = workers // 2
            threads = [
                threading.Thread(
                    target=sync_worker,
                    args=(lb, k, MODES[k % len(MODES)], until, key_text, record),
                    name=f"chaos-worker-{k}",
                )
                for k in keys[:half]
            ]
            threads.append(
                threading.Thread(
                    target=asyncio.run,
                    args=(async_workers(config, keys[half:], until, key_text, record),),
                    name="chaos-async-workers",
                )
            )
            for t in threads:
                t.start()
            injector.run(until)
            for t in threads:
                t.join(timeout=max(0.1, until + JOIN_SECONDS - time.monotonic()))
            stuck = [t.name for t in threads if t.is_alive()]
            for p in proxies:
                p.heal()
            cluster.heal(timeout=60)
        # Lost writes: every acknowledged value must be on the primary.
        with psycopg.connect(cluster.dsn(0), autocommit=True) as conn:
            on_primary = dict(
                conn.execute("SELECT id, v FROM rw_counters WHERE id = ANY(%s)", (keys,)).fetchall()
            )
        lost = [k for k, v in record.acked.items() if on_primary.get(k, 0) < v]
        unexpected = [f for f in record.failures if not expected(f, injector)]
        # The run's secrets, looked for in what it logged and is about to print.
        report = _report(record, injector, lost, unexpected, stuck, seconds, workers, seed, started)
        report += "\nwarnings logged: " + (
            ", ".join(f"{e} {n}" for e, n in logs.events.most_common()) or "none"
        )
        leaks = [
            name
            for name, secret in (("cluster password", password), ("signing key", key_text))
            if secret in logs.text.getvalue() or secret in report
        ]
        out(report)
        worst = max(record.read_seconds, default=0.0)
        problems = len(unexpected) + len(injector.errors) + len(stuck) + len(leaks)
        if leaks:
            out(f"secrets found in the run's output: {', '.join(leaks)}")
        out(
            f"stale reads: {record.stale}, lost writes: {len(lost)}, "
            f"unexpected errors: {problems}, worst read latency: {worst:.2f} s"
        )
        return 1 if record.stale or lost or problems else 0
    finally:
        for p in proxies:
            p.stop()
        cluster.destroy()


def _report(
    record: Record,
    injector: Injector,
    lost: list[int],
    unexpected: list[Failure],
    stuck: list[str],
    seconds: float,
    workers: int,
    seed: int,
    started: float,
) -> str:
    lines = [f"chaos: {seconds:g} s, {workers} workers (threads and asyncio tasks), seed {seed}"]
    kinds = Counter(
        f"{'primary' if f.target == 0 else 'replica'} {f.kind}" for f in injector.faults
    )
    listed = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    lines.append(f"faults: {len(injector.faults)} ({listed})")
    lines.append(
        f"cycles: {record.cycles}, reads: {record.reads} "
        f"({', '.join(f'{m} {n}' for m, n in sorted(record.by_mode.items()))})"
    )
    on_replica = sum(n for r, n in record.reasons.items() if r.startswith("replica"))
    if record.reads:
        lines.append(f"reads on a replica: {on_replica} ({100 * on_replica / record.reads:.1f}%)")
    if record.read_seconds:
        lines.append(
            f"read latency: median {1000 * statistics.median(record.read_seconds):.1f} ms, "
            f"p99 {1000 * percentile(record.read_seconds, 0.99):.1f} ms, "
            f"max {max(record.read_seconds):.2f} s"
        )
        calm = [r for r in record.read_spans if not injector.primary_faulted(r[0], r[1])]
        worst = max(calm, key=lambda r: r[1] - r[0], default=None)
        if worst is not None:
            during = sorted(
                {
                    f"{'primary' if f.target == 0 else f'replica {f.target}'} {f.kind}"
                    for f in injector.faults
                    if f.started <= worst[1] and (f.ended is None or f.ended >= worst[0])
                }
            )
            lines.append(
                f"worst read while the primary was not faulted: {worst[1] - worst[0]:.2f} s "
                f"({len(calm)} reads; that one {worst[2]}, during: {', '.join(during) or '-'})"
            )
    expected_n = len(record.failures) - len(unexpected)
    lines.append(
        f"errors while the primary was faulted (expected): {expected_n}, "
        f"acknowledged writes: {sum(record.acked.values())}, lost: {len(lost)}"
    )
    for f in unexpected[:20]:
        first_line = (str(f.error).splitlines() or [""])[0]
        lines.append(
            f"  unexpected: {f.worker} {f.what} at +{f.started - started:.2f} s: "
            f"{type(f.error).__name__}: {first_line}"
        )
    for text in injector.errors:
        lines.append(f"  injector failed: {text}")
    for name in stuck:
        lines.append(f"  worker still running at the end: {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("CHAOS_SECONDS") or 60)
    )
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--drop-tokens",
        action="store_true",
        help="handoff reads drop their token: the run must then report stale reads",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.workers < 2:
        parser.error("--seconds must be positive and --workers at least 2")
    if args.drop_tokens:
        UNSAFE.set()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    try:
        return run(args.seconds, args.workers, seed, print)
    except Exception as exc:  # the run itself could not be made
        print(f"chaos run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
