"""The FastAPI example (examples/fastapi_app) served by a real uvicorn, in another
process, on the session cluster: read-your-writes through the X-PgReplica-Token header
under 300 ms replay delay on both replicas against a control that misses, replicas
serving once caught up, PATCH and DELETE read back with their tokens, and main.py (the
one-command entry point) honouring PGREPLICA_CONFIG.

The example gets a database of its own: its table ``items`` must not meet the one of
tests/data/routing_schema.sql in ``postgres``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgreplica.testing import LocalCluster
from secrets_registry import register_secret

pytest.importorskip("fastapi", reason="FastAPI is not installed (.[dev])")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (.[dev])")
pytest.importorskip("httpx", reason="httpx is not installed (.[dev])")
pytest.importorskip("sqlalchemy", reason="SQLAlchemy is not installed (.[dev])")
pytest.importorskip("greenlet", reason="greenlet is not installed (sqlalchemy[asyncio])")

import httpx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app"
DATABASE = "fastapi_example"
KEY = register_secret("fastapi-example-test-key", "FastAPI example signing key")
HEADER = "X-PgReplica-Token"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dsn(cluster: LocalCluster, index: int) -> str:
    base = cluster.dsn(index)
    assert base.endswith("/postgres")
    return base[: -len("postgres")] + DATABASE


@pytest.fixture(scope="module")
def config_file(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pgreplica TOML file, as ``pgreplica cluster up`` writes, for the example's own
    database on the session cluster (created once)."""
    if not cluster.execute(0, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
        cluster.execute(0, f"CREATE DATABASE {DATABASE}")
    cluster.wait_replayed()
    replicas = ", ".join(f'"{dsn(cluster, i)}"' for i in range(1, cluster.replicas + 1))
    path = tmp_path_factory.mktemp("fastapi_example") / "pgreplica.toml"
    path.write_text(f'[databases.main]\nprimary = "{dsn(cluster, 0)}"\nreplicas = [{replicas}]\n')
    return path


def example_env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGREPLICA_")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(PGREPLICA_CONFIG=str(config), PGREPLICA_SIGNING_KEY=KEY)
    return env


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str], log: Path, port: int) -> Iterator[str]:
    """Run ``command`` (a server on ``port``), output in ``log``; yield its base URL once
    it answers, stop it at the end."""
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=EXAMPLE.parents[1],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:  # uvicorn listens once the lifespan (tables, balancer) has started
                if httpx.get(f"{base}/items?limit=1", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the example did not start (exit code {process.poll()}):\n"
                    + log.read_text(errors="replace")[-4000:]
                )
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output[-4000:]
    assert "Application shutdown complete" in output, output[-4000:]  # the lifespan closed


@pytest.fixture(scope="module")
def example(config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The example under uvicorn; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("fastapi_example_log") / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(EXAMPLE)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with serving(command, example_env(config_file), log, port) as base:
        yield base


def lag(cluster: LocalCluster, delay: str | int) -> None:
    cluster.lag(1, delay)
    cluster.lag(2, delay)


def replica_ports(cluster: LocalCluster) -> set[int]:
    return {cluster.port(i) for i in range(1, cluster.replicas + 1)}


def token_of(response: httpx.Response) -> str:
    token = response.headers.get(HEADER)
    assert token, f"no {HEADER} header: {response.status_code} {dict(response.headers)}"
    return token


def test_read_your_writes_through_the_token_header_under_lag(
    example: str, healthy_cluster: LocalCluster
) -> None:
    stale = control_stale = 0
    created: list[tuple[str, str, str]] = []  # (path, title, token)
    lag(healthy_cluster, "300ms")
    try:
        with httpx.Client(base_url=example, timeout=10) as web:
            for i in range(8):
                title = f"ryw-{uuid.uuid4().hex[:8]}-{i}"
                response = web.post("/items", json={"title": title})
                assert response.status_code == 201, response.text
                token = token_of(response)
                web.cookies.clear()  # the header alone carries the token
                path = f"/items/{response.json()['id']}"
                control = web.get(path)  # no token: a replica 300 ms behind
                assert control.status_code in (200, 404), control.text
                control_stale += control.status_code == 404
                shown = web.get(path, headers={HEADER: token})
                stale += shown.status_code != 200 or shown.json()["title"] != title
                created.append((path, title, token))
            listed = web.get("/items", params={"limit": 10_000}, headers={HEADER: token})
            titles = {item["title"] for item in listed.json()["items"]}
    finally:
        lag(healthy_cluster, 0)
    assert stale == 0
    assert control_stale >= 6, control_stale  # the lag is real
    assert {title for _, title, _ in created} <= titles

    healthy_cluster.wait_replayed()
    with httpx.Client(base_url=example, timeout=10) as web:
        for path, title, token in created[-3:]:
            shown = web.get(path, headers={HEADER: token})
            assert shown.status_code == 200 and shown.json()["title"] == title
            served_by = shown.json()["served_by"]
            assert served_by["role"] == "replica", served_by
            assert served_by["port"] in replica_ports(healthy_cluster), served_by
            assert HEADER not in shown.headers  # a replica read returns no token


def test_update_and_delete_are_read_back_with_their_tokens_under_lag(
    example: str, healthy_cluster: LocalCluster
) -> None:
    with httpx.Client(base_url=example, timeout=10) as web:
        response = web.post("/items", json={"title": "before"})
        assert response.status_code == 201, response.text
        path = f"/items/{response.json()['id']}"
        healthy_cluster.wait_replayed()  # every replica has the old title
        lag(healthy_cluster, "300ms")
        try:
            web.cookies.clear()
            patched = web.patch(path, json={"title": "after"})
            assert patched.status_code == 200, patched.text
            assert patched.json()["title"] == "after"
            assert patched.json()["updated_at"] > response.json()["updated_at"]
            token = token_of(patched)
            web.cookies.clear()
            control: dict[str, Any] = web.get(path).json()  # no token: the old title
            shown = web.get(path, headers={HEADER: token})
            assert shown.status_code == 200 and shown.json()["title"] == "after", shown.text

            deleted = web.delete(path, headers={HEADER: token})
            assert deleted.status_code == 204, deleted.text
            token = token_of(deleted)
            web.cookies.clear()
            control_deleted = web.get(path)  # no token: still there on the replicas
            gone = web.get(path, headers={HEADER: token})
            assert gone.status_code == 404, gone.text
            assert web.delete(path, headers={HEADER: token}).status_code == 404
            assert web.patch(path, json={"title": "x"}).status_code == 404
        finally:
            lag(healthy_cluster, 0)
    assert control["title"] == "before"  # the lag is real
    assert control_deleted.status_code == 200


def test_main_py_serves_the_configuration_of_the_environment(
    config_file: Path, tmp_path: Path
) -> None:
    """The README's one command, with PGREPLICA_CONFIG set: no local cluster started."""
    port = free_port()
    command = [sys.executable, str(EXAMPLE / "main.py"), "--port", str(port)]
    log = tmp_path / "main.log"
    with serving(command, example_env(config_file), log, port) as base:
        response = httpx.get(f"{base}/items", params={"limit": 1}, timeout=10)
        assert response.status_code == 200
        assert response.json()["served_by"]["role"] in ("primary", "replica")
    assert "creating a local cluster" not in log.read_text()
    assert f"config: {config_file}" in log.read_text()
