"""What the SQL comment (db_config_name and tags) and the metrics cost per statement.

Run ``python -m bench.tagging`` (``make bench``). On a local primary with one replica
(or ``--config``), two balancers on the same servers, one with ``sql_comments`` off and
one with it on, time ``lb.read()`` + ``SELECT 1`` and a routing-connection ``SELECT 1``
interleaved in rotating batches; the tagged balancer runs once with no application tag
and once inside ``pgreplica.tags(application=..., endpoint_id=...)``; the untagged one
runs once more with the Prometheus sink counting (only during its own batches). Medians.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import pgreplica
from bench.overhead import Stats, cluster_target, quiet_logging
from bench.results import Results
from bench.token_cost import Arm, interleave, timed
from pgreplica import LoadBalancer, metrics, observe


def read_arm(lb: LoadBalancer, tags: dict[str, str] | None) -> Arm:
    def op() -> None:
        with lb.read() as conn:
            conn.execute("SELECT 1").fetchone()

    if tags is None:
        return timed(op)

    def loop(n: int, out: list[int]) -> None:
        with pgreplica.tags(**tags):
            timed(op)(n, out)

    return loop


def watched(arm: Arm) -> Arm:
    """``arm`` with the Prometheus sink counting its statements (only during its
    batches: the other arms run unwatched, as with ``metrics = false``)."""

    def loop(n: int, out: list[int]) -> None:
        observe.add_sink(metrics._sink)
        try:
            arm(n, out)
        finally:
            observe.remove_sink(metrics._sink)

    return loop


def routing_arm(lb: LoadBalancer) -> tuple[Arm, Callable[[], None]]:
    rc = lb.connection()
    rc.autocommit = True

    def op() -> None:
        rc.execute("SELECT 1").fetchone()

    return timed(op), rc.close


def main(argv: list[str] | None = None) -> int:
    res = Results("tagging", "SQL comments, tags and metrics: cost per statement")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an existing deployment (pgreplica.toml)")
    parser.add_argument("--iterations", type=int, default=5000, help="per arm (5000)")
    parser.add_argument("--batch", type=int, default=100, help="batch size (100)")
    args = parser.parse_args(argv)
    quiet_logging()
    tags = {"application": "bench", "endpoint_id": "Books#index"}
    with cluster_target(args.config) as target:
        plain = LoadBalancer(target.primary, [target.replica], sql_comments=False)
        tagged = LoadBalancer(target.primary, [target.replica], sql_comments=True)
        with plain, tagged:
            for lb in (plain, tagged):
                deadline = time.monotonic() + 30
                while True:
                    with lb.read() as conn:
                        conn.execute("SELECT 1")
                        if conn.on_replica:
                            break
                    if time.monotonic() > deadline:
                        raise SystemExit("reads did not reach the replica")
                    time.sleep(0.05)
            rc_plain, close_plain = routing_arm(plain)
            rc_tagged, close_tagged = routing_arm(tagged)
            metrics.enable(plain)
            observe.remove_sink(metrics._sink)  # counted only inside the watched arm
            arms = [
                read_arm(plain, None),
                read_arm(tagged, None),
                read_arm(tagged, tags),
                rc_plain,
                rc_tagged,
                watched(read_arm(plain, None)),
            ]
            for arm in arms:
                arm(200, [])  # warm-up
            stats = interleave(arms, args.iterations, args.batch)
            close_plain()
            close_tagged()
    labels = [
        "lb.read() SELECT 1, sql_comments off",
        "lb.read() SELECT 1, db_config_name comment",
        "lb.read() SELECT 1, comment + 2 tags",
        "lb.connection() SELECT 1, comments off",
        "lb.connection() SELECT 1, db_config_name comment",
        "lb.read() SELECT 1, comments off, metrics on",
    ]
    print()
    print("pgreplica: cost of SQL comments per statement (medians, interleaved)")
    print(f"  target {target.description}, {args.iterations} statements per arm")
    for label, s in zip(labels, stats, strict=True):
        print(f"  {label:<50} median {s.median_us:8.1f} us   p99 {s.p99_us:8.1f} us")
    print(
        f"added per read: comment +{stats[1].median_us - stats[0].median_us:.1f} us,"
        f" comment with tags +{stats[2].median_us - stats[0].median_us:.1f} us;"
        f" per routing-connection statement +{stats[4].median_us - stats[3].median_us:.1f} us;"
        f" metrics per read +{stats[5].median_us - stats[0].median_us:.1f} us"
    )
    save_results(res, args, target.description, labels, stats)
    return 0


def save_results(
    res: Results, args: argparse.Namespace, description: str, labels: list[str], stats: list[Stats]
) -> None:
    """``bench/results/tagging.json``: the table and the added costs (no targets)."""
    base, rc_base = stats[0].median_us, stats[3].median_us
    added = {
        "db_config_name comment per lb.read()": stats[1].median_us - base,
        "comment with 2 tags per lb.read()": stats[2].median_us - base,
        "db_config_name comment per routing-connection statement": stats[4].median_us - rc_base,
        "metrics (Prometheus sink) per lb.read()": stats[5].median_us - base,
    }
    res.summary = (
        f"`lb.read()` + `SELECT 1` and a routing-connection `SELECT 1` on {description},"
        f" {args.iterations} statements per arm interleaved in rotating batches of"
        f" {args.batch}: with `sql_comments` off and on (with and without application"
        " tags), and with the Prometheus sink counting. "
        + "; ".join(f"{k}: {v:+.1f} µs" for k, v in added.items())
        + " at the median."
    )
    res.table(
        "Per statement, medians and p99",
        ["arm", "median µs", "p99 µs", "mean µs"],
        [
            [label, round(s.median_us, 2), round(s.p99_us, 2), round(s.mean_us, 2)]
            for label, s in zip(labels, stats, strict=True)
        ],
        "Comments off is the baseline of the lb.read() arms; the routing-connection arms"
        " compare with each other.",
    )
    res.table(
        "Added per statement at the median",
        ["what", "added µs"],
        [[k, round(v, 2)] for k, v in added.items()],
    )
    for k, v in added.items():
        res.target(k, f"{v:+.1f} µs at the median", None)
    res.data = {
        "target": description,
        "iterations": args.iterations,
        "batch": args.batch,
        "arms": [{"label": label, **vars(s)} for label, s in zip(labels, stats, strict=True)],
        "added_median_us": added,
    }
    res.save()


if __name__ == "__main__":
    raise SystemExit(main())
