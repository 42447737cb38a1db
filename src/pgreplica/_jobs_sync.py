"""GENERATED from ``_jobs_async.py`` by ``tools/gen_sync.py``: the sync twin of
the asyncio code. Do not edit; edit the asyncio file and regenerate."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import psycopg

from pgreplica._balancer_sync import LoadBalancer
from pgreplica._jobs_core import (
    _CAPTURE_ERRORS,
    PRIMARY,
    DataConsistency,
    Decision,
    Flag,
    Headers,
    WaitPolicy,
    _early_outcome,
    _finish,
    _late_outcome,
    _log_capture_failed,
    _needs,
    _parse_headers,
    check_flag,
)
from pgreplica.balancer import (
    CHECKOUT_ERRORS,
    LSN_SQL,
    UNKNOWN_POSITION,
    DatabaseRoute,
    bound_positions,
    is_connection_error,
)
from pgreplica.context import current_state
from pgreplica.errors import PgReplicaError
from pgreplica.health import Host
from pgreplica.lsn import parse_lsn

__all__ = ["capture", "start_job"]


def capture(lb: LoadBalancer) -> dict[str, str]:
    """The token a job enqueued now must see, per database, as a header value.

    - A database this context read on the primary: the primary's position now (at
      or past what it read and what it wrote), one query per primary.
    - A database this context wrote to (``lb.write()`` recorded it): the context's
      token, at or past the commit of those writes. No query.
    - A database it only read from replicas: the replay position of those replicas,
      asked now (it only grows, so it is at or past what the reads saw): jobs enqueued
      after pure reads can still use replicas that lag the primary. One query per
      replica, to the replica.
    - Otherwise (it read the primary, read nothing, or a replica cannot be asked): the
      primary's current WAL insert position, one query per primary.

    If the primary cannot be asked either, the result is ``{}``: the job then runs on
    the primary (``primary_no_wal``) rather than on a replica that might be behind.
    """
    state = current_state()
    asked: dict[str, int] = {}  # positions asked now, of the primary's history
    carried: list[str] = []  # databases whose token position also travels
    missing: dict[Host, list[str]] = {}
    for name, route in lb._router.databases.items():
        hosts = [host for db, host in state.read_from if db == name]
        if route.primary in hosts or state.written.get(name) == UNKNOWN_POSITION:
            # It read the primary (data newer than its own writes, perhaps), or wrote
            # at a position it could not read back: the primary's position now.
            missing.setdefault(route.primary, []).append(name)
            continue
        if state.written.get(name):
            carried.append(name)
            continue
        if hosts and route.primary not in hosts:
            position = _replicas_position(lb, hosts)  # type: ignore[arg-type]
            if position:
                asked[name] = position
                carried.append(name)
                continue
        missing.setdefault(route.primary, []).append(name)
    for host, names in missing.items():
        try:
            position = _position(lb, host, LSN_SQL)
        except _CAPTURE_ERRORS as exc:
            _log_capture_failed(host, exc)
            return {}
        for name in names:
            asked[name] = position
            if state.token.get(name) != UNKNOWN_POSITION:  # the position asked is past it
                carried.append(name)
    return (bound_positions(lb._router, asked) | state.token.only(carried)).as_dict()


def _replicas_position(lb: LoadBalancer, hosts: list[Host]) -> int:
    """The highest replay position among ``hosts`` now, or 0 if one cannot tell."""
    best = 0
    for host in hosts:
        try:
            conn = lb._checkout(host)
        except CHECKOUT_ERRORS:
            return 0
        try:
            position = lb._replay_lsn(host, conn)
        except psycopg.Error as exc:
            if is_connection_error(exc):
                lb._host_failed(host, exc)
            return 0
        finally:
            lb._checkin(host, conn)
        if not position:  # no longer in recovery: what it served is unknown
            return 0
        best = max(best, position)
    return best


def _position(lb: LoadBalancer, host: Host, sql: str) -> int:
    if not host.up:
        raise PgReplicaError(f"primary {host.label} is down")
    conn = lb._checkout(host)
    try:
        cur = conn.execute(sql)
        row = cur.fetchone()
    except psycopg.Error as exc:
        if is_connection_error(exc):
            lb._host_failed(host, exc)
        raise
    finally:
        lb._checkin(host, conn)
    if not row or not row[0]:
        raise PgReplicaError(f"{host.label} returned no WAL position")
    return parse_lsn(row[0])


def start_job(
    lb: LoadBalancer,
    consistency: DataConsistency | str,
    headers: Headers,
    attempt: int = 0,
    *,
    job: str = "job",
    wait: WaitPolicy | tuple[int, float] | None = None,
    flag: Flag = None,
    enabled: bool | None = None,
    rand: Callable[[], float] | None = None,
    can_retry: bool = True,
) -> Decision:
    """Decide where one run of a job reads from; enter ``decision.scope`` around its body.

    ``headers`` is the value :func:`capture` produced at enqueue time (``None`` when the
    message had none); ``attempt`` is 0 on the first run and counts the job system's
    retries. ``enabled`` overrides ``PGREPLICA_JOBS_ENABLED``; ``rand`` is the random
    source of percentage flags. A job system that cannot retry passes
    ``can_retry=False``: DELAYED then acts as STICKY.

    Logs ``job_data_consistency task=... consistency=... outcome=...`` at INFO on
    ``pgreplica.jobs`` and counts the outcome (``pgreplica.jobs.outcomes()``).
    """
    kind = DataConsistency.parse(consistency, job=job)
    policy = WaitPolicy.of(wait, job=job)
    check_flag(flag, job=job)
    token = _parse_headers(headers, job)
    outcome = _early_outcome(kind, token, enabled, flag, job, rand)
    waited = 0.0
    if outcome is None:
        assert token is not None
        lb.open()  # waits for the first probes, in every thread that asks
        needs = _needs(lb._router, token, time.monotonic())
        if needs is None:
            outcome = PRIMARY
        else:
            caught_up, waited = _wait_caught_up(lb, needs, policy)
            outcome = _late_outcome(kind, attempt, caught_up, can_retry)
    return _finish(job, kind, outcome, token, attempt, waited)


def _wait_caught_up(
    lb: LoadBalancer, needs: Sequence[tuple[DatabaseRoute, int]], policy: WaitPolicy
) -> tuple[bool, float]:
    start = time.monotonic()
    pending = list(needs)
    for check in range(policy.tries + 1):
        pending = [(r, n) for r, n in pending if not _caught_up_now(lb, r, n)]
        if not pending:
            return True, time.monotonic() - start
        if check == policy.tries or not all(r.read_set for r, _ in pending):
            break  # out of tries, or no usable replica to wait for
        time.sleep(policy.interval)
    return False, time.monotonic() - start


def _caught_up_now(lb: LoadBalancer, route: DatabaseRoute, need: int) -> bool:
    """A replica of the read set has replayed ``need``: the cache says so, or a replica
    says so when asked (which also raises its cache, for the job's own reads)."""
    router = lb._router
    if router.caught_up(route, need, None):
        return True
    for host in router.behind(route, need, set()):
        try:
            conn = lb._checkout(host)
        except CHECKOUT_ERRORS as exc:
            lb._host_failed(host, exc)
            continue
        try:
            if lb._replay_lsn(host, conn) >= need:
                return True
        except psycopg.Error as exc:
            if is_connection_error(exc):
                lb._host_failed(host, exc)
        finally:
            lb._checkin(host, conn)
    return False
