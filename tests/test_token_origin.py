"""Tokens bound to the history they came from (timeline and system identifier).

A position is only comparable with positions of the same history: after a failover the
new timeline shares the old one's positions only up to the point where the old one
ended, and another cluster's positions mean nothing here. A token says which history
its positions belong to; the router reads a position it cannot place on the primary,
and never lets a replica prove it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

import pgreplica
from pgreplica import jobs
from pgreplica.balancer import UNKNOWN_POSITION, Router
from pgreplica.health import Host, parse_history
from pgreplica.lsn import CausalToken, parse_lsn
from pgreplica.testing import LocalCluster, make_cluster_directory

SYSTEM = "7312345678901234567"
OTHER = "7000000000000000001"

# -- the token text ------------------------------------------------------------------------


def test_bound_positions_round_trip_through_text_and_headers() -> None:
    token = CausalToken.parse(f"main=0/10@2-{SYSTEM}&ci=0/5")
    assert token.get("main") == 0x10 and token.origin("main") == f"2-{SYSTEM}"
    assert token.origin("ci") is None  # unbound: an older publisher's token
    assert CausalToken.parse(str(token)) == token
    assert CausalToken.from_dict(token.as_dict()) == token
    assert token.as_dict() == {"ci": "0/5", "main": f"0/10@2-{SYSTEM}"}
    signed = token.sign("k")
    assert CausalToken.verify(signed, "k") == token


@pytest.mark.parametrize(
    "text",
    ["main=0/1@", "main=0/1@2", "main=0/1@0-5", "main=0/1@x-5", "main=0/1@2-", "main=0/1@2-5-6"],
)
def test_a_malformed_origin_is_refused_by_name(text: str) -> None:
    with pytest.raises(pgreplica.TokenError, match=r"malformed origin .* for 'main'"):
        CausalToken.parse(text)
    with pytest.raises(pgreplica.TokenError, match="malformed origin"):
        CausalToken.from_dict({"main": text.partition("=")[2]})


def test_merging_keeps_the_newer_history() -> None:
    old = CausalToken({"main": 500}, {"main": f"1-{SYSTEM}"})
    new = CausalToken({"main": 300}, {"main": f"2-{SYSTEM}"})
    # a write on the new timeline replaces a higher position of the old one
    assert old | new == new | old == new
    same = CausalToken({"main": 700}, {"main": f"1-{SYSTEM}"})
    assert old | same == same | old == same
    unbound = CausalToken({"main": 600})
    assert (old | unbound) == unbound  # positions compare when either is unbound
    assert (CausalToken({"main": 500}) | old) == old  # a tie keeps the bound one
    assert new.covers(old) and not old.covers(new)
    assert unbound.covers(old) and not old.covers(unbound)
    assert old.only(["main", "ci"]) == old and old.only(["ci"]) == CausalToken()


def test_timeline_history_files_parse() -> None:
    text = "1\t0/3000198\tno recovery target specified\n\n2\t0/5000000\tbefore 2000-01-01\n"
    assert parse_history(text) == {1: 0x3000198, 2: 0x5000000}
    assert parse_history("# comment\nnot a line\n3\tzz\tx\n") == {}


# -- the router: tokens it cannot place go to the primary ------------------------------------


def make_router() -> Router:
    settings = pgreplica.Settings.from_dict(
        {"databases": {"main": {"primary": "host=p", "replicas": ["host=r1"]}}}, environ={}
    )
    return Router(settings)


def probed(host: Host, lsn: int, *, timeline: int, recovery: bool) -> None:
    host.record_probe(
        recovery, lsn, lsn if recovery else None, 0.1, timeline=timeline, system_identifier=SYSTEM
    )


@pytest.fixture
def router() -> Router:
    router = make_router()
    route = router.databases["main"]
    probed(route.primary, 10_000, timeline=3, recovery=False)
    route.primary.history = {1: 2_000, 2: 6_000}  # timeline 1 ended at 2000, 2 at 6000
    probed(route.replicas[0], 10_000, timeline=3, recovery=True)
    router.refresh()
    return router


@pytest.mark.parametrize(
    ("position", "origin", "expected"),
    [
        (9_000, f"3-{SYSTEM}", 9_000),  # the primary's own history
        (9_000, None, 9_000),  # unbound: compared as a position
        (1_500, f"1-{SYSTEM}", 1_500),  # an earlier timeline, before it ended
        (2_000, f"1-{SYSTEM}", 2_000),  # ... exactly where it ended
        (2_001, f"1-{SYSTEM}", UNKNOWN_POSITION),  # past its end: lost in a failover
        (5_000, f"2-{SYSTEM}", 5_000),
        (7_000, f"2-{SYSTEM}", UNKNOWN_POSITION),
        (9_000, f"4-{SYSTEM}", UNKNOWN_POSITION),  # a timeline the primary has not reached
        (100, f"3-{OTHER}", UNKNOWN_POSITION),  # another cluster, however small
    ],
)
def test_required_places_a_position_in_the_primary_history(
    router: Router, position: int, origin: str | None, expected: int
) -> None:
    route = router.databases["main"]
    token = CausalToken({"main": position}, {"main": origin} if origin else None)
    assert router.required(route, token, grown_at=0.0) == expected


def test_an_unknown_history_cannot_place_earlier_timelines(
    router: Router, caplog: pytest.LogCaptureFixture
) -> None:
    route = router.databases["main"]
    route.primary.history = {}  # the history file could not be read (no privilege)
    token = CausalToken({"main": 100}, {"main": f"1-{SYSTEM}"})
    with caplog.at_level(logging.WARNING, logger="pgreplica"):
        assert router.required(route, token, grown_at=0.0) == UNKNOWN_POSITION
        assert router.required(route, token, grown_at=0.0) == UNKNOWN_POSITION
    assert caplog.text.count("token_from_other_history database=main") == 1  # rate-limited
    assert f"token_origin=1-{SYSTEM}" in caplog.text and f"primary_origin=3-{SYSTEM}" in caplog.text


# -- on real servers -------------------------------------------------------------------------


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    healthy_cluster.execute(0, "CREATE TABLE IF NOT EXISTS origin_items (v text)")
    with pgreplica.LoadBalancer(config=healthy_cluster.config()) as balancer, balancer.isolated():
        yield balancer


def server_origin(cluster: LocalCluster, index: int) -> str:
    row = cluster.execute(
        index,
        "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int,"
        " system_identifier FROM pg_control_system()",
    )[0]
    return f"{row[0]}-{row[1]}"


def test_a_write_token_is_bound_to_the_primary_history(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    with lb.write() as conn:
        conn.execute("INSERT INTO origin_items VALUES ('bound')")
    token = lb.token()
    assert token.origin("main") == server_origin(healthy_cluster, 0)
    header = jobs.capture(lb)
    assert CausalToken.from_dict(header).origin("main") == server_origin(healthy_cluster, 0)


def test_a_token_from_another_cluster_reads_the_primary(
    lb: pgreplica.LoadBalancer,
    healthy_cluster: LocalCluster,
    scratch_cluster: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pgreplica.LoadBalancer(config=scratch_cluster.config()) as elsewhere, elsewhere.isolated():
        with elsewhere.write() as conn:
            conn.execute("CREATE TABLE t (v int)")
        foreign = elsewhere.token()
    assert foreign.origin("main") != server_origin(healthy_cluster, 0)
    small = CausalToken({"main": 1}, {"main": foreign.origin("main") or ""})
    healthy_cluster.wait_replayed()
    with caplog.at_level(logging.WARNING, logger="pgreplica"):
        for token in (foreign, small):
            with lb.causal(token), lb.read() as conn:
                conn.execute("SELECT 1")
                assert not conn.on_replica and conn.reason == "position_unprovable"
    assert "token_from_other_history database=main" in caplog.text
    # the same positions unbound are compared as positions: the replicas serve them
    with lb.causal(CausalToken({"main": 1})), lb.read() as conn:
        conn.execute("SELECT 1")
        assert conn.on_replica
    for token in (foreign, small):
        decision = jobs.start_job(lb, "sticky", token.as_dict(), job="foreign", enabled=True)
        assert decision.outcome == "primary" and decision.waited == 0.0  # no wait, no replica
    unbound = {"main": "0/1"}
    assert jobs.start_job(lb, "sticky", unbound, job="foreign", enabled=True).outcome == "replica"


# -- a real failover: the new timeline lacks what the old one wrote after it forked -----------


def _wait(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _count(lb: pgreplica.LoadBalancer, value: str) -> tuple[int, bool]:
    with lb.read() as conn:
        row = conn.execute("SELECT count(*) FROM fo_items WHERE v = %s", (value,)).fetchone()
        assert row is not None
        return int(row[0]), conn.on_replica


def test_after_a_failover_old_timeline_tokens_are_placed_by_the_new_history() -> None:
    cluster = LocalCluster(make_cluster_directory(), replicas=2)
    try:
        cluster.up()
        cluster.execute(0, "CREATE TABLE fo_items (v text)")
        with pgreplica.LoadBalancer(config=cluster.config()) as old:
            with old.isolated():
                with old.write() as conn:
                    conn.execute("INSERT INTO fo_items VALUES ('kept')")
                kept = old.token()
            cluster.wait_replayed()
            cluster.kill(1)  # both replicas stop with 'kept' and nothing after it
            cluster.kill(2)
            with old.isolated():
                with old.write() as conn:
                    conn.execute("INSERT INTO fo_items VALUES ('lost')")
                lost = old.token()
        assert kept.origin("main") == lost.origin("main") and lost.origin("main")
        cluster.kill(0)  # 'lost' exists only on the dead primary
        cluster.start(1)
        cluster.promote(1)  # timeline 2 forks before 'lost'
        cluster.execute(1, f"SELECT pg_create_physical_replication_slot('{cluster.name(2)}')")
        cluster.start(2)
        conninfo = cluster.execute(2, "SHOW primary_conninfo")[0][0]
        repointed = conninfo.replace(f"port={cluster.port(0)}", f"port={cluster.port(1)}")
        assert repointed != conninfo
        cluster.execute(2, f"ALTER SYSTEM SET primary_conninfo = '{repointed}'")
        cluster.execute(2, "SELECT pg_reload_conf()")
        # the new primary writes past the lost position; the replica follows it there
        while parse_lsn(cluster.execute(1, "SELECT pg_current_wal_insert_lsn()::text")[0][0]) <= (
            lost.get("main") + 1024
        ):
            cluster.execute(1, "INSERT INTO fo_items SELECT 'filler' FROM generate_series(1, 200)")
        target = cluster.execute(1, "SELECT pg_current_wal_insert_lsn()::text")[0][0]

        def replica_caught_up() -> bool:
            row = cluster.execute(2, "SELECT pg_last_wal_replay_lsn()::text")[0]
            return row[0] is not None and parse_lsn(row[0]) >= parse_lsn(target)

        _wait(replica_caught_up, "replica 2 to follow the new primary")
        with pgreplica.LoadBalancer(cluster.dsn(1), [cluster.dsn(2)]) as new:
            route = new._router.route("main")
            _wait(lambda: route.read_set and route.primary.history, "the new primary's history")
            assert route.primary.timeline == 2
            ended = route.primary.history[1]
            assert kept.get("main") <= ended < lost.get("main")
            # a position of the old timeline before the fork: a replica proves it
            with new.isolated(), new.causal(kept):
                assert _count(new, "kept") == (1, True)
            # after the fork: no replica can have it; the primary (which lacks it too,
            # it was lost with the old primary) answers, never a replica
            with new.isolated(), new.causal(lost):
                assert _count(new, "lost") == (0, False)
            # the same position unbound would have let the replica answer as if fresh
            assert lost.get("main") <= route.replicas[0].replay_lsn
            with new.isolated(), new.causal(CausalToken(dict(lost.items()))):
                assert _count(new, "lost") == (0, True)
            assert jobs.start_job(
                new, "sticky", lost.as_dict(), job="after", enabled=True
            ).use_primary
            assert not jobs.start_job(
                new, "sticky", kept.as_dict(), job="after", enabled=True
            ).use_primary
    finally:
        cluster.destroy()
