"""The :class:`Sticking` and :class:`AsyncSticking` classes: identity keys, the ttl
tied to the lag bound, and adopt / stick / release over a store."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import inspect
import logging
import math
from types import TracebackType
from typing import cast

from pgreplica.balancer import BalancerBase
from pgreplica.context import RouteState, Scope
from pgreplica.errors import ConfigError
from pgreplica.lsn import CausalToken
from pgreplica.sticking._stores import (
    AsyncStickingStore,
    StickingStore,
    StickingUnavailable,
    _AwaitedStore,
)

__all__ = ["AsyncSticking", "Sticking"]

logger = logging.getLogger("pgreplica.sticking")

#: Smallest ttl :class:`Sticking` picks by default, whatever ``max_lag_seconds`` says.
MIN_DEFAULT_TTL = 60.0


class _StickingBase:
    """What :class:`Sticking` and :class:`AsyncSticking` share: keys, ttl, and the
    caught-up positions of the replicas (no I/O)."""

    def __init__(
        self,
        lb: BalancerBase,
        *,
        namespace: str,
        ttl: float | None,
        secret: bytes | str | None,
    ) -> None:
        if not namespace or ":" in namespace or not namespace.isprintable():
            raise ConfigError(
                "sticking.namespace",
                f"must be non-empty printable text without ':', got {namespace!r}",
            )
        max_lag = lb.settings.max_lag_seconds
        if ttl is None:
            ttl = max(2 * max_lag, MIN_DEFAULT_TTL)
        elif not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
            raise ConfigError("sticking.ttl", f"must be a positive number of seconds, got {ttl!r}")
        elif ttl < max_lag:
            raise ConfigError(
                "sticking.ttl",
                f"{ttl:g}s is below max_lag_seconds ({max_lag:g}s): a key could expire"
                " while a replica in the read set has not replayed its writes",
            )
        self.lb = lb
        self.namespace = namespace
        self.ttl = float(ttl)
        self._secret = secret.encode() if isinstance(secret, str) else secret
        if self._secret is not None and not self._secret:
            raise ConfigError("sticking.secret", "must not be empty")

    def key(self, ident: object) -> str:
        """``"<namespace>:"`` + the SHA-256 hex digest of ``str(ident)``.

        Identities are hashed so that the store never holds a user id or an e-mail
        address. With ``secret`` the digest is an HMAC-SHA256, which also stops
        anyone reading the store from recovering small ids by enumeration."""
        data = str(ident).encode()
        if self._secret is None:
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hmac.new(self._secret, data, hashlib.sha256).hexdigest()
        return f"{self.namespace}:{digest}"

    def caught_up(self) -> CausalToken:
        """Per configured database, the lowest replay LSN among all its replicas, from
        the prober's cache: the position *every* replica is known to have replayed.

        A replica that is down, not in recovery (promoted) or never probed counts as
        position 0, and a database without replicas is left out: nothing is released
        while a replica could still serve a stale read; its keys expire with the ttl.
        """
        positions: dict[str, int] = {}
        for name, route in self.lb._router.databases.items():
            if not route.replicas:
                continue
            lowest = min(
                host.replay_lsn if host.up and host.in_recovery is True else 0
                for host in route.replicas
            )
            if lowest:
                positions[name] = lowest
        return CausalToken(positions)

    def _unavailable(self, operation: str, exc: StickingUnavailable) -> None:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        logger.warning(
            "sticking_unavailable key_namespace=%s error=%s operation=%s",
            self.namespace,
            type(cause).__name__,
            operation,
        )


class Sticking(_StickingBase):
    """Read-your-writes per identity (a user, a tenant, an API client) across requests
    and app servers, for callers that carry no causal token.

    ``ttl`` is how long a stick lasts unless :meth:`release_if_caught_up` removes it
    earlier. The default, ``max(2 * max_lag_seconds, 60)``, ties it to the lag bound
    so that a key does not expire while a replica of the read set may still be behind
    its writes; a ttl below ``max_lag_seconds`` raises :class:`~pgreplica.ConfigError`.

    The methods are synchronous; with a Redis store each is one short round trip. For
    asyncio apps use :class:`AsyncSticking` with :class:`AsyncRedisStickingStore`.
    Works with :class:`~pgreplica.LoadBalancer` and :class:`~pgreplica.AsyncLoadBalancer`.
    """

    def __init__(
        self,
        lb: BalancerBase,
        store: StickingStore,
        *,
        namespace: str = "user",
        ttl: float | None = None,
        secret: bytes | str | None = None,
    ) -> None:
        super().__init__(lb, namespace=namespace, ttl=ttl, secret=secret)
        self.store = store

    def stick(self, ident: object, token: CausalToken | None = None) -> None:
        """Remember ``token`` (default: the current context's, ``lb.token()``) for
        ``ident``; call it after the writes made on the identity's behalf committed.

        A no-op for an empty token. Raises :class:`StickingUnavailable` if the store
        is unreachable: the writes are committed, but the next request for ``ident``
        is not guaranteed to see them, and the caller should know.
        """
        if token is None:
            token = self.lb.token()
        if token:
            self.store.stick(self.key(ident), token, self.ttl)

    def try_stick(self, ident: object, token: CausalToken | None = None) -> bool:
        """:meth:`stick`, for callers that must go on when the store is unreachable (a
        middleware after the request's writes committed, whose response carries the
        token anyway): a WARNING is logged and the result is False."""
        try:
            self.stick(ident, token)
        except StickingUnavailable as exc:
            self._unavailable("stick", exc)
            return False
        return True

    def adopt(self, ident: object) -> contextlib.AbstractContextManager[RouteState]:
        """A scope whose reads see the writes last stuck for ``ident``::

            with sticking.adopt(user.id), lb.read() as conn: ...

        The store is read when ``adopt`` is called. If it is unreachable, a WARNING is
        logged (with the namespace, never the identity) and the scope is ``lb.primary()``:
        every read goes to the primary, which is always safe.
        """
        try:
            token = self.store.get(self.key(ident))
        except StickingUnavailable as exc:
            self._unavailable("adopt", exc)
            return self.lb.primary()
        return self.lb.causal(token)

    def release_if_caught_up(self, ident: object) -> bool:
        """Remove the stick of ``ident`` once every replica of every database it names
        has replayed its positions (see :meth:`caught_up`); True if it was removed.

        Optional: keys expire on their own after ``ttl``. Releasing early keeps the
        store small. The removal is a compare-and-delete, so a newer stick made
        concurrently by another app server survives. If the store is unreachable, a
        WARNING is logged and the result is False.
        """
        try:
            return self.store.unstick_if_covered(self.key(ident), self.caught_up())
        except StickingUnavailable as exc:
            self._unavailable("release", exc)
            return False


class _AsyncAdopt:
    """``async with sticking.adopt(ident):`` reads the store on entry, then enters
    ``lb.causal(token)`` (or ``lb.primary()`` if the store is unreachable)."""

    __slots__ = ("_ident", "_scope", "_sticking")

    def __init__(self, sticking: AsyncSticking, ident: object) -> None:
        self._sticking = sticking
        self._ident = ident
        self._scope: Scope | None = None

    async def __aenter__(self) -> RouteState:
        if self._scope is not None:
            raise RuntimeError("this adopt() scope is already entered")
        self._scope = await self._sticking.scope(self._ident)
        return self._scope.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.__exit__(exc_type, exc, tb)


class AsyncSticking(_StickingBase):
    """:class:`Sticking` for asyncio apps: the store is awaited, never blocking the loop.

    ``store`` is an :class:`AsyncStickingStore` such as :class:`AsyncRedisStickingStore`,
    or a non-blocking sync store such as :class:`MemoryStickingStore`. Usage::

        await sticking.stick(user.id)
        async with sticking.adopt(user.id), lb.read() as conn: ...
    """

    def __init__(
        self,
        lb: BalancerBase,
        store: AsyncStickingStore | StickingStore,
        *,
        namespace: str = "user",
        ttl: float | None = None,
        secret: bytes | str | None = None,
    ) -> None:
        super().__init__(lb, namespace=namespace, ttl=ttl, secret=secret)
        if inspect.iscoroutinefunction(getattr(store, "get", None)):
            self.store = cast("AsyncStickingStore", store)
        else:
            self.store = _AwaitedStore(cast("StickingStore", store))

    async def stick(self, ident: object, token: CausalToken | None = None) -> None:
        """See :meth:`Sticking.stick`."""
        if token is None:
            token = self.lb.token()
        if token:
            await self.store.stick(self.key(ident), token, self.ttl)

    async def try_stick(self, ident: object, token: CausalToken | None = None) -> bool:
        """See :meth:`Sticking.try_stick`."""
        try:
            await self.stick(ident, token)
        except StickingUnavailable as exc:
            self._unavailable("stick", exc)
            return False
        return True

    def adopt(self, ident: object) -> _AsyncAdopt:
        """See :meth:`Sticking.adopt`; the store is read on ``async with`` entry."""
        return _AsyncAdopt(self, ident)

    async def scope(self, ident: object) -> Scope:
        """The scope :meth:`adopt` enters: ``lb.causal(stored token)``, or
        ``lb.primary()`` (with a WARNING) if the store is unreachable."""
        try:
            token = await self.store.get(self.key(ident))
        except StickingUnavailable as exc:
            self._unavailable("adopt", exc)
            return self.lb.primary()
        return self.lb.causal(token)

    async def release_if_caught_up(self, ident: object) -> bool:
        """See :meth:`Sticking.release_if_caught_up`."""
        try:
            return await self.store.unstick_if_covered(self.key(ident), self.caught_up())
        except StickingUnavailable as exc:
            self._unavailable("release", exc)
            return False
