"""Run the example in one command: the local cluster (started if needed), then uvicorn.

    .venv/bin/python examples/fastapi_app/main.py            # from the repository root

With ``PGREPLICA_CONFIG`` or ``PGREPLICA_PRIMARY_URL`` set, that configuration is used
and no local cluster is started. Otherwise the cluster in ``.pgreplica-cluster`` at the
repository root (the ``pgreplica cluster`` commands' default directory) is created or
started, as ``pgreplica cluster up`` does, and its ``pgreplica.toml`` is used.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from pgreplica.localcluster import LocalCluster

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def local_cluster_config(directory: Path) -> Path:
    """Start the local cluster in ``directory`` (creating it with 2 replicas if there is
    none), write its configuration and return the file's path."""
    if (directory / "cluster.json").exists():
        cluster = LocalCluster.load(directory)
    else:
        print(f"creating a local cluster in {directory} (primary + 2 replicas)...", flush=True)
        cluster = LocalCluster(directory, replicas=2)
    cluster.up()  # starts whatever is stopped; quick when everything runs
    for index in range(cluster.replicas + 1):
        print(f"{cluster.name(index):<9} {cluster.redacted_dsn(index)}")
    return cluster.write_config()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--cluster-dir",
        type=Path,
        default=ROOT / ".pgreplica-cluster",
        help="local cluster directory (default: .pgreplica-cluster at the repository root)",
    )
    args = parser.parse_args(argv)
    if not (os.environ.get("PGREPLICA_CONFIG") or os.environ.get("PGREPLICA_PRIMARY_URL")):
        config = local_cluster_config(args.cluster_dir.absolute())
        os.environ["PGREPLICA_CONFIG"] = str(config)
    print(f"config: {os.environ.get('PGREPLICA_CONFIG') or 'PGREPLICA_PRIMARY_URL'}", flush=True)
    uvicorn.run("app:app", app_dir=str(HERE), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
