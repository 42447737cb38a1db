"""What operators watch: per-context usage summaries named as GitLab's request logs
name them, Prometheus metrics labelled by db_config_name whose counts equal what the
test did, and OpenTelemetry span attributes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pgreplica
from conftest import two_databases
from pgreplica import jobs, metrics, observe
from pgreplica.testing import LocalCluster


@pytest.fixture
def lb(healthy_cluster: LocalCluster) -> Iterator[pgreplica.LoadBalancer]:
    healthy_cluster.execute(0, "CREATE TABLE IF NOT EXISTS ob_items (v text)")
    healthy_cluster.wait_replayed()
    config = two_databases(healthy_cluster)
    with pgreplica.LoadBalancer(config=config) as balancer, balancer.isolated():
        yield balancer


def test_nothing_is_watched_until_someone_watches() -> None:
    assert observe.current_usage() is None
    with observe.usage() as used:
        assert observe.WATCH.on and observe.current_usage() is used
    assert observe.current_usage() is None


def test_a_usage_scope_counts_statements_by_role_and_configuration(
    lb: pgreplica.LoadBalancer,
) -> None:
    with observe.usage() as used:
        with lb.write("ci") as conn:  # ci's primary work shows as main's
            conn.execute("INSERT INTO ob_items VALUES ('a')")
        with lb.read("ci") as conn:
            conn.execute("SELECT count(*) FROM ob_items")
            conn.execute("SELECT 1")
        with lb.read("main") as conn:
            conn.execute("SELECT 1")
        with lb.connection("ci") as rc:
            rc.autocommit = True
            rc.execute("SELECT 2")
    s = used.summary()
    assert s["db_count"] == 5 and s["db_write_count"] == 1
    assert s["db_primary_count"] == s["db_primary_main_count"] == 1
    replica_reads = s.get("db_replica_count", 0)
    primary_reads = s["db_count"] - 1 - replica_reads  # reads the primary served
    assert replica_reads + primary_reads == 4
    assert s.get("db_replica_ci_count", 0) + s.get("db_replica_main_count", 0) == replica_reads
    # each read after the write had a token: proven by the cache or by asking
    proven = s.get("db_replica_wal_count", 0) + s.get("db_replica_wal_cached_count", 0)
    assert proven == replica_reads
    assert s["db_duration_s"] >= s["db_primary_duration_s"] > 0
    assert set(s) >= {"db_count", "db_primary_main_duration_s", "db_duration_s"}


def test_metrics_count_what_was_done(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    metrics.enable(lb, registry=registry)
    registry = metrics._STATE["registry"]  # the first enable() of the process picked it

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = value(
        "pgreplica_statements_total", db_config_name="ci_replica", role="replica", reason="replica"
    )
    before_write = value(
        "pgreplica_statements_total", db_config_name="main", role="primary", reason="write"
    )
    before_fallback = value(
        "pgreplica_fallbacks_total",
        host=f"127.0.0.1:{healthy_cluster.port(2)}/postgres",
        reason="read_only_retry",
    )
    before_jobs = value("pgreplica_job_outcomes_total", job="metrics-job", outcome="primary_no_wal")
    units = {"db_config_name": "ci_replica", "role": "replica", "reason": "replica"}
    before_units = value("pgreplica_units_total", **units)
    with lb.isolated():
        for _ in range(7):
            with lb.read("ci") as conn:
                conn.execute("SELECT 1")
                assert conn.reason == "replica"
        with lb.write("ci") as conn:
            conn.execute("SELECT 1")
    with lb.isolated(), lb.read("ci") as conn:  # a write the replica refuses: a fallback
        conn.execute("INSERT INTO ob_items VALUES ('fallback') /* metrics */")
    jobs.start_job(lb, "sticky", None, job="metrics-job", enabled=True)
    after = value(
        "pgreplica_statements_total", db_config_name="ci_replica", role="replica", reason="replica"
    )
    assert after - before == 7
    assert value("pgreplica_units_total", **units) - before_units == 7
    assert (
        value("pgreplica_statements_total", db_config_name="main", role="primary", reason="write")
        - before_write
        == 1
    )
    assert (
        value("pgreplica_statement_seconds_total", db_config_name="ci_replica", role="replica") > 0
    )
    assert (
        value("pgreplica_caught_up_checks_total", db_config_name="ci_replica", source="cache") >= 7
    )
    assert (
        value(
            "pgreplica_fallbacks_total",
            host=f"127.0.0.1:{healthy_cluster.port(2)}/postgres",
            reason="read_only_retry",
        )
        - before_fallback
        == 1
    )
    assert (
        value("pgreplica_job_outcomes_total", job="metrics-job", outcome="primary_no_wal")
        - before_jobs
        == 1
    )
    for index, database in ((0, "main"), (1, "main"), (2, "ci")):
        host = f"127.0.0.1:{healthy_cluster.port(index)}/postgres"
        role = "primary" if index == 0 else "replica"
        assert value("pgreplica_host_online", host=host, database=database, role=role) == 1.0
    replica = f"127.0.0.1:{healthy_cluster.port(2)}/postgres"
    assert value("pgreplica_host_replay_lsn_bytes", host=replica, database="ci", role="replica") > 0
    text, content_type = metrics.exposition()
    assert b"pgreplica_statements_total" in text and content_type.startswith("text/plain")
    assert healthy_cluster.dsn(0).split("@")[0].split(":")[-1].encode() not in text


def test_metrics_setting_needs_prometheus_client_or_says_so(
    healthy_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_prometheus(name: str, *args: object, **kwargs: object) -> object:
        if name == "prometheus_client":
            raise ImportError("no prometheus_client")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(pgreplica.ConfigError, match=r"metrics.*pgreplica\[prometheus\]"):
        pgreplica.LoadBalancer(config=two_databases(healthy_cluster, metrics=True))


def test_spans_get_the_routing_of_their_statements(lb: pgreplica.LoadBalancer) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pgreplica import otel

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("pgreplica-test")
    otel.enable()
    with tracer.start_as_current_span("request"), lb.read("ci") as conn:
        conn.execute("SELECT 1")
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["pgreplica.db_config_name"] == "ci_replica"
    assert span.attributes["pgreplica.role"] == "replica"
    assert span.attributes["pgreplica.reason"] == "replica"
    assert str(span.attributes["pgreplica.host"]).startswith("127.0.0.1:")


def test_a_read_no_replica_can_take_is_logged_by_name(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    healthy_cluster.pause(2)
    try:
        with lb.isolated():
            with lb.write("ci") as conn:
                conn.execute("INSERT INTO ob_items VALUES ('behind')")
            with caplog.at_level(logging.DEBUG, logger="pgreplica.routing"), lb.read("ci") as conn:
                conn.execute("SELECT 1")
                assert conn.reason == "replicas_behind"
    finally:
        healthy_cluster.resume(2)
    assert "no_replica_caught_up database=ci need=" in caplog.text


def test_the_metrics_setting_reports_on_the_default_registry(
    healthy_cluster: LocalCluster, tmp_path: Path
) -> None:
    """What a user does: ``metrics = true`` in the configuration, prometheus_client's
    own registry, a scrape (a fresh process: the registry is process-wide)."""
    pytest.importorskip("prometheus_client")
    config = healthy_cluster.write_config(tmp_path / "pgreplica.toml")
    config.write_text("metrics = true\n" + config.read_text())  # a top-level setting
    script = (
        "import prometheus_client, pgreplica\n"
        f"lb = pgreplica.LoadBalancer.from_config({str(config)!r})\n"
        "with lb:\n"
        "    for _ in range(3):\n"
        "        with lb.read() as conn:\n"
        "            conn.execute('SELECT 1')\n"
        "    print(prometheus_client.generate_latest().decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'pgreplica_statements_total{db_config_name="main_replica"' in done.stdout
    assert "pgreplica_host_online{" in done.stdout


def test_metrics_count_the_time_reads_wait_for_a_replica(
    lb: pgreplica.LoadBalancer, healthy_cluster: LocalCluster
) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    metrics.enable(lb, registry=prometheus_client.CollectorRegistry())
    registry = metrics._STATE["registry"]
    labels = {"db_config_name": "ci_replica", "caught_up": "true"}
    name = "pgreplica_catch_up_wait_seconds_total"
    before = registry.get_sample_value(name, labels) or 0.0
    healthy_cluster.pause(2)
    resume = threading.Timer(0.3, healthy_cluster.resume, args=(2,))
    try:
        with lb.isolated():
            with lb.write("ci") as conn:
                conn.execute("INSERT INTO ob_items VALUES ('wait')")
            resume.start()  # replay resumes while the read waits
            with lb.read("ci", max_wait=3.0) as conn:
                conn.execute("SELECT 1")
                assert conn.on_replica, conn.reason  # it waited, and the replica caught up
    finally:
        resume.cancel()
        resume.join()
        healthy_cluster.resume(2)  # idempotent
    waited = (registry.get_sample_value(name, labels) or 0.0) - before
    assert 0.1 < waited < 3.0


def test_a_forked_child_watches_even_if_a_thread_held_the_lock_at_fork() -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with observe.WATCH.lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: the lock another thread held must be free here
        try:
            with observe.usage():
                pass
            metrics._LOCK.__enter__()
            os._exit(0)
        except BaseException:
            os._exit(1)
    release.set()
    thread.join()
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child deadlocked on an inherited lock")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0
