"""The example Django project (examples/django_perf) on the session cluster, for the
tests of the Django and Channels integrations. conftest imports the fixtures ``project``
and ``replicas_up`` (autouse; it does nothing for a test without ``project``).

Django is configured once per process: ``project`` points the example's settings at the
local cluster (a database ``django_perf`` on the primary, which streaming replication
copies to the replicas) and migrates it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgreplica.testing import LocalCluster
from secrets_registry import register_secret

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "django_perf"
DB = "django_perf"


def dsn(cluster: LocalCluster, index: int) -> str:
    return cluster.dsn(index).rsplit("/", 1)[0] + f"/{DB}"


def example_env(cluster: LocalCluster, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn(cluster, 0),
        "READ_REPLICA_ENABLED": "true",
        "READ_REPLICA_DATABASE_URLS": f"{dsn(cluster, 1)},{dsn(cluster, 2)}",
        "DJANGO_SETTINGS_MODULE": "django_perf.settings",
        **extra,
    }


@pytest.fixture(scope="session")
def project(cluster: LocalCluster) -> Iterator[None]:
    if not cluster.execute(0, f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"):
        cluster.execute(0, f"CREATE DATABASE {DB}")
    cluster.wait_replayed()
    os.environ.update(example_env(cluster, PGREPLICA_STICKING="memory"))
    sys.path.insert(0, str(EXAMPLE))
    import django

    django.setup()
    from django.conf import settings

    register_secret(settings.SECRET_KEY, "Django SECRET_KEY")
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    cluster.wait_replayed()
    yield
    from pgreplica.contrib.django import reset_integration

    reset_integration()


@pytest.fixture(autouse=True)
def replicas_up(request: pytest.FixtureRequest) -> None:
    """Django tests start with every replica back in the integration's read set."""
    if "project" not in request.fixturenames:
        return
    request.getfixturevalue("healthy_cluster")
    from django.db import connections

    from pgreplica.contrib.django import integration

    # Django's test client keeps connections open across requests; a server restarted by
    # an earlier test leaves them broken.
    connections.close_all()
    from pgreplica.workload import wait_until

    lb = integration().lb
    wait_until(lambda: all(s.state == "up" for s in lb.status()), timeout=15, what="hosts up")
