"""The WSGI app of tests/test_fork.py, served by a real gunicorn with ``--preload``.

The load balancer is created and opened at import, and used once, so gunicorn's master
holds open pools with idle connections and a running prober when it forks its workers.

Configuration comes from the environment:

``PGREPLICA_FORK_PRIMARY``   the primary's DSN
``PGREPLICA_FORK_REPLICAS``  the replicas' DSNs, a JSON list

``GET /ping`` answers ``{"pid": ...}``; ``GET /cycle?nonce=N`` runs one
:func:`fork_workload.cycle` with nonce ``N`` (the read-back waits up to a second for a
replica to replay the write) and answers its facts as JSON, among them ``nonce``,
``seen``, ``on_replica``, ``pid`` and ``error``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from fork_workload import balancer_used_before_fork, cycle

lb = balancer_used_before_fork("master")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/ping":
        body: dict[str, Any] = {"pid": os.getpid()}
    elif path == "/cycle":
        nonce = parse_qs(environ.get("QUERY_STRING", "")).get("nonce", [""])[0]
        body = cycle(lb, nonce, max_wait=1.0)
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    data = json.dumps(body).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
