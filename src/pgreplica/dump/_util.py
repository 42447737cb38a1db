"""What the modules of :mod:`pgreplica.dump` share: the error, SQL quoting, and the
dump's connections."""

from __future__ import annotations

from typing import Any

import psycopg

from pgreplica.config import Settings
from pgreplica.errors import PgReplicaError

APPLICATION_NAME = "pgreplica-dump"
"""``application_name`` of every dump connection (the prober's end in ``-prober``)."""
_SESSION_SETUP = (
    # As pg_dump does: a role's timeouts must not kill a long export half way through.
    "SET statement_timeout = 0",
    "SET lock_timeout = 0",
    "SET idle_in_transaction_session_timeout = 0",
)


class DumpError(PgReplicaError):
    """The dump (or its verification) cannot go on; the message says why."""

    __module__ = "pgreplica"


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (always: the same name whatever its case)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _connect(conninfo: str, application_name: str, settings: Settings) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        conninfo,
        autocommit=True,
        application_name=application_name,
        connect_timeout=max(1, round(settings.connect_timeout)),
    )
    try:
        for statement in _SESSION_SETUP:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn
