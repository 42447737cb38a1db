"""A real Redis server for the tests: ``redis_server``, a session fixture.

It starts ``redis-server`` on a free port of 127.0.0.1, without persistence, waits
until it answers ``PING``, yields its URL (``redis://127.0.0.1:<port>/0``) and stops it
at the end of the session. Without a ``redis-server`` binary the tests that use it are
skipped, with the reason. Import it in a test module (or in ``conftest.py``, to make it
available everywhere)::

    from redis_server import redis_server  # noqa: F401

:func:`running_redis` starts one of a test's own, optionally with a password.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

__all__ = ["free_port", "redis_server", "running_redis"]

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pings(port: int) -> bool:
    """Redis answers on ``port`` (with ``PONG``, or asking for the password first)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _find_binary() -> str | None:
    if os.access(REDIS_SERVER, os.X_OK):
        return REDIS_SERVER
    return shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a running Redis server, shared by the whole session."""
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@contextlib.contextmanager
def running_redis(directory: Path, *, password: str | None = None) -> Iterator[str]:
    """A ``redis-server`` in ``directory`` for the time of the ``with`` block; its URL.

    With ``password``, the server requires it (``requirepass``) and the URL carries it
    (``redis://:<password>@127.0.0.1:<port>/0``). Skips the test without a binary.
    """
    binary = _find_binary()
    if binary is None:
        reason = f"redis-server not found ({REDIS_SERVER} nor on PATH): Redis tests skipped"
        print(reason)
        pytest.skip(reason)
    port = free_port()
    log_path = directory / "redis.log"
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--logfile", str(log_path),
    ]  # fmt: skip
    if password is not None:
        command += ["--requirepass", password]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _pings(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_text(errors="replace") if log_path.exists() else ""
                pytest.fail(
                    f"redis-server on port {port} did not start"
                    f" (exit code {process.poll()}):\n{log[-2000:]}"
                )
            time.sleep(0.02)
        auth = "" if password is None else f":{quote(password, safe='')}@"
        yield f"redis://{auth}127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
