"""What the causal token costs per write and per read.

Run ``python -m bench.token_cost`` (``make bench``). On a local primary with one
streaming replica (or ``--config pgreplica.toml``) it times, interleaved in small
batches whose order rotates so that noise hits every arm alike:

writes (one ``UPDATE`` of one row, on the primary)
* ``lb.write()``: a transaction whose commit also reads the WAL position (one round
  trip: ``COMMIT; SELECT pg_current_wal_insert_lsn()``), the token bound to the
  primary's timeline and system identifier;
* ``pool.connection()``: the same transaction through a plain ``psycopg_pool`` pool to
  the primary with the balancer's pool arguments (commit only, no token), and the same
  again committing with ``COMMIT; SELECT pg_current_wal_insert_lsn()``: what reading
  the position costs the server, without pgreplica;
* ``lb.connection()`` in autocommit, a routing connection that sees the write and
  reads the position after it; and a plain autocommit connection doing the same write.

reads (``SELECT 1`` on the replica)
* ``lb.read()`` with no token; inside ``lb.causal(token)`` with a bound token and with
  the same positions unbound (the replica has replayed both: the cost is the check).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import psycopg
import psycopg_pool

from bench.overhead import Stats, cluster_target, gc_paused, quiet_logging, rotation
from bench.results import Results
from pgreplica import CausalToken, LoadBalancer

UPDATE = "UPDATE bench_token SET v = v + 1 WHERE id = 1"
Arm = Callable[[int, list[int]], None]


def timed(op: Callable[[], None]) -> Arm:
    def loop(n: int, out: list[int]) -> None:
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            op()
            out.append(clock() - t0)

    return loop


def interleave(arms: list[Arm], iterations: int, batch: int) -> list[Stats]:
    samples: list[list[int]] = [[] for _ in arms]
    with gc_paused():
        done = rounds = 0
        while done < iterations:
            n = min(batch, iterations - done)
            for i in rotation(len(arms), rounds):
                arms[i](n, samples[i])
            done += n
            rounds += 1
    return [Stats.of(s) for s in samples]


def measure(
    lb: LoadBalancer, primary_dsn: str, iterations: int, batch: int
) -> tuple[list[Stats], list[Stats], list[str]]:
    with psycopg.connect(primary_dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS bench_token (id int PRIMARY KEY, v bigint)")
        setup.execute("INSERT INTO bench_token VALUES (1, 0) ON CONFLICT DO NOTHING")
    primary = lb._router.route(None).primary
    kwargs = lb._pool_kwargs(primary)
    kwargs["name"] = "direct-primary"
    pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(**kwargs)
    pool.open(wait=True)
    plain = psycopg.connect(primary_dsn, autocommit=True)
    routing = lb.connection()
    routing.autocommit = True

    def lb_write() -> None:
        with lb.isolated(), lb.write() as conn:
            conn.execute(UPDATE)

    def pool_write() -> None:
        with pool.connection() as conn:
            conn.execute(UPDATE)

    def pool_write_position() -> None:
        with pool.connection() as conn:
            conn.execute(UPDATE)
            cur = conn.execute("COMMIT; SELECT pg_current_wal_insert_lsn()::text")
            cur.nextset()
            cur.fetchone()

    def routing_write() -> None:
        with lb.isolated():
            routing.execute(UPDATE)

    def plain_write() -> None:
        plain.execute(UPDATE)

    with lb.isolated():
        lb_write()
        with lb.write() as conn:
            conn.execute(UPDATE)
        bound = lb.token()
    unbound = CausalToken(dict(bound.items()))
    deadline = time.monotonic() + 30
    while not lb._router.caught_up(lb._router.route(None), bound.get("main"), None):
        if time.monotonic() > deadline:
            raise SystemExit("the replica did not replay the token's position")
        time.sleep(0.05)
    wrong: list[str] = []

    def read_arm(token: CausalToken | None) -> Arm:
        """Reads inside one scope per batch: what a request that adopted ``token``
        pays per read (the scope itself is timed apart, by ``scope_arm``)."""

        def loop(n: int, out: list[int]) -> None:
            clock = time.perf_counter_ns
            with lb.isolated(), lb.causal(token) if token is not None else nullcontext():
                for _ in range(n):
                    t0 = clock()
                    with lb.read() as conn:
                        conn.execute("SELECT 1").fetchone()
                    out.append(clock() - t0)
                    if not conn.on_replica:
                        wrong.append(conn.reason)

        return loop

    def scope() -> None:
        with lb.causal(bound):
            pass

    writes = (lb_write, pool_write, pool_write_position, routing_write, plain_write)
    for op in writes:
        for _ in range(200):
            op()  # warm-up
    w = interleave(
        [timed(op) for op in writes],
        iterations,
        batch,
    )
    r = interleave(
        [read_arm(None), read_arm(bound), read_arm(unbound), timed(scope)], iterations, batch
    )
    routing.close()
    plain.close()
    pool.close()
    return w, r, wrong


def main(argv: list[str] | None = None) -> int:
    res = Results("token_cost", "Causal token: cost per write and per read")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an existing deployment (pgreplica.toml)")
    parser.add_argument("--iterations", type=int, default=3000, help="per arm (3000)")
    parser.add_argument("--batch", type=int, default=50, help="batch size (50)")
    args = parser.parse_args(argv)
    quiet_logging()
    with (
        cluster_target(args.config) as target,
        LoadBalancer(target.primary, [target.replica]) as lb,
    ):
        w, r, wrong = measure(lb, target.primary, args.iterations, args.batch)
    print()
    print("pgreplica: cost of the causal token (medians; interleaved, order rotated)")
    print(f"  target {target.description}, {args.iterations} operations per arm")
    rows = [
        ("write: lb.write() (commit + position, 1 trip)", w[0]),
        ("write: psycopg pool.connection() transaction", w[1]),
        ("write: the same, committing with COMMIT; SELECT lsn", w[2]),
        ("write: lb.connection() autocommit", w[3]),
        ("write: plain autocommit connection", w[4]),
        ("read: lb.read(), no token", r[0]),
        ("read: lb.read() in causal(bound token)", r[1]),
        ("read: lb.read() in causal(unbound token)", r[2]),
        ("adopting a token: lb.causal(token) enter + exit", r[3]),
    ]
    for label, s in rows:
        print(f"  {label:<48} median {s.median_us:8.1f} us   p99 {s.p99_us:8.1f} us")
    print(
        f"per write, token included: transaction +{w[0].median_us - w[1].median_us:.1f} us"
        f" (ratio {w[0].median_us / w[1].median_us:.2f}), of which the server's position read"
        f" +{w[2].median_us - w[1].median_us:.1f} us; autocommit"
        f" +{w[3].median_us - w[4].median_us:.1f} us (ratio {w[3].median_us / w[4].median_us:.2f})"
    )
    print(
        f"per read with a token: bound +{r[1].median_us - r[0].median_us:.1f} us,"
        f" unbound +{r[2].median_us - r[0].median_us:.1f} us (vs no token)"
    )
    save_results(res, args, target.description, rows, w, r, wrong)
    if wrong:
        print(f"FAILED: {len(wrong)} token reads were not served by the caught-up replica")
        return 1
    return 0


def save_results(
    res: Results,
    args: argparse.Namespace,
    description: str,
    rows: list[tuple[str, Stats]],
    w: list[Stats],
    r: list[Stats],
    wrong: list[str],
) -> None:
    """``bench/results/token_cost.json``: the table and the added costs (no targets)."""
    figures = {
        "per write, lb.write() transaction with the token, over a pool transaction": (
            w[0].median_us - w[1].median_us
        ),
        "of which the server's position read (COMMIT; SELECT lsn over plain COMMIT)": (
            w[2].median_us - w[1].median_us
        ),
        "per write, lb.connection() autocommit over a plain autocommit connection": (
            w[3].median_us - w[4].median_us
        ),
        "per read, lb.read() in causal(bound token) over no token": (
            r[1].median_us - r[0].median_us
        ),
        "per read, lb.read() in causal(unbound token) over no token": (
            r[2].median_us - r[0].median_us
        ),
        "adopting a token, lb.causal(token) enter + exit": r[3].median_us,
    }
    res.summary = (
        f"On {description}, {args.iterations} operations per arm interleaved in rotating"
        f" batches of {args.batch}: writes (one UPDATE of one row) with and without the"
        " causal token, and reads on the caught-up replica with and without a token. "
        + "; ".join(f"{k}: {v:+.1f} µs" for k, v in figures.items())
        + " (medians)."
        + (f" {len(wrong)} token reads were NOT served by the replica." if wrong else "")
    )
    res.table(
        "Per operation, medians and p99",
        ["operation", "median µs", "p99 µs", "mean µs"],
        [
            [label, round(s.median_us, 2), round(s.p99_us, 2), round(s.mean_us, 2)]
            for label, s in rows
        ],
    )
    res.table("Added at the median", ["what", "µs"], [[k, round(v, 2)] for k, v in figures.items()])
    for k, v in figures.items():
        res.target(k, f"{v:+.1f} µs at the median", None)
    res.data = {
        "target": description,
        "iterations": args.iterations,
        "batch": args.batch,
        "operations": [{"label": label, **vars(s)} for label, s in rows],
        "added_median_us": figures,
        "reads_not_on_replica": len(wrong),
    }
    res.save()


if __name__ == "__main__":
    raise SystemExit(main())
