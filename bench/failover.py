"""The failover scenario: a replica killed, then hung, under steady load.

    python -m bench.failover [--trials 5] [--hang-seconds 3] [--down-seconds 1]

A local primary with two streaming replicas. Under a steady load (``--writers`` threads
running write-then-read cycles with causal tokens, each on its own counter row, plus
``--readers`` threads running plain reads without a token), replica 1 is

1. killed (immediate shutdown), left down for ``--down-seconds``, then started again;
2. once it is back in the read set, hung: every process of the server SIGSTOPped for
   ``--hang-seconds``, then thawed (SIGCONT);
3. (``--pause``, on by default) its WAL replay paused while writes go on, then resumed:
   the lag bounds (64 KiB, 1 s) take it out.

Each fault runs ``--trials`` times. Reported per fault: the seconds from the fault
(the start of the kill, SIGSTOP or pause) until the replica is out of the read set and from the
repair (the server started again, thawed, replay resumed) until it is back; the caller
errors (any exception out of ``lb.write()`` or ``lb.read()``, must be 0) and stale reads
(a read in the writer's context that returns less than the value it just wrote, must
be 0); and the latency of the reads by phase: before the fault, during it (from the
injection to the repair), and recovering (from the repair until the replica is back
in the read set and 0.3 s after). The default hang (3 s) outlasts ``connect_timeout``
(2 s), so no read is cut short by the thaw, whatever bounds it.

Writes ``bench/results/failover.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.results import Results
from pgreplica import LoadBalancer
from pgreplica.testing import LocalCluster, make_cluster_directory
from pgreplica.workload import INCREMENT_SQL, READ_SQL, prepare

PHASES = ("before", "fault", "recovering")
LATENCY_TARGET_S = 1.0


@dataclass
class Read:
    started: float
    finished: float
    failed: bool


@dataclass
class Trial:
    out: float | None = None  # seconds from the injection until out of the read set
    inject_seconds: float = 0.0  # how long the injection call took (pg_ctl stop etc.)
    back: float | None = None  # seconds from the repair until back in it
    repair_seconds: float = 0.0  # how long the repair itself took (server start etc.)
    cycles: int = 0
    stale: int = 0
    errors: list[str] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def phase_latencies(self) -> dict[str, list[float]]:
        inject, repair = self.marks["inject"], self.marks["repair"]
        settled = self.marks["settled"]
        out: dict[str, list[float]] = {phase: [] for phase in PHASES}
        for r in self.reads:
            if r.started < inject:
                phase = "before"
            elif r.started < repair:
                phase = "fault"
            elif r.started < settled:
                phase = "recovering"
            else:
                continue
            out[phase].append(r.finished - r.started)
        return out


def label_of(cluster: LocalCluster, index: int) -> str:
    return f"127.0.0.1:{cluster.port(index)}/postgres"


def in_read_set(lb: LoadBalancer, label: str) -> bool:
    lb.status()  # refreshes the read sets
    route = lb._router.databases["main"]
    return any(h.label == label for h in route.read_set)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> float | None:
    """Seconds until ``predicate`` holds, polled every 5 ms; None after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.005)
    return time.monotonic() - start


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


class Load:
    """Writer threads (write-then-read with tokens) and reader threads (plain reads)."""

    def __init__(self, lb: LoadBalancer, writers: int, readers: int, trial: Trial) -> None:
        self.lb = lb
        self.trial = trial
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.writer, args=(key,), daemon=True) for key in range(writers)
        ] + [
            threading.Thread(target=self.reader, args=(key,), daemon=True)
            for key in range(writers, writers + readers)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.trial.errors.append(describe(exc))

    def timed_read(self, key: int) -> int | None:
        started = time.monotonic()
        try:
            with self.lb.read() as conn:
                row = conn.execute(READ_SQL, (key,)).fetchone()
        except Exception as exc:
            self.trial.reads.append(Read(started, time.monotonic(), True))
            self.error(exc)
            return None
        self.trial.reads.append(Read(started, time.monotonic(), False))
        return int(row[0]) if row else None

    def writer(self, key: int) -> None:
        cycles = stale = 0
        with self.lb.isolated():
            while not self.stop.is_set():
                cycles += 1
                try:
                    with self.lb.write() as conn:
                        row = conn.execute(INCREMENT_SQL, (key,)).fetchone()
                    written = int(row[0]) if row else 0
                except Exception as exc:
                    self.error(exc)
                    continue
                seen = self.timed_read(key)
                if seen is not None and seen < written:
                    stale += 1
        with self.lock:
            self.trial.cycles += cycles
            self.trial.stale += stale

    def reader(self, key: int) -> None:
        with self.lb.isolated():
            while not self.stop.is_set():
                self.timed_read(key)


@dataclass
class Fault:
    name: str
    inject: Callable[[], None]
    repair: Callable[[], None]
    hold: Callable[[float], float]  # (injected_at) -> seconds to keep the fault after out


def run_trial(
    lb: LoadBalancer, cluster: LocalCluster, fault: Fault, writers: int, readers: int
) -> Trial:
    label = label_of(cluster, 1)
    trial = Trial()
    if wait_for(lambda: in_read_set(lb, label)) is None:
        raise SystemExit(f"{fault.name}: replica 1 never joined the read set")
    load = Load(lb, writers, readers, trial)
    load.start()
    try:
        time.sleep(0.5)
        trial.marks["inject"] = time.monotonic()
        fault.inject()
        injected = time.monotonic()
        trial.inject_seconds = injected - trial.marks["inject"]
        out = wait_for(lambda: not in_read_set(lb, label))
        trial.out = None if out is None else out + trial.inject_seconds
        time.sleep(max(0.0, fault.hold(injected) - (time.monotonic() - injected)))
        trial.marks["repair"] = time.monotonic()
        fault.repair()
        repaired = time.monotonic()
        trial.repair_seconds = repaired - trial.marks["repair"]
        trial.back = wait_for(lambda: in_read_set(lb, label))
        time.sleep(0.3)
        trial.marks["settled"] = time.monotonic()
    finally:
        load.finish()
    return trial


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def fmt_s(value: float | None) -> str:
    return "timeout" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per fault (5)")
    parser.add_argument("--hang-seconds", type=float, default=3.0, help="SIGSTOP for (3 s)")
    parser.add_argument("--down-seconds", type=float, default=1.0, help="killed for (1 s)")
    parser.add_argument("--writers", type=int, default=4, help="write-then-read threads (4)")
    parser.add_argument("--readers", type=int, default=2, help="plain reader threads (2)")
    parser.add_argument(
        "--pause",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also pause WAL replay on the replica (default: on)",
    )
    args = parser.parse_args(argv)
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    logging.getLogger("pgreplica").setLevel(logging.ERROR)

    results = Results("failover", "Failover: a replica killed, hung and paused under load")
    print("starting a local primary with 2 streaming replicas ...", file=sys.stderr, flush=True)
    cluster = LocalCluster(
        make_cluster_directory("pgreplica-bench-failover-"), replicas=2, keep=False
    )
    trials: dict[str, list[Trial]] = {}
    try:
        cluster.up()
        faults = [
            Fault(
                "kill (immediate), restart",
                lambda: cluster.kill(1),
                lambda: cluster.start(1),
                lambda injected: args.down_seconds,
            ),
            Fault(
                "hang (SIGSTOP), thaw",
                lambda: cluster.freeze(1),
                lambda: cluster.thaw(1),
                lambda injected: args.hang_seconds,
            ),
        ]
        if args.pause:
            faults.append(
                Fault(
                    "paused replay (64 KiB, 1 s)",
                    lambda: cluster.pause(1),
                    lambda: cluster.resume(1),
                    lambda injected: time.monotonic() - injected + 0.5,
                )
            )
        with LoadBalancer(config=cluster.config(), max_lag_bytes="64KiB", max_lag_seconds=1) as lb:
            prepare(lb, range(args.writers + args.readers))
            for fault in faults:
                for n in range(args.trials):
                    trial = run_trial(lb, cluster, fault, args.writers, args.readers)
                    trials.setdefault(fault.name, []).append(trial)
                    print(
                        f"  {fault.name} #{n + 1}: out {fmt_s(trial.out)} s,"
                        f" back {fmt_s(trial.back)} s, {len(trial.errors)} errors,"
                        f" {trial.stale} stale",
                        file=sys.stderr,
                        flush=True,
                    )
                    cluster.heal()
    finally:
        cluster.destroy()
    report(results, args, trials)
    results.save()
    failed = any(t.errors or t.stale for ts in trials.values() for t in ts)
    return 1 if failed else 0


def report(results: Results, args: argparse.Namespace, trials: dict[str, list[Trial]]) -> None:
    # -- out / back times, errors, stale reads per fault
    print()
    print(
        f"{'fault':30} {'out median':>11} {'out max':>8} {'back median':>12} {'back max':>9}"
        f" {'errors':>7} {'stale':>6} {'cycles':>7} {'reads':>7}"
    )
    times_rows = []
    per_fault: dict[str, dict[str, float | None]] = {}
    for name, ts in trials.items():
        outs = [t.out for t in ts if t.out is not None]
        backs = [t.back for t in ts if t.back is not None]
        errors = sum(len(t.errors) for t in ts)
        stale = sum(t.stale for t in ts)
        cycles = sum(t.cycles for t in ts)
        reads = sum(len(t.reads) for t in ts)
        out_med = statistics.median(outs) if outs else None
        back_med = statistics.median(backs) if backs else None
        out_max = None if len(outs) < len(ts) else max(outs)
        back_max = None if len(backs) < len(ts) else max(backs)
        print(
            f"{name:30} {fmt_s(out_med):>10}s {fmt_s(out_max):>7}s {fmt_s(back_med):>11}s"
            f" {fmt_s(back_max):>8}s {errors:7} {stale:6} {cycles:7} {reads:7}"
        )
        times_rows.append(
            [
                name,
                None if out_med is None else round(out_med, 3),
                None if out_max is None else round(out_max, 3),
                None if back_med is None else round(back_med, 3),
                None if back_max is None else round(back_max, 3),
                errors,
                stale,
                cycles,
                reads,
            ]
        )
        per_fault[name] = {"out_median": out_med, "back_median": back_med}
    results.table(
        "Out of and back into the read set, caller errors and stale reads",
        [
            "fault",
            "out median (s)",
            "out max (s)",
            "back median (s)",
            "back max (s)",
            "caller errors",
            "stale reads",
            "write-then-read cycles",
            "reads",
        ],
        times_rows,
        note=(
            f"{args.trials} trials per fault; {args.writers} write-then-read threads (tokens)"
            f" and {args.readers} plain reader threads against 1 primary + 2 replicas;"
            " replica 1 is the faulty one. Out: from the start of the injection (the kill"
            " call includes pg_ctl's immediate shutdown) until the replica left the read"
            " set; back: from the"
            " repair done (server accepting connections again, thawed, replay resumed)"
            f" until it was in the read set again. Killed for {args.down_seconds:g} s,"
            f" hung for {args.hang_seconds:g} s. A timeout (30 s) is shown as empty."
        ),
    )

    # -- read latency per phase
    print()
    print(f"read latency by phase (all {args.writers + args.readers} threads, all trials)")
    print(
        f"{'fault':30} {'phase':11} {'reads':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'errors':>7}"
    )
    latency_rows = []
    chart_x: list[str] = []
    chart: dict[str, list[float | None]] = {"p50": [], "p99": [], "max": []}
    worst_during: dict[str, float] = {}
    for name, ts in trials.items():
        pooled: dict[str, list[float]] = {phase: [] for phase in PHASES}
        for t in ts:
            for phase, values in t.phase_latencies().items():
                pooled[phase].extend(values)
        phase_errors = {phase: 0 for phase in PHASES}
        for t in ts:
            for r in t.reads:
                if r.failed:
                    phase = (
                        "before"
                        if r.started < t.marks["inject"]
                        else "fault"
                        if r.started < t.marks["repair"]
                        else "recovering"
                    )
                    phase_errors[phase] += 1
        worst_during[name] = max(pooled["fault"] + pooled["recovering"], default=0.0)
        for phase in PHASES:
            values = pooled[phase]
            p50, p99 = quantile(values, 0.5), quantile(values, 0.99)
            worst = max(values, default=float("nan"))
            print(
                f"{name:30} {phase:11} {len(values):7} {p50 * 1000:8.1f} {p99 * 1000:8.1f}"
                f" {worst * 1000:8.1f} {phase_errors[phase]:7}"
            )
            latency_rows.append(
                [name, phase, len(values), ms(p50), ms(p99), ms(worst), phase_errors[phase]]
            )
            chart_x.append(f"{name.split(' ')[0]}: {phase}")
            chart["p50"].append(ms(p50))
            chart["p99"].append(ms(p99))
            chart["max"].append(ms(worst))
    results.table(
        "Read latency by phase",
        ["fault", "phase", "reads", "p50 (ms)", "p99 (ms)", "max (ms)", "failed reads"],
        latency_rows,
        note=(
            "Every lb.read() of every thread (token reads after a write, plain reads),"
            " pooled over the trials, by the phase in which it started: before the fault,"
            " during it (injection to repair) and recovering (repair until back in the"
            " read set, plus 0.3 s)."
        ),
    )
    results.chart(
        "latency",
        "Read latency by fault and phase",
        x=chart_x,
        series=chart,
        kind="bar",
        xlabel="fault: phase",
        ylabel="read latency (ms)",
        logy=True,
    )
    names = list(trials)
    results.chart(
        "out-back",
        "Seconds until out of the read set and back in (medians)",
        x=[n.split(" (")[0] for n in names],
        series={
            "out (from the fault)": [_round(per_fault[n]["out_median"]) for n in names],
            "back (from the repair)": [_round(per_fault[n]["back_median"]) for n in names],
        },
        kind="bar",
        xlabel="fault",
        ylabel="seconds",
    )

    # -- targets and summary
    errors = sum(len(t.errors) for ts in trials.values() for t in ts)
    stale = sum(t.stale for ts in trials.values() for t in ts)
    reads = sum(len(t.reads) for ts in trials.values() for t in ts)
    cycles = sum(t.cycles for ts in trials.values() for t in ts)
    worst = max(worst_during.values(), default=0.0)
    worst_fault = max(worst_during, key=lambda k: worst_during[k]) if worst_during else "-"
    results.target(
        "0 caller errors", f"{errors} errors in {reads} reads and {cycles} writes", errors == 0
    )
    results.target("0 stale reads", f"{stale} stale in {cycles} write-then-read cycles", stale == 0)
    results.target(
        "worst read latency about 1 s in the failover scenario",
        f"{worst:.2f} s ({worst_fault})",
        worst <= LATENCY_TARGET_S,
    )
    sample_errors = sorted({e for ts in trials.values() for t in ts for e in t.errors})[:5]
    if sample_errors:
        print("\nerrors (first distinct):")
        for e in sample_errors:
            print(f"  {e}")
    outs = {n: per_fault[n]["out_median"] for n in names}
    backs = {n: per_fault[n]["back_median"] for n in names}
    results.summary = (
        f"Under {args.writers} write-then-read threads and {args.readers} plain readers,"
        f" replica 1 of 2 was killed, hung (SIGSTOP) and had its replay paused"
        f" ({args.trials} trials each). Callers saw {errors} errors and {stale} stale reads"
        f" in {reads} reads. Median seconds out of the read set after the fault: "
        + ", ".join(f"{n.split(' (')[0]} {fmt_s(outs[n])}" for n in names)
        + "; back after the repair: "
        + ", ".join(f"{n.split(' (')[0]} {fmt_s(backs[n])}" for n in names)
        + f". The worst read during a fault or its recovery took {worst:.2f} s ({worst_fault})."
    )
    results.data = {
        "args": vars(args),
        "trials": {
            name: [
                {
                    "out": t.out,
                    "back": t.back,
                    "inject_seconds": t.inject_seconds,
                    "repair_seconds": t.repair_seconds,
                    "cycles": t.cycles,
                    "stale": t.stale,
                    "errors": t.errors,
                    "reads": len(t.reads),
                    "worst_fault_read": max(
                        t.phase_latencies()["fault"] + t.phase_latencies()["recovering"],
                        default=None,
                    ),
                }
                for t in ts
            ]
            for name, ts in trials.items()
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


if __name__ == "__main__":
    raise SystemExit(main())
