"""pgreplica: PostgreSQL reads on streaming replicas, writes on the primary, and
read-your-writes on the primary's WAL position.

    lb = pgreplica.LoadBalancer.from_config("pgreplica.toml")
    with lb.write() as conn:
        conn.execute("INSERT ...")        # commit advances this context's causal token
    with lb.read() as conn:
        conn.execute("SELECT ...")        # a replica that has replayed the write, or the primary
"""

from __future__ import annotations

from pgreplica._balancer_async import AsyncLoadBalancer, AsyncReadConnection, AsyncReadCursor
from pgreplica._balancer_sync import LoadBalancer, ReadConnection, ReadCursor
from pgreplica._routing_async import AsyncRoutingConnection, AsyncRoutingCursor
from pgreplica._routing_sync import RoutingConnection, RoutingCursor
from pgreplica.comments import tags
from pgreplica.config import DatabaseConfig, Dsn, Settings
from pgreplica.errors import (
    ConfigError,
    HostUnavailable,
    PgReplicaError,
    PrimaryUnavailable,
    RoutingError,
    TokenError,
)
from pgreplica.health import HostStatus
from pgreplica.lsn import CausalToken, format_lsn, parse_lsn
from pgreplica.sql import Classification, classify

__version__ = "0.1.0"

__all__ = [
    "AsyncLoadBalancer",
    "AsyncReadConnection",
    "AsyncReadCursor",
    "AsyncRoutingConnection",
    "AsyncRoutingCursor",
    "CausalToken",
    "Classification",
    "ConfigError",
    "DatabaseConfig",
    "Dsn",
    "HostStatus",
    "HostUnavailable",
    "LoadBalancer",
    "PgReplicaError",
    "PrimaryUnavailable",
    "ReadConnection",
    "ReadCursor",
    "RoutingConnection",
    "RoutingCursor",
    "RoutingError",
    "Settings",
    "TokenError",
    "__version__",
    "classify",
    "format_lsn",
    "parse_lsn",
    "tags",
]
