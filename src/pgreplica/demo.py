"""``pgreplica demo``: read-your-writes under injected lag and a replica failure.

Starts a local cluster (or uses ``--config``), delays replay on replica 1, kills replica 2
for a moment halfway through, and runs write-then-read cycles from several threads. It
prints where reads went and why, and ends with ``stale reads: N``, which must be 0.

The cluster is a temporary one, removed at the end (``--port`` picks its ports), or the
one in ``--dir``: a cluster found there is left as it was, also after an error or Ctrl-C
(the apply delays it had, the servers that ran running, the others stopped again, the
frozen ones frozen again, the replicas whose replay was paused paused again).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pgreplica._balancer_sync import LoadBalancer
from pgreplica.cli import UsageError
from pgreplica.localcluster import LocalCluster
from pgreplica.workload import Tally, prepare, threaded

REASONS = {
    "replica": "replica proven caught up by the prober's cached replay LSN",
    "replica_checked": "replica caught up, confirmed by asking it directly",
    "replicas_behind": "primary: no replica had replayed the caller's write yet",
    "no_healthy_replica": "primary: no replica up and within the lag bounds",
    "position_unprovable": "primary: a position no replica can prove (unknown, or from"
    " another cluster or timeline)",
    "fallback_replica": "replica, after the first one failed mid-read",
    "fallback_primary": "primary, after a replica failed mid-read",
    "fallback_replicas_behind": "primary, after a replica failed and none other had caught up",
    "fallback_no_healthy_replica": "primary, after the last healthy replica failed",
    "fallback_position_unprovable": "primary, after a replica failed, for a position no"
    " replica can prove",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pgreplica.cli import duration_text, port_number, positive_int, positive_seconds

    parser.add_argument("--config", help="use an existing deployment instead of a local cluster")
    parser.add_argument(
        "--seconds", type=positive_seconds, default=6.0, help="workload duration (6)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=8, help="concurrent writers/readers (8)"
    )
    parser.add_argument(
        "--lag", type=duration_text, default="300ms", help="replay delay injected on replica 1"
    )
    parser.add_argument(
        "--dir",
        help="cluster directory (default: a temporary one, removed); a cluster already"
        " there is left as found: running, stopped, frozen or paused, without the injected"
        " faults",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        metavar="P",
        help="port of the primary of the local cluster; the replicas use P+1 and P+2"
        " (default: free ports from 5432)",
    )


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.config:
        if args.dir is not None or args.port is not None:
            raise UsageError(
                "--config runs against an existing deployment: leave out --dir and --port"
            )
        lb = LoadBalancer.from_config(args.config)
        _say(out, f"pgreplica demo against {lb!r} (no fault injection)")
        try:
            tally = _workload(lb, args, out, None)
        finally:
            lb.close()
        return _report(tally, out)
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="pgreplica-demo-")
        try:
            os.chmod(tmp, 0o755)  # the servers may run as another user
            cluster = _open_cluster(os.path.join(tmp, "cluster"), args.port)
            try:
                return _local_demo(cluster, args, out)
            finally:
                cluster.destroy()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    cluster = _open_cluster(args.dir, args.port)
    found = _Found.of(cluster)
    if any(found.running):
        _say(out, f"using the running cluster in {cluster.directory}; left as found at the end")
    ended = False
    try:
        code = _local_demo(cluster, args, out, found)
        ended = True  # the report ends with "stale reads: N": restore silently
        return code
    finally:
        found.restore(cluster, None if ended else out)


def _open_cluster(directory: str, port: int | None) -> LocalCluster:
    """The cluster in ``directory``, or a new one (two replicas) to create there."""
    if not (Path(directory) / "cluster.json").exists():
        if port is not None and port + 2 > 65535:
            raise UsageError(f"--port {port}: the replicas need ports {port + 1} and {port + 2}")
        return LocalCluster(directory, replicas=2, port=port)
    cluster = LocalCluster.load(directory)
    if port is not None and port != cluster.port(0):
        raise UsageError(
            f"--port {port}: {cluster.directory} holds a cluster on port {cluster.port(0)};"
            " leave out --port to use it, or choose another --dir"
        )
    if cluster.replicas == 0:
        raise UsageError(
            f"{cluster.directory} holds a cluster without replicas: the demo needs one"
        )
    return cluster


@dataclass
class _Found:
    """A cluster as the demo found it: which servers ran and which were frozen, the
    replicas' apply delays and which replicas had their replay paused."""

    running: tuple[bool, ...]
    frozen: tuple[bool, ...]
    apply_delays: tuple[str, ...]
    """Of replicas 1..N."""
    paused: dict[int, bool | None]
    """Replica number: paused or not; None for a frozen one, which cannot be asked until
    :meth:`LocalCluster.up` thaws it (:meth:`learn_paused`)."""

    @classmethod
    def of(cls, cluster: LocalCluster) -> _Found:
        servers = range(cluster.replicas + 1)
        running = tuple(cluster.running(i) for i in servers)
        frozen = tuple(cluster.frozen(i) for i in servers)
        paused: dict[int, bool | None] = {}
        for replica in range(1, cluster.replicas + 1):
            if frozen[replica]:
                paused[replica] = None
            elif running[replica] and _in_recovery(cluster, replica):
                paused[replica] = cluster.paused(replica)
        return cls(
            running=running,
            frozen=frozen,
            apply_delays=tuple(cluster.apply_delay(i) for i in range(1, cluster.replicas + 1)),
            paused=paused,
        )

    def learn_paused(self, cluster: LocalCluster) -> None:
        """Ask the replicas that were frozen, now that they are thawed, whether their
        replay is paused."""
        for replica, paused in self.paused.items():
            if paused is None and _in_recovery(cluster, replica):
                self.paused[replica] = cluster.paused(replica)

    def restore(self, cluster: LocalCluster, out: TextIO | None) -> None:
        """Undo what the demo did: its apply delay, the replica it killed (which forgot
        its paused replay), the servers it started and the servers it thawed.

        A second Ctrl-C is ignored meanwhile (in the main thread), so that it cannot leave
        the cluster half restored."""
        ignoring = threading.current_thread() is threading.main_thread()
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignoring else None
        try:
            if out is not None:  # after an error or Ctrl-C
                with contextlib.suppress(OSError):  # a closed stdout must not stop it
                    _say(out, f"restoring the cluster in {cluster.directory} as found")
            self._restore(cluster)
        finally:
            if ignoring:
                signal.signal(signal.SIGINT, signal.SIG_DFL if handler is None else handler)

    def _restore(self, cluster: LocalCluster) -> None:
        for replica, delay in enumerate(self.apply_delays, 1):
            if cluster.apply_delay(replica) != delay:
                cluster.lag(replica, delay)
        for index, was_running in enumerate(self.running):
            if was_running and not cluster.running(index):
                cluster.start(index)
        if not any(self.running):
            cluster.down()
            return
        for index in reversed(range(len(self.running))):  # replicas before the primary
            if not self.running[index]:
                cluster.stop(index)
        for replica, paused in self.paused.items():
            if paused and not cluster.frozen(replica) and not cluster.paused(replica):
                cluster.pause(replica)
        for index in reversed(range(len(self.frozen))):
            if self.frozen[index] and not cluster.frozen(index):
                cluster.freeze(index)


def _in_recovery(cluster: LocalCluster, replica: int) -> bool:
    """Whether ``replica`` (running, not frozen) is still a replica, not promoted."""
    return bool(cluster.execute(replica, "SELECT pg_is_in_recovery()")[0][0])


def _local_demo(
    cluster: LocalCluster, args: argparse.Namespace, out: TextIO, found: _Found | None = None
) -> int:
    started = time.monotonic()
    cluster.up()  # starts the stopped servers, thaws the frozen ones
    if found is not None:
        found.learn_paused(cluster)
    replicas = "1 replica" if cluster.replicas == 1 else f"{cluster.replicas} replicas"
    _say(out, f"local cluster up in {time.monotonic() - started:.1f}s: primary and {replicas}")
    for index in range(cluster.replicas + 1):
        role = "primary " if index == 0 else f"replica{index}"
        _say(out, f"  {role}  {cluster.redacted_dsn(index)}")
    lb = LoadBalancer(config=cluster.config())
    try:
        cluster.lag(1, args.lag)
        _say(out, f"injected: replay delay {args.lag} on replica1")
        tally = _workload(lb, args, out, cluster)
    finally:
        lb.close()
    return _report(tally, out)


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)


def _workload(
    lb: LoadBalancer, args: argparse.Namespace, out: TextIO, cluster: LocalCluster | None
) -> Tally:
    keys = range(args.threads)
    prepare(lb, keys)
    lb.open()
    _say(out, f"workload: {args.threads} threads of write-then-read cycles for {args.seconds:g}s")
    until = time.monotonic() + args.seconds
    stop = threading.Event()
    result: dict[str, Tally] = {}
    # A daemon, like the threads it starts: an interrupted demo never waits for them.
    worker = threading.Thread(
        target=lambda: result.setdefault("t", threaded(lb, keys, until=until, stop=stop)),
        name="pgreplica-demo-workload",
        daemon=True,
    )
    try:
        worker.start()
        if cluster is not None and cluster.replicas >= 2:
            time.sleep(args.seconds * 0.35)
            cluster.kill(2)
            _say(out, f"injected: replica2 killed at {args.seconds * 0.35:.1f}s")
            time.sleep(args.seconds * 0.3)
            cluster.start(2)
            _say(out, f"injected: replica2 restarted at {args.seconds * 0.65:.1f}s")
        worker.join()
    finally:  # interrupted (Ctrl-C): the threads end their cycle and stop
        stop.set()
        if worker.is_alive():
            worker.join()
    if cluster is not None:  # the restarted replica rejoins after its next probe
        deadline = time.monotonic() + 10
        while any(h.state != "up" for h in lb.status()) and time.monotonic() < deadline:
            time.sleep(0.05)
    _say(out, "hosts after the run:")
    for status in lb.status():
        lag = "" if status.lag_bytes is None else f" lag {status.lag_bytes} B"
        _say(out, f"  {status.host:28} {status.role:8} {status.state}{lag}")
    return result["t"]


def _report(tally: Tally, out: TextIO) -> int:
    reads = sum(tally.reasons.values())
    print(f"reads: {reads} in {tally.cycles} write-then-read cycles", file=out)
    print("routed by host:", file=out)
    for host, count in sorted(tally.hosts.items()):
        print(f"  {host:28} {count:7}  {100 * count / max(reads, 1):5.1f}%", file=out)
    print("routed by reason:", file=out)
    reasons: Counter[str] = tally.reasons
    for reason, count in reasons.most_common():
        meaning = REASONS.get(reason, "")
        print(f"  {reason:20} {count:7}  {100 * count / max(reads, 1):5.1f}%  {meaning}", file=out)
    print(f"errors seen by the caller: {len(tally.errors)}", file=out)
    for exc in tally.errors[:5]:
        print(f"  {type(exc).__name__}: {exc}", file=out)
    print(f"stale reads: {tally.stale}", file=out)
    return 0 if tally.stale == 0 and not tally.errors else 1
