"""WAL-location envelopes for pub/sub consumers (pgreplica.pubsub): the envelope round
trip and its refusals, and real Redis Pub/Sub consumers, in a thread, in an asyncio
task and in another process, that read what the publisher wrote."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pgreplica
from pgreplica import jobs, pubsub
from pgreplica.lsn import CausalToken
from pgreplica.pubsub import EnvelopeError
from pgreplica.testing import LocalCluster
from secrets_registry import register_secret

redis = pytest.importorskip("redis")

TABLE = "CREATE TABLE IF NOT EXISTS ps_items (id serial PRIMARY KEY, v text NOT NULL)"
register_secret("pubsub-s3cret-key", "pubsub signing key")


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    healthy_cluster.execute(0, TABLE)
    healthy_cluster.wait_replayed()
    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as balancer, balancer.isolated():
        yield balancer


# -- the envelope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\xffbytes",
        b"",
        'text with "quotes", {braces} and é',
        "",
        {"id": 7, "nested": [1, 2.5, None, True, {"k": "v"}]},
        [1, 2, 3],
        42,
        None,
    ],
)
def test_every_payload_type_round_trips_exactly(
    lb: pgreplica.LoadBalancer, payload: object
) -> None:
    with lb.write() as conn:
        conn.execute("INSERT INTO ps_items (v) VALUES ('round trip')")
    envelope = pubsub.wrap(payload, lb)
    body = json.loads(envelope)
    assert body["pgreplica"] == 1 and set(body["wal"]) == {"main"}
    for message in (envelope, envelope.encode()):
        back, token = pubsub.unwrap(message)
        assert back == payload and type(back) is type(payload)
        assert token == lb.token()


@pytest.mark.parametrize("message", [b"plain", "plain", '{"other": 1}', "[1, 2]", 17, None])
def test_a_message_without_an_envelope_passes_through(message: object) -> None:
    back, token = pubsub.unwrap(message)
    assert back is message and token is None


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ('{"pgreplica": 1, "wal": {', "not valid JSON"),
        ('{"pgreplica": 2, "wal": {}, "type": "json", "data": 1}', "unknown envelope version"),
        ('{"pgreplica": 1, "wal": {"main": "nope"}, "type": "json", "data": 1}', "positions"),
        ('{"pgreplica": 1, "wal": {}, "type": "xml", "data": 1}', "type"),
        ('{"pgreplica": 1, "wal": {}, "type": "json"}', "data"),
        ('{"pgreplica": 1, "wal": [], "type": "json", "data": 1}', "wal"),
        ('{"pgreplica": 1, "wal": {}, "type": "bytes", "data": "%%%"}', "base64"),
        ('{"pgreplica": 1, "wal": {}, "type": "text", "data": 5}', "string"),
        (b'{"pgreplica": 1, "wal": {}, "\xff": 1}', "UTF-8"),
    ],
)
def test_a_malformed_envelope_raises_one_clear_error(message: object, problem: str) -> None:
    with pytest.raises(EnvelopeError, match=problem):
        pubsub.unwrap(message)
    assert issubclass(EnvelopeError, pgreplica.PgReplicaError)


def test_oversized_unsigned_and_tampered_envelopes_are_refused(
    lb: pgreplica.LoadBalancer,
) -> None:
    big = pubsub.wrap("x" * 2000, lb)
    with pytest.raises(EnvelopeError, match="over the 1000 limit"):
        pubsub.unwrap(big, max_bytes=1000)
    signed = pubsub.wrap({"id": 1}, lb, key="pubsub-s3cret-key")
    assert pubsub.unwrap(signed, key="pubsub-s3cret-key")[0] == {"id": 1}
    assert pubsub.unwrap(signed)[0] == {"id": 1}  # the signature is optional to check
    with pytest.raises(EnvelopeError, match="not signed"):
        pubsub.unwrap(pubsub.wrap({"id": 1}, lb), key="pubsub-s3cret-key")
    with pytest.raises(EnvelopeError, match="does not match"):
        pubsub.unwrap(signed, key="other")
    forged = json.loads(signed)
    forged["wal"] = {"main": "FFFFFFFF/FFFFFFFF"}
    with pytest.raises(EnvelopeError, match="does not match"):
        pubsub.unwrap(json.dumps(forged), key="pubsub-s3cret-key")
    with pytest.raises(EnvelopeError, match="JSON-able"):
        pubsub.wrap(object(), lb)
    with pytest.raises(EnvelopeError, match="key must not be empty"):
        pubsub.wrap(1, lb, key="")


def test_a_bad_message_goes_to_on_error_and_the_loop_goes_on(lb: pgreplica.LoadBalancer) -> None:
    seen: list[object] = []
    errors: list[str] = []

    @pubsub.consumer(lb, on_error=lambda message, exc: errors.append(str(exc)))
    def handle(payload: object) -> None:
        seen.append(payload)

    for message in ('{"pgreplica": 1, "wal": {', pubsub.wrap({"id": 2}, lb), "legacy"):
        handle(message)
    assert seen == [{"id": 2}, "legacy"] and errors == ["envelope is not valid JSON"]


# -- Redis Pub/Sub under lag -------------------------------------------------------------------


def subscribe(url: str, channel: str) -> Any:
    client = redis.Redis.from_url(url)
    subscription = client.pubsub(ignore_subscribe_messages=True)
    subscription.subscribe(channel)
    deadline = time.monotonic() + 5
    while client.pubsub_numsub(channel)[0][1] < 1:
        if time.monotonic() > deadline:
            raise AssertionError("the subscription did not register")
        subscription.get_message(timeout=0.05)
    return subscription


def publish_items(
    lb: pgreplica.LoadBalancer, url: str, channel: str, count: int, pause: float = 0.0
) -> list[int]:
    """Write a row and publish its id, ``count`` times, each from a fresh context,
    ``pause`` seconds apart (so that each message meets a replica still behind)."""
    client = redis.Redis.from_url(url)
    ids = []
    for i in range(count):
        with lb.isolated():
            with lb.write() as conn:
                row = conn.execute(
                    "INSERT INTO ps_items (v) VALUES (%s) RETURNING id", (f"item {i}",)
                ).fetchone()
            assert row is not None
            ids.append(int(row[0]))
            client.publish(channel, pubsub.wrap({"id": row[0]}, lb))
        time.sleep(pause)
    return ids


def read_item(lb: pgreplica.LoadBalancer, item: int) -> tuple[bool, bool]:
    """(found, on_replica) for a read of ``item`` in the current context."""
    with lb.read() as conn:
        found = conn.execute("SELECT 1 FROM ps_items WHERE id = %s", (item,)).fetchone()
        return found is not None, conn.on_replica


def consume(lb: pgreplica.LoadBalancer, subscription: Any, count: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    @pubsub.consumer(lb, wait=(4, 0.1), name="ps-items")
    def on_item(payload: dict[str, Any]) -> None:
        found, on_replica = read_item(lb, payload["id"])
        results.append({"id": payload["id"], "found": found, "on_replica": on_replica})

    def control(message: Any) -> bool:
        payload, _ = pubsub.unwrap(message)  # ignores the envelope's positions
        with lb.isolated():
            found, _ = read_item(lb, payload["id"])
        return found

    deadline = time.monotonic() + 30
    while len(results) < count and time.monotonic() < deadline:
        message = subscription.get_message(timeout=0.5)
        if message is None:
            continue
        control_found = control(message["data"])  # first: before anyone waited
        with lb.isolated():
            on_item(message["data"])
        results[-1]["control_found"] = control_found
    return results


@pytest.mark.parametrize("lagging", [True, False])
def test_a_redis_consumer_in_another_thread_reads_what_was_published(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, redis_server: str, lagging: bool
) -> None:
    channel = f"ps-thread-{lagging}"
    subscription = subscribe(redis_server, channel)
    consumer_lb = pgreplica.LoadBalancer(config=healthy_cluster.config())
    if lagging:
        healthy_cluster.lag(1, "300ms")
        healthy_cluster.lag(2, "300ms")
    try:
        with consumer_lb:
            out: list[list[dict[str, Any]]] = []
            thread = threading.Thread(
                target=lambda: out.append(consume(consumer_lb, subscription, 10))
            )
            thread.start()
            ids = publish_items(lb, redis_server, channel, 10, pause=0.4 if lagging else 0.0)
            thread.join(60)
    finally:
        healthy_cluster.lag(1, 0)
        healthy_cluster.lag(2, 0)
    (results,) = out
    assert [r["id"] for r in results] == ids
    assert all(r["found"] for r in results), results  # 0 misses
    if lagging:
        assert sum(not r["control_found"] for r in results) >= 7, results  # the lag is real
    else:
        assert sum(r["on_replica"] for r in results) >= 9, results
    counts = jobs.outcomes("ps-items")
    assert counts["replica"] + counts["primary"] >= 10


def test_an_asyncio_consumer_reads_what_was_published(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, redis_server: str
) -> None:
    import redis.asyncio as aredis

    channel = "ps-async"
    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")

    async def main() -> list[tuple[bool, bool]]:
        alb = pgreplica.AsyncLoadBalancer(config=healthy_cluster.config())
        client = aredis.Redis.from_url(redis_server)
        results: list[tuple[bool, bool]] = []

        @pubsub.consumer(alb, wait=(4, 0.1), name="ps-async")
        async def on_item(payload: dict[str, Any]) -> None:
            async with alb.read() as conn:
                cur = await conn.execute("SELECT 1 FROM ps_items WHERE id = %s", (payload["id"],))
                results.append((await cur.fetchone() is not None, conn.on_replica))

        async with alb, client.pubsub(ignore_subscribe_messages=True) as subscription:
            await subscription.subscribe(channel)
            while (await client.pubsub_numsub(channel))[0][1] < 1:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(publish_items, lb, redis_server, channel, 8)
            deadline = time.monotonic() + 30
            while len(results) < 8 and time.monotonic() < deadline:
                message = await subscription.get_message(timeout=0.5)
                if message is not None:
                    with alb.isolated():
                        await on_item(message["data"])
        await client.aclose()
        return results

    try:
        results = asyncio.run(main())
    finally:
        healthy_cluster.lag(1, 0)
        healthy_cluster.lag(2, 0)
    assert len(results) == 8 and all(found for found, _ in results), results


CONSUMER_PROCESS = """
import json, sys, time
import redis, pgreplica
from pgreplica import pubsub
config, url, channel, count = json.loads(sys.argv[1])
lb = pgreplica.LoadBalancer(config=config)
client = redis.Redis.from_url(url)
sub = client.pubsub(ignore_subscribe_messages=True)
sub.subscribe(channel)
print("ready", flush=True)
seen = []
@pubsub.consumer(lb, wait=(4, 0.1), name="ps-process")
def on_item(payload):
    with lb.read() as conn:
        row = conn.execute("SELECT 1 FROM ps_items WHERE id = %s", (payload["id"],)).fetchone()
        seen.append({"id": payload["id"], "found": row is not None, "replica": conn.on_replica})
deadline = time.monotonic() + 30
with lb:
    while len(seen) < count and time.monotonic() < deadline:
        message = sub.get_message(timeout=0.5)
        if message is not None:
            with lb.isolated():
                on_item(message["data"])
print(json.dumps(seen), flush=True)
"""


def test_a_consumer_in_another_process_reads_what_was_published(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, redis_server: str
) -> None:
    channel = "ps-process"
    args = json.dumps([healthy_cluster.config(), redis_server, channel, 8])
    process = subprocess.Popen(
        [sys.executable, "-c", CONSUMER_PROCESS, args], stdout=subprocess.PIPE, text=True
    )
    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        client = redis.Redis.from_url(redis_server)
        deadline = time.monotonic() + 10
        while client.pubsub_numsub(channel)[0][1] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        ids = publish_items(lb, redis_server, channel, 8)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        healthy_cluster.lag(1, 0)
        healthy_cluster.lag(2, 0)
    seen = json.loads(output.strip().splitlines()[-1])
    assert [s["id"] for s in seen] == ids and all(s["found"] for s in seen), seen


def test_the_token_of_an_envelope_is_the_context_s_own(lb: pgreplica.LoadBalancer) -> None:
    with lb.isolated():
        assert pubsub.unwrap(pubsub.wrap(1, lb))[1] == CausalToken.from_dict(jobs.capture(lb))


# -- PostgreSQL LISTEN/NOTIFY: published inside the writing transaction -------------------------


def test_notify_inside_the_writing_transaction_is_read_where_it_committed(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    import psycopg

    channel = "ps_notify"
    listener = psycopg.connect(healthy_cluster.dsn(0), autocommit=True)
    listener.execute(f"LISTEN {channel}")
    consumer_lb = pgreplica.LoadBalancer(config=healthy_cluster.config())
    results: list[dict[str, Any]] = []

    @pubsub.consumer(consumer_lb, wait=(6, 0.1), name="ps-notify")
    def on_item(payload: dict[str, Any]) -> None:
        found, on_replica = read_item(consumer_lb, payload["id"])
        results.append({"id": payload["id"], "found": found, "on_replica": on_replica})

    def control(message: str) -> bool:
        payload, token = pubsub.unwrap(message)
        assert isinstance(token, pubsub.Commit)
        with consumer_lb.isolated():
            return read_item(consumer_lb, payload["id"])[0]

    def consume(count: int) -> None:
        misses = 0
        for note in listener.notifies(timeout=30, stop_after=count):
            misses += not control(note.payload)
            with consumer_lb.isolated():
                on_item(note.payload)
        results.append({"control_misses": misses})

    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")
    ids: list[int] = []
    try:
        with consumer_lb:
            thread = threading.Thread(target=consume, args=(8,))
            thread.start()
            for i in range(8):
                with lb.isolated(), lb.write() as conn:
                    row = conn.execute(
                        "INSERT INTO ps_items (v) VALUES (%s) RETURNING id", (f"notify {i}",)
                    ).fetchone()
                    assert row is not None
                    ids.append(int(row[0]))
                    pubsub.notify(conn, channel, {"id": row[0]}, lb)
                time.sleep(0.4)
            # a rolled-back transaction's notification is never delivered
            with pytest.raises(RuntimeError), lb.isolated(), lb.write() as conn:
                pubsub.notify(conn, channel, {"id": -1}, lb)
                raise RuntimeError("rolled back")
            thread.join(60)
    finally:
        healthy_cluster.lag(1, 0)
        healthy_cluster.lag(2, 0)
        listener.close()
    *reads, summary = results
    assert [r["id"] for r in reads] == ids and all(r["found"] for r in reads), reads
    assert summary["control_misses"] >= 5, results  # the lag is real
    assert any(r["on_replica"] for r in reads), reads  # replicas served once caught up


def test_a_notify_envelope_must_fit_and_carries_the_transaction(
    lb: pgreplica.LoadBalancer,
) -> None:
    with (
        lb.isolated(),
        lb.write() as conn,
        pytest.raises(EnvelopeError, match="limited to 7999"),
    ):
        pubsub.notify(conn, "ps_big", "x" * 9000, lb)
    envelope = pubsub._notify_envelope({"id": 1}, lb, None, ("12345",), None)
    payload, token = pubsub.unwrap(envelope)
    assert payload == {"id": 1} and token == pubsub.Commit({"main": "12345"})
    with pytest.raises(EnvelopeError, match="transaction ids"):
        pubsub.unwrap(envelope.replace('"12345"', '"x1"'))


def test_notify_and_its_consumer_in_asyncio(healthy_cluster: LocalCluster) -> None:
    import psycopg

    channel = "ps_anotify"
    healthy_cluster.execute(0, TABLE)

    async def main() -> tuple[list[tuple[bool, bool]], int]:
        alb = pgreplica.AsyncLoadBalancer(config=healthy_cluster.config())
        listener = await psycopg.AsyncConnection.connect(healthy_cluster.dsn(0), autocommit=True)
        await listener.execute(f"LISTEN {channel}")
        results: list[tuple[bool, bool]] = []
        misses = 0

        @pubsub.consumer(alb, wait=(6, 0.1), name="ps-anotify")
        async def on_item(payload: dict[str, Any]) -> None:
            async with alb.read() as conn:
                cur = await conn.execute("SELECT 1 FROM ps_items WHERE id = %s", (payload["id"],))
                results.append((await cur.fetchone() is not None, conn.on_replica))

        async def consume() -> None:
            nonlocal misses
            async for note in listener.notifies(timeout=30, stop_after=5):
                payload, _ = pubsub.unwrap(note.payload)
                with alb.isolated():
                    async with alb.read() as conn:  # the control: no envelope
                        cur = await conn.execute(
                            "SELECT 1 FROM ps_items WHERE id = %s", (payload["id"],)
                        )
                        misses += await cur.fetchone() is None
                    await on_item(note.payload)

        async with alb:
            task = asyncio.create_task(consume())
            for i in range(5):
                with alb.isolated():
                    async with alb.write() as conn:
                        cur = await conn.execute(
                            "INSERT INTO ps_items (v) VALUES (%s) RETURNING id", (f"anotify {i}",)
                        )
                        row = await cur.fetchone()
                        assert row is not None
                        await pubsub.anotify(conn, channel, {"id": row[0]}, alb)
                await asyncio.sleep(0.4)
            await asyncio.wait_for(task, 60)
        await listener.close()
        return results, misses

    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")
    try:
        results, misses = asyncio.run(main())
    finally:
        healthy_cluster.lag(1, 0)
        healthy_cluster.lag(2, 0)
    assert len(results) == 5 and all(found for found, _ in results), results
    assert misses >= 3, misses  # the lag is real
