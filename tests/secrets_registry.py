"""The secrets the tests use, for the secret scan (tests/secret_scan.py).

Every password and key a test hands to pgreplica is registered here, where it is
defined, so that the scan can look for it in everything the test suite printed and
logged::

    from secrets_registry import register_secret

    KEY = register_secret("web-test-key", "web middleware signing key")

LocalCluster passwords are registered by the ``cluster`` and ``scratch_cluster``
fixtures, and by the scan itself for any other cluster (as soon as the password is
read). Values shorter than :data:`MIN_LENGTH` are too common to look for in text: they
are noted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict

from pgreplica._fork import ForkSafeLock

if TYPE_CHECKING:
    from pgreplica.testing import LocalCluster

__all__ = [
    "MIN_LENGTH",
    "REGISTRY",
    "Registry",
    "Secret",
    "register_cluster",
    "register_secret",
]

MIN_LENGTH = 8
REDACTED = "[REDACTED]"

_Value = TypeVar("_Value", str, bytes)


@dataclass(frozen=True)
class Secret:
    """A registered secret: its value, what it is, and the forms it may take in text."""

    value: str
    label: str
    needles: tuple[str, ...]


class Registry:
    """A set of secrets to look for in text; thread-safe, and fork-safe."""

    def __init__(self) -> None:
        self._lock = ForkSafeLock()  # renewed in a forked child, which may log
        self._secrets: dict[str, Secret] = {}
        self.ignored: list[str] = []
        """Labels of the values too short (or not text) to look for."""

    def register(self, value: _Value, label: str) -> _Value:
        """Look for ``value`` in the output of the tests; returns ``value`` unchanged."""
        try:
            text = value.decode() if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            self._ignore(f"{label} (not UTF-8)")
            return value
        if len(text) < MIN_LENGTH:
            self._ignore(f"{label} ({len(text)} characters)")
            return value
        needles = tuple(dict.fromkeys((text, quote(text, safe=""))))
        with self._lock:
            self._secrets[text] = Secret(text, label, needles)
        return value

    def _ignore(self, note: str) -> None:
        with self._lock:
            if note not in self.ignored:
                self.ignored.append(note)

    def secrets(self) -> tuple[Secret, ...]:
        with self._lock:
            return tuple(self._secrets.values())

    def get(self, value: str) -> Secret | None:
        with self._lock:
            return self._secrets.get(value)

    def __len__(self) -> int:
        with self._lock:
            return len(self._secrets)

    def find(self, text: str) -> list[Secret]:
        """The secrets that occur in ``text``."""
        return [s for s in self.secrets() if any(n in text for n in s.needles)]

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of every secret replaced by ``[REDACTED]``."""
        needles = sorted((n for s in self.secrets() for n in s.needles), key=len, reverse=True)
        for needle in needles:
            text = text.replace(needle, REDACTED)
        return text


REGISTRY = Registry()


def register_secret(value: _Value, label: str) -> _Value:
    """Register ``value`` in the registry of the test session; returns it unchanged."""
    return REGISTRY.register(value, label)


def cluster_password(cluster: LocalCluster) -> str:
    """The superuser password of ``cluster`` (it is in every DSN of the cluster)."""
    return str(conninfo_to_dict(cluster.dsn(0))["password"])


def register_cluster(cluster: LocalCluster, label: str) -> LocalCluster:
    """Register the password of a running ``cluster``; returns the cluster."""
    register_secret(cluster_password(cluster), label)
    return cluster
