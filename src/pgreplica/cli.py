"""The ``pgreplica`` command.

``pgreplica cluster ...`` manages a local replicated PostgreSQL cluster for development
(see :mod:`pgreplica.localcluster`). Passwords are never printed: DSNs are shown with
``***`` and the full ones are written to ``DIR/pgreplica.toml`` (mode 0600).

Errors end the command with one line on stderr, never a traceback: exit status 2 for a
bad argument or configuration, 1 for a failure while running (a server that cannot be
reached, a host down in ``pgreplica status``), 130 when interrupted (Ctrl-C). When the
reader of its output goes away (``pgreplica status --json | head -1``) the command stops
quietly with 141, like a program ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import psycopg

from pgreplica.errors import ConfigError, PgReplicaError
from pgreplica.localcluster import DEFAULT_DIRECTORY, ClusterError, LocalCluster, parse_delay

if TYPE_CHECKING:
    from pgreplica.health import HostStatus

_Handler = Callable[[argparse.Namespace], int]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
"""Stdout's reader went away: 128 + SIGPIPE, the status of ``cat``, ``grep`` or ``git`` in
its place (a shell reports the last command's status unless ``set -o pipefail``)."""
DEBUG_ENV = "PGREPLICA_DEBUG"
"""Set to 1 to get the traceback of an unexpected error instead of one line."""


class UsageError(Exception):
    """A command was given values it cannot use; the message says which (exit 2)."""


def version() -> str:
    """The installed version of pgreplica."""
    try:
        return metadata.version("pgreplica")
    except metadata.PackageNotFoundError:
        import pgreplica

        return str(getattr(pgreplica, "__version__", "unknown"))


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``pgreplica status: argument --watch: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


# Argument types: a bad value is a usage error that names the argument.


def positive_seconds(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def count(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def duration_text(text: str) -> str:
    """A delay such as ``300ms``, ``2s``, ``1min`` or ``0``, kept as written."""
    try:
        parse_delay(text)
    except ClusterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pgreplica``; each top-level command sets ``handler``."""
    parser = _Parser(
        prog="pgreplica",
        description="Read-replica routing for PostgreSQL: tools for development.",
    )
    parser.add_argument("--version", action="version", version=f"pgreplica {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_cluster_commands(commands)
    status = commands.add_parser(
        "status",
        help="hosts of a configuration: role, state, replay LSN, lag",
        description="Probe every host of a configuration once and show its role, state,"
        " replay LSN and lag (lag '-' when unknown, e.g. the host is down). Exit status"
        " 1 when a host is down.",
    )
    status.add_argument(
        "--config", help="pgreplica TOML file (default: $PGREPLICA_CONFIG or the environment)"
    )
    status.add_argument("--database", help="only the hosts of this database")
    status.add_argument("--json", action="store_true", help="one JSON object per host")
    status.add_argument(
        "--watch",
        type=positive_seconds,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="redraw the table every SECONDS (1) until interrupted",
    )
    status.add_argument("--count", type=positive_int, help=argparse.SUPPRESS)  # --watch rounds
    status.set_defaults(handler=_status_main, quiet_logs=True)
    demo = commands.add_parser(
        "demo",
        help="read-your-writes under injected lag and a replica failure",
        description="Run write-then-read cycles on a local cluster while replica 1 replays"
        " late and replica 2 is killed and restarted; report where reads went and the"
        " stale reads (0).",
    )
    from pgreplica import demo as demo_module

    demo_module.add_arguments(demo)
    demo.set_defaults(handler=demo_module.run, quiet_logs=True)
    dump = commands.add_parser(
        "dump",
        help="consistent export from a replica, only the columns a visibility file allows",
        description="Export the tables a visibility file lists from a healthy replica, in "
        "one snapshot; or check an export with --verify (see docs/dump.md).",
    )
    from pgreplica import dump as dump_module

    dump_module.add_arguments(dump)
    # docs/dump.md: exit status 1 for every error, a bad configuration included.
    dump.set_defaults(handler=dump_module.run, config_error_exit=EXIT_FAILURE)
    check = commands.add_parser(
        "check",
        help="where each database's reads and writes go, and the tag the server received",
        description="Run one write and one read unit per logical database and show the"
        " host, db_config_name, reason and the SQL comment the server received.",
    )
    from pgreplica import check as check_module

    check_module.add_arguments(check)
    check.set_defaults(handler=check_module.run, quiet_logs=True)
    # Further top-level commands are added here, each with
    # commands.add_parser(...) and set_defaults(handler=...).
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pgreplica`` with ``argv`` (default: the process arguments); return the exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:  # stdout's reader went away (| head): stop, say nothing
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse ignores a closed pipe under --help itself
    handler: _Handler = args.handler
    try:
        with quiet_logging() if getattr(args, "quiet_logs", False) else contextlib.nullcontext():
            code = handler(args)
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
            return code
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except (UsageError, ConfigError) as exc:
        _fail(str(exc))
        return int(getattr(args, "config_error_exit", EXIT_USAGE))
    except (ClusterError, PgReplicaError, psycopg.Error, OSError) as exc:
        _fail(_one_line(exc))
        return EXIT_FAILURE
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        _fail(f"unexpected {type(exc).__name__}: {_one_line(exc)} ({DEBUG_ENV}=1 shows where)")
        return EXIT_FAILURE


def _drop_stdout() -> None:
    """The reader of stdout went away (``pgreplica status --json | head -1``): send what
    is still buffered, and anything later, to /dev/null, so that neither this nor the
    interpreter's final flush reports the closed pipe."""
    try:
        fileno = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (a test's capture): nothing to flush later
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fileno)
    finally:
        os.close(devnull)


def _fail(message: str) -> None:
    print(f"pgreplica: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (libpq's hints follow on indented lines); the
    lines of a server log that a ClusterError ends with are kept."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ClusterError):
        return text
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """Keep the log records about unreachable servers (psycopg_pool's ``error connecting``,
    pgreplica's ``host_offline``) off the terminal while a command runs: the command
    reports each error itself, once. Errors of pgreplica still show."""
    levels = {"psycopg.pool": logging.CRITICAL + 1, "pgreplica": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------------- pgreplica cluster


def _add_cluster_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
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
            type=count,
            required=True,
            metavar="I",
            help="server number: 0 = primary, 1..N = replicas"
            if primary_too
            else "replica number, from 1",
        )
        if name == "lag":
            sub.add_argument(
                "--delay",
                type=duration_text,
                required=True,
                help="apply delay such as 300ms, 2s, 1min; 0 removes it",
            )

    up = action("up", "create the cluster if needed and start it")
    up.add_argument("--replicas", type=count, metavar="N", help="number of replicas (default 2)")
    up.add_argument(
        "--port",
        type=port_number,
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
    createdb = action("createdb", "create a database on the primary, replayed by the replicas")
    createdb.add_argument("name", metavar="NAME", help="the database's name")


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
    elif action == "createdb":
        held = cluster.replay_holdups()
        waited = [i for i in range(1, cluster.replicas + 1) if i not in held]
        created = cluster.create_database(args.name, wait_for=waited)
        print(_createdb_message(cluster, args.name, created, held))
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


def _createdb_message(cluster: LocalCluster, name: str, created: bool, held: dict[int, str]) -> str:
    """What ``cluster createdb`` did: on every replica, or on the primary and which
    replicas were not waited for (stopped, frozen, paused, delayed) and why."""
    state = "created" if created else "already there"
    if not held:
        return f"database {name!r} {state}, on the primary and every replica"
    later = [
        f"{cluster.name(i)} is no longer a replica (promoted)"
        if why == "promoted"
        else f"{cluster.name(i)} replays it later ({why})"
        for i, why in sorted(held.items())
    ]
    return f"database {name!r} {state} on the primary; {', '.join(later)}"


# ---------------------------------------------------------------------- pgreplica status


def _status_main(args: argparse.Namespace) -> int:
    """Probe every configured host and print a table (or JSON); with ``--watch``, keep
    redrawing it from the running prober. Exit 1 if a host is down."""
    import time

    from pgreplica._balancer_sync import LoadBalancer

    lb = LoadBalancer.from_config(args.config)
    if args.database is not None:
        lb.settings.database(args.database)  # an unknown name is a usage error
    rounds = 0
    try:
        lb.open()
        while True:
            rows = [s for s in lb.status() if args.database is None or args.database in s.databases]
            if args.watch is not None and not args.json:
                print("\033[H\033[2J", end="")  # clear the terminal
                print(time.strftime("%Y-%m-%d %H:%M:%S"))
            text = format_hosts(rows, as_json=args.json)
            if text:
                print(text, flush=True)
            rounds += 1
            if args.watch is None or (args.count is not None and rounds >= args.count):
                break
            time.sleep(args.watch)
    finally:
        lb.close()
    return EXIT_FAILURE if any(s.state == "down" for s in rows) else 0


def format_hosts(rows: Sequence[HostStatus], *, as_json: bool) -> str:
    """``lb.status()`` as ``pgreplica status`` shows it: a table followed by one line per
    host error, or (``as_json``) one JSON object per host and line. The lag of a host
    that is down or not probed yet is unknown: ``-`` in the table, null in JSON. No
    trailing newline."""
    if as_json:
        return "\n".join(json.dumps(_host_json(s)) for s in rows)
    header = ("HOST", "DATABASES", "ROLE", "STATE", "REPLAY LSN", "LAG BYTES", "LAG SECONDS")
    table = [header]
    for s in rows:
        lag_bytes, lag_seconds = s.lag_bytes, s.lag_seconds  # None when unknown
        table.append(
            (
                s.host,
                ",".join(s.databases),
                s.role,
                s.state,
                s.replay_lsn or "-",
                "-" if lag_bytes is None else str(lag_bytes),
                "-" if lag_seconds is None else f"{lag_seconds:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    lines += [f"{s.host}: {s.last_error}" for s in rows if s.last_error]
    return "\n".join(lines)


def _host_json(row: HostStatus) -> dict[str, object]:
    lag_bytes, lag_seconds = row.lag_bytes, row.lag_seconds
    return {
        "host": row.host,
        "databases": list(row.databases),
        "role": row.role,
        "state": row.state,
        "replay_lsn": row.replay_lsn,
        "lag_bytes": lag_bytes,
        "lag_seconds": lag_seconds,
        "last_error": row.last_error,
    }


if __name__ == "__main__":
    sys.exit(main())
