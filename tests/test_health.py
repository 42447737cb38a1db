"""The IO-free parts of health: backoff, the circuit breaker, read-set computation."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgreplica
from pgreplica.balancer import Router
from pgreplica.health import Backoff, BreakerState, Host
from pgreplica.testing import LocalCluster

MiB = 1024 * 1024


def make_router(**options: object) -> Router:
    settings = pgreplica.Settings.from_dict(
        {
            "databases": {
                "main": {"primary": "host=p port=5432", "replicas": ["host=r1", "host=r2"]}
            },
            **options,
        },
        environ={},
    )
    return Router(settings)


def probe(host: Host, *, lsn: int, in_recovery: bool = True, age: float | None = 0.5) -> None:
    host.record_probe(in_recovery, lsn, lsn if in_recovery else None, age)


def test_backoff_grows_is_capped_and_jittered() -> None:
    backoff = Backoff(initial=0.2, maximum=5.0, multiplier=2.0, jitter=0.5)
    assert [backoff.delay(n, 0.0) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert backoff.delay(50, 0.0) == 5.0
    assert backoff.delay(1000, 0.0) == 5.0
    assert backoff.delay(3, 0.999) == pytest.approx(0.4, rel=0.01)  # up to half shorter


def test_breaker_opens_once_half_opens_after_wait_and_closes_on_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = make_router().databases["main"].replicas[0]
    drained: list[Host] = []
    host.on_down = drained.append
    with caplog.at_level(logging.INFO, logger="pgreplica"):
        assert host.record_failure("OperationalError", "refused", rand=0.0) is True
        assert host.record_failure("OperationalError", "refused", rand=0.0) is False
        assert host.state is BreakerState.OPEN and drained == [host]
        assert not host.begin_half_open()  # still waiting
        host.retry_at = time.monotonic() - 1
        assert host.begin_half_open() and host.state is BreakerState.HALF_OPEN
        probe(host, lsn=100)
    assert host.up
    assert caplog.text.count("host_offline host=r1:5432/") == 1
    assert "host_online host=r1:5432/" in caplog.text


def test_null_replay_timestamp_is_unknown_never_zero_lag() -> None:
    router = make_router(max_lag_bytes="1MiB", max_lag_seconds=30)
    route = router.databases["main"]
    probe(route.primary, lsn=100 * MiB, in_recovery=False)
    fresh_restart, caught_up = route.replicas
    probe(fresh_restart, lsn=10 * MiB, age=None)  # restarted: nothing replayed yet
    probe(caught_up, lsn=100 * MiB, age=None)  # idle: nothing left to replay
    router.refresh()
    assert fresh_restart.lag_seconds is None and fresh_restart.lagging
    assert caught_up.lag_bytes == 0 and caught_up.lag_seconds == 0.0
    assert route.read_set == (caught_up,)


def test_either_bound_keeps_a_replica_in_the_read_set() -> None:
    router = make_router(max_lag_bytes="1MiB", max_lag_seconds=5)
    route = router.databases["main"]
    probe(route.primary, lsn=100 * MiB, in_recovery=False)
    few_bytes_old_commit, many_bytes_recent = route.replicas
    probe(few_bytes_old_commit, lsn=100 * MiB - 10, age=3600.0)  # idle primary
    probe(many_bytes_recent, lsn=50 * MiB, age=1.0)  # a burst, replayed quickly
    router.refresh()
    assert set(route.read_set) == {few_bytes_old_commit, many_bytes_recent}
    probe(many_bytes_recent, lsn=50 * MiB, age=10.0)
    router.refresh()
    assert route.read_set == (few_bytes_old_commit,)


def test_promoted_down_and_stale_replicas_leave_the_read_set() -> None:
    router = make_router()
    route = router.databases["main"]
    probe(route.primary, lsn=1000, in_recovery=False)
    first, second = route.replicas
    probe(first, lsn=1000)
    probe(second, lsn=1000)
    router.refresh()
    assert set(route.read_set) == {first, second}
    probe(first, lsn=1000, in_recovery=False)  # promoted
    router.refresh()
    assert route.read_set == (second,) and first.role == "promoted"
    assert second.probed_at is not None
    second.probed_at -= router.stale_after + 1  # the prober stopped reporting
    router.refresh()
    assert route.read_set == ()


def test_caught_up_filters_by_token_and_direct_checks_only_raise() -> None:
    router = make_router()
    route = router.databases["main"]
    probe(route.primary, lsn=2000, in_recovery=False)
    first, second = route.replicas
    probe(first, lsn=1500)
    probe(second, lsn=2000)
    router.refresh()
    assert list(router.caught_up(route, 1800, None)) == [second]
    assert router.behind(route, 1800, set()) == [first]
    assert router.behind(route, 1800, {first}) == []
    first.note_replay_lsn(1900)
    first.note_replay_lsn(1000)  # an older observation never lowers the cache
    assert first.replay_lsn == 1900
    assert set(router.caught_up(route, 1800, None)) == {first, second}


def test_kill_switch_creates_no_replica_host() -> None:
    router = make_router(enabled=False)
    assert [h.label for h in router.hosts.values()] == ["p:5432/"]
    assert router.databases["main"].replicas == ()


def tcp_settings(fd: int) -> tuple[int, int, int, int, int]:
    """SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT of a
    connected socket."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )


def test_connections_notice_a_dead_network_path_in_seconds(
    healthy_cluster: LocalCluster,
) -> None:
    """Pooled and probe connections get TCP keepalives and a user timeout, so a server
    whose network died is noticed in seconds rather than the OS's hours; what a DSN
    sets itself is kept."""
    cluster = healthy_cluster
    replica = conninfo_to_dict(cluster.dsn(1))
    replica["keepalives_idle"] = "30"  # the user's own choice wins
    config = {
        "databases": {
            "main": {"primary": cluster.primary_dsn, "replicas": [make_conninfo(**replica)]}
        }
    }
    with pgreplica.LoadBalancer(config=config) as lb:
        with lb.write() as conn:
            assert tcp_settings(conn.pgconn.socket) == (1, 5, 2, 3, 10000)
        with lb.isolated(), lb.read() as conn:  # not after the write: on the replica
            assert conn.on_replica, conn.reason
            assert tcp_settings(conn.pgconn.socket) == (1, 30, 2, 3, 10000)
        probes = lb._prober.connections  # the prober's own connections, one per host
        assert probes, "no probe connection open"
        for conn in probes.values():
            assert tcp_settings(conn.pgconn.socket)[0::4] == (1, 10000)
