"""The Django integration on the real cluster, through the example app (examples/django_perf).

Django is configured once per process: the session fixture points the example's
settings at the local cluster (a database ``django_perf`` on the primary, which
streaming replication copies to the replicas) and migrates it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgreplica.testing import LocalCluster

django = pytest.importorskip("django", reason="Django is not installed (pip install '.[dev]')")

from django_project import DB, EXAMPLE, example_env  # noqa: E402
from redis_server import free_port  # noqa: E402
from secrets_registry import register_secret  # noqa: E402

register_secret("S3cr3t-pw", "test DSN password")


@pytest.fixture
def client(project: None, healthy_cluster: LocalCluster) -> Any:
    from django.test import Client

    return Client()


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- settings helper -------------------------------------------------------------------


def test_replica_alias_exists_only_when_enabled_and_set() -> None:
    from pgreplica.contrib.django import replica_databases

    default = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "p"}
    url = "postgresql://app:S3cr3t-pw@replica-1:5433/app"
    assert replica_databases(default, env={}) == {}
    assert replica_databases(default, env={"READ_REPLICA_DATABASE_URL": url}) == {}
    assert replica_databases(default, env={"READ_REPLICA_ENABLED": "true"}) == {}
    env = {"READ_REPLICA_ENABLED": "true", "READ_REPLICA_DATABASE_URL": url}
    aliases = replica_databases(default, env=env)
    assert list(aliases) == ["read_replica"]
    assert aliases["read_replica"]["HOST"] == "replica-1"
    assert aliases["read_replica"]["PORT"] == "5433"
    assert aliases["read_replica"]["ENGINE"] == default["ENGINE"]
    env["READ_REPLICA_DATABASE_URLS"] = (
        "postgresql://app@replica-2/app,postgresql://app@replica-3/app"
    )
    assert list(replica_databases(default, env=env)) == [
        "read_replica",
        "read_replica_2",
        "read_replica_3",
    ]


def test_replicas_from_a_pgreplica_config_file(tmp_path: Path) -> None:
    from pgreplica.contrib.django import replica_databases

    config = tmp_path / "pgreplica.toml"
    config.write_text(
        '[databases.main]\nprimary = "postgresql://app@p/app"\n'
        'replicas = ["postgresql://app:S3cr3t-pw@r1:5433/app", "host=r2 dbname=app user=app"]\n'
    )
    env = {"READ_REPLICA_ENABLED": "on", "PGREPLICA_CONFIG": str(config)}
    aliases = replica_databases({"NAME": "app"}, env=env)
    assert [(a, d["HOST"]) for a, d in aliases.items()] == [
        ("read_replica", "r1"),
        ("read_replica_2", "r2"),
    ]
    assert aliases["read_replica"]["PASSWORD"] == "S3cr3t-pw"


def test_bad_replica_settings_name_the_setting() -> None:
    import pgreplica
    from pgreplica.contrib.django import replica_databases

    with pytest.raises(pgreplica.ConfigError, match="READ_REPLICA_ENABLED"):
        replica_databases({}, env={"READ_REPLICA_ENABLED": "maybe"}, strict=True)
    with pytest.raises(pgreplica.ConfigError, match="READ_REPLICA_DATABASE_URL:") as info:
        replica_databases(
            {},
            env={
                "READ_REPLICA_ENABLED": "1",
                "READ_REPLICA_DATABASE_URL": "postgresql://a:S3cr3t-pw@h:99999/x",
            },
            strict=True,
        )
    assert "S3cr3t-pw" not in str(info.value)


# -- router ----------------------------------------------------------------------------


def test_router_contract(project: None, healthy_cluster: LocalCluster) -> None:
    from django.contrib.auth.models import User
    from perf.models import Signature

    from pgreplica.contrib.django import ReadReplicaRouter, replica_reads

    router = ReadReplicaRouter()
    assert router.db_for_read(Signature) is None  # no scope: Django's default
    with replica_reads():
        assert router.db_for_read(Signature) in ("read_replica", "read_replica_2")
        assert router.db_for_read(User) is None  # auth is not in the allow-list
    assert router.db_for_write(Signature) == "default"
    on_primary, on_replica = Signature(name="a"), Signature(name="b")
    on_primary._state.db, on_replica._state.db = "default", "read_replica"
    assert router.allow_relation(on_primary, on_replica) is True
    elsewhere = Signature(name="c")
    elsewhere._state.db = "other"
    assert router.allow_relation(on_primary, elsewhere) is None
    assert router.allow_migrate("read_replica", "perf") is False
    assert router.allow_migrate("read_replica_2", "perf") is False
    assert router.allow_migrate("default", "perf") is None


def test_router_is_lag_aware(project: None, healthy_cluster: LocalCluster) -> None:
    from perf.models import Signature

    from pgreplica.contrib.django import ReadReplicaRouter, integration, replica_reads

    router = ReadReplicaRouter()
    healthy_cluster.kill(1)
    lb = integration().lb
    from pgreplica.workload import wait_until

    wait_until(lambda: [s.state for s in lb.status()][1] == "down", what="replica 1 down")
    for _ in range(10):
        with replica_reads():
            assert router.db_for_read(Signature) == "read_replica_2"


# -- the mixin and the decorator -------------------------------------------------------


def test_opted_in_endpoints_are_served_by_the_replica(client: Any) -> None:
    from pgreplica.contrib.django.testing import assert_served_by_primary, assert_served_by_replica

    for url in ("/api/signatures/", "/api/datapoints/", "/api/summary/", "/api/signature-count/"):
        with assert_served_by_replica():
            assert client.get(url).status_code == 200, url
    for url in ("/api/alertsummaries/", "/api/alerts/", "/api/tags/"):
        with assert_served_by_primary():  # excluded endpoints never touch the replica
            assert client.get(url).status_code == 200, url


def test_unsafe_methods_and_other_actions_stay_on_the_primary(client: Any) -> None:
    from pgreplica.contrib.django.testing import assert_served_by_primary

    with assert_served_by_primary():
        response = client.post(
            "/api/signatures/",
            {"name": new_name("sig"), "framework": "t"},
            content_type="application/json",
        )
    assert response.status_code == 201
    ident = response.json()["id"]
    with assert_served_by_primary():  # retrieve is routed, but PATCH is not a safe method
        patched = client.patch(
            f"/api/signatures/{ident}/", {"framework": "u"}, content_type="application/json"
        )
    assert patched.status_code == 200
    with assert_served_by_primary():
        assert client.delete(f"/api/signatures/{ident}/").status_code == 204


def test_transaction_atomic_reads_go_to_the_primary(client: Any) -> None:
    from pgreplica.contrib.django.testing import served_by

    with served_by() as seen:
        assert client.get("/api/signature-count/?atomic=1").status_code == 200
    assert seen[0] in ("read_replica", "read_replica_2")  # outside the atomic block
    assert seen[-1] == "default"  # inside it


def test_a_write_during_a_get_sends_the_rest_to_the_primary(client: Any) -> None:
    from perf.models import Tag

    from pgreplica.contrib.django.testing import served_by

    name = new_name("tag")
    Tag.objects.create(name=name)
    with served_by() as seen:
        response = client.get(f"/api/tag-touch/?name={name}")
    assert response.json()["after"] == 1
    assert seen[-2:] == ["default", "default"]  # the update, then the read after it


def test_state_is_cleared_when_the_view_raises(client: Any) -> None:
    from pgreplica.contrib.django.state import REQUEST

    with pytest.raises(KeyError):
        client.get("/api/tag-touch/")  # no ?name=: the view raises
    assert REQUEST.get() is None


def test_replica_failure_is_retried_once_on_the_primary(
    project: None, healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    from django.test import Client, override_settings

    from pgreplica.contrib.django import integration, reset_integration
    from pgreplica.contrib.django.testing import served_by

    # A prober that will not notice the kill: the request itself meets the dead replica.
    options = {"REPLICA_APPS": {"perf"}, "SETTINGS": {"probe_interval": 60}}
    reset_integration()
    try:
        with override_settings(PGREPLICA=options):
            integration()
            healthy_cluster.kill(1)
            healthy_cluster.kill(2)
            with caplog.at_level(logging.WARNING, logger="pgreplica"), served_by() as seen:
                response = Client().get("/api/signatures/")
            assert response.status_code == 200
            assert seen[-1] == "default"
            assert "db_routing_fallback view=SignatureViewSet" in caplog.text
    finally:
        reset_integration()


def test_routed_requests_log_at_debug(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pgreplica.django"):
        client.get("/api/signatures/")
    assert "db_routing routed_to=read_replica" in caplog.text


# -- read-your-writes across requests --------------------------------------------------


def test_read_your_writes_across_requests_under_lag(
    client: Any, healthy_cluster: LocalCluster
) -> None:
    from django.test import Client

    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")
    stale = {"header": 0, "cookie": 0, "none": 0}
    for i in range(15):
        for carrier in stale:
            writer = Client()
            name = new_name(f"ryw{i}")
            created = writer.post(
                "/api/signatures/", {"name": name}, content_type="application/json"
            )
            assert created.status_code == 201
            token = created.headers["X-PgReplica-Token"]
            assert created.cookies["pgreplica_token"].value == token
            reader = Client()  # the next request: another client object, maybe another server
            if carrier == "header":
                response = reader.get(
                    f"/api/signatures/{created.json()['id']}/", HTTP_X_PGREPLICA_TOKEN=token
                )
            elif carrier == "cookie":
                reader.cookies["pgreplica_token"] = token
                response = reader.get(f"/api/signatures/{created.json()['id']}/")
            else:
                response = reader.get(f"/api/signatures/{created.json()['id']}/")
            if response.status_code != 200:
                stale[carrier] += 1
    assert stale["header"] == 0 and stale["cookie"] == 0
    # The control group proves the lag was real: without the token, reads were stale.
    assert stale["none"] > 0


def test_a_replica_read_served_by_the_primary_carries_its_position(
    client: Any, healthy_cluster: LocalCluster
) -> None:
    from django.test import Client

    healthy_cluster.lag(1, "2s")
    healthy_cluster.lag(2, "2s")
    created = Client().post(
        "/api/signatures/", {"name": new_name("mono")}, content_type="application/json"
    )
    token = created.headers["X-PgReplica-Token"]
    # The replicas are behind the token: the read falls back to the primary, and the
    # response hands the next request a token at least as new as what it saw.
    response = Client().get(
        f"/api/signatures/{created.json()['id']}/", HTTP_X_PGREPLICA_TOKEN=token
    )
    assert response.status_code == 200
    carried = response.headers.get("X-PgReplica-Token")
    assert carried, "a read served by the primary handed back no token"
    from django.conf import settings

    from pgreplica import CausalToken

    key = settings.SECRET_KEY
    assert CausalToken.verify(carried, key).covers(CausalToken.verify(token, key))


def test_a_position_the_primary_never_reached_is_dropped_not_signed_again(
    client: Any, healthy_cluster: LocalCluster
) -> None:
    """A token signed with the right key but carrying a position beyond the primary (a
    bug elsewhere, a restored database, a leaked key) would send every read of the
    client to the primary, and each response would sign it again. Once the primary has
    been probed after the signing time (plus the clock skew tokens tolerate, 5 min),
    the position is dropped at the door, as in the ASGI and WSGI middleware."""
    from django.conf import settings

    from pgreplica import CausalToken
    from pgreplica.contrib.django.state import integration

    lb = integration().lb
    database = lb.databases[0]
    healthy_cluster.wait_replayed()
    bogus = CausalToken({database: 2**62}).sign(settings.SECRET_KEY, issued_at=time.time() - 600)
    for _ in range(3):
        response = client.get("/api/signatures/", HTTP_X_PGREPLICA_TOKEN=bogus)
        assert response.status_code == 200
        carried = response.headers.get("X-PgReplica-Token")
        if carried:
            assert CausalToken.verify(carried, settings.SECRET_KEY).get(database) < 2**62


def test_tampered_token_is_ignored(client: Any) -> None:
    response = client.get("/api/signatures/", HTTP_X_PGREPLICA_TOKEN="default=FF/FFFFFFFF.forged")
    assert response.status_code == 200


@pytest.fixture
def fresh_cluster() -> Iterator[LocalCluster]:
    """A cluster of its own (primary + 2 replicas) for tests that run Django in another
    process: nothing earlier tests did to the session cluster reaches them."""
    from pgreplica.testing import make_cluster_directory

    local = LocalCluster(make_cluster_directory(), replicas=2)
    try:
        local.up()
        local.execute(0, f"CREATE DATABASE {DB}")
        local.wait_replayed()
        yield local
    finally:
        local.destroy()


def test_pytest_django_and_kill_switch_in_a_fresh_process(fresh_cluster: LocalCluster) -> None:
    """pytest-django's ``databases=[...]`` marker, and READ_REPLICA_ENABLED=false as a
    true no-op, each in its own process (Django is configured once per process)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGREPLICA_")}
    env = {**environ, **example_env(fresh_cluster)}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "django",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(EXAMPLE),
            "-c",
            os.devnull,
            str(EXAMPLE / "tests"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-3000:]
    assert "3 passed" in result.stdout and "warning" not in result.stdout, result.stdout
    env["READ_REPLICA_ENABLED"] = "false"
    script = (
        "import django; django.setup();"
        "from django.core.management import call_command; call_command('migrate', verbosity=0);"
        "from django.db import connections; assert list(connections.databases) == ['default'];"
        "from django.test import Client;"
        "from pgreplica.contrib.django.testing import assert_served_by_primary;"
        "cm = assert_served_by_primary(); cm.__enter__();"
        "assert Client().get('/api/signatures/').status_code == 200;"
        "cm.__exit__(None, None, None);"
        "from pgreplica.contrib.django.testing import served_by;"
        "cm = served_by(); seen = cm.__enter__();"
        "r = Client().post('/api/tags/', {'name': 'off'}, content_type='application/json');"
        "cm.__exit__(None, None, None);"
        "assert r.status_code == 201, r.status_code;"
        "assert 'X-PgReplica-Token' not in r.headers and 'pgreplica_token' not in r.cookies;"
        "assert seen and set(seen) == {'default'}, seen;"
        "print('no-op ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "no-op ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("store", ["memory", "redis", "unreachable redis"])
def test_server_side_sticking_for_authenticated_users(
    project: None, healthy_cluster: LocalCluster, redis_server: str, store: str
) -> None:
    """A client that carries neither cookie nor header (another session of the same
    user, a webhook acting for them) still reads its user's writes. With Redis
    unreachable, the writes still succeed (the stick is logged as failed) and the
    reads go to the primary."""
    from django.contrib.auth.models import User
    from django.test import Client, override_settings

    spec = {
        "memory": "memory",
        "redis": redis_server,
        "unreachable redis": f"redis://127.0.0.1:{free_port()}/0",
    }[store]
    user = User.objects.create(username=new_name("user"))
    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")
    with override_settings(PGREPLICA={"REPLICA_APPS": {"perf"}, "STICKING": spec}):
        writer, reader = Client(), Client()
        writer.force_login(user)
        reader.force_login(user)  # another session: no pgreplica cookie, no header
        missing = 0
        for i in range(10):
            created = writer.post(
                "/api/signatures/", {"name": new_name(f"stick{i}")}, content_type="application/json"
            )
            assert created.status_code == 201
            reader.cookies.pop("pgreplica_token", None)
            response = reader.get(f"/api/signatures/{created.json()['id']}/")
            missing += response.status_code != 200
        assert missing == 0


def test_asgi_requests_route_and_keep_read_your_writes(
    project: None, healthy_cluster: LocalCluster
) -> None:
    """Through Django's ASGI handler (AsyncClient): the contextvar state follows each
    request across the sync/async boundary."""
    import asyncio

    from django.test import AsyncClient

    from pgreplica.contrib.django.testing import wait_for_replicas

    # The test process's own writes (migrations, earlier tests) are behind every read of
    # its contexts: have them replayed first, so that only the requests' writes count.
    wait_for_replicas()
    healthy_cluster.lag(1, "300ms")
    healthy_cluster.lag(2, "300ms")

    async def main() -> dict[str, int]:
        missing = {"token": 0, "none": 0}
        for i in range(8):
            for carrier in missing:
                created = await AsyncClient().post(
                    "/api/signatures/",
                    {"name": new_name(f"asgi{i}")},
                    content_type="application/json",
                )
                headers = {"X-PgReplica-Token": created.headers["X-PgReplica-Token"]}
                response = await AsyncClient().get(
                    f"/api/signatures/{created.json()['id']}/",
                    headers=headers if carrier == "token" else {},
                )
                missing[carrier] += response.status_code != 200
        return missing

    missing = asyncio.run(main())
    assert missing["token"] == 0
    assert missing["none"] > 0  # control: without the token the replica read is stale


def test_a_request_logs_its_database_usage(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    from django.conf import settings
    from django.test import Client, override_settings

    options = {**(getattr(settings, "PGREPLICA", {}) or {}), "USAGE_LOG": True}
    with (
        override_settings(PGREPLICA=options),
        caplog.at_level(logging.INFO, logger="pgreplica.django"),
    ):
        assert Client().get("/api/signatures/").status_code == 200
        name = f"usage-{uuid.uuid4().hex[:12]}"
        assert Client().post("/api/tags/", {"name": name}).status_code in (200, 201)
    records = [r for r in caplog.records if r.getMessage().startswith("db_usage")]
    assert len(records) == 2
    read, write = (r.db_usage for r in records)  # type: ignore[attr-defined]
    assert read["db_replica_count"] >= 1 and read["db_replica_default_count"] >= 1
    assert read.get("db_primary_count", 0) == 0 and read["db_replica_duration_s"] > 0
    assert write["db_primary_default_count"] >= 1 and write["db_write_count"] >= 1
    assert "db_replica_count" not in write
    assert "path=/api/signatures/" in records[0].getMessage()


def test_models_mapped_to_a_logical_database_read_its_replicas_behind_a_rollout(
    project: None, healthy_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """GitLab's CI split in Django: Signature belongs to ``ci``, which shares the primary
    alias and reads read_replica_2; the other models read read_replica. At rollout 0 the
    ci model reads main's replica; at 100 its own; about half at 50."""
    from collections import Counter

    from django.conf import settings
    from django.test import Client, override_settings

    from pgreplica.contrib.django import integration, reset_integration
    from pgreplica.contrib.django.testing import served_by

    def options(rollout: float) -> dict[str, Any]:
        logical = {"ci": {"MODELS": ["perf.Signature"], "REPLICAS": ["read_replica_2"]}}
        logical["ci"]["ROLLOUT"] = rollout  # type: ignore[assignment]
        return {**(getattr(settings, "PGREPLICA", {}) or {}), "DATABASES": logical}

    def aliases(url: str, requests: int) -> Counter[str]:
        seen_all: Counter[str] = Counter()
        for _ in range(requests):
            with served_by() as seen:
                assert Client().get(url).status_code == 200
            seen_all.update(seen)
        return seen_all

    try:
        for rollout, expected in ((0, "read_replica"), (100, "read_replica_2")):
            reset_integration()
            with override_settings(PGREPLICA=options(rollout)):
                integ = integration()
                assert integ.route_of_alias["read_replica_2"].name == "ci"
                signatures = aliases("/api/signatures/", 6)
                assert set(signatures) == {expected}, (rollout, signatures)
                others = aliases("/api/datapoints/", 3)  # not mapped: main's replica
                assert set(others) == {"read_replica"}, others
        reset_integration()
        with override_settings(PGREPLICA=options(50)):
            integration()
            mixed = aliases("/api/signatures/", 40)
            assert mixed["read_replica"] > 0 and mixed["read_replica_2"] > 0, mixed
        # a bad mapping names the entry
        reset_integration()
        bad = options(100)
        bad["DATABASES"]["ci"]["REPLICAS"] = ["no_such_alias"]
        with override_settings(PGREPLICA=bad), pytest.raises(Exception, match="no_such_alias"):
            integration()
    finally:
        reset_integration()


@pytest.mark.parametrize("replicas", ["mirroring the primary", "real, 300 ms behind"])
def test_a_drf_suite_passes_with_django_s_own_runner(
    project: None, healthy_cluster: LocalCluster, replicas: str
) -> None:
    """examples/django_perf/perf/tests.py (rows made in setUp, then requests) under
    ``manage.py test`` with Django's default runner, the replica URLs pointing at the
    primary and at real replicas that replay 300 ms late: it passes both ways, and the
    test database is dropped at the end (the probe connections were let go)."""
    name = f"drf_suite_{uuid.uuid4().hex[:8]}"
    real = replicas.startswith("real")

    def url(index: int) -> str:
        return healthy_cluster.dsn(index).rsplit("/", 1)[0] + f"/{name}"

    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGREPLICA_")}
    env = {
        **environ,
        "DATABASE_URL": url(0),
        "READ_REPLICA_ENABLED": "true",
        "READ_REPLICA_DATABASE_URLS": f"{url(1)},{url(2)}" if real else f"{url(0)},{url(0)}",
        "DJANGO_SETTINGS_MODULE": "django_perf.settings",
        "PERF_TESTS_REAL_REPLICAS": "1" if real else "0",
    }
    if real:
        for replica in (1, 2):
            healthy_cluster.lag(replica, "300ms")
    try:
        result = subprocess.run(
            [sys.executable, "manage.py", "test", "perf", "-v", "2"],
            cwd=EXAMPLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        if real:
            for replica in (1, 2):
                healthy_cluster.lag(replica, 0)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert "Ran 10 tests" in output and "OK" in output, output[-5000:]
    assert ("skipped" in output) != real, output[-5000:]
    assert "accessed by other users" not in output and "Traceback" not in output, output
    assert "Destroying test database for alias 'default'" in output, output
    assert not healthy_cluster.execute(
        0, f"SELECT 1 FROM pg_database WHERE datname = 'test_{name}'"
    ), "the test database was left behind"


def test_a_request_asks_lagging_replicas_once_not_before_every_query(
    project: None, healthy_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row written outside a request, then three reads in one replica-enabled block
    while the replicas replay 300 ms late: the replicas are asked (and waited for, at
    most ``max_wait``) before the first read only; all three read the primary."""
    from perf.models import Signature

    from pgreplica.contrib.django import integration, replica_reads
    from pgreplica.contrib.django.testing import served_by

    integ = integration()
    checks: list[str] = []
    real_ask = integ.lb._replay_lsn

    def counting(host: Any, conn: Any) -> int:  # each direct check of a replica
        checks.append(integ.alias_of[host])
        return real_ask(host, conn)

    monkeypatch.setattr(integ.lb, "_replay_lsn", counting)
    for replica in (1, 2):
        healthy_cluster.lag(replica, "300ms")
    try:
        name = new_name("once")
        Signature.objects.create(name=name)
        with replica_reads(), served_by() as seen:
            assert Signature.objects.filter(name=name).exists()
            first = len(checks)
            assert Signature.objects.filter(name=name).count() == 1
            assert Signature.objects.get(name=name).name == name
    finally:
        for replica in (1, 2):
            healthy_cluster.lag(replica, 0)
    assert seen == ["default", "default", "default"], seen
    assert first >= 1 and len(checks) == first, checks
    assert set(checks) <= {"read_replica", "read_replica_2"}, checks


def test_the_one_shot_retry_needs_a_replica_and_no_write(
    project: None, healthy_cluster: LocalCluster
) -> None:
    """The retry runs a view again on the primary only when a replica was involved and
    nothing was written: an error with no replica behind it, or after a write, is
    raised as it is, and the view ran once."""
    from django.db import OperationalError
    from perf.models import Signature, Tag

    from pgreplica.contrib.django.testing import wait_for_replicas
    from pgreplica.contrib.django.views import run_with_replica

    wait_for_replicas()
    calls: list[str] = []

    def reads_then_fails() -> int:
        calls.append("read")
        count = Signature.objects.count()  # on a replica
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return count

    assert run_with_replica(reads_then_fails, "reads_then_fails") >= 0
    assert calls == ["read", "read"]

    def fails_before_any_query() -> None:
        calls.append("nothing")
        raise OperationalError("raised by the view itself")

    calls.clear()
    with pytest.raises(OperationalError, match="by the view itself"):
        run_with_replica(fails_before_any_query, "fails_before_any_query")
    assert calls == ["nothing"]

    name = new_name("wrote")

    def reads_writes_then_fails() -> None:
        calls.append("write")
        Signature.objects.count()  # on a replica
        Tag.objects.create(name=name)
        raise OperationalError("connection lost after the write")

    calls.clear()
    with pytest.raises(OperationalError, match="after the write"):
        run_with_replica(reads_writes_then_fails, "reads_writes_then_fails")
    assert calls == ["write"]
    assert Tag.objects.filter(name=name).count() == 1


def test_writes_outside_http_are_counted_once_per_commit_and_not_during_a_request(
    project: None, healthy_cluster: LocalCluster
) -> None:
    """What counts as this context's write outside a request: a write in a
    ``replica_reads()`` block of a job (no HTTP request) does, once per transaction and
    when it commits; a write while Django handles a request (a session save around the
    middleware) does not."""
    from django.core.signals import request_finished, request_started
    from django.db import connection, transaction
    from perf.models import Signature, Tag

    from pgreplica.contrib.django import replica_reads
    from pgreplica.contrib.django.state import OUTSIDE_REQUESTS, _outside_commit
    from pgreplica.contrib.django.testing import served_by, wait_for_replicas

    wait_for_replicas()  # nothing of the test process pending
    state = OUTSIDE_REQUESTS.get()
    assert state is not None and state.committed == state.read

    def counted() -> int:
        return OUTSIDE_REQUESTS.get().committed - state.read  # type: ignore[union-attr]

    with transaction.atomic():
        Tag.objects.create(name=new_name("t"))
        Tag.objects.create(name=new_name("t"))
        hooks = [e for e in connection.run_on_commit if e[1] is _outside_commit]
        assert len(hooks) == 1  # once per transaction, not per write
        assert counted() == 0  # not committed yet
    assert counted() == 1

    wait_for_replicas()
    request_started.send(sender=None)
    try:
        Tag.objects.create(name=new_name("session-like"))  # e.g. a session save
    finally:
        request_finished.send(sender=None)
    assert counted() == 0

    # A job's replica_reads() block that writes, then another that reads, replicas 300 ms
    # behind: the second reads the primary (before, the write was not counted).
    for replica in (1, 2):
        healthy_cluster.lag(replica, "300ms")
    try:
        name = new_name("job")
        with replica_reads():
            Signature.objects.create(name=name)
        assert counted() == 1
        with replica_reads(), served_by() as seen:
            assert Signature.objects.filter(name=name).exists()
    finally:
        for replica in (1, 2):
            healthy_cluster.lag(replica, 0)
    assert seen == ["default"], seen


def test_a_frozen_replica_holds_no_request(project: None, healthy_cluster: LocalCluster) -> None:
    """``pgreplica cluster freeze`` (SIGSTOP) on a replica while 4 threads make routed
    requests: Django, not the balancer, holds the connections that run the queries, so
    when the prober marks the replica down the integration shuts those connections'
    sockets (a query blocked on it fails now and the view's retry reads the primary),
    and a connection being opened to it gives up after ``connect_timeout``. Every
    request answers 200, and none is still waiting while the replica is still frozen."""
    import threading

    from django.db import connections
    from django.test import Client

    from pgreplica.contrib.django.testing import wait_for_replicas

    wait_for_replicas()
    results: list[tuple[Any, float]] = []

    def worker() -> None:
        client = Client()
        try:
            for _ in range(20):
                started = time.monotonic()
                try:
                    status: Any = client.get("/api/signatures/").status_code
                except Exception as exc:
                    status = type(exc).__name__
                results.append((status, time.monotonic() - started))
                time.sleep(0.05)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    healthy_cluster.freeze(1)
    try:
        for thread in threads:
            thread.join(15)
        still_waiting = sum(thread.is_alive() for thread in threads)
    finally:
        healthy_cluster.thaw(1)
    for thread in threads:
        thread.join(60)
    assert still_waiting == 0, f"{still_waiting} threads blocked on the frozen replica"
    assert len(results) == 80
    assert [r for r in results if r[0] != 200] == []
    worst = max(seconds for _, seconds in results)
    print(f"\nworst request {worst:.2f} s with replica 1 frozen")
    assert worst < 6, worst  # connect_timeout (2 s) and the prober's hang detection


def test_a_forked_worker_forgets_its_parent_s_replica_connections(
    project: None, healthy_cluster: LocalCluster
) -> None:
    """gunicorn --preload forks after the parent used a replica alias: the child must
    never shut those (shared) sockets when its prober marks a replica down."""
    from pgreplica.contrib.django.state import REPLICA_CONNECTIONS
    from pgreplica.contrib.django.testing import wait_for_replicas

    wait_for_replicas()  # opens this thread's connections to both replica aliases
    assert {a for a, wrappers in REPLICA_CONNECTIONS.items() if len(wrappers)} == {
        "read_replica",
        "read_replica_2",
    }
    pid = os.fork()
    if pid == 0:  # the child: exit at once, with the answer as its status
        os._exit(0 if not REPLICA_CONNECTIONS else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert REPLICA_CONNECTIONS  # the parent keeps its own
