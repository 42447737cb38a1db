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

The package, one job a module: :mod:`~pgreplica.sticking._stores` (the store protocols,
:class:`StickingUnavailable` and the in-process :class:`MemoryStickingStore`),
:mod:`~pgreplica.sticking._redis` (the sync and asyncio Redis stores and their Lua
scripts) and :mod:`~pgreplica.sticking._sticking` (:class:`Sticking` and
:class:`AsyncSticking`: key hashing, the ttl tied to the lag bound, adopt / stick /
release).
"""

from __future__ import annotations

from pgreplica.sticking._redis import DEFAULT_PREFIX as DEFAULT_PREFIX
from pgreplica.sticking._redis import STICK_LUA as STICK_LUA
from pgreplica.sticking._redis import UNSTICK_LUA as UNSTICK_LUA
from pgreplica.sticking._redis import AsyncRedisStickingStore, RedisStickingStore
from pgreplica.sticking._sticking import MIN_DEFAULT_TTL as MIN_DEFAULT_TTL
from pgreplica.sticking._sticking import AsyncSticking, Sticking
from pgreplica.sticking._stores import (
    AsyncStickingStore,
    MemoryStickingStore,
    StickingStore,
    StickingUnavailable,
)

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
