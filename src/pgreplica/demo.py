"""``pgreplica demo``: read-your-writes under injected lag and a replica failure.

Starts a local cluster (or uses ``--config``), delays replay on replica 1, kills replica 2
for a moment halfway through, and runs write-then-read cycles from several threads. It
prints where reads went and why, and ends with ``stale reads: N``, which must be 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import TextIO

from pgreplica._balancer_sync import LoadBalancer
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
    parser.add_argument("--config", help="use an existing deployment instead of a local cluster")
    parser.add_argument("--seconds", type=float, default=6.0, help="workload duration (6)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent writers/readers (8)")
    parser.add_argument("--lag", default="300ms", help="replay delay injected on replica 1")
    parser.add_argument("--dir", help="cluster directory (default: a temporary one, removed)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    if args.config:
        lb = LoadBalancer.from_config(args.config)
        print(f"pgreplica demo against {lb!r} (no fault injection)", file=out)
        try:
            tally = _workload(lb, args, out, None)
        finally:
            lb.close()
        return _report(tally, out)

    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="pgreplica-demo-")
        os.chmod(tmp, 0o755)  # the servers may run as another user
        directory = os.path.join(tmp, "cluster")
    cluster = LocalCluster(directory, replicas=2)
    try:
        started = time.monotonic()
        cluster.up()
        print(
            f"local cluster up in {time.monotonic() - started:.1f}s: primary and 2 replicas",
            file=out,
        )
        for index in range(3):
            role = "primary " if index == 0 else f"replica{index}"
            print(f"  {role}  {cluster.redacted_dsn(index)}", file=out)
        lb = LoadBalancer(config=cluster.config())
        try:
            cluster.lag(1, args.lag)
            print(f"injected: replay delay {args.lag} on replica1", file=out)
            tally = _workload(lb, args, out, cluster)
        finally:
            lb.close()
        return _report(tally, out)
    finally:
        cluster.destroy() if tmp else cluster.down()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _workload(
    lb: LoadBalancer, args: argparse.Namespace, out: TextIO, cluster: LocalCluster | None
) -> Tally:
    keys = range(args.threads)
    prepare(lb, keys)
    lb.open()
    print(
        f"workload: {args.threads} threads of write-then-read cycles for {args.seconds:g}s",
        file=out,
    )
    until = time.monotonic() + args.seconds
    result: dict[str, Tally] = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("t", threaded(lb, keys, until=until))
    )
    worker.start()
    if cluster is not None:
        time.sleep(args.seconds * 0.35)
        cluster.kill(2)
        print(f"injected: replica2 killed at {args.seconds * 0.35:.1f}s", file=out)
        time.sleep(args.seconds * 0.3)
        cluster.start(2)
        print(f"injected: replica2 restarted at {args.seconds * 0.65:.1f}s", file=out)
    worker.join()
    if cluster is not None:  # the restarted replica rejoins after its next probe
        deadline = time.monotonic() + 10
        while any(h.state != "up" for h in lb.status()) and time.monotonic() < deadline:
            time.sleep(0.05)
    print("hosts after the run:", file=out)
    for status in lb.status():
        lag = "" if status.lag_bytes is None else f" lag {status.lag_bytes} B"
        print(f"  {status.host:28} {status.role:8} {status.state}{lag}", file=out)
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
