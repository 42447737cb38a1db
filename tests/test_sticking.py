"""Server-side sticking: both stores on a real Redis, and read-your-writes across
contexts without a token on the real local cluster."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import pgreplica
from pgreplica.lsn import CausalToken
from pgreplica.sticking import (
    AsyncRedisStickingStore,
    AsyncSticking,
    MemoryStickingStore,
    RedisStickingStore,
    Sticking,
    StickingStore,
    StickingUnavailable,
)
from pgreplica.testing import LocalCluster
from pgreplica.workload import INCREMENT_SQL, READ_SQL, prepare, wait_until
from redis_server import free_port, redis_server  # noqa: F401
from secrets_registry import register_secret

redis = pytest.importorskip("redis")

#: Counter rows of rw_counters owned by this module (other modules use 0..63).
ROW = 900
RAW_ID = "alice.42@example.com"
register_secret("sticking-s3cret-key", "sticking key secret")


def token(**lsns: int) -> CausalToken:
    return CausalToken(lsns)


def host_at(lb: pgreplica.LoadBalancer, port: int) -> Any:
    return next(h for h in lb._router.hosts.values() if h.label.startswith(f"127.0.0.1:{port}/"))


@pytest.fixture
def redis_url(redis_server: str) -> str:  # noqa: F811
    return redis_server


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone, so tests sharing the server never collide."""
    return f"pgreplica:test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_store(redis_url: str, prefix: str) -> Iterator[RedisStickingStore]:
    with RedisStickingStore(redis_url, prefix=prefix) as store:
        yield store


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> StickingStore:
    if request.param == "memory":
        return MemoryStickingStore()
    result: RedisStickingStore = request.getfixturevalue("redis_store")
    return result


@pytest.fixture
def offline_lb() -> Iterator[pgreplica.LoadBalancer]:
    """A balancer never opened: sticking's keys and settings need no server."""
    lb = pgreplica.LoadBalancer(
        "postgresql://127.0.0.1:9/none", ["postgresql://127.0.0.1:10/none"], max_lag_seconds=45
    )
    yield lb
    lb.close()


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    balancer = pgreplica.LoadBalancer(config=healthy_cluster.config())
    prepare(balancer, range(ROW, ROW + 4))
    healthy_cluster.wait_replayed()  # the table and rows exist on the replicas too
    balancer.open()
    yield balancer
    balancer.close()


# --------------------------------------------------------------------------- stores


def test_stick_keeps_the_maximum_per_database(store: StickingStore) -> None:
    store.stick("k", token(main=100, ci=5), 60)
    store.stick("k", token(main=50), 60)  # older: never lowers main
    store.stick("k", token(ci=7, other=3), 60)
    assert store.get("k") == token(main=100, ci=7, other=3)
    store.stick("k", CausalToken(), 60)  # empty: nothing changes
    assert store.get("k") == token(main=100, ci=7, other=3)


def test_positions_compare_exactly_as_64_bit_integers(store: StickingStore) -> None:
    top = 2**64 - 1
    store.stick("k", token(main=top - 1), 60)
    store.stick("k", token(main=top - 2), 60)  # a double cannot tell these apart
    assert store.get("k").get("main") == top - 1
    store.stick("k", token(main=top), 60)
    assert store.get("k").get("main") == top
    store.stick("short", token(main=9), 60)
    store.stick("short", token(main=10), 60)  # longer decimal text is larger
    store.stick("short", token(main=8), 60)
    assert store.get("short").get("main") == 10
    assert not store.unstick_if_covered("k", token(main=top - 1))
    assert store.unstick_if_covered("k", token(main=top))


def test_get_of_an_absent_key_is_empty(store: StickingStore) -> None:
    assert store.get("absent") == CausalToken()
    assert not store.get("absent")
    assert store.unstick_if_covered("absent", token(main=1)) is False


def test_expiry_is_never_shortened(store: StickingStore) -> None:
    store.stick("k", token(main=1), 1.5)
    store.stick("k", token(main=2), 0.2)  # a shorter ttl does not shorten the life
    time.sleep(0.5)
    assert store.get("k") == token(main=2)
    store.stick("short", token(main=1), 0.3)
    time.sleep(0.15)
    store.stick("short", token(main=1), 0.6)  # a longer one extends it
    time.sleep(0.3)
    assert store.get("short") == token(main=1)
    wait_until(lambda: not store.get("short"), timeout=5, what="expiry")


def test_unstick_only_when_covered(store: StickingStore) -> None:
    store.stick("k", token(main=100, ci=50), 60)
    assert not store.unstick_if_covered("k", token(main=200))  # ci missing: not covered
    assert not store.unstick_if_covered("k", token(main=200, ci=49))  # partially
    assert not store.unstick_if_covered("k", CausalToken())
    assert store.get("k") == token(main=100, ci=50)
    assert store.unstick_if_covered("k", token(main=100, ci=50, other=1))
    assert store.get("k") == CausalToken()
    assert not store.unstick_if_covered("k", token(main=100, ci=50))  # already gone


def test_concurrent_sticks_end_at_the_maximum(store: StickingStore) -> None:
    threads, per_thread = 8, 200
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                store.stick("k", token(main=i * threads + t + 1, **{f"t{t}": i + 1}), 60)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert store.get("k") == token(
        main=threads * per_thread, **{f"t{t}": per_thread for t in range(threads)}
    )


def test_redis_layout_hash_of_decimal_positions_with_expiry(
    redis_store: RedisStickingStore, redis_client: Any, prefix: str
) -> None:
    redis_store.stick("k", token(main=0x16B3748, ci=7), 30)
    assert redis_client.hgetall(prefix + "k") == {b"main": b"23803720", b"ci": b"7"}
    assert 29_000 < redis_client.pttl(prefix + "k") <= 30_000
    redis_store.stick("k", token(main=1), 5)
    assert redis_client.pttl(prefix + "k") > 25_000  # not shortened to 5 s


def test_redis_malformed_data_is_unavailable(
    redis_store: RedisStickingStore, redis_client: Any, prefix: str
) -> None:
    redis_client.hset(prefix + "bad", mapping={"main": "0x10"})
    with pytest.raises(StickingUnavailable, match="malformed"):
        redis_store.get("bad")
    redis_client.set(prefix + "string", "x")  # a key of another type: WRONGTYPE
    with pytest.raises(StickingUnavailable) as info:
        redis_store.stick("string", token(main=1), 60)
    assert isinstance(info.value.__cause__, redis.ResponseError)
    assert isinstance(info.value, pgreplica.PgReplicaError)


def test_memory_store_is_bounded_expired_first_then_oldest() -> None:
    store = MemoryStickingStore(max_keys=3)
    store.stick("a", token(main=1), 60)
    store.stick("b", token(main=1), 0.05)
    store.stick("c", token(main=1), 60)
    time.sleep(0.1)
    store.stick("d", token(main=1), 60)  # full: the expired "b" goes
    assert [bool(store.get(k)) for k in "abcd"] == [True, False, True, True]
    store.stick("a", token(main=2), 60)  # "a" is now the most recently stuck
    store.stick("e", token(main=1), 60)  # full, nothing expired: the oldest ("c") goes
    assert [bool(store.get(k)) for k in "acde"] == [True, False, True, True]
    assert len(store) == 3


# --------------------------------------------------------------------------- Sticking


def test_keys_are_hashed_and_never_hold_the_raw_id(
    offline_lb: pgreplica.LoadBalancer, redis_store: RedisStickingStore, redis_client: Any
) -> None:
    sticking = Sticking(offline_lb, redis_store)
    digest = hashlib.sha256(RAW_ID.encode()).hexdigest()
    assert sticking.key(RAW_ID) == f"user:{digest}"
    assert sticking.key(42) == sticking.key("42")  # str(ident)
    sticking.stick(RAW_ID, token(main=5))
    keys = [k.decode() for k in redis_client.scan_iter(match=redis_store.prefix + "*")]
    assert keys == [f"{redis_store.prefix}user:{digest}"]
    assert not any(part in k for k in keys for part in (RAW_ID, "alice", "example"))
    assert sticking.store.get(sticking.key(RAW_ID)) == token(main=5)
    keyed = Sticking(offline_lb, redis_store, namespace="tenant", secret="sticking-s3cret-key")
    assert keyed.key(RAW_ID).startswith("tenant:")
    assert keyed.key(RAW_ID).split(":")[1] != digest  # HMAC, not a bare hash


def test_ttl_defaults_to_the_lag_bound_and_rejects_less(
    offline_lb: pgreplica.LoadBalancer,
) -> None:
    store = MemoryStickingStore()
    assert Sticking(offline_lb, store).ttl == 90.0  # 2 * max_lag_seconds (45)
    assert Sticking(offline_lb, store, ttl=45).ttl == 45.0
    with pytest.raises(pgreplica.ConfigError, match=r"sticking\.ttl") as info:
        Sticking(offline_lb, store, ttl=44.9)
    assert info.value.setting == "sticking.ttl"
    with pytest.raises(pgreplica.ConfigError, match=r"sticking\.ttl"):
        Sticking(offline_lb, store, ttl=float("nan"))
    with pytest.raises(pgreplica.ConfigError, match=r"sticking\.namespace"):
        Sticking(offline_lb, store, namespace="a:b")
    short = pgreplica.LoadBalancer("postgresql://127.0.0.1:9/none", max_lag_seconds=5)
    assert Sticking(short, store).ttl == 60.0  # never below a minute by default
    short.close()


def test_stick_defaults_to_the_context_token(
    offline_lb: pgreplica.LoadBalancer,
) -> None:
    store = MemoryStickingStore()
    sticking = Sticking(offline_lb, store)
    with offline_lb.isolated():
        sticking.stick(42)  # empty token: no key at all
        assert len(store) == 0
        with offline_lb.causal(token(main=77)):
            sticking.stick(42)
    assert store.get(sticking.key(42)) == token(main=77)
    with offline_lb.isolated():
        with sticking.adopt(42) as state:
            assert offline_lb.token() == token(main=77)
            assert not state.use_primary
        assert not offline_lb.token()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_adopt_gives_read_your_writes_without_a_token_under_lag(
    kind: str, lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, request: Any
) -> None:
    store: StickingStore = (
        MemoryStickingStore() if kind == "memory" else request.getfixturevalue("redis_store")
    )
    sticking = Sticking(lb, store)
    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")

    def write() -> int:
        """A request acting for user 42: write, then stick; its token is dropped."""
        with lb.isolated():
            with lb.write() as conn:
                written = int(conn.execute(INCREMENT_SQL, (ROW,)).fetchone()[0])
            sticking.stick(42)
        return written

    # Control: a fresh context without the stick reads a lagging replica.
    control_stale = 0
    for _ in range(5):
        written = write()
        with lb.isolated(), lb.read() as conn:
            control_stale += int(conn.execute(READ_SQL, (ROW,)).fetchone()[0]) < written
    assert control_stale > 0

    stale, reasons = 0, Counter[str]()
    for _ in range(100):
        written = write()
        with lb.isolated(), sticking.adopt(42), lb.read() as conn:
            seen = int(conn.execute(READ_SQL, (ROW,)).fetchone()[0])
            reasons[conn.reason] += 1
        stale += seen < written
    assert stale == 0
    assert sum(reasons.values()) == 100
    # The replicas were 300 ms behind every fresh write: the reads went to the primary.
    assert reasons["replicas_behind"] >= 90, reasons


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_release_once_every_replica_caught_up(
    kind: str, lb: pgreplica.LoadBalancer, request: Any
) -> None:
    store: StickingStore = (
        MemoryStickingStore() if kind == "memory" else request.getfixturevalue("redis_store")
    )
    sticking = Sticking(lb, store)
    with lb.isolated():
        with lb.write() as conn:
            conn.execute(INCREMENT_SQL, (ROW + 1,))
        written = lb.token()
        sticking.stick(42)
    key = sticking.key(42)
    # a store keeps positions only (its entries live a ttl, not a failover)
    assert store.get(key) == CausalToken(dict(written.items()))
    wait_until(lambda: sticking.release_if_caught_up(42), timeout=10, what="release")
    assert store.get(key) == CausalToken()
    assert sticking.caught_up().covers(written)
    assert sticking.release_if_caught_up(42) is False  # nothing left to release


def test_release_waits_for_lagging_and_down_replicas(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, redis_store: RedisStickingStore
) -> None:
    sticking = Sticking(lb, redis_store)
    replica1 = host_at(lb, healthy_cluster.port(1))
    replica2 = host_at(lb, healthy_cluster.port(2))

    healthy_cluster.lag(1, "1s")
    with lb.isolated():
        with lb.write() as conn:
            conn.execute(INCREMENT_SQL, (ROW + 2,))
        written = lb.token().get("main")
        sticking.stick(42)
    assert sticking.release_if_caught_up(42) is False  # replica 1 has not replayed it
    wait_until(lambda: sticking.release_if_caught_up(42), timeout=10, what="lagging release")
    healthy_cluster.lag(1, 0)

    healthy_cluster.kill(2)
    wait_until(lambda: not replica2.up, timeout=10, what="replica 2 seen down")
    with lb.isolated():
        with lb.write() as conn:
            conn.execute(INCREMENT_SQL, (ROW + 2,))
        written = lb.token().get("main")
        sticking.stick(42)
    wait_until(lambda: replica1.replay_lsn >= written, timeout=10, what="replica 1 replays")
    assert sticking.release_if_caught_up(42) is False  # a down replica is not caught up
    assert redis_store.get(sticking.key(42))
    healthy_cluster.start(2)
    wait_until(lambda: sticking.release_if_caught_up(42), timeout=30, what="release after start")


def test_unreachable_redis_falls_back_to_the_primary(
    lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisStickingStore(f"redis://127.0.0.1:{free_port()}/0") as store:
        sticking = Sticking(lb, store)
        with caplog.at_level(logging.WARNING, logger="pgreplica.sticking"):
            with lb.isolated(), sticking.adopt(RAW_ID) as state, lb.read() as conn:
                assert state.use_primary
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
                assert not conn.on_replica
                assert conn.reason == "primary_scope"
            assert sticking.release_if_caught_up(RAW_ID) is False
        with pytest.raises(StickingUnavailable) as info:
            sticking.stick(RAW_ID, token(main=1))
        assert isinstance(info.value.__cause__, redis.ConnectionError)
    messages = [r.getMessage() for r in caplog.records if r.name == "pgreplica.sticking"]
    assert len(messages) == 2
    assert all(m.startswith("sticking_unavailable key_namespace=user error=") for m in messages)
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    digest = sticking.key(RAW_ID).split(":")[1]
    assert not any(RAW_ID in m or "alice" in m or digest in m for m in messages)


# --------------------------------------------------------------------------- asyncio


def test_async_sticking_with_async_redis(
    lb: pgreplica.LoadBalancer,  # creates the counter rows
    healthy_cluster: LocalCluster,
    redis_url: str,
    redis_store: RedisStickingStore,
    prefix: str,
) -> None:
    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")

    async def main() -> tuple[int, Counter[str]]:
        stale, reasons = 0, Counter[str]()
        async with (
            pgreplica.AsyncLoadBalancer(config=healthy_cluster.config()) as alb,
            AsyncRedisStickingStore(redis_url, prefix=prefix) as store,
        ):
            sticking = AsyncSticking(alb, store)
            for _ in range(20):
                with alb.isolated():
                    async with alb.write() as conn:
                        cur = await conn.execute(INCREMENT_SQL, (ROW + 3,))
                        written = int((await cur.fetchone())[0])
                    await sticking.stick(42)
                with alb.isolated():
                    async with sticking.adopt(42), alb.read() as conn:
                        cur = await conn.execute(READ_SQL, (ROW + 3,))
                        stale += int((await cur.fetchone())[0]) < written
                        reasons[conn.reason] += 1
            # The same keys and scripts as the sync store.
            assert redis_store.get(sticking.key(42)) == await store.get(sticking.key(42))
            await wait_for(lambda: sticking.release_if_caught_up(42))
        return stale, reasons

    stale, reasons = asyncio.run(main())
    assert stale == 0
    assert reasons["replicas_behind"] >= 15, reasons


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_async_sticking_falls_back_and_accepts_a_memory_store(
    offline_lb: pgreplica.LoadBalancer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        memory = AsyncSticking(offline_lb, MemoryStickingStore())
        with offline_lb.isolated():
            await memory.stick(7, token(main=9))
            async with memory.adopt(7):
                assert offline_lb.token() == token(main=9)
            assert not offline_lb.token()
        async with AsyncRedisStickingStore(f"redis://127.0.0.1:{free_port()}/0") as store:
            sticking = AsyncSticking(offline_lb, store)
            async with sticking.adopt(RAW_ID) as state:
                assert state.use_primary
            assert await sticking.release_if_caught_up(RAW_ID) is False
            with pytest.raises(StickingUnavailable):
                await sticking.stick(RAW_ID, token(main=1))

    with caplog.at_level(logging.WARNING, logger="pgreplica.sticking"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "pgreplica.sticking"]
    assert len(messages) == 2 and not any(RAW_ID in m for m in messages)
