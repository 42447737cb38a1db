"""Replicas from DNS service discovery (``replicas_dns``), with dnspython.

A name that starts with ``_`` (``_postgresql._tcp.replicas.service.consul``) is looked
up as SRV records: each gives a host and a port. Any other name is looked up as A
records: each address is a replica on the port of the database's primary. A replica's
connection string is the primary's with the host and port replaced (same user,
password, database and options).

The prober looks the name up again every ``max(TTL, dns_interval)`` seconds, +-10 %.
A failed or empty answer keeps the current replicas (logged ``dns_lookup_failed``).
A host that leaves the answer leaves the read set at once, and its pool is closed
gently: work in flight on it finishes. A host that joins is probed, and reads use it
after its first good probe, like any replica.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgreplica._extras import require
from pgreplica.config import Dsn

__all__ = ["lookup", "replica_dsns"]

Target = tuple[str, "int | None"]


async def lookup(name: str, servers: Sequence[str]) -> tuple[list[Target], float]:
    """``([(host, port or None), ...], ttl)`` for ``name`` (SRV if it starts with ``_``,
    else A). Raises :class:`LookupError` for a failed or empty answer."""
    require("dns.asyncresolver", extra="dns", feature="replicas_dns", setting=True)
    import dns.asyncresolver
    import dns.exception

    resolver = dns.asyncresolver.Resolver(configure=not servers)
    if servers:
        addresses, ports = [], set()
        for server in servers:
            address, sep, port = server.rpartition(":") if server.count(":") == 1 else ("", "", "")
            addresses.append(address if sep else server)
            ports.add(int(port) if sep else 53)
        resolver.nameservers = addresses
        resolver.port = ports.pop() if len(ports) == 1 else 53
    resolver.lifetime = 2.0
    srv = name.startswith("_")
    try:
        answer = await resolver.resolve(name, "SRV" if srv else "A")
    except dns.exception.DNSException as exc:
        raise LookupError(f"{type(exc).__name__}: {str(exc)[:120]}") from None
    if answer.rrset is None or not len(answer.rrset):
        raise LookupError("empty answer")
    targets: set[Target] = set()
    for record in answer:
        if srv:
            targets.add((str(record.target).rstrip("."), int(record.port)))
        else:
            targets.add((str(record.address), None))
    return sorted(targets, key=lambda t: (t[0], t[1] or 0)), float(answer.rrset.ttl)


def replica_dsns(primary: Dsn, targets: Sequence[Target], setting: str) -> list[Dsn]:
    """The primary's connection string with each target's host and port."""
    params = conninfo_to_dict(primary.conninfo)
    params.pop("hostaddr", None)
    dsns = []
    for host, port in targets:
        one = {**params, "host": host}
        if port is not None:
            one["port"] = str(port)
        dsns.append(Dsn(make_conninfo("", **one), setting=setting))
    return dsns


def next_lookup_in(ttl: float, interval: float, rand: float | None = None) -> float:
    """Seconds until the next lookup: ``max(ttl, interval)``, +-10 %."""
    jitter = 0.9 + 0.2 * (random.random() if rand is None else rand)
    return max(ttl, interval) * jitter
