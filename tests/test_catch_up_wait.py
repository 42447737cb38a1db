"""The adaptive catch-up wait (``max_wait``), on the real local cluster: a read after its
own write waits for a replica that is expected to replay the write soon, never for one
that is delayed or paused, and never returns a stale row."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

import pgreplica
from pgreplica import observe
from pgreplica.testing import LocalCluster
from pgreplica.workload import Tally, gathered, prepare, sync_cycles, threaded, wait_until


@contextlib.contextmanager
def catch_up_waits() -> Iterator[list[observe.CatchUpWait]]:
    seen: list[observe.CatchUpWait] = []

    def sink(event: observe.Observed) -> None:
        if isinstance(event, observe.CatchUpWait):
            seen.append(event)

    observe.add_sink(sink)
    try:
        yield seen
    finally:
        observe.remove_sink(sink)


def write_then_read(lb: pgreplica.LoadBalancer, row: int) -> tuple[int, int, bool, str]:
    """Bump ``row``; read it back in the same context: (written, read, on_replica, reason)."""
    with lb.write() as conn:
        written = conn.execute(
            "UPDATE rw_counters SET v = v + 1 WHERE id = %s RETURNING v", (row,)
        ).fetchone()[0]
    with lb.read() as conn:
        seen = conn.execute("SELECT v FROM rw_counters WHERE id = %s", (row,)).fetchone()[0]
        return written, seen, conn.on_replica, conn.reason


def replica_config(cluster: LocalCluster, replicas: list[int], **settings: object) -> dict:
    return {
        "databases": {
            "main": {
                "primary": cluster.primary_dsn,
                "replicas": [cluster.replica_dsns[i - 1] for i in replicas],
            }
        },
        **settings,
    }


def test_default_wait_is_short_and_adaptive() -> None:
    settings = pgreplica.Settings(
        databases={"main": pgreplica.DatabaseConfig(name="main", primary="host=x")}
    )
    assert 0 < settings.max_wait <= 0.005


def test_read_after_own_write_waits_for_a_replica_expected_to_catch_up(
    healthy_cluster: LocalCluster,
) -> None:
    # replica 1 alone, replaying 150 ms late: with a wait bound above its delay, the read
    # after the write waits on the replica (not the primary) and sees the write
    healthy_cluster.lag(1, "150ms")
    config = replica_config(healthy_cluster, [1], max_wait=2.0)
    with pgreplica.LoadBalancer(config=config) as lb, catch_up_waits() as waits:
        prepare(lb, range(700, 701))
        healthy_cluster.wait_replayed()
        for _ in range(3):
            with lb.isolated():
                written, seen, on_replica, reason = write_then_read(lb, 700)
            assert seen == written
            assert on_replica and reason == "replica_checked"
        assert waits and all(w.caught_up for w in waits)
        assert all(w.seconds > 0.05 for w in waits)  # it did wait for the apply delay


def test_no_wait_for_a_replica_known_to_be_delayed(healthy_cluster: LocalCluster) -> None:
    # replica 1 alone, replaying 300 ms late under a steady write load: its probes show
    # the delay, so a read after its own write goes to the primary without waiting
    healthy_cluster.lag(1, "300ms")
    config = replica_config(healthy_cluster, [1], max_wait=0.05)
    with pgreplica.LoadBalancer(config=config) as lb:
        prepare(lb, range(701, 702))
        healthy_cluster.wait_replayed()
        route = lb._router.databases["main"]
        host = route.replicas[0]

        def delayed() -> bool:
            with lb.isolated(), lb.write() as conn:
                conn.execute("UPDATE rw_counters SET v = v + 1 WHERE id = 701")
            delay = host.expected_delay()
            return delay is not None and delay > 0.05

        wait_until(delayed, timeout=20, what="probes seeing the apply delay")
        with catch_up_waits() as waits:
            for _ in range(5):
                with lb.isolated():
                    written, seen, on_replica, reason = write_then_read(lb, 701)
                assert seen == written
                assert not on_replica and reason == "replicas_behind"
        assert waits == []  # not one read waited


def test_a_replica_that_missed_a_wait_is_not_waited_for_until_its_next_probe(
    healthy_cluster: LocalCluster,
) -> None:
    # probes every 30 s: the paused replica looks fine to the cache (no delay seen yet);
    # the first read waits for it in vain, the next ones go to the primary at once
    config = replica_config(healthy_cluster, [2], max_wait=0.1, probe_interval=30.0)
    with pgreplica.LoadBalancer(config=config) as lb:
        prepare(lb, range(702, 703))
        healthy_cluster.wait_replayed()
        healthy_cluster.pause(2)
        with catch_up_waits() as waits:
            for _ in range(4):
                with lb.isolated():
                    written, seen, on_replica, reason = write_then_read(lb, 702)
                assert seen == written
                assert not on_replica and reason == "replicas_behind"
        assert len(waits) == 1 and not waits[0].caught_up
        assert waits[0].seconds >= 0.1


def _insert_lsn(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    return int(row[0])


def _pad_wal(conn: psycopg.Connection, size: int) -> None:
    """Write a WAL record of about ``size`` bytes (a non-transactional message)."""
    conn.execute(
        "SELECT pg_logical_emit_message(false, 'pad', repeat('x', %s))", (max(0, size - 56),)
    )


def test_a_token_at_a_wal_page_boundary_is_reached(scratch_cluster: LocalCluster) -> None:
    # A commit that ends exactly at a WAL page boundary leaves the insert position (the
    # token) after the next page's header, which no replica replays until some later
    # write: with nothing else writing, a read after such a write still goes to a
    # replica once it has replayed up to the boundary. WAL is padded so that the write
    # ends at the boundary, on a cluster of its own where nothing else writes WAL (a
    # few tries: a checkpoint or page pruning may change a write's size).
    config = replica_config(scratch_cluster, [1], max_wait=0.0)
    with (
        pgreplica.LoadBalancer(config=config) as lb,
        psycopg.connect(scratch_cluster.primary_dsn, autocommit=True) as primary,
        psycopg.connect(scratch_cluster.replica_dsns[0], autocommit=True) as replica,
    ):
        prepare(lb, range(707, 708))
        scratch_cluster.wait_replayed()
        sql = "UPDATE rw_counters SET v = v + 1 WHERE id = 707 RETURNING v"
        write_size = 0
        for _ in range(200):
            with lb.isolated():
                before = _insert_lsn(primary)
                left = 8192 - before % 8192
                if write_size:
                    pad = left - write_size
                    if pad < 56:
                        pad += 8192  # into the next page, whose header takes 24 bytes
                        pad -= 24
                    _pad_wal(primary, pad)
                    before = _insert_lsn(primary)
                with lb.write() as conn:
                    written = conn.execute(sql).fetchone()[0]
                need = lb.token().get("main")
                if need // 8192 == before // 8192:
                    write_size = need - before  # the write's WAL, within one page
                if need % 8192 != 24:
                    continue

                def replayed(need: int = need) -> bool:
                    row = replica.execute(
                        "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint"
                    ).fetchone()
                    return int(row[0]) >= need - 24

                wait_until(replayed, timeout=10, what="the replica at the boundary")
                with lb.read() as conn:
                    seen = conn.execute("SELECT v FROM rw_counters WHERE id = 707").fetchone()[0]
                    assert seen == written
                    assert conn.on_replica, conn.reason
                return
    pytest.fail(f"no write ended at a WAL page boundary in 200 tries (last write {write_size} B)")


def test_replayed_through() -> None:
    from pgreplica.lsn import replayed_through

    assert replayed_through(0) == 0
    assert replayed_through(8192 * 5) == 8192 * 5 + 24
    assert replayed_through(8192 * 5 + 8) == 8192 * 5 + 8


def test_no_wait_with_max_wait_zero(healthy_cluster: LocalCluster) -> None:
    config = replica_config(healthy_cluster, [2], max_wait=0.0)
    with pgreplica.LoadBalancer(config=config) as lb:
        prepare(lb, range(703, 704))
        healthy_cluster.wait_replayed()
        healthy_cluster.pause(2)
        with catch_up_waits() as waits, lb.isolated():
            written, seen, on_replica, reason = write_then_read(lb, 703)
        assert seen == written and not on_replica and reason == "replicas_behind"
        assert waits == []


def test_wait_skips_a_paused_replica_and_polls_the_live_one(
    healthy_cluster: LocalCluster,
) -> None:
    # both replicas; replica 2 paused, replica 1 replaying 100 ms late: every read after
    # its own write ends on replica 1 once it catches up, never stale, never on 2
    healthy_cluster.lag(1, "100ms")
    config = replica_config(healthy_cluster, [1, 2], max_wait=1.0)
    with pgreplica.LoadBalancer(config=config) as lb:
        prepare(lb, range(704, 705))
        healthy_cluster.wait_replayed()
        healthy_cluster.pause(2)
        replica_1 = healthy_cluster.port(1)
        for _ in range(5):
            with lb.isolated():
                with lb.write() as conn:
                    written = conn.execute(
                        "UPDATE rw_counters SET v = v + 1 WHERE id = 704 RETURNING v"
                    ).fetchone()[0]
                with lb.read() as conn:
                    seen, port = conn.execute(
                        "SELECT v, inet_server_port() FROM rw_counters WHERE id = 704"
                    ).fetchone()
                    assert seen == written
                    assert conn.on_replica and port == replica_1


def test_routing_connection_waits_too(healthy_cluster: LocalCluster) -> None:
    healthy_cluster.lag(1, "150ms")
    config = replica_config(healthy_cluster, [1], max_wait=2.0)
    with pgreplica.LoadBalancer(config=config) as lb:
        prepare(lb, range(705, 706))
        healthy_cluster.wait_replayed()
        replica_1 = healthy_cluster.port(1)
        with lb.isolated(), lb.connection() as conn:
            conn.autocommit = True
            written = conn.execute(
                "UPDATE rw_counters SET v = v + 1 WHERE id = 705 RETURNING v"
            ).fetchone()[0]
            seen, port = conn.execute(
                "SELECT v, inet_server_port() FROM rw_counters WHERE id = 705"
            ).fetchone()
            assert (seen, port) == (written, replica_1)
            # a read-only transaction in repeatable read: its snapshot is taken after
            # the check saw the replica caught up, so it sees the write too
            conn.autocommit = False
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            written_2 = _bump_elsewhere(lb, 705)
            seen, port = conn.execute(
                "SELECT v, inet_server_port() FROM rw_counters WHERE id = 705"
            ).fetchone()
            conn.commit()
            assert (seen, port) == (written_2, replica_1)


def _bump_elsewhere(lb: pgreplica.LoadBalancer, row: int) -> int:
    """A write in the current context through ``lb.write()``: the token moves."""
    with lb.write() as conn:
        return int(
            conn.execute(
                "UPDATE rw_counters SET v = v + 1 WHERE id = %s RETURNING v", (row,)
            ).fetchone()[0]
        )


def test_async_balancer_waits_adaptively(healthy_cluster: LocalCluster) -> None:
    healthy_cluster.lag(1, "150ms")
    config = replica_config(healthy_cluster, [1, 2], max_wait=1.0)

    async def main() -> list[tuple[int, int, bool]]:
        async with pgreplica.AsyncLoadBalancer(config=config) as alb:
            async with alb.write() as conn:
                await conn.execute(
                    "INSERT INTO rw_counters (id, v) VALUES (706, 0) ON CONFLICT (id) DO NOTHING"
                )
            healthy_cluster.wait_replayed()
            healthy_cluster.pause(2)
            out = []
            for _ in range(3):
                with alb.isolated():
                    async with alb.write() as conn:
                        cur = await conn.execute(
                            "UPDATE rw_counters SET v = v + 1 WHERE id = 706 RETURNING v"
                        )
                        written = (await cur.fetchone())[0]
                    async with alb.read() as conn:
                        cur = await conn.execute("SELECT v FROM rw_counters WHERE id = 706")
                        out.append((written, (await cur.fetchone())[0], conn.on_replica))
            return out

    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as lb:
        prepare(lb, range(0, 1))  # the table
    healthy_cluster.wait_replayed()
    results = asyncio.run(main())
    assert all(written == seen and on_replica for written, seen, on_replica in results)


@pytest.mark.parametrize("value", [-0.001, "5ms", float("nan"), float("inf")])
def test_bad_max_wait_is_refused(value: object) -> None:
    with pytest.raises(pgreplica.ConfigError, match="max_wait"):
        pgreplica.Settings(
            databases={"main": pgreplica.DatabaseConfig(name="main", primary="host=x")},
            max_wait=value,
        )


# -- a replica that hangs while reads after their own write check and wait on it ----------

HANG_SECONDS = 2.5
#: No read may take this long: the hung replica is given up within about a second.
READ_BOUND = 1.5


@pytest.mark.parametrize("replicas", [[1, 2], [1]])
@pytest.mark.parametrize("api", ["read", "connection"])
def test_sync_reads_after_writes_survive_a_replica_hanging_under_their_checks(
    healthy_cluster: LocalCluster, api: str, replicas: list[int]
) -> None:
    # 4 threads write and read back at once: the reads check replica 1 directly and
    # wait for it (the default max_wait); replica 1 is frozen (SIGSTOP) mid-run
    config = replica_config(healthy_cluster, replicas)
    with pgreplica.LoadBalancer(config=config) as lb:
        rows = range(720, 724)
        prepare(lb, range(720, 725))
        healthy_cluster.wait_replayed()
        until = time.monotonic() + 0.5 + HANG_SECONDS + 0.5
        result: list[Tally] = []
        work = threading.Thread(
            target=lambda: result.append(threaded(lb, rows, until=until, api=api)), daemon=True
        )
        work.start()
        time.sleep(0.5)
        healthy_cluster.freeze(1)
        try:
            time.sleep(0.2)
            # reads complete while the replica is frozen, here too
            during = sync_cycles(lb, 724, cycles=20, api=api)
            time.sleep(max(0.0, until - 0.5 - time.monotonic()))
        finally:
            healthy_cluster.thaw(1)
        work.join(15)
    assert result, "a read never finished"
    check_tally(result[0], f"{api} {replicas}")
    check_tally(during, "during the hang")


def check_tally(tally: Tally, what: str) -> None:
    assert tally.errors == []
    assert tally.stale == 0
    assert tally.cycles > 0
    assert tally.worst_read < READ_BOUND, f"a read took {tally.worst_read:.2f}s"
    print(f"\n{what}: {tally.cycles} reads, worst {tally.worst_read:.3f}s")


def test_async_reads_after_writes_survive_a_replica_hanging_under_their_checks(
    healthy_cluster: LocalCluster,
) -> None:
    config = replica_config(healthy_cluster, [1])

    async def main() -> Tally:
        async with pgreplica.AsyncLoadBalancer(config=config) as alb:
            until = time.monotonic() + 0.5 + HANG_SECONDS + 0.5
            work = [
                asyncio.ensure_future(gathered(alb, range(724, 726), until=until, api="read")),
                asyncio.ensure_future(
                    gathered(alb, range(726, 728), until=until, api="connection")
                ),
            ]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(healthy_cluster.freeze, 1)
            try:
                await asyncio.sleep(HANG_SECONDS)
            finally:
                await asyncio.to_thread(healthy_cluster.thaw, 1)
            total = Tally()
            for tally in await asyncio.wait_for(asyncio.gather(*work), 15):
                total.add(tally)
            return total

    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as lb:
        prepare(lb, range(724, 728))
    healthy_cluster.wait_replayed()
    check_tally(asyncio.run(main()), "async")
