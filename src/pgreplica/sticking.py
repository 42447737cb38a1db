"""Server-side sticking: read-your-writes for clients that carry no causal token.

A browser can carry its causal token in a cookie, a job in its headers. A webhook or
another service acting for a user carries nothing, yet after a write made on behalf of
user 42 the next request for user 42 -- possibly on another app server -- must not read
from a replica that has not replayed that write. :class:`Sticking` remembers the token
of the last writes per identity in a shared store and lets later requests adopt it::

    sticking = Sticking(lb, RedisStickingStore("redis://cache:6379/0"))

    with lb.write() as conn:                 # a request acting for user 42 writes
        conn.execute("UPDATE ...")
    sticking.stick(user.id)                  # remember this context's token

    with sticking.adopt(user.id), lb.read() as conn:   # any later request, any server
        conn.execute("SELECT ...")           # a caught-up replica, or the primary

Unlike sticking by "send everything to the primary for N seconds", a stuck identity
still reads from replicas as soon as one has replayed its writes: the stored value is a
:class:`~pgreplica.CausalToken`, not a flag. Identities are hashed before they become
store keys, so no user id or e-mail address lands in Redis. Stored tokens only grow and
their expiry only extends, whatever order concurrent app servers write in.

The store is an optimisation of safety, never a single point of failure for reads: when
it is unreachable, :meth:`Sticking.adopt` routes everything to the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

from pgreplica.balancer import BalancerBase
from pgreplica.context import RouteState, Scope
from pgreplica.errors import ConfigError, PgReplicaError, TokenError
from pgreplica.lsn import EMPTY_TOKEN, CausalToken

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "AsyncRedisStickingStore",
    "AsyncSticking",
    "AsyncStickingStore",
    "MemoryStickingStore",
    "RedisStickingStore",
    "Sticking",
    "StickingStore",
    "StickingUnavailable",
]

logger = logging.getLogger("pgreplica.sticking")

#: Smallest ttl :class:`Sticking` picks by default, whatever ``max_lag_seconds`` says.
MIN_DEFAULT_TTL = 60.0
DEFAULT_PREFIX = "pgreplica:stick:"


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
        self._lock = threading.Lock()
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


# --------------------------------------------------------------------------- redis

# Decimal LSN strings (no leading zeros) compared exactly: Lua numbers are doubles,
# which cannot hold every 64-bit position.
_LUA_GREATER = """
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return false
end
"""

#: KEYS[1] = key; ARGV[1] = ttl in ms; ARGV[2..] = database, LSN pairs.
STICK_LUA = (
    _LUA_GREATER
    + """
local key = KEYS[1]
for i = 2, #ARGV, 2 do
  local stored = redis.call('HGET', key, ARGV[i])
  if (not stored) or greater(ARGV[i + 1], stored) then
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
local ttl = tonumber(ARGV[1])
if redis.call('PTTL', key) < ttl then
  redis.call('PEXPIRE', key, ttl)
end
return 1
"""
)

#: KEYS[1] = key; ARGV = database, caught-up LSN pairs. 1 if the key was deleted.
UNSTICK_LUA = (
    _LUA_GREATER
    + """
local stored = redis.call('HGETALL', KEYS[1])
if #stored == 0 then return 0 end
local caught = {}
for i = 1, #ARGV, 2 do caught[ARGV[i]] = ARGV[i + 1] end
for i = 1, #stored, 2 do
  local have = caught[stored[i]]
  if (not have) or greater(stored[i + 1], have) then return 0 end
end
redis.call('DEL', KEYS[1])
return 1
"""
)


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Redis sticking store needs redis-py: pip install 'pgreplica[redis]'"
        ) from exc
    return redis


def _client_options(timeout: float, *, for_asyncio: bool = False) -> dict[str, Any]:
    """Short timeouts and a single immediate retry (a pooled connection that Redis
    closed): an unreachable store must fail fast, since the fallback is safe."""
    from redis.backoff import NoBackoff

    if for_asyncio:
        from redis.asyncio.retry import Retry as AsyncRetry

        retry: Any = AsyncRetry(NoBackoff(), 1)
    else:
        from redis.retry import Retry

        retry = Retry(NoBackoff(), 1)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": retry}


def _pairs(token: CausalToken) -> list[str]:
    return [text for name, position in token.items() for text in (name, str(position))]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: Mapping[Any, Any], key: str) -> CausalToken:
    try:
        lsns = {_text(name): int(_text(value)) for name, value in raw.items()}
        if any(_text(value) != str(lsns[_text(name)]) for name, value in raw.items()):
            raise ValueError("not a canonical decimal LSN")
        return CausalToken(lsns)
    except (ValueError, TokenError, UnicodeDecodeError) as exc:
        raise StickingUnavailable(f"malformed sticking data under {key!r}: {exc}") from exc


def _check_ttl(ttl: float) -> int:
    if not ttl > 0 or math.isinf(ttl):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


class RedisStickingStore:
    """A store shared by many processes: one Redis hash per key, one field per database
    holding the LSN as a decimal integer.

    :meth:`stick` and :meth:`unstick_if_covered` are each one Lua script (``EVALSHA``),
    so concurrent app servers never lower a position, shorten an expiry, or delete a
    key that a newer write raised. Every key touched is a single Redis key, so the
    scripts also work on Redis Cluster. Each call is one short round trip; in an asyncio
    app it blocks the loop for that time (use :class:`AsyncRedisStickingStore` there).

    ``client_or_url`` is a ``redis.Redis`` (used as it is: give it short timeouts) or a
    URL; from a URL the client gets ``timeout``-second socket timeouts and one immediate
    retry, and :meth:`close` closes it. Redis errors raise :class:`StickingUnavailable`.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 0.5,
    ) -> None:
        redis_mod = _redis_module()
        if isinstance(client_or_url, str):
            self._client: redis.Redis = redis_mod.Redis.from_url(
                client_or_url, **_client_options(timeout)
            )
            self._owns_client = True
        else:
            self._client = client_or_url
            self._owns_client = False
        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (redis_mod.RedisError, OSError)
        self._stick = self._client.register_script(STICK_LUA)
        self._unstick = self._client.register_script(UNSTICK_LUA)

    @property
    def client(self) -> redis.Redis:
        return self._client

    def close(self) -> None:
        """Close the client if this store created it from a URL."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RedisStickingStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise StickingUnavailable(
                f"sticking store {operation} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def stick(self, key: str, token: CausalToken, ttl: float) -> None:
        ttl_ms = _check_ttl(ttl)
        if not token:
            return
        with self._translated("stick"):
            self._stick(keys=[self.prefix + key], args=[ttl_ms, *_pairs(token)])

    def get(self, key: str) -> CausalToken:
        with self._translated("get"):
            raw = cast("Mapping[Any, Any]", self._client.hgetall(self.prefix + key))
        return _decode(raw, key)

    def unstick_if_covered(self, key: str, caught_up: CausalToken) -> bool:
        with self._translated("unstick"):
            deleted = self._unstick(keys=[self.prefix + key], args=_pairs(caught_up))
        return bool(deleted)


class AsyncRedisStickingStore:
    """:class:`RedisStickingStore` on ``redis.asyncio``: the same keys and Lua scripts,
    so sync and async app servers can share one Redis."""

    def __init__(
        self,
        client_or_url: redis.asyncio.Redis | str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 0.5,
    ) -> None:
        redis_mod = _redis_module()
        import redis.asyncio as redis_asyncio

        if isinstance(client_or_url, str):
            self._client: redis.asyncio.Redis = redis_asyncio.Redis.from_url(
                client_or_url, **_client_options(timeout, for_asyncio=True)
            )
            self._owns_client = True
        else:
            self._client = client_or_url
            self._owns_client = False
        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (
            redis_mod.RedisError,
            OSError,
            asyncio.TimeoutError,  # not an OSError before Python 3.11
        )
        self._stick = self._client.register_script(STICK_LUA)
        self._unstick = self._client.register_script(UNSTICK_LUA)

    @property
    def client(self) -> redis.asyncio.Redis:
        return self._client

    async def aclose(self) -> None:
        """Close the client if this store created it from a URL."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncRedisStickingStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _call(self, operation: str, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except self._errors as exc:
            raise StickingUnavailable(
                f"sticking store {operation} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def stick(self, key: str, token: CausalToken, ttl: float) -> None:
        ttl_ms = _check_ttl(ttl)
        if not token:
            return
        await self._call(
            "stick", self._stick(keys=[self.prefix + key], args=[ttl_ms, *_pairs(token)])
        )

    async def get(self, key: str) -> CausalToken:
        raw = await self._call(
            "get", cast("Awaitable[Any]", self._client.hgetall(self.prefix + key))
        )
        return _decode(raw, key)

    async def unstick_if_covered(self, key: str, caught_up: CausalToken) -> bool:
        deleted = await self._call(
            "unstick", self._unstick(keys=[self.prefix + key], args=_pairs(caught_up))
        )
        return bool(deleted)


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


# --------------------------------------------------------------------------- sticking


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
