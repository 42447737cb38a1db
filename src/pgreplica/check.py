"""``pgreplica check``: where each logical database's reads and writes go, as the
validation commands of a multi-database rollout do in a console.

For every configured database it runs one write unit (``SELECT 1`` on the primary, no
change) and one read unit, and prints the host, the ``db_config_name`` and the reason
of each, and, for the read, the SQL comment the server received (read back from
``pg_stat_activity`` of the session that ran it: what a server log or
``pg_stat_statements`` shows). A database in a rollout says its percentage and which
replicas the unit read. Exit status 1 if a unit failed.
"""

from __future__ import annotations

import argparse
import re

import psycopg

from pgreplica.errors import PgReplicaError

OWN_QUERY = "SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()"
_COMMENT = re.compile(r"/\*[^*]*\*/\s*\Z")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="pgreplica TOML file (default: $PGREPLICA_CONFIG or the environment)"
    )
    parser.add_argument("--database", help="only this database")


def run(args: argparse.Namespace) -> int:
    from pgreplica._balancer_sync import LoadBalancer

    lb = LoadBalancer.from_config(args.config)
    rows: list[tuple[str, ...]] = [
        ("DATABASE", "UNIT", "HOST", "DB_CONFIG_NAME", "REASON", "SERVER RECEIVED")
    ]
    notes: list[str] = []
    failed = False
    try:
        lb.open()
        for name, route in lb._router.databases.items():
            if args.database is not None and name != args.database:
                continue
            with lb.isolated():
                try:
                    with lb.write(name) as conn:
                        conn.execute("SELECT 1")
                    rows.append(
                        (
                            name,
                            "write",
                            route.primary.label,
                            route.primary_config_name,
                            "write",
                            "-",
                        )
                    )
                except (PgReplicaError, psycopg.Error) as exc:
                    failed = True
                    rows.append((name, "write", route.primary.label, "-", "failed", str(exc)[:80]))
            with lb.isolated():
                try:
                    with lb.read(name) as reader:
                        row = reader.execute(OWN_QUERY).fetchone()
                        text = str(row[0]) if row else ""
                        match = _COMMENT.search(text)
                        rows.append(
                            (
                                name,
                                "read",
                                reader.host,
                                reader.db_config_name,
                                reader.reason,
                                match.group(0).strip() if match else "(no comment)",
                            )
                        )
                except (PgReplicaError, psycopg.Error) as exc:
                    failed = True
                    rows.append((name, "read", "-", "-", "failed", str(exc)[:80]))
            if route.rollout_from is not None:
                percent = lb._router.rollout_percent(route)
                shown = (
                    "not set: all reads use its own replicas"
                    if percent is None
                    else (
                        f"{percent:g}% of units read {route.replica_config_name},"
                        f" the others {route.rollout_from.replica_config_name}"
                    )
                )
                notes.append(
                    f"{name}: primary shared with {route.primary_config_name}; rollout {shown}"
                )
    finally:
        lb.close()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for note in notes:
        print(note)
    return 1 if failed else 0
