"""Free TCP ports for the servers, and the claims file that keeps clusters created at the
same time from picking the same ones."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pgreplica.localcluster._util import HOST, ClusterError

DEFAULT_FIRST_PORT = 5432

# Ports handed out by _choose_ports stay reserved for a while, so that clusters created at
# the same time (parallel test sessions) do not pick the same free ports before either
# has started its servers.
_PORT_CLAIMS = Path(tempfile.gettempdir()) / "pgreplica-port-claims.json"
_PORT_CLAIM_SECONDS = 120.0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like PostgreSQL itself, ignore connections of a stopped server in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _port_claims() -> Iterator[dict[str, float]]:
    """Yield the shared port claims (port -> expiry time), locked; saved on exit.

    Best effort: when the claims file cannot be used, yields an empty dict.
    """
    try:
        fd = os.open(_PORT_CLAIMS, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield {}
        return
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            claims: dict[str, float] = json.loads(handle.read() or "{}")
            if not isinstance(claims, dict):
                claims = {}
        except ValueError:
            claims = {}
        now = time.time()
        claims = {p: t for p, t in claims.items() if isinstance(t, (int, float)) and t > now}
        yield claims
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(claims))


def _choose_ports(count: int, first: int = DEFAULT_FIRST_PORT) -> int:
    """Return the first of ``count`` consecutive free ports at or above ``first``."""
    with _port_claims() as claims:
        now = time.time()
        base = first
        while base + count - 1 <= 65535:
            taken = next(
                (p for p in range(base, base + count) if str(p) in claims or not _port_free(p)),
                None,
            )
            if taken is None:
                for port in range(base, base + count):
                    claims[str(port)] = now + _PORT_CLAIM_SECONDS
                return base
            base = taken + 1
    raise ClusterError(f"no {count} consecutive free ports on {HOST} at or above {first}")


def _release_ports(ports: Sequence[int]) -> None:
    with _port_claims() as claims:
        for port in ports:
            claims.pop(str(port), None)
