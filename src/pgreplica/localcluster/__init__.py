"""A local replicated PostgreSQL cluster for development and tests.

:class:`LocalCluster` runs a primary and N hot-standby streaming replicas on 127.0.0.1,
each in its own data directory under one cluster directory::

    DIR/cluster.json      replica count, ports, binaries, run-as user (never the password)
    DIR/pwfile            the superuser password (mode 0600)
    DIR/primary           data directory of the primary
    DIR/replica1 ...      data directories of the replicas (numbered from 1)
    DIR/logs/*.log        one server log per server
    DIR/pgreplica.toml    written by :meth:`LocalCluster.write_config`

The servers listen on TCP only (no Unix sockets) and authenticate with SCRAM; every replica
streams through its own physical replication slot, so a paused, delayed or stopped replica
never loses WAL. Failures can be injected per replica: an apply delay
(:meth:`~LocalCluster.lag`), a paused replay (:meth:`~LocalCluster.pause`), a crash
(:meth:`~LocalCluster.kill`), a hung server that accepts TCP connections but never
answers (:meth:`~LocalCluster.freeze`) and a failover (:meth:`~LocalCluster.promote`).

PostgreSQL refuses to run as root. When this process runs as root the servers run as the
unprivileged system user ``postgres`` (the Debian/Ubuntu ``postgresql`` package creates
it) and the cluster directory is handed over to that user, so every parent directory must
be traversable by it: ``/tmp/pgreplica-xyz`` works, pytest's ``tmp_path`` (under a 0700
directory owned by root) does not. :func:`pgreplica.testing.make_cluster_directory`
creates a suitable directory.

Only Linux is supported: :meth:`~LocalCluster.freeze` and :meth:`~LocalCluster.thaw`
find the server processes in ``/proc``.

The package, one job a module: :mod:`~pgreplica.localcluster.binaries` (the server
binaries and the user the servers run as), :mod:`~pgreplica.localcluster.ports` (free
ports and the claims file), :mod:`~pgreplica.localcluster.processes` (postmaster pids,
signals, freezing and thawing), :mod:`~pgreplica.localcluster.serverconf` (server
settings and apply delays), :mod:`~pgreplica.localcluster.files` (the files of the
cluster directory), :mod:`~pgreplica.localcluster.servers` (running, starting, stopping
and querying the servers) and :mod:`~pgreplica.localcluster.cluster` (:class:`LocalCluster`).
"""

from __future__ import annotations

# The tests patch os.geteuid and pwd.getpwnam through this package.
import os as os
import pwd as pwd

from pgreplica.localcluster._util import HOST as HOST
from pgreplica.localcluster._util import SUPERUSER as SUPERUSER
from pgreplica.localcluster._util import ClusterError, lsn_to_int
from pgreplica.localcluster.binaries import BINDIR_ENV as BINDIR_ENV
from pgreplica.localcluster.binaries import find_bindir as find_bindir
from pgreplica.localcluster.cluster import LocalCluster
from pgreplica.localcluster.files import DEFAULT_DIRECTORY as DEFAULT_DIRECTORY
from pgreplica.localcluster.ports import DEFAULT_FIRST_PORT as DEFAULT_FIRST_PORT
from pgreplica.localcluster.serverconf import format_delay as format_delay
from pgreplica.localcluster.serverconf import parse_delay as parse_delay

__all__ = ["ClusterError", "LocalCluster", "lsn_to_int"]
