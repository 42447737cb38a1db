"""Optional dependencies: one error, with the ``pip install 'pgreplica[EXTRA]'`` that
installs what is missing, for every feature that needs an extra of pyproject.toml.

Modules that need a third-party package to be imported at all wrap their imports::

    with extra_imports("celery", feature="pgreplica.contrib.celery"):
        import celery

Features switched on at run time call :func:`require` when they start.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType

from pgreplica.errors import ConfigError, PgReplicaError

__all__ = ["MissingExtra", "MissingExtraSetting", "extra_imports", "require"]

# The import name of each extra's packages, and what the message calls them.
_EXTRAS: dict[str, dict[str, str]] = {
    "django": {"django": "Django"},
    "redis": {"redis": "redis-py"},
    "celery": {"celery": "Celery", "kombu": "Celery"},
    "prometheus": {"prometheus_client": "prometheus_client"},
    "opentelemetry": {"opentelemetry": "opentelemetry-api"},
    "channels": {
        "channels": "Django Channels",
        "django": "Django",
        "channels_redis": "channels-redis",
    },
    "sqlalchemy": {"sqlalchemy": "SQLAlchemy", "greenlet": "greenlet"},
    "dns": {"dns": "dnspython"},
}


class MissingExtra(PgReplicaError, ModuleNotFoundError):
    """A feature needs a package that is not installed; the message says which extra of
    pgreplica installs it. ``name`` is the module that could not be imported."""

    def __init__(self, feature: str, module: str, extra: str) -> None:
        # Not super(): in MissingExtraSetting the next class is ConfigError.
        ModuleNotFoundError.__init__(self, feature, module, extra)
        self.feature = feature
        self.module = module
        self.extra = extra
        self.name = module

    def __str__(self) -> str:
        top = self.module.partition(".")[0]
        package = _EXTRAS.get(self.extra, {}).get(top, top)
        return f"{self.feature} needs {package}: pip install 'pgreplica[{self.extra}]'"


class MissingExtraSetting(MissingExtra, ConfigError):
    """:class:`MissingExtra` for a setting that switches a feature on (``metrics =
    true``): also a :class:`~pgreplica.ConfigError` naming that setting."""

    def __init__(self, feature: str, module: str, extra: str) -> None:
        MissingExtra.__init__(self, feature, module, extra)
        self.setting = feature
        self.problem = str(self)

    def __str__(self) -> str:
        return MissingExtra.__str__(self)


def _missing(exc: ImportError, extra: str, importing: str | None = None) -> str | None:
    """The module of ``extra`` whose absence ``exc`` reports, or None if it is another.
    An error that names no module is taken to be about ``importing``, if given."""
    name = exc.name or importing or ""
    return name if name.partition(".")[0] in _EXTRAS[extra] else None


@contextlib.contextmanager
def extra_imports(extra: str, *, feature: str) -> Iterator[None]:
    """Turn the import error of a package of ``extra`` raised inside into
    :class:`MissingExtra`; any other import error goes through unchanged."""
    if extra not in _EXTRAS:
        raise ValueError(f"no extra {extra!r} in pyproject.toml")
    try:
        yield
    except ImportError as exc:
        module = _missing(exc, extra)
        if module is None:
            raise
        raise MissingExtra(feature, module, extra) from exc


def require(module: str, *, extra: str, feature: str, setting: bool = False) -> ModuleType:
    """Import ``module`` (a package of ``extra``) and return it; if it is not installed,
    raise :class:`MissingExtra` (:class:`MissingExtraSetting` when ``feature`` is the
    name of a setting, with ``setting=True``)."""
    if extra not in _EXTRAS:
        raise ValueError(f"no extra {extra!r} in pyproject.toml")
    try:
        __import__(module)  # not importlib: an import hook on builtins sees it too
    except ImportError as exc:
        missing = _missing(exc, extra, module)
        if missing is None:
            raise
        error = MissingExtraSetting if setting else MissingExtra
        raise error(feature, missing, extra) from exc
    return sys.modules[module]
