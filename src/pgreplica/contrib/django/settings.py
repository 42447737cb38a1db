"""``DATABASES`` entries for read replicas, from the environment.

    DATABASES = {"default": {...}}
    DATABASES.update(replica_databases(DATABASES["default"]))

The replica aliases exist only when ``READ_REPLICA_ENABLED`` is true and
``READ_REPLICA_DATABASE_URL`` (one replica), ``READ_REPLICA_DATABASE_URLS`` (comma
separated) or ``PGREPLICA_CONFIG`` (a pgreplica TOML file: its first database's replicas)
is set; otherwise this returns ``{}`` and the whole integration is a no-op.

A bad value in one of these variables does not raise from ``settings.py`` (where it
would end in a long traceback): the aliases are left out, and the error, naming the
variable, is reported by the system check ``pgreplica.E002`` (``manage.py check``,
``runserver``, ``migrate``) and raised by the middleware when the app starts. Pass
``strict=True`` to raise at once instead.

Replicas can also be ordinary ``DATABASES`` entries, named in ``PGREPLICA["REPLICAS"]``
(see docs/django.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EnvOutcome:
    """What the last :func:`replica_databases` call (not strict) found: the error that
    left the aliases out, how many aliases it made, and whether replicas were switched
    on. The system checks and the middleware report it (``pgreplica.E002``, ``W003``)."""

    error: ConfigError | None
    aliases: int
    enabled: bool


LAST_OUTCOME: EnvOutcome | None = None


def enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    text = env.get("READ_REPLICA_ENABLED", "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError("READ_REPLICA_ENABLED", f"expected true or false, got {text!r}")


def replica_urls(env: Mapping[str, str] | None = None) -> list[str]:
    return [url for url, _ in _sourced_urls(env)]


def _sourced_urls(env: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """Each replica URL with the variable it came from (``READ_REPLICA_DATABASE_URLS``
    item 2 is ``READ_REPLICA_DATABASE_URLS[2]``), for errors that name what was set."""
    env = os.environ if env is None else env
    many = env.get("READ_REPLICA_DATABASE_URLS", "")
    items = [u.strip() for u in many.split(",")]
    urls = [
        (
            url,
            f"READ_REPLICA_DATABASE_URLS[{i}]" if len(items) > 1 else "READ_REPLICA_DATABASE_URLS",
        )
        for i, url in enumerate(items, 1)
        if url
    ]
    one = env.get("READ_REPLICA_DATABASE_URL", "").strip()
    if one and one not in [u for u, _ in urls]:
        urls.insert(0, (one, "READ_REPLICA_DATABASE_URL"))
    if not urls and env.get("PGREPLICA_CONFIG"):
        # The replicas of the first database of a pgreplica TOML file.
        from pgreplica.config import Settings

        settings = Settings.from_toml(env["PGREPLICA_CONFIG"], environ=env)
        urls = [(dsn.conninfo, "PGREPLICA_CONFIG") for dsn in settings.database(None).replicas]
    return urls


def replica_databases(
    default: Mapping[str, Any], env: Mapping[str, str] | None = None, *, strict: bool = False
) -> dict[str, dict[str, Any]]:
    """Django database settings for each configured replica, copied from ``default``
    (engine, options, timeouts) with the replica's connection parameters.

    A bad variable raises :class:`~pgreplica.ConfigError` with ``strict``; otherwise it
    is kept in :data:`LAST_OUTCOME` for the system check ``pgreplica.E002`` and the
    middleware, and no replica alias is returned."""
    global LAST_OUTCOME
    if strict:
        return _replica_databases(default, env)
    try:
        databases = _replica_databases(default, env)
    except ConfigError as exc:
        LAST_OUTCOME = EnvOutcome(exc, 0, False)
        return {}
    LAST_OUTCOME = EnvOutcome(None, len(databases), enabled(env))
    return databases


def _replica_databases(
    default: Mapping[str, Any], env: Mapping[str, str] | None
) -> dict[str, dict[str, Any]]:
    if not enabled(env):
        return {}
    databases: dict[str, dict[str, Any]] = {}
    urls = _sourced_urls(env)
    for alias, (url, variable) in zip(replica_aliases(len(urls)), urls, strict=True):
        Dsn(url, setting=variable)  # validates; errors hide the password
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
