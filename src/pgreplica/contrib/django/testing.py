"""Assertions for tests of Django code: which alias served a block of code.

    with assert_served_by_replica():
        client.get("/api/signatures/")
    with assert_served_by_primary():
        client.post("/api/alerts/", {...})

They work in Django's TestCase, TransactionTestCase and pytest-django tests (declare the
replica alias in ``databases``). Inside TestCase every test runs in a transaction on the
primary that other connections cannot see, so reads stay on the primary there; use
TransactionTestCase (pytest-django: ``transaction=True``) to exercise replica routing.

pgreplica's prober holds a connection to the (test) database: stop it before the test
database is dropped, with :class:`PgReplicaTestRunner` (``TEST_RUNNER``) or, with
pytest-django, a session fixture that depends on ``django_db_setup`` and calls
:func:`~pgreplica.contrib.django.reset_integration` after its ``yield``.
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


def _runner_base() -> Any:
    from django.test.runner import DiscoverRunner

    return DiscoverRunner


class PgReplicaTestRunner(_runner_base()):  # type: ignore[misc]  # Django ships no types
    """Django's test runner, stopping pgreplica's prober before the test databases go."""

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        from pgreplica.contrib.django.state import reset_integration

        reset_integration()
        super().teardown_databases(old_config, **kwargs)
