"""Errors raised by pgreplica.

Every error derives from :class:`PgReplicaError`. Errors about the availability of
servers also derive from :class:`psycopg.OperationalError`, the DB-API error that callers
already catch around database code. Every error pickles (job systems move exceptions
between processes) and never carries a password.
"""

from __future__ import annotations

import psycopg


class PgReplicaError(Exception):
    """Base class of every pgreplica error."""

    __module__ = "pgreplica"


class ConfigError(PgReplicaError, ValueError):
    """A setting is missing, malformed or contradictory; the message names it."""

    __module__ = "pgreplica"

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(setting, problem)
        self.setting = setting
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.setting}: {self.problem}"


class TokenError(PgReplicaError, ValueError):
    """A causal token could not be parsed, or its signature does not match."""

    __module__ = "pgreplica"


class HostUnavailable(PgReplicaError, psycopg.OperationalError):
    """No server could take the unit of work.

    ``host`` is the label of the server (``host:port/dbname``, never a password) and
    ``reason`` a short word such as ``primary_down`` or ``no_caught_up_replica``.
    """

    __module__ = "pgreplica"

    def __init__(self, message: str, *, host: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_host_unavailable, (type(self), str(self), self.host, self.reason))


class PrimaryUnavailable(HostUnavailable):
    """The primary is down: writes fail fast instead of hanging on a dead server."""

    __module__ = "pgreplica"


class RoutingError(PgReplicaError, psycopg.errors.ReadOnlySqlTransaction):
    """A statement only a primary can run reached a replica where it cannot move.

    Outside a transaction a read unit moves such a statement to the primary; inside
    ``conn.transaction()`` of ``lb.read()`` it cannot (the snapshot would change), and
    this is raised. A bug in the caller's routing, not a sick replica: the replica is
    not marked down.
    """

    __module__ = "pgreplica"

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_routing_error, (str(self), self.host))


def _rebuild_host_unavailable(
    cls: type[HostUnavailable], message: str, host: str | None, reason: str
) -> HostUnavailable:
    return cls(message, host=host, reason=reason)


def _rebuild_routing_error(message: str, host: str | None) -> RoutingError:
    return RoutingError(message, host=host)
