"""pgreplica in front of a real Patroni cluster (etcd + three PostgreSQL 15 nodes, see
``tests/patroni_cluster.py``), configured with ``hosts = [...]`` and no fixed roles.

Under a read-your-writes workload (threads that write a row and read it back, plus
threads that only read), a switchover and a failover (the leader's Patroni and
postmaster killed) give 0 stale reads; writes fail fast while there is no primary and
resume on the new leader without a restart or a configuration change; reads go on
throughout. Every write the new leader acknowledged is on it afterwards; what the killed
leader had acknowledged but not shipped (asynchronous replication) is reported
separately. The old leader, rewound and back as a replica, rejoins the read set.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import psycopg
import pytest

import pgreplica
from patroni_cluster import NODES, PatroniCluster, patroni_cluster  # noqa: F401
from pgreplica.config import Dsn
from pgreplica.workload import wait_until

pytestmark = pytest.mark.slow


class Workload:
    """Three threads that write a row and read it back (with the write's token), and
    two that only read, in a loop, recording every outcome: acknowledged ids and the
    node that acknowledged them, stale reads, errors by reason, and when each write and
    read succeeded or failed."""

    def __init__(self, lb: pgreplica.LoadBalancer, cluster: PatroniCluster, table: str) -> None:
        self.lb = lb
        self.cluster = cluster
        self.table = table
        self.acked: list[tuple[int, str, float]] = []
        self.stale = 0
        self.write_ok: list[tuple[float, str]] = []
        self.write_errors: list[tuple[float, str, float]] = []
        self.slow_errors: list[str] = []  # the messages of write errors that took >= 1 s
        self.read_ok: list[tuple[float, str]] = []
        self.read_errors: list[tuple[float, str]] = []
        self.readback_on: dict[str, int] = {}
        self._stop = threading.Event()
        self._next = iter(range(10**9))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write_and_read, args=(i,)) for i in range(3)]
        self._threads += [threading.Thread(target=self._read) for _ in range(2)]

    def __enter__(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _where(self, conn: Any) -> str:  # a write or a read unit's connection
        row = conn.execute("SELECT inet_server_port()").fetchone()
        assert row is not None
        return self.cluster.name_of_port(row[0])

    def _write_and_read(self, index: int) -> None:
        lb = self.lb
        while not self._stop.is_set():
            with self._lock:
                item = next(self._next) * 10 + index
            with lb.isolated():
                started = time.monotonic()
                try:
                    with lb.write() as conn:
                        conn.execute(f"INSERT INTO {self.table} VALUES (%s)", (item,))
                        where = self._where(conn)
                except psycopg.Error as exc:  # HostUnavailable, or in flight on a primary
                    took = time.monotonic() - started
                    reason = getattr(exc, "reason", "") or type(exc).__name__
                    self.write_errors.append((started, reason, took))
                    if took >= 1.0:
                        self.slow_errors.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.02)
                    continue
                now = time.monotonic()
                self.acked.append((item, where, now))
                self.write_ok.append((now, where))
                try:
                    with lb.read() as conn:
                        row = conn.execute(
                            f"SELECT id FROM {self.table} WHERE id = %s", (item,)
                        ).fetchone()
                        where = self._where(conn)
                except psycopg.Error as exc:
                    reason = getattr(exc, "reason", "") or type(exc).__name__
                    self.read_errors.append((time.monotonic(), reason))
                    continue
                self.stale += row is None
                self.readback_on[where] = self.readback_on.get(where, 0) + 1

    def _read(self) -> None:
        lb = self.lb
        while not self._stop.is_set():
            with lb.isolated():
                try:
                    with lb.read() as conn:
                        conn.execute("SELECT pg_is_in_recovery()").fetchone()
                        where = self._where(conn)
                except psycopg.Error as exc:
                    reason = getattr(exc, "reason", "") or type(exc).__name__
                    self.read_errors.append((time.monotonic(), reason))
                    time.sleep(0.02)
                    continue
                self.read_ok.append((time.monotonic(), where))
            time.sleep(0.005)

    # -- summaries -------------------------------------------------------------------

    def errors_by_reason(self) -> str:
        """The write errors by reason: how many, and the longest each kind took."""
        counts: dict[str, int] = {}
        longest: dict[str, float] = {}
        for _, reason, took in self.write_errors:
            counts[reason] = counts.get(reason, 0) + 1
            longest[reason] = max(longest.get(reason, 0.0), took)
        return ", ".join(
            f"{r} {n} (longest {longest[r] * 1000:.0f} ms)" for r, n in sorted(counts.items())
        )

    @staticmethod
    def longest_gap(times: list[float], start: float, end: float) -> float:
        """The longest time without a success between ``start`` and ``end``."""
        points = [start, *sorted(t for t in times if start < t < end), end]
        return max(b - a for a, b in itertools.pairwise(points))

    def reads_between(self, start: float, end: float) -> dict[str, int]:
        counts: dict[str, int] = {}
        for at, where in self.read_ok:
            if start <= at <= end:
                counts[where] = counts.get(where, 0) + 1
        return counts


def _config(cluster: PatroniCluster) -> dict[str, object]:
    return {"databases": {"main": {"hosts": cluster.dsns}}, "probe_interval": 0.1}


def _create_table(lb: pgreplica.LoadBalancer, table: str) -> None:
    with lb.isolated(), lb.write() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY)")


def _ids_on(cluster: PatroniCluster, name: str, table: str) -> set[int]:
    with psycopg.connect(cluster.dsn(name), autocommit=True) as conn:
        return {r[0] for r in conn.execute(f"SELECT id FROM {table}")}


def _label(cluster: PatroniCluster, name: str) -> str:
    return Dsn(cluster.dsn(name)).label


def _count(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _summary(load: Workload, start: float, end: float) -> str:
    write_gap = load.longest_gap([t for t, _ in load.write_ok], start, end)
    read_gap = load.longest_gap([t for t, _ in load.read_ok], start, end)
    slow = load.slow_errors
    return (
        f"\n  longest gap in successful writes {write_gap:.2f} s, in reads {read_gap:.2f} s"
        f"\n  writes acked {len(load.acked)} (on {_count(w for _, w, _ in load.acked)}),"
        f" stale reads {load.stale}"
        f"\n  write errors {len(load.write_errors)}: {load.errors_by_reason() or 'none'}"
        f"\n  writes that waited >= 1 s before failing: {len(slow)}"
        + (f" (e.g. {slow[0]})" if slow else "")
        + f"\n  read errors {len(load.read_errors)}: {_count(r for _, r in load.read_errors)}"
        f"\n  read-backs (with the write's token) on {load.readback_on}"
    )


def _check_writes_fail_fast(load: Workload, lb: pgreplica.LoadBalancer) -> None:
    """Writes fail fast while there is no primary: refused at once for want of one
    (``no_primary``), and those already waiting for a connection to the old primary
    when the prober saw it go fail then too, not after ``connect_timeout``."""
    no_primary = [took for _, reason, took in load.write_errors if reason == "no_primary"]
    assert max(no_primary, default=0.0) < 1.0
    assert load.slow_errors == [], load.slow_errors[:3]


@pytest.fixture
def healthy(patroni_cluster: PatroniCluster) -> PatroniCluster:  # noqa: F811
    """The session's Patroni cluster with a leader and two streaming replicas."""
    patroni_cluster.wait_healthy()
    return patroni_cluster


def test_a_switchover_under_a_read_your_writes_workload(
    healthy: PatroniCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """``POST /switchover``: Patroni stops the leader (its replicas get every WAL record
    first), promotes the candidate and restarts the old leader as a replica."""
    cluster = healthy
    caplog.set_level(logging.INFO, logger="pgreplica")
    old = cluster.leader()
    assert old is not None
    candidate = next(n for n in NODES if n != old)
    with pgreplica.LoadBalancer(config=_config(cluster)) as lb:
        route = lb._router.route("main")
        wait_until(lambda: len(route.read_set) == 2, timeout=20, what="two replicas")
        assert route.primary.label == _label(cluster, old)
        _create_table(lb, "patroni_switch")
        with Workload(lb, cluster, "patroni_switch") as load:
            time.sleep(1.0)
            started = time.monotonic()
            answer = cluster.switchover(candidate)
            answered = time.monotonic()
            wait_until(
                lambda: any(w == candidate for _, w in load.write_ok),
                timeout=30,
                what="a write on the new leader",
            )
            first_write = min(t for t, w in load.write_ok if w == candidate)
            time.sleep(1.0)
            ended = time.monotonic()
        # The new leader took the writes without a restart or a configuration change.
        assert route.primary.label == _label(cluster, candidate)
        assert route.primary_problem is None
    assert cluster.leader() == candidate
    reads_during = load.reads_between(started, first_write)
    present = _ids_on(cluster, candidate, "patroni_switch")
    lost = sorted(i for i, _, _ in load.acked if i not in present)
    print(
        f"\nswitchover {old} -> {candidate} ({answer}; the request took"
        f" {answered - started:.2f} s): first write on the new leader"
        f" {first_write - started:.2f} s after the request"
        + _summary(load, started, ended)
        + f"\n  reads from the request to the first write on the new leader: {reads_during}"
        f"\n  acknowledged writes missing from the new leader: {len(lost)}"
    )
    assert load.stale == 0
    assert "primary_changed database=main" in caplog.text
    _check_writes_fail_fast(load, lb)
    assert {w for t, w in load.write_ok if t >= first_write} == {candidate}
    # Reads went on throughout, on the replicas (or the primary).
    assert load.longest_gap([t for t, _ in load.read_ok], started, ended) < 3.0
    assert sum(reads_during.values()) > 0
    # A switchover is clean: the old leader shuts down only once its replicas have
    # every WAL record, so nothing acknowledged is missing.
    assert not lost, lost


def test_a_failover_under_a_read_your_writes_workload(
    healthy: PatroniCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader's Patroni and postmaster are killed (-9): Patroni fails over once the
    leader key expires (ttl 10 s). The killed node is left down (the next test brings it
    back)."""
    cluster = healthy
    caplog.set_level(logging.INFO, logger="pgreplica")
    with pgreplica.LoadBalancer(config=_config(cluster)) as lb:
        route = lb._router.route("main")
        wait_until(lambda: len(route.read_set) == 2, timeout=20, what="two replicas")
        _create_table(lb, "patroni_fail")
        with Workload(lb, cluster, "patroni_fail") as load:
            time.sleep(1.0)
            killed = cluster.kill_leader()
            killed_at = cluster.killed_at
            wait_until(lambda: route.primary_problem == "no_primary", timeout=10, what="gap")
            wait_until(
                lambda: any(w != killed for _, w in load.write_ok),
                timeout=45,
                what="a write on the new leader",
            )
            first_write, leader = min((t, w) for t, w in load.write_ok if w != killed)
            time.sleep(1.0)
            ended = time.monotonic()
        # The new leader took the writes without a restart or a configuration change.
        assert route.primary.label == _label(cluster, leader)
        assert route.primary_problem is None
    assert cluster.leader() == leader
    reads_during = load.reads_between(killed_at, first_write)
    present = _ids_on(cluster, leader, "patroni_fail")
    after = [i for i, w, t in load.acked if t >= first_write]
    missing_after = sorted(i for i in after if i not in present)
    lost = sorted((t - killed_at, i) for i, _, t in load.acked if i not in present)
    print(
        f"\nfailover: {killed} killed; FIRST SUCCESSFUL WRITE through pgreplica"
        f" {first_write - killed_at:.2f} s after the kill, on {leader}"
        + _summary(load, killed_at, ended)
        + f"\n  reads from the kill to the first write on the new leader: {reads_during}"
        f"\n  acknowledged by the killed leader and lost by asynchronous replication:"
        f" {len(lost)}"
        + "".join(
            f"\n    id {i}, acknowledged {-t * 1000:.0f} ms before the kill" for t, i in lost[:10]
        )
    )
    assert load.stale == 0
    assert "primary_changed database=main" in caplog.text
    assert "no_primary database=main" in caplog.text
    # Writes failed fast during the gap, and resumed on the new leader by themselves.
    _check_writes_fail_fast(load, lb)
    assert any(reason == "no_primary" for _, reason, _ in load.write_errors)
    assert {w for t, w in load.write_ok if t >= first_write} == {leader}
    # Every write acknowledged after the failover is on the new leader.
    assert after and not missing_after, missing_after
    # Reads went on throughout, on the surviving replicas (then the new primary too).
    assert load.longest_gap([t for t, _ in load.read_ok], killed_at, ended) < 3.0
    assert sum(reads_during.values()) > 0 and killed not in reads_during


def test_the_old_leader_rejoins_the_read_set_after_pg_rewind(
    patroni_cluster: PatroniCluster,  # noqa: F811
) -> None:
    """After the failover of the previous test (or one of its own when run alone),
    Patroni starts the killed old leader again: it is rewound onto the new timeline and
    follows the new leader, and pgreplica reads from it again without a restart."""
    cluster = patroni_cluster
    down = cluster.down()
    if not down:
        cluster.wait_healthy()
        down = [cluster.kill_leader()]
        wait_until(lambda: cluster.leader() not in (None, down[0]), timeout=45, what="leader")
    old = down[0]
    label = _label(cluster, old)
    with pgreplica.LoadBalancer(config=_config(cluster)) as lb:
        route = lb._router.route("main")
        wait_until(lambda: route.primary_problem is None, timeout=30, what="a primary")
        wait_until(lambda: len(route.read_set) == 1, timeout=20, what="the other replica")
        assert label not in {h.label for h in route.read_set}
        _create_table(lb, "patroni_rejoin")
        with Workload(lb, cluster, "patroni_rejoin") as load:
            time.sleep(0.5)
            restarted = time.monotonic()
            cluster.restart(old)
            took = wait_until(
                lambda: label in {h.label for h in route.read_set},
                timeout=20,
                what=f"{old} back in the read set",
            )
            cluster.wait_healthy()
            time.sleep(1.0)
            ended = time.monotonic()
        host = next(h for h in route.members if h.label == label)
        assert host in route.read_set and host.in_recovery is True
        assert route.primary.label != label
    print(
        f"\n{old} started again: in pgreplica's read set {took:.2f} s later"
        f" (pg_rewind, recovery, streaming)"
        + _summary(load, restarted, ended)
        + f"\n  reads from the restart on: {load.reads_between(restarted, ended)}"
    )
    assert load.stale == 0
    assert not load.write_errors
    assert load.reads_between(restarted + took, ended).get(old, 0) > 0


def test_members_come_from_the_patroni_rest_api(healthy: PatroniCluster) -> None:
    """Configured with one host and the REST APIs, the balancer learns the other members
    from ``GET /cluster``, probes them, and reads from the replicas; a REST API that
    does not answer is skipped for the next one."""
    from pgreplica.workload import wait_until

    leader = healthy.leader()
    assert leader is not None
    apis = [f"http://127.0.0.1:{n.api_port}" for n in healthy.nodes.values()]
    config = {
        "databases": {
            "main": {"hosts": [healthy.dsn(leader)], "patroni": ["http://127.0.0.1:9", *apis]}
        },
        "probe_interval": 0.1,
        "patroni_interval": "1s",
    }
    with pgreplica.LoadBalancer(config=config) as lb:
        route = lb._router.route("main")
        wait_until(lambda: len(route.read_set) == 2, timeout=20, what="replicas from Patroni")
        assert route.primary.label == _label(healthy, leader)
        assert {h.label for h in route.members} == {_label(healthy, n) for n in healthy.nodes}
        ports = set()
        for _ in range(10):
            with lb.isolated(), lb.read() as conn:
                ports.add(conn.execute("SELECT inet_server_port()").fetchone()[0])
        assert {healthy.name_of_port(p) for p in ports} <= set(healthy.nodes) - {leader}
        assert ports
