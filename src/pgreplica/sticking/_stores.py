"""The store side of sticking: what a store must do, and the store for one process.

:class:`StickingStore` and :class:`AsyncStickingStore` are the protocols
:class:`~pgreplica.sticking.Sticking` and :class:`~pgreplica.sticking.AsyncSticking`
use; :class:`MemoryStickingStore` keeps the tokens in a dict behind a lock.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Protocol

from pgreplica._fork import ForkSafeLock
from pgreplica.errors import ConfigError, PgReplicaError
from pgreplica.lsn import EMPTY_TOKEN, CausalToken

__all__ = [
    "AsyncStickingStore",
    "MemoryStickingStore",
    "StickingStore",
    "StickingUnavailable",
]


class StickingUnavailable(PgReplicaError):
    """The sticking store could not be read or written (Redis down, timed out, or
    holding data pgreplica did not write). The original error is ``__cause__``."""


class StickingStore(Protocol):
    """Where :class:`Sticking` keeps the token of each identity.

    Implementations must make :meth:`stick` and :meth:`unstick_if_covered` atomic per
    key: app servers stick and release the same identity concurrently.
    """

    def stick(self, key: str, token: CausalToken, ttl: float) -> None:
        """Raise the stored LSN of each database of ``token`` to at least its value
        (never lower one), and make the key live at least ``ttl`` more seconds (never
        shorten its remaining life)."""
        ...

    def get(self, key: str) -> CausalToken:
        """The stored token; the empty token if the key is absent or expired."""
        ...

    def unstick_if_covered(self, key: str, caught_up: CausalToken) -> bool:
        """Delete the key only if ``caught_up`` covers every stored position (a database
        missing from ``caught_up`` is not covered). True if this call deleted it."""
        ...


class AsyncStickingStore(Protocol):
    """:class:`StickingStore` for asyncio: the same operations, awaited."""

    async def stick(self, key: str, token: CausalToken, ttl: float) -> None: ...

    async def get(self, key: str) -> CausalToken: ...

    async def unstick_if_covered(self, key: str, caught_up: CausalToken) -> bool: ...


def _check_ttl(ttl: float) -> int:
    if not ttl > 0 or math.isinf(ttl):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


# --------------------------------------------------------------------------- memory


class MemoryStickingStore:
    """A store for one process: a dict behind a lock.

    Useful for tests and single-process servers; app servers that share users need
    :class:`RedisStickingStore`. Expiry uses :func:`time.monotonic`, so clock changes do
    not expire keys early. At most ``max_keys`` keys are kept: when full, expired keys
    go first, then the least recently stuck ones (those whose writes replicas have most
    likely replayed already) -- size it above the number of identities that write
    within one ttl.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ConfigError("sticking.max_keys", f"must be at least 1, got {max_keys}")
        self.max_keys = max_keys
        self._lock = ForkSafeLock()
        # key -> (positions, expires_at); ordered from least to most recently stuck.
        self._entries: OrderedDict[str, tuple[dict[str, int], float]] = OrderedDict()
        self._swept_at = -math.inf

    def __len__(self) -> int:
        with self._lock:
            now = time.monotonic()
            return sum(1 for _, expires in self._entries.values() if expires > now)

    def stick(self, key: str, token: CausalToken, ttl: float) -> None:
        _check_ttl(ttl)
        if not token:
            return
        now = time.monotonic()
        with self._lock:
            entry = self._live(key, now)
            if entry is None:
                self._make_room(now)
                positions: dict[str, int] = {}
                expires = now + ttl
            else:
                positions = dict(entry[0])
                expires = max(entry[1], now + ttl)
            for name, position in token.items():
                if position > positions.get(name, 0):
                    positions[name] = position
            self._entries[key] = (positions, expires)
            self._entries.move_to_end(key)

    def get(self, key: str) -> CausalToken:
        with self._lock:
            entry = self._live(key, time.monotonic())
        return EMPTY_TOKEN if entry is None else CausalToken(entry[0])

    def unstick_if_covered(self, key: str, caught_up: CausalToken) -> bool:
        with self._lock:
            entry = self._live(key, time.monotonic())
            if entry is None or not caught_up.covers(CausalToken(entry[0])):
                return False
            del self._entries[key]
            return True

    def _live(self, key: str, now: float) -> tuple[dict[str, int], float] | None:
        """The entry of ``key`` unless it expired (an expired one is removed)."""
        entry = self._entries.get(key)
        if entry is not None and entry[1] <= now:
            del self._entries[key]
            return None
        return entry

    def _make_room(self, now: float) -> None:
        entries = self._entries
        if len(entries) < self.max_keys:
            return
        # Expired keys first: the front ones cheaply (with one ttl they expire in
        # order), all of them at most once a second (ttls may differ).
        while entries:
            first = next(iter(entries.values()))
            if first[1] > now:
                break
            entries.popitem(last=False)
        if len(entries) >= self.max_keys and now - self._swept_at >= 1.0:
            self._swept_at = now
            for key in [k for k, (_, expires) in entries.items() if expires <= now]:
                del entries[key]
        while len(entries) >= self.max_keys:
            entries.popitem(last=False)


class _AwaitedStore:
    """A non-blocking sync store (such as :class:`MemoryStickingStore`) used where an
    :class:`AsyncStickingStore` is expected."""

    def __init__(self, store: StickingStore) -> None:
        self.store = store

    async def stick(self, key: str, token: CausalToken, ttl: float) -> None:
        self.store.stick(key, token, ttl)

    async def get(self, key: str) -> CausalToken:
        return self.store.get(key)

    async def unstick_if_covered(self, key: str, caught_up: CausalToken) -> bool:
        return self.store.unstick_if_covered(key, caught_up)
