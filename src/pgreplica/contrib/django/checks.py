"""System checks of the Django integration (``manage.py check``, ``runserver``,
``migrate``, ``test``): every setting mistake that would otherwise pass silently is an
error or a warning with an id and a hint.

- ``pgreplica.E001``: ``PGREPLICA`` is not a dict, or has an unknown key.
- ``pgreplica.E002``: a bad ``READ_REPLICA_*`` variable or ``PGREPLICA_CONFIG`` file.
- ``pgreplica.E003``: ``REPLICA_APPS`` is not a list or set of app labels.
- ``pgreplica.E004``: ``STICKING`` is not ``"memory"``, a Redis URL or a ``Sticking``.
- ``pgreplica.E005``: ``REPLICAS`` does not list other ``DATABASES`` aliases.
- ``pgreplica.E006``: ``DATABASES`` (logical databases) is malformed.
- ``pgreplica.E007``: ``SETTINGS`` (the core's settings) has a bad key or value.
- ``pgreplica.E008``: ``PRIMARY_ALIAS``, ``TOKEN_COOKIE``, ``TOKEN_HEADER``,
  ``SIGNING_KEY`` or ``USAGE_LOG`` has the wrong type.
- ``pgreplica.W001``: ``ATOMIC_REQUESTS`` on the primary: routed views read the primary.
- ``pgreplica.W002``: a ``REPLICAS`` alias has no ``TEST: {"MIRROR": ...}``.
- ``pgreplica.W003``: ``READ_REPLICA_ENABLED`` is true but no replica is configured.
- ``pgreplica.W004``: ``REPLICA_APPS`` names an app that is not installed.
- ``pgreplica.W005``: replicas, but ``ReadReplicaRouter`` is not in ``DATABASE_ROUTERS``.
- ``pgreplica.W006``: ``PgReplicaMiddleware`` is missing, or before
  ``AuthenticationMiddleware`` while ``STICKING`` is set.

They are registered when ``pgreplica.contrib.django`` is imported (``settings.py``
imports it for ``replica_databases``), so they run without an ``INSTALLED_APPS`` entry.
The middleware runs them once when the app starts, raises ``ImproperlyConfigured`` on
errors and logs warnings: the same mistakes stop a gunicorn or uvicorn worker too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pgreplica.errors import ConfigError

KNOWN_OPTIONS = {
    "DATABASES": "logical databases that share the primary (docs/multiple-databases.md)",
    "PRIMARY_ALIAS": "the DATABASES alias of the primary (default 'default')",
    "REPLICAS": "DATABASES aliases that are replicas of the primary",
    "REPLICA_APPS": "the app labels whose models may be read from a replica",
    "SETTINGS": "pgreplica's own settings (probe_interval, max_lag, ...)",
    "SIGNING_KEY": "the key that signs tokens (default SECRET_KEY)",
    "STICKING": "'memory' or a redis:// URL: read-your-writes by user id",
    "TOKEN_COOKIE": "the token cookie's name",
    "TOKEN_HEADER": "the token header's name",
    "USAGE_LOG": "log a db_usage record per request",
}
ROUTER = "pgreplica.contrib.django.ReadReplicaRouter"
MIDDLEWARE = "pgreplica.contrib.django.PgReplicaMiddleware"
AUTHENTICATION = "django.contrib.auth.middleware.AuthenticationMiddleware"


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    if not close and isinstance(name, str):
        close = difflib.get_close_matches(name.upper(), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The system check: every problem of the integration's settings."""
    from django.conf import settings

    return _Checker(settings).run()


class _Checker:
    def __init__(self, settings: Any) -> None:
        from django.core import checks

        self.checks = checks
        self.settings = settings
        self.messages: list[Any] = []

    def error(self, id: int, msg: str, hint: str | None = None) -> None:
        self.messages.append(self.checks.Error(msg, hint=hint, id=f"pgreplica.E{id:03d}"))

    def warning(self, id: int, msg: str, hint: str | None = None) -> None:
        self.messages.append(self.checks.Warning(msg, hint=hint, id=f"pgreplica.W{id:03d}"))

    def run(self) -> list[Any]:
        options = getattr(self.settings, "PGREPLICA", None)
        if options is None:
            options = {}
        if not isinstance(options, dict):
            self.error(1, f"PGREPLICA must be a dict, not {type(options).__name__}.")
            return self.messages
        databases = dict(getattr(self.settings, "DATABASES", {}) or {})
        for key in options:
            if key not in KNOWN_OPTIONS:
                known = ", ".join(sorted(KNOWN_OPTIONS))
                self.error(
                    1,
                    f"PGREPLICA has an unknown key {key!r}{did_you_mean(key, KNOWN_OPTIONS)}.",
                    hint=f"The keys are {known} (docs/django.md).",
                )
        self.environment(options)
        self.types(options, databases)
        self.replica_apps(options.get("REPLICA_APPS"))
        self.sticking(options.get("STICKING"))
        self.replicas(options, databases)
        self.logical(options, databases)
        self.core_settings(options.get("SETTINGS"))
        self.wiring(options, databases)
        return self.messages

    def environment(self, options: dict[str, Any]) -> None:
        from pgreplica.contrib.django import settings as env_settings

        outcome = env_settings.LAST_OUTCOME
        if outcome is None:  # settings.py did not call replica_databases(): the process's
            try:
                created = env_settings.replica_databases({}, strict=True)
                outcome = env_settings.EnvOutcome(None, len(created), env_settings.enabled())
            except ConfigError as bad:
                outcome = env_settings.EnvOutcome(bad, 0, False)
        if outcome.error is not None:
            self.error(
                2,
                f"{outcome.error}: no replica alias was created.",
                hint="Fix the variable, or unset READ_REPLICA_ENABLED to run without replicas.",
            )
        elif outcome.enabled and not outcome.aliases and not options.get("REPLICAS"):
            self.warning(
                3,
                "READ_REPLICA_ENABLED is true but no replica is configured: every read "
                "goes to the primary.",
                hint="Set READ_REPLICA_DATABASE_URL (one replica) or "
                "READ_REPLICA_DATABASE_URLS (comma separated), or list DATABASES aliases "
                'in PGREPLICA["REPLICAS"].',
            )

    def types(self, options: dict[str, Any], databases: dict[str, Any]) -> None:
        primary = options.get("PRIMARY_ALIAS", "default")
        if not isinstance(primary, str) or primary not in databases:
            self.error(
                8,
                f'PGREPLICA["PRIMARY_ALIAS"] is {primary!r}, which is not a DATABASES alias.',
                hint=f"The aliases are {sorted(databases)}.",
            )
        for key in ("TOKEN_COOKIE", "TOKEN_HEADER"):
            value = options.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                self.error(8, f'PGREPLICA["{key}"] must be a non-empty string, not {value!r}.')
        key_value = options.get("SIGNING_KEY")
        if key_value is not None and (not isinstance(key_value, (str, bytes)) or not key_value):
            # the type only: never the key itself
            kind = "empty" if isinstance(key_value, (str, bytes)) else type(key_value).__name__
            self.error(8, f'PGREPLICA["SIGNING_KEY"] must be a non-empty str or bytes, not {kind}.')
        usage = options.get("USAGE_LOG")
        if usage is not None and not isinstance(usage, bool):
            self.error(8, f'PGREPLICA["USAGE_LOG"] must be True or False, not {usage!r}.')

    def replica_apps(self, apps: Any) -> None:
        if apps is None:
            return
        if (
            isinstance(apps, (str, bytes))
            or not isinstance(apps, Iterable)
            or iter(apps) is apps  # a generator: read once, by whoever reads it first
        ):
            shown = repr(apps) if isinstance(apps, (str, bytes)) else type(apps).__name__
            self.error(
                3,
                f'PGREPLICA["REPLICA_APPS"] must be a list or set of app labels, not '
                f"{shown}: no model would be read from a replica.",
                hint=f"Write {{{apps!r}}}." if isinstance(apps, str) else None,
            )
            return
        from django.apps import apps as registry

        if not registry.ready:
            return
        labels = {config.label for config in registry.get_app_configs()}
        for label in sorted(a for a in apps if a not in labels):
            self.warning(
                4,
                f'PGREPLICA["REPLICA_APPS"] names {label!r}, which is not an installed app '
                f"label{did_you_mean(label, labels)}.",
                hint="REPLICA_APPS takes app labels (the last part of the app's module).",
            )

    def sticking(self, spec: Any) -> None:
        if spec is None:
            return
        from pgreplica.sticking import AsyncSticking

        if isinstance(spec, str):
            if spec == "memory" or spec.startswith(("redis://", "rediss://", "unix://")):
                return
            # never the text itself: a malformed URL may hold a password
            scheme = spec.split("://", 1)[0][:20] if "://" in spec else None
            shown = f"{scheme}://..." if scheme else f"a string of {len(spec)} characters"
        elif isinstance(spec, AsyncSticking):
            shown = "an AsyncSticking (the Django middleware is synchronous)"
        elif callable(getattr(spec, "adopt", None)) and callable(getattr(spec, "stick", None)):
            return
        else:
            shown = f"a {type(spec).__name__}"
        self.error(
            4,
            f'PGREPLICA["STICKING"] is {shown}: expected "memory", a redis:// URL or a '
            "pgreplica.sticking.Sticking.",
            hint='Use "memory" for one process, a Redis URL for several.',
        )

    def replicas(self, options: dict[str, Any], databases: dict[str, Any]) -> None:
        named = options.get("REPLICAS")
        if named is None:
            return
        primary = options.get("PRIMARY_ALIAS", "default")
        if isinstance(named, str) or not isinstance(named, (list, tuple)):
            self.error(
                5,
                f'PGREPLICA["REPLICAS"] must be a list of DATABASES aliases, not {named!r}.',
                hint=f"Write [{named!r}]." if isinstance(named, str) else None,
            )
            return
        for alias in named:
            if alias == primary:
                self.error(5, f'PGREPLICA["REPLICAS"] names the primary alias {alias!r}.')
            elif alias not in databases:
                self.error(
                    5,
                    f'PGREPLICA["REPLICAS"] names {alias!r}, which is not a DATABASES alias'
                    f"{did_you_mean(alias, databases)}.",
                )
            elif not (databases[alias].get("TEST") or {}).get("MIRROR"):
                self.warning(
                    2,
                    f"DATABASES[{alias!r}] is a replica without TEST MIRROR: manage.py test "
                    "would try to create a test database on the replica.",
                    hint=f'Add "TEST": {{"MIRROR": {primary!r}}} to DATABASES[{alias!r}].',
                )

    def logical(self, options: dict[str, Any], databases: dict[str, Any]) -> None:
        from pgreplica.contrib.django.state import logical_databases

        try:
            logical_databases(options, databases)
        except ConfigError as exc:
            self.error(6, str(exc), hint="See docs/multiple-databases.md.")

    def core_settings(self, values: Any) -> None:
        if values is None:
            return
        from pgreplica.config import Settings

        if not isinstance(values, dict):
            self.error(7, f'PGREPLICA["SETTINGS"] must be a dict, not {values!r}.')
            return
        data = {str(k).lower(): v for k, v in values.items()}
        data["databases"] = {"default": {"primary": "host=localhost"}}
        try:
            Settings.from_dict(data, environ={})
        except ConfigError as exc:
            self.error(7, f'PGREPLICA["SETTINGS"]: {exc}', hint="See docs/operations.md.")

    def wiring(self, options: dict[str, Any], databases: dict[str, Any]) -> None:
        from pgreplica.contrib.django.state import replicas_of_primary

        primary = options.get("PRIMARY_ALIAS", "default")
        replicas = replicas_of_primary(options, databases)
        logical = options.get("DATABASES")
        if not replicas and not logical:
            return
        if isinstance(primary, str) and (databases.get(primary) or {}).get("ATOMIC_REQUESTS"):
            self.warning(
                1,
                f"DATABASES[{primary!r}] has ATOMIC_REQUESTS: every view runs in a "
                "transaction on the primary, so replica-enabled views read the primary.",
                hint="Decorate the read-only views with "
                "django.db.transaction.non_atomic_requests (see docs/django.md).",
            )
        from pgreplica.contrib.django.middleware import PgReplicaMiddleware
        from pgreplica.contrib.django.router import ReadReplicaRouter

        routers = list(getattr(self.settings, "DATABASE_ROUTERS", None) or [])
        if not any(_is(r, ReadReplicaRouter) for r in routers):
            self.warning(
                5,
                "Replica aliases are configured but ReadReplicaRouter is not in "
                "DATABASE_ROUTERS: no read goes to a replica.",
                hint=f"DATABASE_ROUTERS = [{ROUTER!r}]",
            )
        middleware = list(getattr(self.settings, "MIDDLEWARE", None) or [])
        ours = [i for i, m in enumerate(middleware) if _is(m, PgReplicaMiddleware)]
        if not ours:
            self.warning(
                6,
                "PgReplicaMiddleware is not in MIDDLEWARE: a request after a write may read "
                "a replica that has not replayed it.",
                hint=f"Add {MIDDLEWARE!r} after AuthenticationMiddleware.",
            )
        elif (
            options.get("STICKING") is not None
            and AUTHENTICATION in middleware
            and ours[0] < middleware.index(AUTHENTICATION)
        ):
            self.warning(
                6,
                "PgReplicaMiddleware comes before AuthenticationMiddleware: STICKING never "
                "sees the user.",
                hint="Move it after AuthenticationMiddleware.",
            )


def _is(entry: Any, cls: type) -> bool:
    """A ``DATABASE_ROUTERS`` or ``MIDDLEWARE`` entry (a dotted path, a class or an
    instance) is ``cls`` or a subclass of it."""
    if isinstance(entry, str):
        from django.utils.module_loading import import_string

        try:
            entry = import_string(entry)
        except ImportError:
            return False
    if not isinstance(entry, type):
        entry = type(entry)
    return issubclass(entry, cls)


def validate_at_startup() -> list[Any]:
    """Run the checks once per process (the middleware calls it when the app starts):
    raise ``ImproperlyConfigured`` naming every error; return the warnings. Ids in
    ``SILENCED_SYSTEM_CHECKS`` are left out, as ``manage.py check`` does."""
    global _validated
    if _validated is not None:
        return _validated
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    silenced = set(getattr(settings, "SILENCED_SYSTEM_CHECKS", ()) or ())
    messages = [m for m in check_settings() if m.id not in silenced]
    errors = [m for m in messages if m.is_serious()]
    if errors:
        raise ImproperlyConfigured("pgreplica: " + "; ".join(f"({m.id}) {m.msg}" for m in errors))
    _validated = [m for m in messages if not m.is_serious()]
    return _validated


def forget_validation(**kwargs: Any) -> None:
    """Validate again at the next start: connected to ``setting_changed`` (tests that
    change settings)."""
    global _validated
    _validated = None


def watch_settings() -> None:
    from django.core.signals import setting_changed

    setting_changed.connect(forget_validation, dispatch_uid="pgreplica.contrib.django.checks")


_validated: list[Any] | None = None
