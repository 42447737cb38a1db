import pytest


@pytest.fixture(autouse=True)
def _close_connections():
    """Close every alias's connection after a test, so that the test database can be
    dropped at the end (a replica alias mirrors it in tests)."""
    yield
    from django.db import connections

    connections.close_all()


@pytest.fixture(scope="session", autouse=True)
def _pgreplica_integration(django_db_setup):
    """Stop pgreplica's prober before pytest-django drops the test database (the prober
    holds a connection to it)."""
    yield
    from pgreplica.contrib.django import reset_integration

    reset_integration()
