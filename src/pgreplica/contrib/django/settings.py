"""``DATABASES`` entries for read replicas, from the environment.

    DATABASES = {"default": {...}}
    DATABASES.update(replica_databases(DATABASES["default"]))

The replica aliases exist only when ``READ_REPLICA_ENABLED`` is true and
``READ_REPLICA_DATABASE_URL`` (one replica), ``READ_REPLICA_DATABASE_URLS`` (comma
separated) or ``PGREPLICA_CONFIG`` (a pgreplica TOML file: its first database's replicas)
is set; otherwise this returns ``{}`` and the whole integration is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from pgreplica.config import Dsn
from pgreplica.errors import ConfigError

REPLICA_ALIAS = "read_replica"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_DJANGO_KEYS = {
    "dbname": "NAME",
    "user": "USER",
    "password": "PASSWORD",
    "host": "HOST",
    "port": "PORT",
}


def replica_aliases(count: int) -> list[str]:
    """``read_replica``, ``read_replica_2``, ``read_replica_3``, ..."""
    return [REPLICA_ALIAS if i == 0 else f"{REPLICA_ALIAS}_{i + 1}" for i in range(count)]


def enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    text = env.get("READ_REPLICA_ENABLED", "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError("READ_REPLICA_ENABLED", f"expected true or false, got {text!r}")


def replica_urls(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    many = env.get("READ_REPLICA_DATABASE_URLS", "")
    urls = [u.strip() for u in many.split(",") if u.strip()]
    one = env.get("READ_REPLICA_DATABASE_URL", "").strip()
    if one and one not in urls:
        urls.insert(0, one)
    if not urls and env.get("PGREPLICA_CONFIG"):
        # The replicas of the first database of a pgreplica TOML file.
        from pgreplica.config import Settings

        settings = Settings.from_toml(env["PGREPLICA_CONFIG"], environ=env)
        urls = [dsn.conninfo for dsn in settings.database(None).replicas]
    return urls


def replica_databases(
    default: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Django database settings for each configured replica, copied from ``default``
    (engine, options, timeouts) with the replica's connection parameters."""
    if not enabled(env):
        return {}
    databases: dict[str, dict[str, Any]] = {}
    urls = replica_urls(env)
    for alias, url in zip(replica_aliases(len(urls)), urls, strict=True):
        Dsn(url, setting="READ_REPLICA_DATABASE_URL")  # validates; errors hide the password
        params = conninfo_to_dict(url)
        entry = {k: v for k, v in default.items() if k not in ("TEST", *_DJANGO_KEYS.values())}
        options = dict(entry.get("OPTIONS") or {})
        for key, value in params.items():
            if key in _DJANGO_KEYS:
                entry[_DJANGO_KEYS[key]] = str(value)
            else:
                options[key] = value
        entry.setdefault("NAME", default.get("NAME"))
        entry["OPTIONS"] = options
        # Django's own test runner: the replica alias reads the test database.
        entry["TEST"] = {"MIRROR": "default"}
        databases[alias] = entry
    return databases


def conninfo(settings: Mapping[str, Any]) -> str:
    """A libpq connection string for one Django database entry."""
    from psycopg.conninfo import make_conninfo

    params = {k: settings.get(v) for k, v in _DJANGO_KEYS.items() if settings.get(v)}
    libpq = _libpq_keywords()
    options = {k: v for k, v in (settings.get("OPTIONS") or {}).items() if k in libpq}
    return make_conninfo("", **params, **options)


def _libpq_keywords() -> frozenset[str]:
    from psycopg import pq

    return frozenset(
        d.keyword.decode() for d in pq.Conninfo.get_defaults() if d.keyword is not None
    )
