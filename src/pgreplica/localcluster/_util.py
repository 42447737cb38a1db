"""What the modules of :mod:`pgreplica.localcluster` share: the error, the address and
superuser of the servers, and WAL positions."""

from __future__ import annotations

SUPERUSER = "postgres"
HOST = "127.0.0.1"


class ClusterError(Exception):
    """The local cluster could not do what was asked; the message says why.

    Messages never contain the cluster's password. Errors about a server that did not
    come up in time end with the last lines of that server's log.
    """

    __module__ = "pgreplica.localcluster"


def lsn_to_int(lsn: str) -> int:
    """Return a WAL position such as ``"0/3000148"`` as an integer, for comparisons."""
    high, sep, low = lsn.strip().partition("/")
    try:
        if not sep:
            raise ValueError(lsn)
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise ClusterError(f"not a WAL position: {lsn!r} (expected e.g. '0/3000148')") from None
