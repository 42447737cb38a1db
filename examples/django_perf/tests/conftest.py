import pytest


@pytest.fixture(autouse=True)
def _close_connections():
    """Close every alias's connection after a test: Django's test client keeps them
    open across requests. (pgreplica's own probe connections need nothing: they are let
    go before pytest-django drops the test database.)"""
    yield
    from django.db import connections

    connections.close_all()
