"""The ``pgreplica`` command.

``pgreplica cluster ...`` manages a local replicated PostgreSQL cluster for development
(see :mod:`pgreplica.localcluster`). Passwords are never printed: DSNs are shown with
``***`` and the full ones are written to ``DIR/pgreplica.toml`` (mode 0600).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from pgreplica.errors import PgReplicaError
from pgreplica.localcluster import DEFAULT_DIRECTORY, ClusterError, LocalCluster

_Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pgreplica``; each top-level command sets ``handler``."""
    parser = argparse.ArgumentParser(
        prog="pgreplica",
        description="Read-replica routing for PostgreSQL: tools for development.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_cluster_commands(commands)
    status = commands.add_parser(
        "status", help="hosts of a configuration: role, state, replay LSN, lag"
    )
    status.add_argument(
        "--config", help="pgreplica TOML file (default: $PGREPLICA_CONFIG or the environment)"
    )
    status.add_argument("--database", help="only the hosts of this database")
    status.add_argument("--json", action="store_true", help="one JSON object per host")
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="redraw the table every SECONDS (1) until interrupted",
    )
    status.add_argument("--count", type=int, help=argparse.SUPPRESS)  # --watch rounds (tests)
    status.set_defaults(handler=_status_main)
    demo = commands.add_parser(
        "demo", help="read-your-writes under injected lag and a replica failure"
    )
    from pgreplica import demo as demo_module

    demo_module.add_arguments(demo)
    demo.set_defaults(handler=demo_module.run)
    dump = commands.add_parser(
        "dump",
        help="consistent export from a replica, only the columns a visibility file allows",
        description="Export the tables a visibility file lists from a healthy replica, in "
        "one snapshot; or check an export with --verify (see docs/dump.md).",
    )
    from pgreplica import dump as dump_module

    dump_module.add_arguments(dump)
    dump.set_defaults(handler=dump_module.run)
    check = commands.add_parser(
        "check",
        help="where each database's reads and writes go, and the tag the server received",
        description="Run one write and one read unit per logical database and show the"
        " host, db_config_name, reason and the SQL comment the server received.",
    )
    from pgreplica import check as check_module

    check_module.add_arguments(check)
    check.set_defaults(handler=check_module.run)
    # Further top-level commands are added here, each with
    # commands.add_parser(...) and set_defaults(handler=...).
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pgreplica`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: _Handler = args.handler
    try:
        return handler(args)
    except (ClusterError, PgReplicaError, psycopg.Error) as exc:
        print(f"pgreplica: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pgreplica: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------- pgreplica cluster


def _add_cluster_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = commands.add_parser(
        "cluster",
        help="run a local primary with streaming replicas for development",
        description="Manage a local PostgreSQL primary with hot-standby streaming replicas "
        "on 127.0.0.1. Server 0 is the primary, replicas are numbered from 1.",
    )
    cluster.set_defaults(handler=_cluster_main)
    actions = cluster.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--dir",
            default=DEFAULT_DIRECTORY,
            help=f"cluster directory (default: ./{DEFAULT_DIRECTORY})",
        )
        return sub

    def replica_action(name: str, help: str, *, primary_too: bool = False) -> None:
        sub = action(name, help)
        sub.add_argument(
            "--replica",
            type=int,
            required=True,
            metavar="I",
            help="server number: 0 = primary, 1..N = replicas"
            if primary_too
            else "replica number, from 1",
        )
        if name == "lag":
            sub.add_argument(
                "--delay",
                required=True,
                help="apply delay such as 300ms, 2s, 1min; 0 removes it",
            )

    up = action("up", "create the cluster if needed and start it")
    up.add_argument("--replicas", type=int, metavar="N", help="number of replicas (default 2)")
    up.add_argument(
        "--port",
        type=int,
        metavar="P",
        help="port of the primary; replicas use P+1..P+N (default: free ports from 5432)",
    )
    action("down", "stop every server")
    action("status", "show every server's role, state and WAL position")
    replica_action("lag", "delay WAL replay on a replica (recovery_min_apply_delay)")
    replica_action("pause", "pause WAL replay on a replica")
    replica_action("resume", "resume WAL replay on a replica")
    replica_action("kill", "crash a server (immediate shutdown)", primary_too=True)
    replica_action("start", "start a stopped server", primary_too=True)
    replica_action("freeze", "hang a server: SIGSTOP all its processes", primary_too=True)
    replica_action("thaw", "undo freeze: SIGCONT all its processes", primary_too=True)
    replica_action("promote", "promote a replica to a primary")
    action("destroy", "stop every server and remove the cluster directory")


def _cluster_main(args: argparse.Namespace) -> int:
    action: str = args.action
    if action == "up":
        return _cluster_up(args)
    cluster = LocalCluster.load(args.dir)
    if action == "down":
        cluster.down()
        print(f"stopped the cluster in {cluster.directory}")
    elif action == "status":
        _print_status(cluster)
    elif action == "destroy":
        cluster.destroy()
        print(f"removed {cluster.directory}")
    else:
        replica_handlers: dict[str, Callable[[int], None]] = {
            "pause": cluster.pause,
            "resume": cluster.resume,
            "kill": cluster.kill,
            "start": cluster.start,
            "freeze": cluster.freeze,
            "thaw": cluster.thaw,
            "promote": cluster.promote,
            "lag": lambda replica: cluster.lag(replica, args.delay),
        }
        replica_handlers[action](args.replica)
        print(f"{action}: {cluster.name(args.replica)} ok")
    return 0


def _cluster_up(args: argparse.Namespace) -> int:
    if args.replicas is None and args.port is None and (Path(args.dir) / "cluster.json").exists():
        cluster = LocalCluster.load(args.dir)
    else:
        replicas = 2 if args.replicas is None else args.replicas
        cluster = LocalCluster(args.dir, replicas=replicas, port=args.port)
    cluster.up()
    path = cluster.write_config()
    for index in range(cluster.replicas + 1):
        print(f"{cluster.name(index):<9} {cluster.redacted_dsn(index)}")
    print(f"config: {path}")
    return 0


def _print_status(cluster: LocalCluster) -> None:
    header = ("server", "role", "port", "state", "lsn", "replay", "delay")
    rows: list[tuple[str, ...]] = [header]
    for server in cluster.status():
        if not server["running"]:
            state = "stopped"
        elif server["frozen"]:
            state = "frozen"
        elif server["in_recovery"] is None:
            state = "unreachable"
        elif server["in_recovery"]:
            state = "streaming" if server["streaming"] else "recovering"
        else:
            state = "running"
        if server["role"] != "replica" or not server["running"] or server["paused"] is None:
            replay = "-"
        else:
            replay = "paused" if server["paused"] else "on"
        rows.append(
            (
                str(server["name"]),
                str(server["role"]),
                str(server["port"]),
                state,
                str(server["lsn"] or "-"),
                replay,
                str(server["apply_delay"] or "-") if server["role"] == "replica" else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------- pgreplica status


def _status_main(args: argparse.Namespace) -> int:
    """Probe every configured host and print a table (or JSON); with ``--watch``, keep
    redrawing it from the running prober. Exit 1 if a host is down."""
    import time

    from pgreplica._balancer_sync import LoadBalancer

    lb = LoadBalancer.from_config(args.config)
    rounds = 0
    try:
        lb.open()
        while True:
            rows = [s for s in lb.status() if args.database is None or args.database in s.databases]
            if args.watch is not None and not args.json:
                print("\033[H\033[2J", end="")  # clear the terminal
                print(time.strftime("%Y-%m-%d %H:%M:%S"))
            _print_hosts(rows, as_json=args.json)
            rounds += 1
            if args.watch is None or (args.count is not None and rounds >= args.count):
                break
            time.sleep(args.watch)
    finally:
        lb.close()
    return 1 if any(s.state == "down" for s in rows) else 0


def _print_hosts(rows: list[Any], *, as_json: bool) -> None:
    if as_json:
        import json

        for s in rows:
            print(
                json.dumps(
                    {
                        "host": s.host,
                        "databases": list(s.databases),
                        "role": s.role,
                        "state": s.state,
                        "replay_lsn": s.replay_lsn,
                        "lag_bytes": s.lag_bytes,
                        "lag_seconds": s.lag_seconds,
                        "last_error": s.last_error,
                    }
                ),
                flush=True,
            )
        return
    header = ("HOST", "DATABASES", "ROLE", "STATE", "REPLAY LSN", "LAG BYTES", "LAG SECONDS")
    table = [header]
    for s in rows:
        table.append(
            (
                s.host,
                ",".join(s.databases),
                s.role,
                s.state,
                s.replay_lsn or "-",
                "-" if s.lag_bytes is None else str(s.lag_bytes),
                "-" if s.lag_seconds is None else f"{s.lag_seconds:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for s in rows:
        if s.last_error:
            print(f"{s.host}: {s.last_error}")
