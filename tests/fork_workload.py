"""The write-then-read cycle of tests/test_fork.py, shared with the processes it starts
(tests/fork_wsgi_app.py under gunicorn, tests/fork_celery_app.py under Celery).

A cycle, in an isolated routing scope, with a nonce unique to the process and iteration:

1. an *echo* read (no causal token: it should go to a replica) selects the nonce back,
   with the backend's pid, port and recovery state;
2. a write inserts a row ``(nonce, pid)`` and returns it;
3. a *read-back* (carrying the write's token) selects the nonce and the row's pid.

Every statement returns the nonce it was sent, so a result that belongs to another
process or iteration (a connection shared across a fork) shows as a wrong nonce.
:func:`cycle_problems` turns a cycle's facts into the list of what is wrong with them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pgreplica

TABLE_SQL = "CREATE TABLE IF NOT EXISTS fork_rows (nonce text PRIMARY KEY, pid int NOT NULL)"
ECHO_SQL = "SELECT %s::text, pg_backend_pid(), inet_server_port(), pg_is_in_recovery()"
INSERT_SQL = "INSERT INTO fork_rows (nonce, pid) VALUES (%s, %s) RETURNING nonce, pid"
READBACK_SQL = (
    "SELECT %s::text, (SELECT pid FROM fork_rows WHERE nonce = %s),"
    " pg_backend_pid(), inet_server_port(), pg_is_in_recovery()"
)

#: The most problems kept per report (the count is always complete).
KEEP = 20
#: A process stops its cycles after this many failed ones.
MAX_FAILED = 5


def new_nonce(tag: str, iteration: int) -> str:
    return f"{tag}:{os.getpid()}:{iteration}:{uuid.uuid4().hex}"


def _empty(nonce: str) -> dict[str, Any]:
    return {
        "sent": nonce,
        "pid": os.getpid(),
        "echo": None,
        "echo_on_replica": None,
        "echo_backend": None,
        "echo_port": None,
        "echo_recovery": None,
        "written": None,
        "nonce": None,
        "seen": False,
        "row_pid": None,
        "on_replica": None,
        "backend": None,
        "port": None,
        "in_recovery": None,
        "error": None,
    }


def _echo(facts: dict[str, Any], row: Any, on_replica: bool) -> None:
    facts["echo_on_replica"] = on_replica
    facts["echo"], facts["echo_backend"], facts["echo_port"], facts["echo_recovery"] = row


def _written(facts: dict[str, Any], row: Any) -> None:
    nonce, pid = row
    facts["written"] = nonce
    if pid != facts["pid"]:
        facts["written"] = f"{nonce} (pid {pid})"


def _readback(facts: dict[str, Any], row: Any, on_replica: bool) -> None:
    facts["on_replica"] = on_replica
    facts["nonce"], facts["row_pid"], facts["backend"], facts["port"], facts["in_recovery"] = row
    facts["seen"] = facts["row_pid"] == facts["pid"]


def cycle(lb: Any, nonce: str, *, max_wait: float | None = None) -> dict[str, Any]:
    """One cycle on a :class:`pgreplica.LoadBalancer`; never raises (``error``)."""
    facts = _empty(nonce)
    try:
        with lb.isolated():
            with lb.read() as conn:
                row = conn.execute(ECHO_SQL, (nonce,)).fetchone()
                on_replica = conn.on_replica
            _echo(facts, row, on_replica)
            with lb.write() as conn:
                row = conn.execute(INSERT_SQL, (nonce, facts["pid"])).fetchone()
            _written(facts, row)
            with lb.read(max_wait=max_wait) as conn:
                row = conn.execute(READBACK_SQL, (nonce, nonce)).fetchone()
                on_replica = conn.on_replica
            _readback(facts, row, on_replica)
    except Exception as exc:
        facts["error"] = repr(exc)
    return facts


async def acycle(alb: Any, nonce: str, *, max_wait: float | None = None) -> dict[str, Any]:
    """One cycle on a :class:`pgreplica.AsyncLoadBalancer`; never raises (``error``)."""
    facts = _empty(nonce)
    try:
        async with alb.isolated():
            async with alb.read() as conn:
                cur = await conn.execute(ECHO_SQL, (nonce,))
                row = await cur.fetchone()
                on_replica = conn.on_replica
            _echo(facts, row, on_replica)
            async with alb.write() as conn:
                cur = await conn.execute(INSERT_SQL, (nonce, facts["pid"]))
                row = await cur.fetchone()
            _written(facts, row)
            async with alb.read(max_wait=max_wait) as conn:
                cur = await conn.execute(READBACK_SQL, (nonce, nonce))
                row = await cur.fetchone()
                on_replica = conn.on_replica
            _readback(facts, row, on_replica)
    except Exception as exc:
        facts["error"] = repr(exc)
    return facts


def failed(facts: dict[str, Any]) -> bool:
    """An error or a result that is not the cycle's own (the cheap part of the checks)."""
    sent = facts["sent"]
    return bool(facts["error"]) or not facts["echo"] == facts["written"] == facts["nonce"] == sent


def _report(tag: str, iterations: int, cycles: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tag": tag, "pid": os.getpid(), "planned": iterations, "cycles": cycles}


def run_cycles(lb: Any, tag: str, iterations: int, deadline: float) -> dict[str, Any]:
    """``iterations`` cycles; fewer if ``deadline`` (a ``time.monotonic()`` value)
    passes or after :data:`MAX_FAILED` failed cycles (no need to wait for more)."""
    cycles: list[dict[str, Any]] = []
    bad = 0
    for i in range(iterations):
        if time.monotonic() > deadline or bad >= MAX_FAILED:
            break
        cycles.append(cycle(lb, new_nonce(tag, i)))
        bad += failed(cycles[-1])
    return _report(tag, iterations, cycles)


async def arun_cycles(alb: Any, tag: str, iterations: int, deadline: float) -> dict[str, Any]:
    cycles: list[dict[str, Any]] = []
    bad = 0
    for i in range(iterations):
        if time.monotonic() > deadline or bad >= MAX_FAILED:
            break
        cycles.append(await acycle(alb, new_nonce(tag, i)))
        bad += failed(cycles[-1])
    return _report(tag, iterations, cycles)


def cycle_problems(
    facts: dict[str, Any], sent: str, primary_port: int, replica_ports: Iterable[int]
) -> list[str]:
    """What is wrong with one cycle that sent ``sent``: empty when all is well."""
    if facts.get("error"):
        return [f"{sent}: error {facts['error']}"]
    problems = []
    if facts.get("sent") != sent:
        problems.append(f"{sent}: the handler saw nonce {facts.get('sent')!r}")
    for key in ("echo", "written", "nonce"):
        if facts.get(key) != sent:
            problems.append(f"{sent}: crossed result, {key} = {facts.get(key)!r}")
    if not facts.get("seen"):
        problems.append(f"{sent}: stale read-back (row pid {facts.get('row_pid')!r})")
    replicas = set(replica_ports)
    # A read's on_replica must say where it really ran: (port, pg_is_in_recovery()).
    for claim, port, recovery in (
        ("echo_on_replica", "echo_port", "echo_recovery"),
        ("on_replica", "port", "in_recovery"),
    ):
        where = (facts.get(port), facts.get(recovery))
        if facts.get(claim):
            if where[0] not in replicas or where[1] is not True:
                problems.append(f"{sent}: {claim} but served by (port, recovery) {where}")
        elif where != (primary_port, False):
            problems.append(f"{sent}: not {claim} but served by (port, recovery) {where}")
    return problems


def report_problems(
    report: dict[str, Any], primary_port: int, replica_ports: Iterable[int]
) -> list[str]:
    """The problems of a process's report: its cycles', and too few cycles run."""
    replicas = list(replica_ports)
    problems = []
    for facts in report["cycles"]:
        problems.extend(cycle_problems(facts, facts["sent"], primary_port, replicas))
        if facts["pid"] != report["pid"]:
            problems.append(f"{facts['sent']}: pid {facts['pid']} in report of {report['pid']}")
    if len(report["cycles"]) < report["planned"]:
        problems.append(
            f"{report['tag']}: {len(report['cycles'])} of {report['planned']} cycles ran"
            f" (stops at the deadline or after {MAX_FAILED} failed cycles)"
        )
    if len(problems) > KEEP:
        problems = [*problems[:KEEP], f"... {len(problems) - KEEP} more"]
    return problems


def replica_share(cycles: list[dict[str, Any]], key: str = "echo_on_replica") -> tuple[int, int]:
    """(reads on a replica, reads) among ``cycles``."""
    return sum(1 for c in cycles if c.get(key)), len(cycles)


def balancer_used_before_fork(tag: str) -> pgreplica.LoadBalancer:
    """The balancer a pre-forking server builds at import (from the test's environment),
    with pooled connections in use, a prober running and a token: what children inherit."""
    lb = pgreplica.LoadBalancer(
        primary=os.environ["PGREPLICA_FORK_PRIMARY"],
        replicas=json.loads(os.environ["PGREPLICA_FORK_REPLICAS"]),
    )
    lb.open()
    with lb.isolated():
        for _ in range(4):
            with lb.read() as conn:
                conn.execute(ECHO_SQL, (tag,)).fetchone()
        with lb.write() as conn:
            conn.execute("SELECT 1").fetchone()
    return lb
