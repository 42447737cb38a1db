"""Immutable settings, loaded from a dict, a TOML file or the environment.

A configuration names one or more logical databases. Each has a primary and a list of
replicas; a database may reuse another database's primary (``primary = "main"``) while
keeping its own replica set, as GitLab's ``ci`` database reuses ``main``'s primary.

The kill switch ``PGREPLICA_ENABLED=false`` is read by every loader: whatever the file
says, everything then goes to the primary and no replica connection is opened.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgreplica._extras import require
from pgreplica.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["DatabaseConfig", "Dsn", "Settings"]

ENV_PREFIX = "PGREPLICA_"
_NAME_RE = re.compile(r"\A[A-Za-z0-9_]{1,63}\Z")
_DURATION_RE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(ms|s|min)?\s*\Z")
_SIZE_RE = re.compile(r"\A\s*(\d+)\s*(B|kB|KB|KiB|MB|MiB|GB|GiB)?\s*\Z")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "kB": 1024,
    "KB": 1024,
    "KiB": 1024,
    "MB": 1024**2,
    "MiB": 1024**2,
    "GB": 1024**3,
    "GiB": 1024**3,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Dsn:
    """A connection string whose password never shows: not in repr, str or labels.

    ``conninfo`` is the only attribute that holds the secret; hand it to libpq and to
    nothing else.
    """

    __slots__ = ("conninfo", "label", "redacted")

    conninfo: str
    label: str
    redacted: str

    def __init__(self, text: str, *, setting: str = "dsn") -> None:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(setting, "expected a connection string (URL or key=value)")
        if "\x00" in text:  # libpq would stop reading there, dropping what follows
            raise ConfigError(setting, "malformed connection string (NUL character)")
        try:
            params = conninfo_to_dict(text)
        except UnicodeEncodeError:  # lone surrogates: an environment that was not UTF-8
            raise ConfigError(setting, "malformed connection string (not UTF-8)") from None
        except psycopg.ProgrammingError as exc:
            # libpq quotes pieces of the text, which may hold the password: drop them.
            first_line = (str(exc).strip().splitlines() or ["invalid"])[0]
            reason = first_line.split('"', 1)[0].strip().rstrip(":") or "invalid"
            raise ConfigError(setting, f"malformed connection string ({reason})") from None
        host = str(params.get("host") or params.get("hostaddr") or "localhost")
        port = str(params.get("port") or "5432")
        if not all(_port_number(p) for p in port.split(",")):
            raise ConfigError(setting, "port must be a number between 1 and 65535")
        dbname = str(params.get("dbname") or params.get("user") or "")
        user = str(params.get("user") or "")
        object.__setattr__(self, "conninfo", make_conninfo(text))
        object.__setattr__(self, "label", f"{host}:{port}/{dbname}")
        secret = ":***" if params.get("password") else ""
        userpart = f"{user}{secret}@" if user or secret else ""
        object.__setattr__(self, "redacted", f"postgresql://{userpart}{host}:{port}/{dbname}")

    def hosts(self, setting: str = "dsn") -> tuple[Dsn, ...]:
        """One connection string per host of a libpq multi-host string
        (``host=a,b port=5432,5433``, ``postgresql://a:5432,b:5433/db``); just this one
        for a single host."""
        params = conninfo_to_dict(self.conninfo)
        hosts = str(params.get("host") or "").split(",")
        addrs = str(params.get("hostaddr") or "").split(",")
        if len(hosts) < 2 and len(addrs) < 2:
            return (self,)
        count = max(len(hosts), len(addrs))
        ports = str(params.get("port") or "").split(",")
        if len(ports) not in (1, count):
            raise ConfigError(setting, f"{count} hosts but {len(ports)} ports")
        split = []
        for i in range(count):
            one = {k: v for k, v in params.items() if k not in ("target_session_attrs",)}
            if params.get("host"):
                one["host"] = hosts[i] if len(hosts) == count else hosts[0]
            if params.get("hostaddr"):
                one["hostaddr"] = addrs[i] if len(addrs) == count else addrs[0]
            if params.get("port"):
                one["port"] = ports[i] if len(ports) == count else ports[0]
            split.append(Dsn(make_conninfo("", **one), setting=setting))
        return tuple(split)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Dsn is immutable")

    def __repr__(self) -> str:
        return f"Dsn({self.redacted!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dsn) and other.conninfo == self.conninfo

    def __hash__(self) -> int:
        return hash(self.conninfo)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Dsn, (self.conninfo,))


@dataclass(frozen=True)
class DatabaseConfig:
    """One logical database: its primary and its own replica set."""

    name: str
    primary: Dsn
    replicas: tuple[Dsn, ...] = ()
    primary_from: str | None = None
    """Name of the database whose primary (and pool) this one reuses, if any."""
    rollout: float | None = None
    """Percentage of this database's read units that use its own replicas; the others
    read from the replicas of :attr:`primary_from` (``None``: all use its own, 0: none).
    ``PGREPLICA_ROLLOUT_<NAME>``, read at each decision, overrides it."""
    replicas_dns: str | None = None
    """A DNS name whose A or SRV records (a name starting with ``_``) are the replicas,
    refreshed while running (:mod:`pgreplica.dns`); on top of :attr:`replicas`."""
    patroni: tuple[str, ...] = ()
    """Patroni REST API addresses (``http://db1:8008``): with :attr:`discover`, the
    members of the Patroni cluster are the hosts (``GET /cluster``), followed while
    running; roles are still found by probing the servers."""
    discover: bool = False
    """The hosts have no fixed roles (``hosts = [...]`` or a multi-host DSN): the
    prober finds the primary among :attr:`primary` and :attr:`replicas`, and follows
    failovers."""


@dataclass(frozen=True)
class Settings:
    """All settings of a load balancer. Durations are in seconds, sizes in bytes."""

    databases: Mapping[str, DatabaseConfig] = field(default_factory=dict)
    enabled: bool = True
    max_lag_bytes: int = 8 * 1024 * 1024
    max_lag_seconds: float = 30.0
    probe_interval: float = 0.1
    probe_timeout: float = 0.5
    probe_statement_timeout: float = 0.1
    connect_timeout: float = 2.0
    max_wait: float = 0.005
    """How long a read whose context must see a write waits for a replica to replay it
    before using the primary. The wait is adaptive: only replicas expected to catch up
    that soon (their recent replay delay) are polled, and with none the read goes to
    the primary at once. 0: ask each replica once, never wait."""
    backoff_initial: float = 0.2
    backoff_max: float = 1.0
    pool_min_size: int = 1
    pool_max_size: int = 10
    application_name: str = "pgreplica"
    read_only_functions: tuple[str, ...] = ()
    """Functions that may run on a replica whatever their declared volatility."""
    write_functions: tuple[str, ...] = ()
    """Functions whose calls always go to the primary."""
    sql_comments: bool = True
    """End routed statements with a sqlcommenter comment naming ``db_config_name`` and
    the context's tags (:func:`pgreplica.tags`)."""
    metrics: bool = False
    """Prometheus metrics labelled by ``db_config_name`` (:mod:`pgreplica.metrics`)."""
    opentelemetry: bool = False
    """Routing attributes on the active OpenTelemetry span (:mod:`pgreplica.otel`)."""
    transaction_pooling: bool = False
    """The servers are reached through a pooler in transaction mode (PgBouncer
    ``pool_mode = transaction``): pooled connections never prepare statements, and a
    routing connection refuses session state (``SET``, temporary objects, ``LISTEN``,
    ``PREPARE``, cursors ``WITH HOLD``), which would outlive the transaction on a server
    connection other clients get next."""
    dns_servers: tuple[str, ...] = ()
    """Name servers (``"10.0.0.2"``, ``"127.0.0.1:8600"``) for ``replicas_dns``; empty:
    the system's resolver."""
    patroni_interval: float = 10.0
    """Time between two reads of a Patroni cluster's members (``patroni``)."""
    dns_interval: float = 30.0
    """Shortest time between two lookups of a ``replicas_dns`` name (a record's TTL
    lengthens it), with a jitter of +-10 %."""
    fallback_limit: int = 0
    """Protects the primary when replicas fail: at most this many reads of a database
    on its primary at once because no replica could serve them (behind, down, a token
    no replica has); one more waits up to :attr:`fallback_wait` for one to finish, then
    fails with :class:`~pgreplica.HostUnavailable` (reason ``fallback_limit``). Reads in
    ``lb.primary()`` and databases without replicas do not count. 0: no limit."""
    fallback_wait: float = 0.05
    """How long a read over :attr:`fallback_limit` waits for a place on the primary."""

    def __post_init__(self) -> None:
        if not self.databases:
            raise ConfigError("databases", "at least one database must be configured")
        for name in ("max_lag_bytes", "pool_min_size", "fallback_limit"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_int("pool_max_size", self.pool_max_size, minimum=1)
        if self.pool_max_size < self.pool_min_size:
            raise ConfigError("pool_max_size", "must be at least pool_min_size")
        for name in ("max_lag_seconds", "max_wait", "fallback_wait"):
            _check_number(name, getattr(self, name), positive=False)
        for name in (
            "probe_interval",
            "probe_timeout",
            "probe_statement_timeout",
            "connect_timeout",
            "backoff_initial",
            "backoff_max",
            "dns_interval",
            "patroni_interval",
        ):
            _check_number(name, getattr(self, name), positive=True)
        if not isinstance(self.enabled, bool):
            raise ConfigError("enabled", f"expected true or false, got {self.enabled!r}")

    @property
    def default_database(self) -> str:
        return next(iter(self.databases))

    def database(self, name: str | None) -> DatabaseConfig:
        """The named database (default: the first configured)."""
        if name is None:
            name = self.default_database
        try:
            return self.databases[name]
        except KeyError:
            known = ", ".join(self.databases)
            close = _closest(name, self.databases)
            hint = f": did you mean {close!r}?" if close else ""
            raise ConfigError(
                "database", f"no database {name!r} (configured: {known}){hint}"
            ) from None

    # -- loaders --------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from a mapping shaped like the TOML file.

        ``environ`` (default ``os.environ``) supplies the kill switch ``PGREPLICA_ENABLED``
        and ``PGREPLICA_<SETTING>`` overrides; pass ``{}`` to ignore the environment.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"expected a mapping, got {type(data).__name__}")
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise _unknown_setting(str(key), str(key), known)
            if key != "databases":
                values[key] = _coerce(key, value)
        values.update(_env_overrides(env, known))
        values["databases"] = _parse_databases(data.get("databases"), env)
        return cls(**values)

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
    ) -> Settings:
        file = Path(path)
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {file}") from None
        except OSError as exc:
            raise ConfigError("config", f"cannot read {file}: {exc.strerror or exc}") from None
        except ValueError as exc:  # TOMLDecodeError, not UTF-8, an integer over 4300 digits
            raise ConfigError("config", f"{file} is not valid TOML ({exc})") from None
        except RecursionError:
            raise ConfigError("config", f"{file} is nested too deeply") from None
        return cls.from_dict(data, environ=environ)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """``PGREPLICA_CONFIG`` (a TOML file), or ``PGREPLICA_PRIMARY_URL`` with
        ``PGREPLICA_REPLICA_URLS`` (comma separated) for a single database ``main``."""
        env = os.environ if environ is None else environ
        path = env.get(ENV_PREFIX + "CONFIG")
        if path:
            return cls.from_toml(path, environ=env)
        primary = env.get(ENV_PREFIX + "PRIMARY_URL")
        if not primary:
            raise ConfigError(
                "PGREPLICA_PRIMARY_URL", "not set (set it, or PGREPLICA_CONFIG to a TOML file)"
            )
        replicas = [u.strip() for u in env.get(ENV_PREFIX + "REPLICA_URLS", "").split(",")]
        db = {"primary": primary, "replicas": [u for u in replicas if u]}
        return cls.from_dict({"databases": {"main": db}}, environ=env)

    def with_options(self, **changes: Any) -> Settings:
        """A copy with some settings changed (validated like the original)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            key = sorted(unknown)[0]
            raise _unknown_setting(key, key, known)
        return replace(self, **{k: _coerce(k, v) for k, v in changes.items()})


_DATABASE_KEYS = frozenset(("primary", "replicas", "rollout", "hosts", "replicas_dns", "patroni"))
"""The settings of one ``[databases.NAME]`` table."""


def _closest(key: str, known: Iterable[str]) -> str | None:
    """The known name that ``key`` is most likely a typo of, if any."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return close[0] if close else None


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``key``, or ``""``."""
    close = _closest(key, known)
    return f" (did you mean {close!r}?)" if close else ""


def _unknown_setting(setting: str, key: str, known: Iterable[str]) -> ConfigError:
    """The error for ``key``, not one of ``known``: the closest known setting, a
    setting of the other level (global or per database), or the list of known ones."""
    known = sorted(known)
    hint = _did_you_mean(key, known)
    if hint:
        return ConfigError(setting, f"unknown setting {key!r}{hint}")
    if "databases" in known:  # the top level
        if key in _DATABASE_KEYS:
            return ConfigError(
                setting,
                f"unknown setting {key!r} here: it belongs in a database's table,"
                " e.g. under [databases.main]",
            )
        close = _closest(key, _DATABASE_KEYS)
        if close:
            return ConfigError(
                setting, f"unknown setting {key!r} (did you mean {close!r} under [databases.main]?)"
            )
    else:
        top_level = {f.name for f in fields(Settings)} - {"databases"}
        if key in top_level:
            return ConfigError(
                setting,
                f"unknown setting {key!r} here: it applies to every database, so it goes"
                " at the top of the file, before the [databases.*] tables",
            )
    return ConfigError(setting, f"unknown setting {key!r} (known: {', '.join(known)})")


def _parse_databases(raw: Any, env: Mapping[str, str]) -> dict[str, DatabaseConfig]:
    if raw is None:
        raise ConfigError("databases", "missing: add [databases.main] with primary and replicas")
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("databases", "expected a table of databases, e.g. [databases.main]")
    for name in raw:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"databases.{name}", "name must be letters, digits or _")
    parsed: dict[str, DatabaseConfig] = {}
    references: dict[str, tuple[str, tuple[Dsn, ...], float | None, str]] = {}
    dns_names: dict[str, str | None] = {}
    for name, entry in raw.items():
        where = f"databases.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(where, "expected a table with primary and replicas")
        unknown = set(entry) - _DATABASE_KEYS
        if unknown:
            key = str(sorted(unknown, key=str)[0])
            raise _unknown_setting(f"{where}.{key}", key, _DATABASE_KEYS)
        if (
            "patroni" in entry
            and "hosts" not in entry
            and not _multi_host(entry.get("primary"), f"{where}.primary")
        ):
            raise ConfigError(f"{where}.patroni", "needs hosts (roles found by probing)")
        reused = env.get(f"{ENV_PREFIX}REUSE_PRIMARY_{name.upper()}", "").strip()
        if not reused and (
            "hosts" in entry or _multi_host(entry.get("primary"), f"{where}.primary")
        ):
            parsed[name] = _discovered(name, entry, where)
            continue
        primary = entry.get("primary")
        reuse_setting = f"{ENV_PREFIX}REUSE_PRIMARY_{name.upper()}"
        reuse = env.get(reuse_setting, "").strip()
        setting = reuse_setting if reuse else f"{where}.primary"
        if reuse:
            primary = reuse  # as GitLab's GITLAB_LOAD_BALANCING_REUSE_PRIMARY_<name>
            if not _NAME_RE.match(reuse):
                raise ConfigError(reuse_setting, "expected the name of a configured database")
        if not isinstance(primary, str) or not primary:
            raise ConfigError(f"{where}.primary", "missing: a connection string or a database")
        replicas_raw = entry.get("replicas", [])
        if not isinstance(replicas_raw, (list, tuple)):
            raise ConfigError(f"{where}.replicas", "expected a list of connection strings")
        replicas = tuple(
            Dsn(r, setting=f"{where}.replicas[{i}]") for i, r in enumerate(replicas_raw)
        )
        rollout = parse_rollout(f"{where}.rollout", entry.get("rollout"))
        if _NAME_RE.match(primary):
            references[name] = (primary, replicas, rollout, setting)
            dns_names[name] = _dns_name(entry, where)
        else:
            if rollout is not None:
                raise ConfigError(
                    f"{where}.rollout",
                    "a rollout moves reads from another database's replicas to this one's:"
                    ' it needs a shared primary (primary = "main")',
                )
            parsed[name] = DatabaseConfig(
                name,
                Dsn(primary, setting=f"{where}.primary"),
                replicas,
                replicas_dns=_dns_name(entry, where),
            )
    for name, (target, replicas, rollout, setting) in references.items():
        if target == name:
            raise ConfigError(setting, "a database cannot reuse its own primary")
        if target in references:
            raise ConfigError(setting, f"reuses {target!r}, which itself reuses another primary")
        if target not in parsed:
            raise ConfigError(setting, f"reuses database {target!r}, which is not configured")
        parsed[name] = DatabaseConfig(
            name, parsed[target].primary, replicas, target, rollout, replicas_dns=dns_names[name]
        )
    return {name: parsed[name] for name in raw}


def _dns_name(entry: Mapping[str, Any], where: str) -> str | None:
    name = entry.get("replicas_dns")
    if name is None:
        return None
    if (
        not isinstance(name, str)
        or len(name) > 253
        or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name)
    ):
        raise ConfigError(f"{where}.replicas_dns", f"expected a DNS name, got {name!r}")
    # The lookups run in the prober: a missing dnspython is told now, not there.
    require("dns.asyncresolver", extra="dns", feature=f"{where}.replicas_dns", setting=True)
    return name


def _multi_host(primary: Any, setting: str) -> bool:
    if not isinstance(primary, str) or not primary or _NAME_RE.match(primary):
        return False
    return len(Dsn(primary, setting=setting).hosts(setting)) > 1


def _discovered(name: str, entry: Mapping[str, Any], where: str) -> DatabaseConfig:
    """A database whose hosts have no fixed roles: ``hosts = [...]`` (each entry may be
    a multi-host string), or a multi-host ``primary`` with no ``replicas``."""
    if "replicas_dns" in entry:
        raise ConfigError(
            f"{where}.replicas_dns", "replicas from DNS need a fixed primary, not hosts"
        )
    if "hosts" in entry:
        if "primary" in entry or "replicas" in entry:
            raise ConfigError(
                f"{where}.hosts", "either hosts (roles found by probing) or primary and replicas"
            )
        raw = entry["hosts"]
        setting = f"{where}.hosts"
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise ConfigError(setting, "expected a non-empty list of connection strings")
    else:
        if entry.get("replicas"):
            raise ConfigError(
                f"{where}.replicas",
                "a multi-host primary finds its replicas by probing: list every host in it",
            )
        raw = [entry["primary"]]
        setting = f"{where}.primary"
    hosts: list[Dsn] = []
    for i, text in enumerate(raw):
        for dsn in Dsn(text, setting=f"{setting}[{i}]").hosts(f"{setting}[{i}]"):
            if dsn in hosts:
                raise ConfigError(f"{setting}[{i}]", f"{dsn.label} is listed twice")
            hosts.append(dsn)
    if entry.get("rollout") is not None:
        raise ConfigError(f"{where}.rollout", 'a rollout needs a shared primary (primary = "main")')
    patroni = _patroni_urls(entry.get("patroni"), f"{where}.patroni")
    return DatabaseConfig(name, hosts[0], tuple(hosts[1:]), discover=True, patroni=patroni)


def _patroni_urls(value: Any, setting: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(setting, "expected a list of Patroni REST API URLs")
    urls = []
    for item in items:
        if isinstance(item, str) and re.match(r"\s*(https?://)?[^/\s]*@", item):
            raise ConfigError(setting, "no credentials in a Patroni URL: GET /cluster needs none")
        if not isinstance(item, str) or not re.fullmatch(r"https?://[^/\s]+/?", item):
            shown = re.sub(r"[^/\s@]*@", "***@", str(item))  # user:password@
            raise ConfigError(setting, f"expected http://host:port, got {shown[:60]!r}")
        urls.append(item.rstrip("/"))
    return tuple(urls)


def parse_rollout(setting: str, value: Any) -> float | None:
    """A rollout percentage: a number from 0 to 100 (``"1.5"``, ``"0.01%"``), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(setting, f"expected a percentage from 0 to 100, got {value!r}")
    text = str(value).strip().removesuffix("%")
    try:
        percent = float(text)
    except ValueError:
        raise ConfigError(
            setting, f"expected a percentage from 0 to 100, got {str(value)[:40]!r}"
        ) from None
    if not 0.0 <= percent <= 100.0 or percent != percent:
        raise ConfigError(setting, f"expected a percentage from 0 to 100, got {percent:g}")
    return percent


def _env_overrides(env: Mapping[str, str], known: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in known - {"databases"}:
        text = env.get(ENV_PREFIX + key.upper())
        if text is not None:
            values[key] = _coerce(key, text, setting=ENV_PREFIX + key.upper())
    return values


_DEFAULTS = {f.name: f.default for f in fields(Settings) if f.name != "databases"}


def _coerce(key: str, value: Any, *, setting: str | None = None) -> Any:
    """Turn TOML or environment values into the setting's type ("100ms", "8MiB", "false")."""
    setting = setting or key
    default = _DEFAULTS[key]
    if key == "dns_servers":
        return _dns_servers(setting, value)
    if isinstance(default, tuple):
        return _function_names(setting, value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(setting, f"expected true or false, got {value!r}")
    if isinstance(value, str) and isinstance(default, (int, float)):
        if key == "max_lag_bytes":
            return _parse_size(setting, value)
        if isinstance(default, float):
            return _parse_duration(setting, value)
        try:
            return int(value)
        except ValueError:
            raise ConfigError(setting, f"expected an integer, got {value!r}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(setting, "must be a finite number of seconds") from None
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(setting, f"expected text, got {type(value).__name__}")
    return value


def _dns_servers(setting: str, value: Any) -> tuple[str, ...]:
    """Name servers as ``ip`` or ``ip:port`` (a list, or one comma-separated string)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(setting, "expected a list of name server addresses")
    servers = tuple(i.strip() for i in items if i.strip())
    for server in servers:
        address, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        if port and not _port_number(port):
            raise ConfigError(setting, f"bad port in {server!r}")
        if not address or not re.fullmatch(r"[0-9A-Fa-f.:]+", address):
            raise ConfigError(setting, f"expected an IP address, got {server!r}")
    return servers


def _port_number(text: str) -> bool:
    """``text`` is a TCP port: ASCII digits, 1 to 65535 (``"²".isdigit()`` is true too)."""
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def _function_names(setting: str, value: Any) -> tuple[str, ...]:
    """A list of function names (or one comma-separated string, from the environment)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(setting, "expected a list of function names")
    names = tuple(i.strip().lower() for i in items if i.strip())
    for name in names:
        if not re.fullmatch(r"[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)?", name):
            raise ConfigError(setting, f"not a function name: {name!r}")
    return names


def _parse_duration(setting: str, text: str) -> float:
    match = _DURATION_RE.match(text)
    if match is None:
        raise ConfigError(setting, f"expected a duration like 0.5, '100ms' or '2s', got {text!r}")
    number = float(match.group(1))
    unit = match.group(2) or "s"
    return number / 1000 if unit == "ms" else number * 60 if unit == "min" else number


def _parse_size(setting: str, text: str) -> int:
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(setting, f"expected a size like 8388608 or '8MiB', got {text!r}")
    try:
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    except ValueError:  # over the 4300 digits int() accepts
        raise ConfigError(setting, f"size too large: {text[:40]!r}") from None


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"expected a number of seconds, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float
        raise ConfigError(name, "must be a finite number of seconds, got too large a one") from None
    if not finite:
        raise ConfigError(name, f"must be a finite number of seconds, got {value}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(
            name, f"must be {'positive' if positive else 'zero or more'}, got {value}"
        )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
