"""Helpers for tests that need real PostgreSQL servers.

:class:`LocalCluster` runs a primary with streaming replicas on 127.0.0.1 (see
:mod:`pgreplica.localcluster`); :class:`FaultProxy` puts switchable network faults
(delay, bandwidth, blackhole, drop, reset) between the application and a server;
:func:`make_cluster_directory` gives a cluster a directory that
the ``postgres`` user can reach when the tests run as root.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pgreplica.faultproxy import FaultProxy
from pgreplica.localcluster import ClusterError, LocalCluster, lsn_to_int

__all__ = ["ClusterError", "FaultProxy", "LocalCluster", "lsn_to_int", "make_cluster_directory"]


def make_cluster_directory(prefix: str = "pgreplica-") -> Path:
    """Create a new empty directory for a :class:`LocalCluster` in the temp directory.

    pytest's ``tmp_path`` lives under a directory that only its owner can enter, so a
    cluster there fails when the tests run as root (the servers then run as ``postgres``).
    This directory sits directly in the system temp directory and is mode 0755.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path
