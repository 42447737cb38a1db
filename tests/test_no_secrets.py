"""No password or key in anything pgreplica shows: reprs, error messages and their
tracebacks, logs, ``pgreplica status`` / ``check`` / ``dump`` output, metrics, the SQL
comments the server receives, and the Redis sticking store's errors.

Each test holds the secrets it checks for (the session cluster's password, and those
registered below) and fails with a redacted excerpt if one shows. The secret scan
(tests/secret_scan.py) also checks everything these tests print and log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import tarfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

import pgreplica
from dump_support import database_dsn, filled_database
from pgreplica import AsyncLoadBalancer, ConfigError, Dsn, LoadBalancer, Settings
from pgreplica.lsn import CausalToken
from pgreplica.testing import LocalCluster
from redis_server import free_port, running_redis
from secrets_registry import REGISTRY, cluster_password, register_secret

#: A password that no server accepts, with characters a URL must escape.
WRONG_PASSWORD = register_secret("Wr0ng/pa55@w:rd-for-tests", "wrong DSN password")
SIGNING_KEY = register_secret("no-secrets-signing-key", "signing key")
STICKING_SECRET = register_secret("no-secrets-sticking-hmac", "sticking secret")
PATRONI_PASSWORD = register_secret("patroni-api-pa55word", "Patroni REST API password")
DB = "pgreplica_no_secrets"
CLI = "import sys; from pgreplica.cli import main; sys.exit(main())"


def assert_clean(*texts: object) -> None:
    """No registered secret in any of ``texts`` (the failure shows them redacted)."""
    for text in texts:
        shown = text if isinstance(text, str) else repr(text)
        found = REGISTRY.find(shown)
        if found:
            labels = ", ".join(s.label for s in found)
            pytest.fail(f"{labels} shown in: {REGISTRY.redact(shown)[:3000]}", pytrace=False)


def formatted(exc: BaseException) -> str:
    """The exception as a traceback prints it, with every chained cause and context."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def url(port: int, password: str = WRONG_PASSWORD, dbname: str = "postgres") -> str:
    return f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{port}/{dbname}"


def db_dsn(cluster: LocalCluster, index: int) -> str:
    return database_dsn(cluster, index, DB)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``pgreplica ARGS`` in a process of its own: its logging goes to its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGREPLICA_")}
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )


def test_the_secrets_of_these_tests_are_registered(cluster: LocalCluster) -> None:
    for value in (WRONG_PASSWORD, SIGNING_KEY, STICKING_SECRET, cluster_password(cluster)):
        assert REGISTRY.get(value) is not None
    wrong = REGISTRY.get(WRONG_PASSWORD)
    assert wrong is not None and quote(WRONG_PASSWORD, safe="") in wrong.needles  # as in URLs


# ---------------------------------------------------------------------- reprs


def test_reprs_of_settings_databases_dsns_and_hosts(cluster: LocalCluster) -> None:
    password = cluster_password(cluster)
    multi = (
        f"postgresql://app:{quote(WRONG_PASSWORD, safe='')}@h1:5432,h2:5433/shop"
        "?target_session_attrs=any"
    )
    settings = Settings.from_dict(
        {
            "databases": {
                "main": {
                    "primary": cluster.dsn(0),
                    "replicas": [cluster.dsn(1), f"host=r2 password='{WRONG_PASSWORD}'"],
                },
                "ci": {"primary": "main", "replicas": [url(5999)]},
                "found": {"hosts": [multi, f"host=h3 port=5434 password={password}"]},
            }
        },
        environ={},
    )
    shown: list[object] = [settings, str(settings), settings.with_options(max_wait=0.01)]
    for database in settings.databases.values():
        shown += [database, str(database), database.primary, *database.replicas]
        for dsn in (database.primary, *database.replicas):
            shown += [str(dsn), dsn.label, dsn.redacted, *dsn.hosts()]
            shown += [str(host) for host in dsn.hosts()]
    shown += list(Dsn(multi).hosts())
    assert_clean(*shown)
    assert WRONG_PASSWORD in settings.database("found").primary.conninfo  # it is still used

    for cls in (LoadBalancer, AsyncLoadBalancer):
        lb = cls(config=settings)
        try:
            hosts = list(lb._router.hosts.values())
            assert len(hosts) == 7
            assert_clean(lb, str(lb), lb.settings, *hosts, *lb.status(), lb.database_config())
            assert_clean(*(lb.database_config(name) for name in lb.databases))
        finally:
            if isinstance(lb, LoadBalancer):
                lb.close()
            else:
                asyncio.run(lb.close())


def test_a_patroni_url_with_credentials_is_refused_without_showing_them() -> None:
    hosts = ["host=a port=5432", "host=b port=5433"]
    for patroni in (
        f"http://admin:{PATRONI_PASSWORD}@db1:8008",
        f"http://admin:{PATRONI_PASSWORD}@db1:8008/cluster",
        f"https://:{PATRONI_PASSWORD}@db1:8008/",
        f"admin:{PATRONI_PASSWORD}@db1:8008",
    ):
        with pytest.raises(ConfigError) as info:
            Settings.from_dict(
                {"databases": {"main": {"hosts": hosts, "patroni": [patroni]}}}, environ={}
            )
        assert info.value.setting == "databases.main.patroni"
        assert_clean(str(info.value), repr(info.value), formatted(info.value))


# ---------------------------------------------------------------------- connection errors


@pytest.mark.parametrize("fault", ["wrong_password", "dead_port"])
def test_connection_errors_and_their_logs(
    healthy_cluster: LocalCluster, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A primary that refuses the password (or does not listen) and a replica likewise:
    the errors of writes, reads and routing connections, their causes, the status and
    the log show neither the wrong password nor the cluster's."""
    caplog.set_level(logging.DEBUG, logger="pgreplica")
    caplog.set_level(logging.DEBUG, logger="psycopg")
    if fault == "wrong_password":
        primary, replica = url(healthy_cluster.port(0)), url(healthy_cluster.port(2))
    else:
        primary, replica = url(free_port()), url(free_port(), cluster_password(healthy_cluster))
    config = {
        "databases": {"main": {"primary": primary, "replicas": [replica]}},
        "connect_timeout": 1,
    }
    errors: list[BaseException] = []
    with LoadBalancer(config=config) as lb:
        lb.open()
        with pytest.raises(pgreplica.PrimaryUnavailable) as write_error, lb.write() as conn:
            conn.execute("SELECT 1")
        errors.append(write_error.value)
        with pytest.raises(pgreplica.HostUnavailable) as read_error, lb.read() as conn:
            conn.execute("SELECT 1")
        errors.append(read_error.value)
        with pytest.raises(psycopg.OperationalError) as routed_error, lb.connection() as rc:
            rc.execute("SELECT 1")
        errors.append(routed_error.value)
        statuses = lb.status()
        assert all(s.state == "down" and s.last_error for s in statuses), statuses
        assert_clean(lb, *statuses, *(s.last_error for s in statuses))
    try:
        psycopg.connect(primary, connect_timeout=2)
    except psycopg.OperationalError as exc:
        errors.append(exc)
    else:  # pragma: no cover - the fault is real
        pytest.fail("the faulty primary accepted a connection")

    async def async_errors() -> list[BaseException]:
        found: list[BaseException] = []
        async with AsyncLoadBalancer(config=config) as alb:
            await alb.open()
            for unit in (alb.write, alb.read):
                try:
                    async with unit() as conn:
                        await conn.execute("SELECT 1")
                except psycopg.OperationalError as exc:
                    found.append(exc)
            assert_clean(alb, *alb.status())
        return found

    async_found = asyncio.run(async_errors())
    assert len(async_found) == 2
    errors += async_found
    if fault == "wrong_password":
        assert any("password authentication failed" in formatted(e) for e in errors)
    for error in errors:
        assert_clean(str(error), repr(error), error.args, formatted(error))
    assert "host_offline" in caplog.text
    assert_clean(caplog.text, *(formatted_record(r) for r in caplog.records))


def formatted_record(record: logging.LogRecord) -> str:
    return logging.Formatter("%(levelname)s %(name)s %(message)s").format(record)


# ---------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_config(healthy_cluster: LocalCluster, tmp_path: Path) -> Iterator[Path]:
    """The cluster's own DSNs (password included) plus a replica that refuses the
    password and one that does not listen; replica 2 is stopped."""
    path = tmp_path / "pgreplica.toml"
    replicas = [
        healthy_cluster.dsn(1),
        healthy_cluster.dsn(2),
        url(healthy_cluster.port(1), dbname="template1"),
        url(free_port(), cluster_password(healthy_cluster)),
    ]
    listed = ", ".join(f'"{r}"' for r in replicas)
    path.write_text(
        f'[databases.main]\nprimary = "{healthy_cluster.dsn(0)}"\nreplicas = [{listed}]\n'
    )
    healthy_cluster.kill(2)
    yield path


def test_status_and_check_in_a_process_with_hosts_down(
    healthy_cluster: LocalCluster, cli_config: Path
) -> None:
    status = run_cli("status", "--config", str(cli_config))
    assert status.returncode == 1, status.stderr
    assert status.stdout.count(" down ") == 3, status.stdout
    assert "password authentication failed" in status.stdout
    as_json = run_cli("status", "--config", str(cli_config), "--json")
    assert as_json.returncode == 1 and as_json.stdout.count('"down"') == 3
    check = run_cli("check", "--config", str(cli_config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "db_config_name='main_replica'" in check.stdout
    for result in (status, as_json, check):
        assert_clean(result.stdout, result.stderr)


def test_status_and_check_when_the_primary_refuses_the_password(
    healthy_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = tmp_path / "pgreplica.toml"
    config.write_text(
        "[databases.main]\n"
        f'primary = "{url(healthy_cluster.port(0))}"\n'
        f'replicas = ["{healthy_cluster.dsn(1)}"]\n'
    )
    status = run_cli("status", "--config", str(config))
    check = run_cli("check", "--config", str(config))
    assert status.returncode == 1 and check.returncode == 1
    assert " write  " in check.stdout and "failed" in check.stdout
    for result in (status, check):
        assert_clean(result.stdout, result.stderr)


# ---------------------------------------------------------------------- metrics


def test_metrics_labels(healthy_cluster: LocalCluster) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from pgreplica import metrics

    config = {
        "databases": {
            "main": {
                "primary": healthy_cluster.dsn(0),
                "replicas": [healthy_cluster.dsn(1), url(healthy_cluster.port(2))],
            }
        },
    }
    with LoadBalancer(config=config) as lb:
        metrics.enable(lb, registry=prometheus_client.CollectorRegistry())
        lb.open()
        with lb.isolated():
            with lb.write() as conn:
                conn.execute("SELECT 1")
            for _ in range(3):
                with lb.read() as conn:
                    conn.execute("SELECT 1")
        text, _ = metrics.exposition()
        scraped = text.decode()
        down = f'host="127.0.0.1:{healthy_cluster.port(2)}/postgres"'
        assert "pgreplica_host_online{" in scraped and down in scraped
        assert_clean(scraped)


# ---------------------------------------------------------------------- SQL comments


def test_the_sql_comments_the_servers_receive(healthy_cluster: LocalCluster) -> None:
    own = "SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    received: list[str] = []
    with LoadBalancer(config=healthy_cluster.config()) as lb:
        lb.open()
        with lb.isolated(), pgreplica.tags(endpoint_id="NoSecrets#index", job="scan"):
            with lb.read() as conn:
                received.append(conn.execute(own).fetchone()[0])  # type: ignore[index]
            with lb.connection() as rc:
                rc.autocommit = True
                received.append(rc.execute(own).fetchone()[0])  # type: ignore[index]
        every = "SELECT coalesce(query, '') FROM pg_stat_activity"
        for index in range(healthy_cluster.replicas + 1):
            received += [row[0] for row in healthy_cluster.execute(index, every)]
    assert "db_config_name='main_replica'" in received[0]
    assert "endpoint_id='NoSecrets%23index'" in received[0]
    assert any("/*" in text for text in received[1:])
    assert_clean(*received)


# ---------------------------------------------------------------------- pgreplica dump


@pytest.fixture(scope="module")
def dump_db(cluster: LocalCluster) -> Iterator[LocalCluster]:
    notes = (
        "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);"
        " INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 50) g"
    )
    with filled_database(cluster, DB, notes):
        yield cluster


def test_dump_output_files_and_messages(dump_db: LocalCluster, tmp_path: Path) -> None:
    config = tmp_path / "pgreplica.toml"
    replicas = ", ".join(f'"{db_dsn(dump_db, i)}"' for i in (1, 2))
    config.write_text(
        f'[databases.main]\nprimary = "{db_dsn(dump_db, 0)}"\nreplicas = [{replicas}]\n'
    )
    visibility = tmp_path / "visibility.toml"
    visibility.write_text('[tables.notes]\ncolumns = { id = "public", body = "public" }\n')
    directory, tarball = tmp_path / "dump", tmp_path / "dump.tar.gz"
    results = [
        run_cli(*args, "--config", str(config), "--visibility", str(visibility), "--out", out)
        for args, out in ((("dump",), str(directory)), (("dump",), str(tarball)))
    ]
    results.append(run_cli("dump", "--verify", str(directory), "--config", str(config)))
    for result in results:
        assert result.returncode == 0, result.stderr
        assert_clean(result.stdout, result.stderr)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"schema.sql", "import.sql", "metadata.json"}
    texts = [p.read_bytes().decode(errors="replace") for p in files]
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            if extracted is not None:
                texts.append(extracted.read().decode(errors="replace"))
            texts.append(member.name)
    assert any("note 50" in text for text in texts)  # the data is there
    assert_clean(*texts)


# ---------------------------------------------------------------------- signing keys


def test_signing_keys_stay_out_of_token_errors_and_middleware_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pgreplica.contrib.wsgi import PgReplicaMiddleware

    caplog.set_level(logging.DEBUG, logger="pgreplica")
    signed = CausalToken({"main": 0x16B3748}).sign(SIGNING_KEY)
    assert_clean(signed, CausalToken.verify(signed, SIGNING_KEY))
    for text in (signed[:-2] + "xx", signed + ".extra", "main=0/1", signed.replace("main", "ci")):
        with pytest.raises(pgreplica.TokenError) as info:
            CausalToken.verify(text, SIGNING_KEY)
        assert_clean(str(info.value), formatted(info.value))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    lb = LoadBalancer("postgresql://127.0.0.1:9/none")
    try:
        middleware = PgReplicaMiddleware(app, lb=lb, key=SIGNING_KEY)
        headers: list[Any] = []
        environ = {"REQUEST_METHOD": "GET", "HTTP_X_PGREPLICA_TOKEN": signed[:-2] + "xx"}
        body = middleware(environ, lambda status, hdrs: headers.append((status, hdrs)))
        assert b"".join(body) == b"ok"
        assert "pgreplica_token_rejected" in caplog.text
        assert_clean(middleware, headers, caplog.text)
    finally:
        lb.close()


# ---------------------------------------------------------------------- Redis sticking


@pytest.fixture(scope="module")
def redis_password() -> str:
    return register_secret(secrets.token_hex(16), "Redis password")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory, redis_password: str) -> Iterator[str]:
    pytest.importorskip("redis")
    with running_redis(tmp_path_factory.mktemp("redis-auth"), password=redis_password) as found:
        yield found


def test_redis_store_with_a_password(
    redis_url: str, redis_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The password works, and stays out of reprs, of what the store writes, and of the
    errors and logs of a wrong password and of an unreachable server."""
    from pgreplica.sticking import RedisStickingStore, Sticking, StickingUnavailable

    caplog.set_level(logging.DEBUG, logger="pgreplica")
    assert redis_password in redis_url
    lb = LoadBalancer("postgresql://127.0.0.1:9/none", ["postgresql://127.0.0.1:10/none"])
    prefix = f"pgreplica:nosecrets:{secrets.token_hex(4)}:"
    try:
        with RedisStickingStore(redis_url, prefix=prefix) as store:
            sticking = Sticking(lb, store, secret=STICKING_SECRET)
            sticking.stick("alice@example.com", CausalToken({"main": 5}))
            assert store.get(sticking.key("alice@example.com")) == CausalToken({"main": 5})
            client = store.client
            stored = [k.decode() for k in client.scan_iter(match=prefix + "*")]
            stored += [str(client.hgetall(k)) for k in stored]
            assert len(stored) == 2
            assert_clean(store, client, client.connection_pool, sticking, *stored)

        wrong = redis_url.replace(quote(redis_password, safe=""), quote(WRONG_PASSWORD, safe=""))
        dead = redis_url.rsplit(":", 1)[0] + f":{free_port()}/0"
        assert WRONG_PASSWORD not in redis_url and redis_password in dead
        for target in (wrong, dead):
            with RedisStickingStore(target, prefix=prefix) as store:
                with pytest.raises(StickingUnavailable) as info:
                    store.get("k")
                assert_clean(str(info.value), repr(info.value), formatted(info.value), store)
                sticking = Sticking(lb, store, secret=STICKING_SECRET)
                with pytest.raises(StickingUnavailable) as stick_error:
                    sticking.stick("alice@example.com", CausalToken({"main": 5}))
                assert_clean(formatted(stick_error.value))
                with sticking.adopt("alice@example.com"):
                    pass
        assert caplog.text.count("sticking_unavailable") >= 2
        assert_clean(caplog.text)
    finally:
        lb.close()


def test_async_redis_store_and_middleware_sticking_urls(
    redis_url: str, redis_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pgreplica.contrib.wsgi import PgReplicaMiddleware
    from pgreplica.sticking import AsyncRedisStickingStore, StickingUnavailable

    caplog.set_level(logging.DEBUG, logger="pgreplica")
    dead = redis_url.rsplit(":", 1)[0] + f":{free_port()}/0"

    async def scenario() -> list[str]:
        shown = []
        async with AsyncRedisStickingStore(redis_url) as store:
            assert await store.get("missing") == CausalToken()
            shown += [repr(store.client), repr(store)]
        async with AsyncRedisStickingStore(dead) as store:
            try:
                await store.get("k")
            except StickingUnavailable as exc:
                shown.append(formatted(exc))
            else:  # pragma: no cover - nothing listens there
                pytest.fail("an unreachable Redis answered")
        return shown

    shown = asyncio.run(scenario())
    assert len(shown) == 3 and "StickingUnavailable" in shown[2]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    lb = LoadBalancer("postgresql://127.0.0.1:9/none", ["postgresql://127.0.0.1:10/none"])
    try:
        middleware = PgReplicaMiddleware(
            app, lb=lb, key=SIGNING_KEY, sticking=dead, identify=lambda environ: "bob"
        )
        body = middleware({"REQUEST_METHOD": "GET"}, lambda status, headers: None)
        assert b"".join(body) == b"ok"
        assert "sticking_unavailable" in caplog.text
        assert_clean(*shown, middleware, middleware.sticking, caplog.text)
        middleware.sticking.store.close()
    finally:
        lb.close()
