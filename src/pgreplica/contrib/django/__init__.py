"""Django integration: replica aliases from the environment or ``DATABASES``, a lag-
and causality-aware router, a view mixin and decorator, a middleware for read-your-writes
across requests, system checks and ``manage.py pgreplica_status``. See docs/django.md."""

from __future__ import annotations

from pgreplica._extras import extra_imports

with extra_imports("django", feature="pgreplica.contrib.django"):
    import django  # noqa: F401  (the modules below import the rest of it when used)

from django.core import checks as _checks

from pgreplica.contrib.django.checks import check_settings, watch_settings
from pgreplica.contrib.django.middleware import PgReplicaMiddleware
from pgreplica.contrib.django.router import ReadReplicaRouter
from pgreplica.contrib.django.settings import REPLICA_ALIAS, replica_databases
from pgreplica.contrib.django.state import integration, reset_integration, watch_connections
from pgreplica.contrib.django.views import ReadReplicaMixin, read_replica, replica_reads

_checks.register(check_settings, _checks.Tags.database)
watch_connections()
watch_settings()

__all__ = [
    "REPLICA_ALIAS",
    "PgReplicaMiddleware",
    "ReadReplicaMixin",
    "ReadReplicaRouter",
    "integration",
    "read_replica",
    "replica_databases",
    "replica_reads",
    "reset_integration",
]
