"""Pure tests of settings and connection strings (no database needed)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from pgreplica import AsyncLoadBalancer, ConfigError, DatabaseConfig, Dsn, LoadBalancer, Settings
from secrets_registry import register_secret

SECRET = register_secret("S3cr3t-pw", "test DSN password")
PRIMARY_URL = f"postgresql://app:{SECRET}@db-primary.internal:5433/shop"
REPLICA_URL = f"postgresql://app:{SECRET}@db-replica1.internal:5434/shop"
REPLICA_KV = f"host=db-replica2.internal port=5435 user=app password={SECRET} dbname=shop"

NO_ENV: dict[str, str] = {}


def one_db(**db: Any) -> dict[str, Any]:
    entry = {"primary": PRIMARY_URL, "replicas": [REPLICA_URL]}
    entry.update(db)
    return {"databases": {"main": entry}}


def config_error(data: dict[str, Any], environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_dict(data, environ=NO_ENV if environ is None else environ)
    return info.value


# -- from_dict ---------------------------------------------------------------------------


def test_from_dict_with_url_and_key_value_dsns() -> None:
    settings = Settings.from_dict(
        {"databases": {"main": {"primary": PRIMARY_URL, "replicas": [REPLICA_URL, REPLICA_KV]}}},
        environ=NO_ENV,
    )
    assert list(settings.databases) == ["main"]
    main = settings.database("main")
    assert isinstance(main, DatabaseConfig)
    assert main.name == "main"
    assert main.primary_from is None
    assert main.primary.label == "db-primary.internal:5433/shop"
    assert [r.label for r in main.replicas] == [
        "db-replica1.internal:5434/shop",
        "db-replica2.internal:5435/shop",
    ]
    assert main.replicas[1].redacted == "postgresql://app:***@db-replica2.internal:5435/shop"
    assert settings.default_database == "main"
    assert settings.database(None) is main
    assert settings.enabled is True


def test_dsn_defaults_for_host_port_and_dbname() -> None:
    dsn = Dsn("user=alice")
    assert dsn.label == "localhost:5432/alice"
    assert dsn.redacted == "postgresql://alice@localhost:5432/alice"
    assert Dsn("postgresql://h/db").redacted == "postgresql://h:5432/db"
    assert Dsn("hostaddr=10.0.0.1 dbname=x").label == "10.0.0.1:5432/x"


def test_dsn_equality_hash_pickle_and_immutability() -> None:
    a = Dsn(PRIMARY_URL)
    b = Dsn(PRIMARY_URL)
    assert a == b
    assert hash(a) == hash(b)
    assert a != Dsn(REPLICA_URL)
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(AttributeError):
        a.label = "x"  # type: ignore[misc]


def test_database_without_replicas() -> None:
    settings = Settings.from_dict({"databases": {"main": {"primary": PRIMARY_URL}}}, environ={})
    assert settings.database("main").replicas == ()


def test_unknown_database_lookup() -> None:
    settings = Settings.from_dict(one_db(), environ=NO_ENV)
    with pytest.raises(ConfigError) as info:
        settings.database("nope")
    assert info.value.setting == "database"
    assert "'nope'" in str(info.value)


def test_defaults() -> None:
    settings = Settings.from_dict(one_db(), environ=NO_ENV)
    assert settings.max_lag_bytes == 8 * 1024 * 1024
    assert settings.max_lag_seconds == 30
    assert settings.probe_interval == 0.1
    assert settings.connect_timeout == 2
    assert settings.probe_statement_timeout == 0.1
    assert settings.enabled is True
    assert settings.pool_min_size <= settings.pool_max_size


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("probe_interval", "100ms", 0.1),
        ("probe_interval", "0.25", 0.25),
        ("probe_interval", 2, 2.0),
        ("probe_timeout", "2s", 2.0),
        ("connect_timeout", " 1.5 s ", 1.5),
        ("max_lag_seconds", "1min", 60.0),
        ("max_lag_seconds", "0", 0.0),
        ("max_wait", "250ms", 0.25),
        ("max_lag_bytes", "8MiB", 8 * 1024 * 1024),
        ("max_lag_bytes", "8MB", 8 * 1024 * 1024),
        ("max_lag_bytes", "64kB", 64 * 1024),
        ("max_lag_bytes", "1GiB", 1024**3),
        ("max_lag_bytes", "4096", 4096),
        ("max_lag_bytes", 4096, 4096),
        ("max_lag_bytes", "0", 0),
        ("pool_max_size", "20", 20),
        ("enabled", "off", False),
        ("enabled", "Yes", True),
        ("application_name", "shop-web", "shop-web"),
    ],
)
def test_durations_sizes_and_coercion(key: str, value: object, expected: object) -> None:
    settings = Settings.from_dict({**one_db(), key: value}, environ=NO_ENV)
    assert getattr(settings, key) == expected
    assert type(getattr(settings, key)) is type(expected)


def test_environment_overrides_the_mapping() -> None:
    env = {
        "PGREPLICA_PROBE_INTERVAL": "250ms",
        "PGREPLICA_MAX_LAG_BYTES": "16MiB",
        "PGREPLICA_POOL_MAX_SIZE": "3",
        "UNRELATED": "x",
    }
    settings = Settings.from_dict({**one_db(), "probe_interval": 1}, environ=env)
    assert settings.probe_interval == 0.25
    assert settings.max_lag_bytes == 16 * 1024 * 1024
    assert settings.pool_max_size == 3


def test_empty_environ_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGREPLICA_ENABLED", "false")
    monkeypatch.setenv("PGREPLICA_PROBE_INTERVAL", "5")
    settings = Settings.from_dict(one_db(), environ={})
    assert settings.enabled is True
    assert settings.probe_interval == 0.1
    # ... while the default environ is the process environment
    assert Settings.from_dict(one_db()).enabled is False


def test_reused_primary_with_own_replicas() -> None:
    ci_replica = "postgresql://app@db-ci-replica.internal:5436/shop"
    settings = Settings.from_dict(
        {
            "databases": {
                "main": {"primary": PRIMARY_URL, "replicas": [REPLICA_URL]},
                "ci": {"primary": "main", "replicas": [ci_replica]},
            }
        },
        environ=NO_ENV,
    )
    main, ci = settings.database("main"), settings.database("ci")
    assert ci.primary == main.primary
    assert ci.primary_from == "main"
    assert main.primary_from is None
    assert [r.label for r in ci.replicas] == ["db-ci-replica.internal:5436/shop"]
    assert [r.label for r in main.replicas] == ["db-replica1.internal:5434/shop"]
    assert list(settings.databases) == ["main", "ci"]


def test_reuse_may_name_a_database_defined_later() -> None:
    settings = Settings.from_dict(
        {"databases": {"ci": {"primary": "main"}, "main": {"primary": PRIMARY_URL}}},
        environ=NO_ENV,
    )
    assert list(settings.databases) == ["ci", "main"]
    assert settings.database("ci").primary == settings.database("main").primary
    assert settings.default_database == "ci"


def test_with_options() -> None:
    settings = Settings.from_dict(one_db(), environ=NO_ENV)
    changed = settings.with_options(probe_interval="50ms", pool_max_size=4)
    assert changed.probe_interval == 0.05
    assert changed.pool_max_size == 4
    assert settings.probe_interval == 0.1
    with pytest.raises(ConfigError) as info:
        settings.with_options(probe_intervall=1)
    assert info.value.setting == "probe_intervall"
    with pytest.raises(ConfigError) as info:
        settings.with_options(pool_min_size=11)
    assert info.value.setting == "pool_max_size"


def test_settings_are_frozen() -> None:
    settings = Settings.from_dict(one_db(), environ=NO_ENV)
    with pytest.raises(AttributeError):
        settings.probe_interval = 1.0  # type: ignore[misc]


# -- TOML --------------------------------------------------------------------------------

TOML = f"""
probe_interval = "100ms"
max_lag_bytes = "8MiB"
max_lag_seconds = 10

[databases.main]
primary = "{PRIMARY_URL}"
replicas = ["{REPLICA_URL}", "{REPLICA_KV}"]

[databases.ci]
primary = "main"
replicas = ["postgresql://app@db-ci-replica.internal:5436/shop"]
"""


def write_toml(tmp_path: Path, text: str = TOML) -> Path:
    path = tmp_path / "pgreplica.toml"
    path.write_text(text)
    return path


def test_from_toml(tmp_path: Path) -> None:
    settings = Settings.from_toml(write_toml(tmp_path), environ=NO_ENV)
    assert settings.probe_interval == 0.1
    assert settings.max_lag_bytes == 8 * 1024 * 1024
    assert settings.max_lag_seconds == 10.0
    assert list(settings.databases) == ["main", "ci"]
    assert len(settings.database("main").replicas) == 2
    ci = settings.database("ci")
    assert ci.primary == settings.database("main").primary
    assert ci.primary_from == "main"
    assert [r.label for r in ci.replicas] == ["db-ci-replica.internal:5436/shop"]
    assert Settings.from_toml(str(write_toml(tmp_path)), environ=NO_ENV) == settings


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(tmp_path / "absent.toml", environ=NO_ENV)
    assert info.value.setting == "config"
    assert "not found" in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[databases.main\nprimary = 1\n")
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(path, environ=NO_ENV)
    assert info.value.setting == "config"
    assert "not valid TOML" in str(info.value)


def test_invalid_toml_does_not_echo_a_password(tmp_path: Path) -> None:
    path = write_toml(tmp_path, f'[databases.main]\nprimary = "{PRIMARY_URL}" oops\n')
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(path, environ=NO_ENV)
    assert SECRET not in str(info.value)


# -- from_env ----------------------------------------------------------------------------


def test_from_env_with_config_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path)
    settings = Settings.from_env({"PGREPLICA_CONFIG": str(path)})
    assert list(settings.databases) == ["main", "ci"]
    assert settings.probe_interval == 0.1
    # the other PGREPLICA_ variables still override the file
    env = {"PGREPLICA_CONFIG": str(path), "PGREPLICA_PROBE_INTERVAL": "2s"}
    assert Settings.from_env(env).probe_interval == 2.0


def test_from_env_config_file_wins_over_urls(tmp_path: Path) -> None:
    env = {
        "PGREPLICA_CONFIG": str(write_toml(tmp_path)),
        "PGREPLICA_PRIMARY_URL": "postgresql://elsewhere/db",
    }
    assert Settings.from_env(env).database("main").primary == Dsn(PRIMARY_URL)


def test_from_env_with_urls() -> None:
    env = {
        "PGREPLICA_PRIMARY_URL": PRIMARY_URL,
        "PGREPLICA_REPLICA_URLS": f" {REPLICA_URL} ,, {REPLICA_KV},",
        "PGREPLICA_MAX_LAG_SECONDS": "5",
    }
    settings = Settings.from_env(env)
    assert list(settings.databases) == ["main"]
    main = settings.database("main")
    assert main.primary == Dsn(PRIMARY_URL)
    assert main.replicas == (Dsn(REPLICA_URL), Dsn(REPLICA_KV))
    assert settings.max_lag_seconds == 5.0


def test_from_env_with_primary_only() -> None:
    settings = Settings.from_env({"PGREPLICA_PRIMARY_URL": PRIMARY_URL})
    assert settings.database("main").replicas == ()


def test_from_env_with_nothing_set() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({})
    assert info.value.setting == "PGREPLICA_PRIMARY_URL"


def test_from_env_with_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PGREPLICA_CONFIG": str(tmp_path / "absent.toml")})
    assert info.value.setting == "config"


# -- the kill switch ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "off", " OFF "])
def test_kill_switch_in_from_dict(value: str) -> None:
    settings = Settings.from_dict(
        {**one_db(), "enabled": True}, environ={"PGREPLICA_ENABLED": value}
    )
    assert settings.enabled is False


def test_kill_switch_in_from_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "enabled = true\n" + TOML)
    assert Settings.from_toml(path, environ=NO_ENV).enabled is True
    assert Settings.from_toml(path, environ={"PGREPLICA_ENABLED": "false"}).enabled is False


def test_kill_switch_in_from_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path)
    with_file = {"PGREPLICA_CONFIG": str(path), "PGREPLICA_ENABLED": "false"}
    assert Settings.from_env(with_file).enabled is False
    with_urls = {
        "PGREPLICA_PRIMARY_URL": PRIMARY_URL,
        "PGREPLICA_REPLICA_URLS": REPLICA_URL,
        "PGREPLICA_ENABLED": "false",
    }
    assert Settings.from_env(with_urls).enabled is False


def test_kill_switch_keeps_replicas_out_of_the_balancer() -> None:
    settings = Settings.from_dict(one_db(), environ={"PGREPLICA_ENABLED": "false"})
    lb = LoadBalancer(config=settings)
    assert "disabled" in repr(lb)
    assert "+ 0 replicas" in repr(lb)
    assert [s.role for s in lb.status()] == ["primary"]


def test_kill_switch_value_must_be_boolean() -> None:
    error = config_error(one_db(), environ={"PGREPLICA_ENABLED": "maybe"})
    assert error.setting == "PGREPLICA_ENABLED"


# -- errors name the setting -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "setting"),
    [
        ({**one_db(), "probe_intervall": 1}, "probe_intervall"),
        ({**one_db(), "replicas": []}, "replicas"),
        (one_db(replica=[REPLICA_URL]), "databases.main.replica"),
        (one_db(pool_max_size=3), "databases.main.pool_max_size"),
        (one_db(primary="not a dsn"), "databases.main.primary"),
        (one_db(primary=""), "databases.main.primary"),
        (one_db(primary=None), "databases.main.primary"),
        (one_db(primary=5432), "databases.main.primary"),
        (one_db(replicas=["host=h bogus=1"]), "databases.main.replicas[0]"),
        (one_db(replicas=[REPLICA_URL, "postgresql://h:99999/db"]), "databases.main.replicas[1]"),
        (one_db(replicas=[""]), "databases.main.replicas[0]"),
        (one_db(replicas=REPLICA_URL), "databases.main.replicas"),
        (one_db(primary="postgresql://h:0/db"), "databases.main.primary"),
        (one_db(primary="postgresql://h:65536/db"), "databases.main.primary"),
        (one_db(primary="host=h port=http"), "databases.main.primary"),
        (one_db(primary="nowhere"), "databases.main.primary"),
        ({"databases": {"main": {"primary": "main"}}}, "databases.main.primary"),
        ({"databases": {"main": "postgresql://h/db"}}, "databases.main"),
        ({"databases": {"bad-name": {"primary": PRIMARY_URL}}}, "databases.bad-name"),
        ({**one_db(), "max_lag_bytes": -1}, "max_lag_bytes"),
        ({**one_db(), "max_lag_bytes": "-1"}, "max_lag_bytes"),
        ({**one_db(), "max_lag_bytes": "8 parsecs"}, "max_lag_bytes"),
        ({**one_db(), "max_lag_bytes": 1.5}, "max_lag_bytes"),
        ({**one_db(), "max_lag_seconds": -1}, "max_lag_seconds"),
        ({**one_db(), "max_lag_seconds": "-1s"}, "max_lag_seconds"),
        ({**one_db(), "max_wait": -0.5}, "max_wait"),
        ({**one_db(), "probe_interval": 0}, "probe_interval"),
        ({**one_db(), "probe_interval": "0ms"}, "probe_interval"),
        ({**one_db(), "probe_interval": "soon"}, "probe_interval"),
        ({**one_db(), "probe_interval": True}, "probe_interval"),
        ({**one_db(), "probe_timeout": -1}, "probe_timeout"),
        ({**one_db(), "probe_statement_timeout": 0}, "probe_statement_timeout"),
        ({**one_db(), "connect_timeout": 0}, "connect_timeout"),
        ({**one_db(), "backoff_initial": 0}, "backoff_initial"),
        ({**one_db(), "backoff_max": -1}, "backoff_max"),
        ({**one_db(), "pool_min_size": -1}, "pool_min_size"),
        ({**one_db(), "pool_max_size": 0}, "pool_max_size"),
        ({**one_db(), "pool_max_size": "ten"}, "pool_max_size"),
        ({**one_db(), "pool_min_size": 5, "pool_max_size": 4}, "pool_max_size"),
        ({**one_db(), "enabled": "maybe"}, "enabled"),
        ({**one_db(), "enabled": 2}, "enabled"),
        ({**one_db(), "application_name": 7}, "application_name"),
        ({}, "databases"),
        ({"probe_interval": 1}, "databases"),
        ({"databases": {}}, "databases"),
        ({"databases": ["main"]}, "databases"),
    ],
)
def test_bad_settings_name_the_setting(data: dict[str, Any], setting: str) -> None:
    error = config_error(data)
    assert error.setting == setting
    assert str(error).startswith(f"{setting}: ")
    assert error.problem


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (one_db(replica=[REPLICA_URL]), "unknown setting 'replica' (did you mean 'replicas'?)"),
        (
            one_db(replica_dns="replicas.internal"),
            "unknown setting 'replica_dns' (did you mean 'replicas_dns'?)",
        ),
        (
            {**one_db(), "max_lag_byte": 1},
            "unknown setting 'max_lag_byte' (did you mean 'max_lag_bytes'?)",
        ),
        (
            {**one_db(), "probe_intervall": 1},
            "unknown setting 'probe_intervall' (did you mean 'probe_interval'?)",
        ),
        ({"database": {}}, "unknown setting 'database' (did you mean 'databases'?)"),
        (
            {**one_db(), "replica": [REPLICA_URL]},
            "unknown setting 'replica' (did you mean 'replicas' under [databases.main]?)",
        ),
        ({**one_db(), "primary": PRIMARY_URL}, "it belongs in a database's table"),
        (one_db(max_lag_bytes=1), "it applies to every database"),
    ],
)
def test_unknown_setting_suggests_the_closest_known_one(data: dict[str, Any], problem: str) -> None:
    assert problem in config_error(data).problem


def test_unknown_setting_without_a_close_one_lists_the_known_ones() -> None:
    problem = config_error({**one_db(), "xyzzy": 1}).problem
    assert problem.startswith("unknown setting 'xyzzy' (known: application_name, ")
    assert "did you mean" not in problem
    problem = config_error(one_db(xyzzy=1)).problem
    assert "(known: hosts, patroni, primary, replicas, replicas_dns, rollout)" in problem


def test_unknown_setting_in_a_toml_file_suggests_the_known_one(tmp_path: Path) -> None:
    path = tmp_path / "pgreplica.toml"
    path.write_text(f'[databases.main]\nprimary = "{PRIMARY_URL}"\nreplica = ["{REPLICA_URL}"]\n')
    with pytest.raises(ConfigError) as info:
        Settings.from_toml(path, environ=NO_ENV)
    assert str(info.value) == (
        "databases.main.replica: unknown setting 'replica' (did you mean 'replicas'?)"
    )
    assert SECRET not in str(info.value)


def test_unknown_option_and_database_suggest_the_known_one() -> None:
    settings = Settings.from_dict(one_db(), environ=NO_ENV)
    with pytest.raises(ConfigError, match=r"did you mean 'max_lag_bytes'\?"):
        settings.with_options(max_lagbytes=1)
    with pytest.raises(
        ConfigError, match=r"no database 'mian' \(configured: main\): did you mean 'main'\?"
    ):
        settings.database("mian")


def test_reuse_of_a_database_that_does_not_exist() -> None:
    error = config_error(
        {"databases": {"main": {"primary": PRIMARY_URL}, "ci": {"primary": "mian"}}}
    )
    assert error.setting == "databases.ci.primary"
    assert "'mian'" in str(error)
    assert "not configured" in str(error)


def test_chained_reuse() -> None:
    error = config_error(
        {
            "databases": {
                "main": {"primary": PRIMARY_URL},
                "ci": {"primary": "main"},
                "sec": {"primary": "ci"},
            }
        }
    )
    assert error.setting == "databases.sec.primary"
    assert "'ci'" in str(error)


def test_bad_environment_value_names_the_variable() -> None:
    error = config_error(one_db(), environ={"PGREPLICA_PROBE_INTERVAL": "fast"})
    assert error.setting == "PGREPLICA_PROBE_INTERVAL"
    error = config_error(one_db(), environ={"PGREPLICA_POOL_MIN_SIZE": "x"})
    assert error.setting == "PGREPLICA_POOL_MIN_SIZE"


def test_direct_construction_is_validated() -> None:
    main = Settings.from_dict(one_db(), environ=NO_ENV).databases
    with pytest.raises(ConfigError) as info:
        Settings(databases=main, enabled="yes")  # type: ignore[arg-type]
    assert info.value.setting == "enabled"
    with pytest.raises(ConfigError) as info:
        Settings(databases=main, probe_interval=0.0)
    assert info.value.setting == "probe_interval"
    with pytest.raises(ConfigError) as info:
        Settings()
    assert info.value.setting == "databases"


def test_same_server_as_primary_and_replica_is_rejected() -> None:
    settings = Settings.from_dict(one_db(replicas=[PRIMARY_URL]), environ=NO_ENV)
    with pytest.raises(ConfigError) as info:
        LoadBalancer(config=settings)
    assert info.value.setting == "databases.main.replicas[0]"


def test_config_error_is_a_value_error() -> None:
    error = config_error({})
    assert isinstance(error, ValueError)


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("databases.main.primary", "malformed connection string"),
        ConfigError("PGREPLICA_ENABLED", "expected true or false, got 'maybe'"),
    ],
)
def test_config_error_pickles(error: ConfigError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ConfigError
    assert copy.setting == error.setting
    assert copy.problem == error.problem
    assert str(copy) == str(error)


def test_raised_config_error_pickles() -> None:
    error = config_error(one_db(primary="postgresql://h:0/db"))
    copy = pickle.loads(pickle.dumps(error))
    assert copy.setting == "databases.main.primary"
    assert str(copy) == str(error)


# -- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        PRIMARY_URL,
        REPLICA_KV,
        f"postgresql://app:{SECRET}@h1:5432,h2:5433/shop?sslmode=prefer",
        f"postgresql://:{SECRET}@h/shop",
        f"host=h password='{SECRET}'",
        f"postgresql://h/shop?password={SECRET}&user=app",
    ],
)
def test_password_is_hidden_everywhere_but_conninfo(text: str) -> None:
    dsn = Dsn(text)
    for shown in (repr(dsn), str(dsn), dsn.label, dsn.redacted, f"{dsn}", f"{dsn!r}"):
        assert SECRET not in shown
    assert ":***@" in dsn.redacted
    assert SECRET in dsn.conninfo


def test_password_is_hidden_in_settings_repr() -> None:
    settings = Settings.from_dict(
        {
            "databases": {
                "main": {"primary": PRIMARY_URL, "replicas": [REPLICA_URL, REPLICA_KV]},
                "ci": {"primary": "main", "replicas": [REPLICA_KV]},
            }
        },
        environ=NO_ENV,
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in repr(settings.database("ci"))
    assert SECRET in settings.database("main").primary.conninfo


@pytest.mark.parametrize("cls", [LoadBalancer, AsyncLoadBalancer])
def test_password_is_hidden_in_load_balancer_repr(cls: type[Any]) -> None:
    lb = cls(primary=PRIMARY_URL, replicas=[REPLICA_URL, REPLICA_KV])
    text = repr(lb)
    assert SECRET not in text
    assert "db-primary.internal:5433/shop" in text
    assert "2 replicas" in text
    assert SECRET not in repr(lb.settings)
    assert all(SECRET not in repr(status) for status in lb.status())


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://app:{SECRET}@db.internal:5432/shop?bogus=1",
        f"postgresql://app:{SECRET}@[::1/shop",
        f"postgresql://app:{SECRET}%zz@db.internal/shop",
        f"postgresql://app:{SECRET}@db.internal:5432/shop?sslmode",
        f"host=db.internal password={SECRET} port",
        f"host=db.internal password='{SECRET}",
        f"host=db.internal password={SECRET} bogus=1",
        f"host=db.internal password={SECRET} port=99999",
        f"postgresql://app:{SECRET}@db.internal:0/shop",
        # a double quote in the password must not defeat the redaction of libpq's message
        f'postgresql://app:pre"{SECRET}@[::1/shop',
        f'postgresql://app:pre"{SECRET}%zz@db.internal/shop',
    ],
)
def test_malformed_dsn_error_does_not_show_the_password(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Dsn(text, setting="databases.main.primary")
    error = info.value
    assert error.setting == "databases.main.primary"
    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert all(SECRET not in str(arg) for arg in error.args)
    # the libpq error, whose text holds the password, is not chained for display
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    with pytest.raises(ConfigError) as info:
        Settings.from_dict(one_db(primary=text), environ=NO_ENV)
    assert SECRET not in str(info.value)
