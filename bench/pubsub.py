"""What a WAL-location envelope costs per message (``python -m bench.pubsub``).

On a local primary with one replica: after a write (the context's position is known,
so :func:`pgreplica.pubsub.wrap` asks no server), the median of ``wrap`` of a small JSON
payload, of ``unwrap`` of the envelope (and of a plain message, passed through), and
of a whole ``@pubsub.consumer`` call whose body does nothing (the decision included:
cache hit, a caught-up replica).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from bench.overhead import cluster_target, quiet_logging
from bench.results import Results
from pgreplica import LoadBalancer, pubsub


def median_us(op: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        op()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an existing deployment (pgreplica.toml)")
    parser.add_argument("--iterations", type=int, default=20000, help="per operation")
    args = parser.parse_args(argv)
    quiet_logging()
    results = Results("pubsub", "pgreplica.pubsub: cost of the WAL-location envelope per message")
    payload = {"event": "item_updated", "id": 12345, "fields": ["title", "price"]}
    with (
        cluster_target(args.config) as target,
        LoadBalancer(target.primary, [target.replica]) as lb,
    ):
        with lb.write() as conn:
            conn.execute("SELECT 1")
        deadline = time.monotonic() + 30
        while True:  # the replica has replayed the write: the consumer's cache hit
            with lb.isolated(), lb.causal(lb.token()), lb.read() as conn:
                if conn.reason == "replica":
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the replica did not catch up")
            time.sleep(0.05)
        envelope = pubsub.wrap(payload, lb)
        signed = pubsub.wrap(payload, lb, key="k")

        @pubsub.consumer(lb, name="bench")
        def handle(body: object) -> None:
            return None

        def consume() -> None:
            with lb.isolated():
                handle(envelope)

        n = args.iterations
        rows = [
            ("wrap (JSON payload, position known)", median_us(lambda: pubsub.wrap(payload, lb), n)),
            ("wrap, signed", median_us(lambda: pubsub.wrap(payload, lb, key="k"), n)),
            ("unwrap", median_us(lambda: pubsub.unwrap(envelope), n)),
            (
                "unwrap, checking the signature",
                median_us(lambda: pubsub.unwrap(signed, key="k"), n),
            ),
            ("unwrap of a plain message", median_us(lambda: pubsub.unwrap(b"plain"), n)),
            ("@consumer call (unwrap + decision + scope)", median_us(consume, n // 4)),
        ]
    print()
    print(f"pgreplica.pubsub: cost per message (medians of {n} calls), {len(envelope)} B envelope")
    for label, us in rows:
        print(f"  {label:<46} {us:8.1f} us")
    results.table(
        "Cost per message",
        ["operation", "median (us)"],
        [(label, round(us, 1)) for label, us in rows],
        note=(
            f"Medians of {n} calls ({n // 4} for the consumer call), {len(envelope)} B"
            f" envelope of a small JSON payload; target: {target.description}."
        ),
    )
    results.chart(
        "cost",
        "pubsub: median cost per message",
        x=[label for label, _ in rows],
        series={"median (us)": [round(us, 1) for _, us in rows]},
        kind="bar",
        xlabel="operation",
        ylabel="microseconds",
    )
    by_label = dict(rows)
    results.summary = (
        f"Wrapping a message in a WAL-location envelope costs"
        f" {by_label['wrap (JSON payload, position known)']:.0f} us"
        f" ({by_label['wrap, signed']:.0f} us signed), unwrapping"
        f" {by_label['unwrap']:.0f} us, and a whole `@pubsub.consumer` call"
        f" {by_label['@consumer call (unwrap + decision + scope)']:.0f} us (medians)."
    )
    results.data = {"iterations": n, "envelope_bytes": len(envelope), "median_us": by_label}
    results.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
