"""The Django integration's system checks: each misconfiguration raises its id with a
hint, the correct setting raises nothing; ``manage.py check`` prints them without a
traceback, and a worker that runs no checks refuses to start on an error.

In-process tests change settings with ``override_settings`` on the example project
(tests/django_project.py); the subprocess tests run a project of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgreplica.testing import LocalCluster

django = pytest.importorskip("django", reason="Django is not installed (pip install '.[dev]')")

from django_project import EXAMPLE, dsn  # noqa: E402


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


@pytest.fixture
def run_checks(project: None) -> Iterator[Any]:
    """``run_checks(**settings)``: the integration's check under those settings."""
    from django.test import override_settings

    from pgreplica.contrib.django.checks import check_settings

    def run(**overrides: Any) -> list[Any]:
        with warnings.catch_warnings():
            # The check only reads DATABASES; no connection is made from the override.
            warnings.filterwarnings("ignore", "Overriding setting DATABASES")
            with override_settings(**overrides):
                return check_settings()

    yield run


def pgreplica_settings(**changes: Any) -> dict[str, Any]:
    from django.conf import settings

    return {**settings.PGREPLICA, **changes}


def test_the_example_project_passes_every_check(run_checks: Any) -> None:
    assert run_checks() == []


def test_e001_unknown_key_with_a_suggestion(run_checks: Any) -> None:
    from django.conf import settings

    options = dict(settings.PGREPLICA)
    options["REPLICA_APP"] = options.pop("REPLICA_APPS")
    messages = run_checks(PGREPLICA=options)
    assert ids(messages) == ["pgreplica.E001"]
    assert "'REPLICA_APP'" in messages[0].msg and "did you mean 'REPLICA_APPS'" in messages[0].msg
    assert "REPLICA_APPS" in messages[0].hint
    assert ids(run_checks(PGREPLICA=["REPLICA_APPS"])) == ["pgreplica.E001"]


def test_e002_a_bad_environment_variable_names_it(
    run_checks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgreplica.contrib.django import settings as env_settings

    monkeypatch.setattr(env_settings, "LAST_OUTCOME", None)  # the check reads the env
    monkeypatch.setenv(
        "READ_REPLICA_DATABASE_URLS", "postgresql://a@h/x,postgresql://a:pw@h:99999/x"
    )
    messages = run_checks()
    assert ids(messages) == ["pgreplica.E002"]
    assert "READ_REPLICA_DATABASE_URLS[2]" in messages[0].msg
    assert "pw" not in messages[0].msg.replace("port", "")
    monkeypatch.setenv("READ_REPLICA_ENABLED", "maybe")
    messages = run_checks()
    assert ids(messages) == ["pgreplica.E002"]
    assert "READ_REPLICA_ENABLED" in messages[0].msg


def test_e002_from_settings_py_is_deferred_to_the_check() -> None:
    """In settings.py (not strict) a bad variable is not raised: no alias, and the error
    waits for the check and the middleware, naming the variable the user set."""
    from pgreplica.contrib.django import settings as env_settings

    env = {"READ_REPLICA_ENABLED": "true", "READ_REPLICA_DATABASE_URLS": "postgresql://h:0/x"}
    before = env_settings.LAST_OUTCOME
    try:
        assert env_settings.replica_databases({}, env=env) == {}
        outcome = env_settings.LAST_OUTCOME
        assert outcome is not None
        assert str(outcome.error) == (
            "READ_REPLICA_DATABASE_URLS: port must be a number between 1 and 65535"
        )
    finally:
        env_settings.LAST_OUTCOME = before


def test_e003_replica_apps_must_be_a_collection(run_checks: Any) -> None:
    messages = run_checks(PGREPLICA=pgreplica_settings(REPLICA_APPS="perf"))
    assert ids(messages) == ["pgreplica.E003"]
    assert messages[0].hint == "Write {'perf'}."
    assert ids(run_checks(PGREPLICA=pgreplica_settings(REPLICA_APPS=["perf"]))) == []
    assert ids(run_checks(PGREPLICA=pgreplica_settings(REPLICA_APPS={"perf": 1}.keys()))) == []
    generator = pgreplica_settings(REPLICA_APPS=(a for a in ["perf"]))
    assert ids(run_checks(PGREPLICA=generator)) == ["pgreplica.E003"]


def test_e004_sticking_spec(run_checks: Any) -> None:
    messages = run_checks(PGREPLICA=pgreplica_settings(STICKING="memcached://cache:11211"))
    assert ids(messages) == ["pgreplica.E004"]
    assert "memcached://..." in messages[0].msg and "11211" not in messages[0].msg
    for good in ("memory", "redis://127.0.0.1:6379/0", None):
        assert ids(run_checks(PGREPLICA=pgreplica_settings(STICKING=good))) == []
    # a malformed URL may hold a password: never shown
    messages = run_checks(PGREPLICA=pgreplica_settings(STICKING="redis//:S3cr3t-pw@h:6379/0"))
    assert ids(messages) == ["pgreplica.E004"]
    assert "S3cr3t" not in messages[0].msg and "a string of 26 characters" in messages[0].msg


def test_e004_an_async_sticking_is_refused(run_checks: Any, project: None) -> None:
    """The middleware is synchronous: an AsyncSticking would fail every request."""
    from pgreplica.contrib.django import integration
    from pgreplica.sticking import AsyncSticking, MemoryStickingStore, Sticking

    lb = integration().lb
    wrong = AsyncSticking(lb, MemoryStickingStore())
    messages = run_checks(PGREPLICA=pgreplica_settings(STICKING=wrong))
    assert ids(messages) == ["pgreplica.E004"] and "AsyncSticking" in messages[0].msg
    right = Sticking(lb, MemoryStickingStore())
    assert ids(run_checks(PGREPLICA=pgreplica_settings(STICKING=right))) == []


def test_e005_replicas_must_name_other_aliases(run_checks: Any) -> None:
    assert ids(run_checks(PGREPLICA=pgreplica_settings(REPLICAS="read_replica"))) == [
        "pgreplica.E005"
    ]
    messages = run_checks(PGREPLICA=pgreplica_settings(REPLICAS=["read_replca"]))
    assert ids(messages) == ["pgreplica.E005"]
    assert "did you mean 'read_replica'" in messages[0].msg
    assert ids(run_checks(PGREPLICA=pgreplica_settings(REPLICAS=["default"]))) == ["pgreplica.E005"]
    assert ids(run_checks(PGREPLICA=pgreplica_settings(REPLICAS=["read_replica_2"]))) == []


def test_e006_logical_databases(run_checks: Any) -> None:
    bad = {"ci": {"APPS": ["perf"], "REPLICA": ["read_replica"]}}
    messages = run_checks(PGREPLICA=pgreplica_settings(DATABASES=bad))
    assert ids(messages) == ["pgreplica.E006"]
    assert "REPLICA" in messages[0].msg


def test_e007_core_settings(run_checks: Any) -> None:
    messages = run_checks(PGREPLICA=pgreplica_settings(SETTINGS={"max_wait": "forever"}))
    assert ids(messages) == ["pgreplica.E007"]
    assert "max_wait" in messages[0].msg
    messages = run_checks(PGREPLICA=pgreplica_settings(SETTINGS={"probe_intervall": "1s"}))
    assert ids(messages) == ["pgreplica.E007"]
    assert "probe_interval" in messages[0].msg
    assert ids(run_checks(PGREPLICA=pgreplica_settings(SETTINGS={"max_wait": "2ms"}))) == []


def test_e008_option_types(run_checks: Any) -> None:
    assert ids(run_checks(PGREPLICA=pgreplica_settings(PRIMARY_ALIAS="primary"))) == [
        "pgreplica.E008"
    ]
    assert ids(run_checks(PGREPLICA=pgreplica_settings(TOKEN_HEADER=""))) == ["pgreplica.E008"]
    assert ids(run_checks(PGREPLICA=pgreplica_settings(USAGE_LOG="yes"))) == ["pgreplica.E008"]
    assert ids(run_checks(PGREPLICA=pgreplica_settings(SIGNING_KEY=b"k3y-bytes"))) == []
    messages = run_checks(PGREPLICA=pgreplica_settings(SIGNING_KEY=12345678))
    assert ids(messages) == ["pgreplica.E008"] and "12345678" not in messages[0].msg


def test_w001_atomic_requests(run_checks: Any) -> None:
    from django.conf import settings

    databases = {k: dict(v) for k, v in settings.DATABASES.items()}
    databases["default"]["ATOMIC_REQUESTS"] = True
    messages = run_checks(DATABASES=databases)
    assert ids(messages) == ["pgreplica.W001"]
    assert "non_atomic_requests" in messages[0].hint


def test_w002_declared_replica_without_test_mirror(run_checks: Any) -> None:
    from django.conf import settings

    databases = {k: dict(v) for k, v in settings.DATABASES.items()}
    databases["replica"] = {k: v for k, v in databases["read_replica"].items() if k != "TEST"}
    messages = run_checks(DATABASES=databases, PGREPLICA=pgreplica_settings(REPLICAS=["replica"]))
    assert ids(messages) == ["pgreplica.W002"]
    assert "\"MIRROR\": 'default'" in messages[0].hint


def test_w003_enabled_without_any_replica(run_checks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pgreplica.contrib.django import settings as env_settings

    monkeypatch.setattr(env_settings, "LAST_OUTCOME", None)  # the check reads the env
    monkeypatch.delenv("READ_REPLICA_DATABASE_URLS")
    monkeypatch.delenv("READ_REPLICA_DATABASE_URL", raising=False)
    monkeypatch.delenv("PGREPLICA_CONFIG", raising=False)
    messages = run_checks()
    assert "pgreplica.W003" in ids(messages)
    monkeypatch.setenv("READ_REPLICA_ENABLED", "false")
    assert "pgreplica.W003" not in ids(run_checks())


def test_w004_replica_apps_names_an_unknown_app(run_checks: Any) -> None:
    messages = run_checks(PGREPLICA=pgreplica_settings(REPLICA_APPS={"perf", "pref2"}))
    assert ids(messages) == ["pgreplica.W004"]
    assert "'pref2'" in messages[0].msg


def test_w005_router_missing(run_checks: Any) -> None:
    from pgreplica.contrib.django import ReadReplicaRouter

    assert ids(run_checks(DATABASE_ROUTERS=[])) == ["pgreplica.W005"]

    class MyRouter(ReadReplicaRouter):
        pass

    assert ids(run_checks(DATABASE_ROUTERS=[MyRouter()])) == []
    assert ids(run_checks(DATABASE_ROUTERS=("pgreplica.contrib.django.ReadReplicaRouter",))) == []


def test_w006_middleware_missing_or_before_authentication(run_checks: Any) -> None:
    from django.conf import settings

    without = [m for m in settings.MIDDLEWARE if "PgReplica" not in m]
    assert ids(run_checks(MIDDLEWARE=without)) == ["pgreplica.W006"]
    before = ["pgreplica.contrib.django.PgReplicaMiddleware", *without]
    sticking = pgreplica_settings(STICKING="memory")
    assert ids(run_checks(MIDDLEWARE=before, PGREPLICA=sticking)) == ["pgreplica.W006"]
    assert ids(run_checks(MIDDLEWARE=before, PGREPLICA=pgreplica_settings(STICKING=None))) == []


def test_the_middleware_refuses_to_start_on_an_error(project: None) -> None:
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from pgreplica.contrib.django import PgReplicaMiddleware
    from pgreplica.contrib.django.checks import forget_validation

    forget_validation()
    try:
        PgReplicaMiddleware(lambda request: None)  # valid: validated once, cached
        # a settings change (override_settings sends setting_changed) validates again
        with (
            override_settings(PGREPLICA={"REPLICA_APPS": "perf"}),
            pytest.raises(ImproperlyConfigured, match=r"pgreplica\.E003"),
        ):
            PgReplicaMiddleware(lambda request: None)
    finally:
        forget_validation()


# -- in a process of its own: manage.py check, and a worker that runs no checks ---------

SETTINGS = """
import os
from pgreplica.contrib.django import replica_databases
SECRET_KEY = "checks-test-not-secret"
INSTALLED_APPS = [
    "django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions",
    "rest_framework", "perf",
    "pgreplica.contrib.django",
]
REST_FRAMEWORK = {{"UNAUTHENTICATED_USER": None}}
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "pgreplica.contrib.django.PgReplicaMiddleware",
]
ROOT_URLCONF = "django_perf.urls"
DATABASES = {{"default": {{
    "ENGINE": "django.db.backends.postgresql", "NAME": "django_perf",
    "HOST": "127.0.0.1", "PORT": "{port}", "USER": "{user}", "PASSWORD": "{password}",
}}}}
DATABASES.update(replica_databases(DATABASES["default"]))
DATABASE_ROUTERS = ["pgreplica.contrib.django.ReadReplicaRouter"]
PGREPLICA = {pgreplica}
"""


def write_project(tmp_path: Path, cluster: LocalCluster, pgreplica: str, extra: str = "") -> Path:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(cluster.dsn(0))
    text = SETTINGS.format(
        port=params["port"], user=params["user"], password=params["password"], pgreplica=pgreplica
    )
    (tmp_path / "checks_settings.py").write_text(textwrap.dedent(text) + textwrap.dedent(extra))
    return tmp_path


def django_env(tmp_path: Path, cluster: LocalCluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGREPLICA_", "READ_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="checks_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(EXAMPLE)]),
        READ_REPLICA_ENABLED="true",
        READ_REPLICA_DATABASE_URLS=f"{dsn(cluster, 1)},{dsn(cluster, 2)}",
    )
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE / "manage.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_manage_py_check_reports_without_a_traceback(
    project: None, cluster: LocalCluster, tmp_path: Path
) -> None:
    write_project(tmp_path, cluster, '{"REPLICA_APP": {"perf"}, "STICKING": "memcached://x"}')
    bad_url = f"{dsn(cluster, 1)},postgresql://h:99999/x"
    result = manage(django_env(tmp_path, cluster, READ_REPLICA_DATABASE_URLS=bad_url), "check")
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    for expected in (
        "(pgreplica.E001) PGREPLICA has an unknown key 'REPLICA_APP' (did you mean "
        "'REPLICA_APPS'?)",
        "(pgreplica.E002) READ_REPLICA_DATABASE_URLS[2]: port must be a number",
        "(pgreplica.E004)",
    ):
        assert expected in output, output
    write_project(tmp_path, cluster, '{"REPLICA_APPS": {"perf"}}')
    result = manage(django_env(tmp_path, cluster), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pgreplica" not in result.stdout + result.stderr


def test_a_wsgi_worker_refuses_to_start_on_an_error(
    project: None, cluster: LocalCluster, tmp_path: Path
) -> None:
    """gunicorn and uvicorn run no system checks: building the application (as they do
    when a worker boots) raises ImproperlyConfigured naming the error."""
    write_project(tmp_path, cluster, '{"REPLICA_APPS": "perf"}')
    script = "from django.core.wsgi import get_wsgi_application; get_wsgi_application()"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=django_env(tmp_path, cluster),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured: pgreplica:"), last
    assert "(pgreplica.E003)" in last


# -- replicas declared in DATABASES, and manage.py pgreplica_status -----------------------

DECLARED = """
for alias, index in (("replica_a", 1), ("replica_b", 2)):
    DATABASES[alias] = {
        **DATABASES["default"], "PORT": os.environ[f"REPLICA_{index}_PORT"],
        "TEST": {"MIRROR": "default"},
    }
"""

SCRIPT = """
import json, django
django.setup()
from django.test import Client
from pgreplica.contrib.django import integration
from pgreplica.contrib.django.testing import served_by, wait_for_replicas
wait_for_replicas()
with served_by() as listed:
    assert Client().get("/api/signatures/").status_code == 200
stale = 0
for i in range(5):
    created = Client().post("/api/signatures/", {"name": f"declared-{i}-NAME"},
                            content_type="application/json")
    token = created.headers["X-PgReplica-Token"]
    with served_by() as seen:
        got = Client().get(f"/api/signatures/{created.json()['id']}/",
                           HTTP_X_PGREPLICA_TOKEN=token)
    stale += got.status_code != 200
print(json.dumps({"listed": listed, "stale": stale, "after_write": seen,
                  "replicas": integration().replica_aliases}))
"""


def test_replicas_declared_in_databases_are_routed(
    project: None, healthy_cluster: LocalCluster, tmp_path: Path
) -> None:
    """``PGREPLICA["REPLICAS"]`` names ordinary DATABASES entries: reads go to them, and
    read-your-writes holds under 300 ms of lag, as with the environment's aliases."""
    import json
    import uuid

    write_project(tmp_path, healthy_cluster, '{"REPLICAS": ["replica_a", "replica_b"]}', DECLARED)
    env = django_env(
        tmp_path,
        healthy_cluster,
        READ_REPLICA_ENABLED="false",
        REPLICA_1_PORT=str(healthy_cluster.port(1)),
        REPLICA_2_PORT=str(healthy_cluster.port(2)),
    )
    script = SCRIPT.replace("NAME", uuid.uuid4().hex[:8])
    for replica in (1, 2):
        healthy_cluster.lag(replica, "300ms")
    try:
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        for replica in (1, 2):
            healthy_cluster.lag(replica, 0)
    assert result.returncode == 0, result.stderr[-5000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["replicas"] == ["replica_a", "replica_b"]
    assert outcome["listed"] and set(outcome["listed"]) <= {"replica_a", "replica_b"}, outcome
    assert outcome["stale"] == 0, outcome
    assert outcome["after_write"] == ["default"], outcome  # the replicas are 300 ms behind

    result = manage(env, "pgreplica_status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["HOST", "DATABASES", "ROLE", "STATE"], result.stdout
    assert [line.split()[2:4] for line in lines[1:4]] == [
        ["primary", "up"],
        ["replica", "up"],
        ["replica", "up"],
    ], result.stdout
    for alias in ("default", "replica_a", "replica_b"):
        assert f"DATABASES alias {alias!r}" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr and len(set(lines)) == len(lines), result.stdout
    result = manage(env, "pgreplica_status", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["role"] for r in rows] == ["primary", "replica", "replica"], result.stdout
