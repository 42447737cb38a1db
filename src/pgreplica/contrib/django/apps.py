"""``INSTALLED_APPS = [..., "pgreplica.contrib.django"]``: adds ``manage.py
pgreplica_status``. The rest of the integration (router, middleware, system checks)
works without it."""

from __future__ import annotations

from django.apps import AppConfig


class PgReplicaConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    name = "pgreplica.contrib.django"
    label = "pgreplica"
    verbose_name = "pgreplica"

    def ready(self) -> None:
        from pgreplica.contrib.django.state import watch_connections

        watch_connections()
