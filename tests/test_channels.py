"""Django Channels on the real cluster and a real Redis (channels-redis): a writer saves a
signature and sends "signature N updated" through pgreplica's envelope layer; websocket
consumers (the example's SignatureUpdates, sync; an async one here) read it by id.

With 300 ms replay delay on every replica, every consumer that uses
``ReplicaConsumerMixin`` finds the row, on the primary or on a replica that caught up;
a control consumer that ignores the envelope misses rows (the lag is real). Without
lag the reads are served by replicas. The example runs under daphne in another process
for the cross-process case.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgreplica.testing import LocalCluster

pytest.importorskip("channels", reason="Django Channels is not installed (pip install '.[dev]')")
pytest.importorskip("channels_redis", reason="channels-redis is not installed (.[dev])")
pytest.importorskip("django", reason="Django is not installed (pip install '.[dev]')")

from django_project import EXAMPLE, dsn, example_env
from secrets_registry import register_secret

GROUP = "signatures"  # the example's group (perf.consumers.GROUP)
REPLICAS = ("read_replica", "read_replica_2")
register_secret("channels-s1gning-k3y", "channel layer signing key")


def layers(redis_url: str, **config: Any) -> dict[str, Any]:
    return {
        "default": {
            "BACKEND": "pgreplica.contrib.channels.EnvelopeChannelLayer",
            "CONFIG": {
                "layer": {
                    "BACKEND": "channels_redis.core.RedisChannelLayer",
                    "CONFIG": {"hosts": [redis_url]},
                },
                **config,
            },
        }
    }


@pytest.fixture
def redis_layer(project: None, redis_server: str) -> Iterator[str]:
    from django.test import override_settings

    with override_settings(CHANNEL_LAYERS=layers(redis_server)):
        yield redis_server


def lag(cluster: LocalCluster, delay: str | int) -> None:
    cluster.lag(1, delay)
    cluster.lag(2, delay)


def create(name: str) -> int:
    """Save a signature (autocommit: committed on return). Threads of asyncio's executor
    end with the event loop: their Django connections are closed here."""
    from django.db import connections
    from perf.models import Signature

    try:
        return int(Signature.objects.create(name=name).pk)
    finally:
        connections.close_all()


def publish(name: str, message_type: str = "signature.updated") -> int:
    """What a view does: save, then send through the layer."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    pk = create(name)
    async_to_sync(get_channel_layer().group_send)(GROUP, {"type": message_type, "id": pk})
    return pk


def consumers() -> tuple[Any, Any]:
    """An async consumer with the mixin (reads, and a handler that writes then reads),
    and a control consumer that ignores the envelope (replica reads, no token)."""
    from channels.db import database_sync_to_async
    from channels.generic.websocket import AsyncJsonWebsocketConsumer, JsonWebsocketConsumer
    from perf.models import Signature

    from pgreplica.contrib.channels import ReplicaConsumerMixin
    from pgreplica.contrib.django import replica_reads

    def read(pk: int) -> dict[str, Any]:
        signatures = Signature.objects.filter(pk=pk)
        found = signatures.values("id", "name").first()
        return {"id": pk, "signature": found, "alias": signatures.db}

    class AsyncUpdates(ReplicaConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
        groups = [GROUP]

        async def signature_updated(self, event: dict[str, Any]) -> None:
            await self.send_json(await database_sync_to_async(read)(event["id"]))

        async def signature_renamed(self, event: dict[str, Any]) -> None:
            def rename_and_read() -> dict[str, Any]:
                Signature.objects.filter(pk=event["id"]).update(name=f"renamed-{event['id']}")
                return read(event["id"])

            await self.send_json(await database_sync_to_async(rename_and_read)())

    class Control(JsonWebsocketConsumer):  # type: ignore[misc]
        groups = [GROUP]

        def signature_updated(self, event: dict[str, Any]) -> None:
            with replica_reads():
                self.send_json(read(event["id"]))

        signature_renamed = signature_updated

    return AsyncUpdates, Control


def run_scenario(
    count: int, pause: float, message_type: str = "signature.updated"
) -> dict[str, Any]:
    """Connect the example's consumer, the async one and the control; publish ``count``
    signatures from another thread; collect what each consumer pushed."""
    from channels.testing import WebsocketCommunicator
    from perf.consumers import SignatureUpdates

    async_updates, control = consumers()
    apps = {"sync": SignatureUpdates, "async": async_updates, "control": control}
    if message_type != "signature.updated":  # only the async consumer has the other handler
        apps = {"async": async_updates}

    async def scenario() -> dict[str, Any]:
        sockets = {
            name: WebsocketCommunicator(app.as_asgi(), "/ws/signatures/")
            for name, app in apps.items()
        }
        for communicator in sockets.values():
            connected, _ = await communicator.connect()
            assert connected
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in sockets}
        ids = []
        try:
            for i in range(count):
                name = f"live-{uuid.uuid4().hex[:8]}-{i}"
                ids.append(await asyncio.to_thread(publish, name, message_type))
                for kind, communicator in sockets.items():
                    results[kind].append(await communicator.receive_json_from(timeout=20))
                await asyncio.sleep(pause)
        finally:
            for communicator in sockets.values():
                await communicator.disconnect()
        return {"ids": ids, **results}

    return asyncio.run(scenario())


def test_consumers_read_what_the_message_announced_under_lag(
    redis_layer: str, healthy_cluster: LocalCluster
) -> None:
    lag(healthy_cluster, "300ms")
    try:
        outcome = run_scenario(8, 0.0)
    finally:
        lag(healthy_cluster, 0)
    for kind in ("sync", "async"):
        pushed = outcome[kind]
        assert [p["id"] for p in pushed] == outcome["ids"]
        misses = [p for p in pushed if p["signature"] is None]
        assert misses == [], (kind, misses)
        assert all(p["alias"] in ("default", *REPLICAS) for p in pushed), pushed
    control_misses = [p for p in outcome["control"] if p["signature"] is None]
    assert len(control_misses) >= 4, outcome["control"]  # the lag is real


def test_without_lag_the_consumers_read_replicas(
    redis_layer: str, healthy_cluster: LocalCluster
) -> None:
    outcome = run_scenario(6, 0.05)
    for kind in ("sync", "async"):
        assert all(p["signature"] is not None for p in outcome[kind]), outcome[kind]
        assert {p["alias"] for p in outcome[kind]} <= set(REPLICAS), outcome[kind]


def test_a_handler_that_writes_reads_its_write_on_the_primary(
    redis_layer: str, healthy_cluster: LocalCluster
) -> None:
    """The async consumer's handler renames the signature (an ORM write, in another
    thread than the dispatch) and reads it back: the read goes to the primary."""
    lag(healthy_cluster, "300ms")
    try:
        outcome = run_scenario(3, 0.0, message_type="signature.renamed")
    finally:
        lag(healthy_cluster, 0)
    for pushed in outcome["async"]:
        assert pushed["alias"] == "default", pushed
        assert pushed["signature"]["name"] == f"renamed-{pushed['id']}", pushed


def test_a_message_without_an_envelope_is_read_on_the_primary(
    redis_layer: str, healthy_cluster: LocalCluster
) -> None:
    """An older sender (a plain layer, no envelope) during a rolling deploy."""
    from channels.testing import WebsocketCommunicator
    from channels_redis.core import RedisChannelLayer
    from perf.consumers import SignatureUpdates

    async def scenario() -> dict[str, Any]:
        communicator = WebsocketCommunicator(SignatureUpdates.as_asgi(), "/ws/signatures/")
        assert (await communicator.connect())[0]
        plain = RedisChannelLayer(hosts=[redis_layer])
        pk = await asyncio.to_thread(create, f"plain-{uuid.uuid4().hex[:8]}")
        await plain.group_send(GROUP, {"type": "signature.updated", "id": pk})
        try:
            return dict(await communicator.receive_json_from(timeout=20))
        finally:
            await communicator.disconnect()

    lag(healthy_cluster, "300ms")
    try:
        pushed = asyncio.run(scenario())
    finally:
        lag(healthy_cluster, 0)
    assert pushed["signature"] is not None and pushed["alias"] == "default", pushed


def test_signed_envelopes_and_a_tampered_one(
    project: None,
    redis_server: str,
    healthy_cluster: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a key, the layer signs; a consumer that requires the key reads replicas for
    signed messages, and a tampered envelope is logged and handled on the primary (the
    websocket stays open)."""
    from channels.layers import get_channel_layer
    from channels.testing import WebsocketCommunicator
    from django.test import override_settings
    from perf.consumers import SignatureUpdates

    from pgreplica.contrib.channels import KEY

    class Signed(SignatureUpdates):  # type: ignore[misc]
        pgreplica_key = "channels-s1gning-k3y"

    async def scenario() -> list[dict[str, Any]]:
        communicator = WebsocketCommunicator(Signed.as_asgi(), "/ws/signatures/")
        assert (await communicator.connect())[0]
        layer = get_channel_layer()
        pushed = []
        try:
            for tamper in (False, True):
                pk = await asyncio.to_thread(create, f"signed-{uuid.uuid4().hex[:8]}")
                message = await layer.stamp({"type": "signature.updated", "id": pk})
                if tamper:  # positions changed on the way: the signature no longer matches
                    envelope = json.loads(message[KEY])
                    envelope["wal"] = {"default": "0/1"}
                    message[KEY] = json.dumps(envelope)
                await layer.layer.group_send(GROUP, message)
                pushed.append(dict(await communicator.receive_json_from(timeout=20)))
        finally:
            await communicator.disconnect()
        return pushed

    with (
        override_settings(CHANNEL_LAYERS=layers(redis_server, key="channels-s1gning-k3y")),
        caplog.at_level(logging.WARNING, logger="pgreplica.channels"),
    ):
        signed, tampered = asyncio.run(scenario())
    assert signed["signature"] is not None and signed["alias"] in REPLICAS, signed
    assert tampered["signature"] is not None and tampered["alias"] == "default", tampered
    assert "envelope_rejected" in caplog.text and "signature does not match" in caplog.text


def test_the_layer_refuses_what_is_not_a_layer_and_passes_everything_else_through(
    project: None,
) -> None:
    from channels.layers import InMemoryChannelLayer

    from pgreplica.contrib.channels import EnvelopeChannelLayer

    with pytest.raises(ValueError, match="BACKEND"):
        EnvelopeChannelLayer({"CONFIG": {}})
    with pytest.raises(ValueError, match="channel layer"):
        EnvelopeChannelLayer(object())
    layer = EnvelopeChannelLayer({"BACKEND": "channels.layers.InMemoryChannelLayer"})
    assert isinstance(layer.layer, InMemoryChannelLayer)
    assert layer.extensions == ["groups", "flush"]
    with pytest.raises(TypeError, match="dict"):
        asyncio.run(layer.send("c", ["not", "a", "dict"]))  # type: ignore[arg-type]


# -- the example under daphne, in another process --------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daphne(redis_layer: str, healthy_cluster: LocalCluster) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, **example_env(healthy_cluster), "REDIS_URL": redis_layer}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), env.get("PYTHONPATH", "")])
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "django_perf.asgi:application",
        ],
        cwd=EXAMPLE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = server.stdout.read().decode() if server.stdout else ""
                    pytest.fail(f"daphne did not start: {output[-2000:]}")
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)
        if server.stdout:
            server.stdout.close()


def test_the_example_under_daphne_pushes_what_was_written_in_another_process(
    daphne: int, healthy_cluster: LocalCluster
) -> None:
    """Half the writes come from this process through the layer, half through the
    example's API (POST, announced on commit in the daphne process); the websocket
    consumer runs in the daphne process. Under 300 ms lag: 0 misses, while a replica
    asked right after each write misses it (the lag is real)."""
    import httpx
    from websockets.sync.client import connect

    replica = dsn(healthy_cluster, 1)
    lag(healthy_cluster, "300ms")
    pushed, ids, replica_misses = [], [], 0
    try:
        with connect(f"ws://127.0.0.1:{daphne}/ws/signatures/", open_timeout=10) as ws:
            time.sleep(0.3)  # the consumer has joined the group
            for i in range(8):
                name = f"daphne-{uuid.uuid4().hex[:8]}-{i}"
                if i % 2:
                    response = httpx.post(
                        f"http://127.0.0.1:{daphne}/api/signatures/", json={"name": name}
                    )
                    assert response.status_code == 201, response.text
                    ids.append(response.json()["id"])
                else:
                    ids.append(publish(name))
                with psycopg.connect(replica, autocommit=True) as conn:
                    row = conn.execute("SELECT 1 FROM perf_signature WHERE id = %s", (ids[-1],))
                    replica_misses += row.fetchone() is None
                pushed.append(json.loads(ws.recv(timeout=20)))
    finally:
        lag(healthy_cluster, 0)
    assert [p["id"] for p in pushed] == ids
    assert [p for p in pushed if p["signature"] is None] == [], pushed
    assert replica_misses >= 6, replica_misses  # the lag is real


def test_the_example_s_live_client_sees_every_signature_it_creates(
    daphne: int, healthy_cluster: LocalCluster
) -> None:
    lag(healthy_cluster, "300ms")
    try:
        result = subprocess.run(
            [sys.executable, "live_client.py", f"http://127.0.0.1:{daphne}", "4"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        lag(healthy_cluster, 0)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.endswith("found=True") for line in lines), lines
