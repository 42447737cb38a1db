"""Django integration: replica aliases from the environment, a lag- and causality-aware
router, a view mixin and decorator, and a middleware for read-your-writes across
requests. See docs/django.md."""

from __future__ import annotations

from pgreplica.contrib.django.middleware import PgReplicaMiddleware
from pgreplica.contrib.django.router import ReadReplicaRouter
from pgreplica.contrib.django.settings import REPLICA_ALIAS, replica_databases
from pgreplica.contrib.django.state import integration, reset_integration
from pgreplica.contrib.django.views import ReadReplicaMixin, read_replica, replica_reads

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
