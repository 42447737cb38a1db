"""How fast a failing replica leaves the read set and comes back, under load.

    python -m bench.failover [--trials 5]

For each fault (hang = SIGSTOP of every process of the server, kill = immediate
shutdown, pause = WAL replay paused while writes continue), a write-then-read workload
runs from 4 threads while the fault is injected on one replica. Reported per fault:
median and max seconds from injection until the replica is out of the read set, and
from repair until it is back, plus the caller-visible errors and stale reads over all
trials (both must be 0).

Then the hung replica again, seen from the callers: in each trial replica 1 is frozen
for ``--hang-seconds`` while 4 threads run short reads (``lb.read()``, no token)
continuously. Reported per trial: the worst latency of the reads that started during
the hang (from the freeze to the thaw), how many there were, the errors any read
raised (must be 0), and the seconds from the thaw until the replica is back in the
read set; then the medians over the trials (and the sum of the errors). The default
hang (3 s) outlasts ``connect_timeout`` (2 s), so that no read is cut short by the
thaw, whatever bounds it.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

from pgreplica import LoadBalancer
from pgreplica.localcluster import LocalCluster
from pgreplica.workload import Tally, prepare, threaded


def in_read_set(lb: LoadBalancer, label: str) -> bool:
    lb.status()  # refreshes the read sets
    route = lb._router.databases["main"]
    return any(h.label == label for h in route.read_set)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)
    return time.monotonic() - start


def run_fault(
    lb: LoadBalancer,
    cluster: LocalCluster,
    inject: Callable[[], None],
    repair: Callable[[], None],
    keys: range,
) -> tuple[float, float, Tally]:
    label = f"127.0.0.1:{cluster.port(1)}/postgres"
    wait_for(lambda: in_read_set(lb, label))
    stop = threading.Event()
    result: dict[str, Tally] = {}

    def work() -> None:
        result["t"] = threaded(lb, keys, stop=stop)

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.3)
    inject()
    out = wait_for(lambda: not in_read_set(lb, label))
    time.sleep(0.5)
    repair()
    back = wait_for(lambda: in_read_set(lb, label))
    stop.set()
    worker.join()
    return out, back, result["t"]


def hang_trial(
    lb: LoadBalancer, cluster: LocalCluster, seconds: float, threads: int = 4
) -> tuple[float, int, int, float]:
    """Freeze replica 1 for ``seconds`` under continuous reads. Returns the worst latency
    of the reads started during the hang, their count, the errors of all reads, and the
    seconds from the thaw until the replica is back in the read set."""
    label = f"127.0.0.1:{cluster.port(1)}/postgres"
    wait_for(lambda: in_read_set(lb, label))
    stop = threading.Event()
    # (started, finished, failed) per read; list.append is atomic
    reads: list[tuple[float, float, bool]] = []

    def reader() -> None:
        with lb.isolated():
            while not stop.is_set():
                started = time.monotonic()
                failed = False
                try:
                    with lb.read() as conn:
                        conn.execute("SELECT 1").fetchone()
                except Exception:
                    failed = True
                reads.append((started, time.monotonic(), failed))

    workers = [threading.Thread(target=reader) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.3)
        frozen_at = time.monotonic()
        cluster.freeze(1)
        try:
            time.sleep(max(0.0, frozen_at + seconds - time.monotonic()))
        finally:
            thawed_at = time.monotonic()
            cluster.thaw(1)
        back = wait_for(lambda: in_read_set(lb, label))
        time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    during = [end - start for start, end, _ in reads if frozen_at <= start < thawed_at]
    errors = sum(failed for _, _, failed in reads)
    return max(during, default=0.0), len(during), errors, back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--hang-seconds", type=float, default=3.0)
    args = parser.parse_args()
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    logging.getLogger("pgreplica").setLevel(logging.ERROR)

    tmp = tempfile.mkdtemp(prefix="pgreplica-bench-")
    os.chmod(tmp, 0o755)
    cluster = LocalCluster(os.path.join(tmp, "cluster"), replicas=2).up()
    try:
        faults: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            "hang (SIGSTOP)": (lambda: cluster.freeze(1), lambda: cluster.thaw(1)),
            "kill (immediate)": (lambda: cluster.kill(1), lambda: cluster.start(1)),
        }
        with LoadBalancer(config=cluster.config(), max_lag_bytes="64KiB", max_lag_seconds=1) as lb:
            prepare(lb, range(8))
            # Lag bounds: pausing replay while writes go on takes the replica out once
            # it is more than max_lag_bytes and max_lag_seconds behind (64 KiB, 1 s here).
            faults["paused replay (64 KiB, 1 s)"] = (
                lambda: cluster.pause(1),
                lambda: cluster.resume(1),
            )
            print(
                f"{'fault':30} {'out median':>11} {'out max':>8} {'back median':>12} "
                f"{'errors':>7} {'stale':>6} {'cycles':>7}"
            )
            for name, (inject, repair) in faults.items():
                outs, backs, total = [], [], Tally()
                for _ in range(args.trials):
                    out, back, tally = run_fault(lb, cluster, inject, repair, range(4))
                    outs.append(out)
                    backs.append(back)
                    total.add(tally)
                    cluster.heal()
                print(
                    f"{name:30} {statistics.median(outs):10.3f}s {max(outs):7.3f}s "
                    f"{statistics.median(backs):11.3f}s {len(total.errors):7} "
                    f"{total.stale:6} {total.cycles:7}"
                )

            print(
                f"\nhung replica: worst read latency (reads started during a"
                f" {args.hang_seconds:g} s hang, 4 threads)"
            )
            print(f"{'trial':30} {'worst read':>11} {'reads':>8} {'errors':>7} {'back':>12}")
            worsts, backs_after_thaw, hang_errors = [], [], 0
            for trial in range(1, args.trials + 1):
                worst, count, errors, back = hang_trial(lb, cluster, args.hang_seconds)
                worsts.append(worst)
                backs_after_thaw.append(back)
                hang_errors += errors
                cluster.heal()
                print(f"{trial:<30} {worst:10.3f}s {count:8} {errors:7} {back:11.3f}s")
            print(
                f"{'median (errors: sum)':30} {statistics.median(worsts):10.3f}s {'':8}"
                f" {hang_errors:7} {statistics.median(backs_after_thaw):11.3f}s"
            )
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
