"""The Redis stores of sticking, sync and asyncio, and the Lua scripts they share.

redis-py is imported only when a store is created, so importing
:mod:`pgreplica.sticking` does not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from pgreplica._extras import require
from pgreplica.errors import TokenError
from pgreplica.lsn import CausalToken
from pgreplica.sticking._stores import StickingUnavailable, _check_ttl

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["AsyncRedisStickingStore", "RedisStickingStore"]

DEFAULT_PREFIX = "pgreplica:stick:"

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
    return require("redis", extra="redis", feature="the Redis sticking store")


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
