"""``manage.py pgreplica_status``: the hosts of the Django integration, as
``pgreplica status`` shows them (role, state, replay position, lag), with each replica's
``DATABASES`` alias. Exit status 1 when a host is down."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no types
    help = "The primary and replicas of pgreplica's Django integration: role, state, lag."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON object per host")

    def handle(self, *args: Any, **options: Any) -> None:
        from pgreplica.cli import format_hosts
        from pgreplica.contrib.django.state import integration

        integ = integration()
        if not integ.alias_of:
            self.stdout.write(
                "No replica is probed: no replica alias is configured, or the kill switch "
                "PGREPLICA_ENABLED=false is on. Every read goes to the primary."
            )
        integ.lb.open(wait=True)
        rows = integ.lb.status()
        text = format_hosts(rows, as_json=options["json"])
        if not options["json"]:
            aliases = {host.label: alias for host, alias in integ.alias_of.items()}
            aliases[integ.route.primary.label] = integ.primary_alias
            text += "\n" + "\n".join(
                f"{label}: DATABASES alias {alias!r}" for label, alias in aliases.items()
            )
        self.stdout.write(text.rstrip("\n"))
        if any(row.state == "down" for row in rows):
            sys.exit(1)
