"""Helpers for tests of Django code: which alias served a block of code, and waiting
for the replicas.

    with assert_served_by_replica():
        client.get("/api/signatures/")
    with assert_served_by_primary():
        client.post("/api/alerts/", {...})

They work in Django's TestCase, TransactionTestCase and pytest-django tests (declare the
replica aliases in ``databases``). Inside TestCase every test runs in a transaction on
the primary that other connections cannot see, so reads stay on the primary there; use
TransactionTestCase (pytest-django: ``transaction=True``) to exercise replica routing.

Against a real replica, a test suite behaves as with a replica alias that mirrors the
primary: rows a test creates outside a request (fixtures, ``setUp``, factories) are seen
by the requests it makes next, which read a replica that has replayed them or the
primary (``OUTSIDE_REQUESTS``). To assert that a read *is* served by a replica after
such writes, call :func:`wait_for_replicas` first.

The integration lets its probe connections go when Django creates or drops a test
database: Django's own test runner and pytest-django need no extra set-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from pgreplica.contrib.django.state import integration


@contextmanager
def served_by() -> Iterator[list[str]]:
    """Collect, in order, the alias of every query run inside the block."""
    from django.db import connections

    seen: list[str] = []

    def wrapper(alias: str) -> Callable[..., Any]:
        def run(
            execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
        ) -> Any:
            seen.append(alias)
            return execute(sql, params, many, context)

        return run

    with ExitStack() as stack:
        for alias in connections.databases:
            stack.enter_context(connections[alias].execute_wrapper(wrapper(alias)))
        yield seen


@contextmanager
def assert_served_by_replica() -> Iterator[list[str]]:
    """Fail unless every query inside ran on a replica alias (and there was one)."""
    replicas = set(integration().replica_aliases)
    with served_by() as seen:
        yield seen
    if not seen or not set(seen) <= replicas:
        raise AssertionError(f"expected queries on a replica alias {sorted(replicas)}, got {seen}")


@contextmanager
def assert_served_by_primary() -> Iterator[list[str]]:
    """Fail unless every query inside ran on the primary alias (and there was one)."""
    primary = integration().primary_alias
    with served_by() as seen:
        yield seen
    if not seen or set(seen) != {primary}:
        raise AssertionError(f"expected queries on {primary!r} only, got {seen}")


def wait_for_replicas(timeout: float = 10.0) -> None:
    """Wait until every replica alias has replayed every write committed so far (the
    primary's current position), so that the next routed reads may use any of them.
    Raises ``AssertionError`` naming the replicas still behind after ``timeout``."""
    import time

    from pgreplica.balancer import CHECK_SQL, LSN_SQL
    from pgreplica.contrib.django.state import OUTSIDE_REQUESTS, internal_query
    from pgreplica.lsn import parse_lsn, replayed_through

    integ = integration()
    outside = OUTSIDE_REQUESTS.get()
    committed = 0 if outside is None else outside.committed  # waited for below
    row = internal_query(integ.primary_alias, LSN_SQL)
    need = parse_lsn(row[0])
    deadline = time.monotonic() + timeout
    behind = dict(integ.host_of)
    while behind:
        for alias, host in list(behind.items()):
            row = internal_query(alias, CHECK_SQL)
            position = replayed_through(parse_lsn(row[0])) if row and row[0] else 0
            host.note_replay_lsn(position)
            if position >= need:
                del behind[alias]
        if behind and time.monotonic() > deadline:
            raise AssertionError(
                f"replicas {sorted(behind)} did not replay the primary's position within "
                f"{timeout} s"
            )
        if behind:
            time.sleep(0.01)
    if outside is not None:  # the writes waited for are the floor of the next reads
        outside.floor = max(outside.floor, need)
        outside.read = max(outside.read, committed)


def _runner_base() -> Any:
    from django.test.runner import DiscoverRunner

    return DiscoverRunner


class PgReplicaTestRunner(_runner_base()):  # type: ignore[misc]  # Django ships no types
    """Django's test runner, stopping pgreplica's prober before the test databases go.
    No longer needed (the integration does it by itself); kept for settings that name
    it."""

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        from pgreplica.contrib.django.state import reset_integration

        reset_integration()
        super().teardown_databases(old_config, **kwargs)
