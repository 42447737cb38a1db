"""ASGI middleware (Starlette, FastAPI, any ASGI app): read-your-writes across requests.

::

    app.add_middleware(PgReplicaMiddleware, lb=lb, key=SECRET)      # Starlette / FastAPI
    app = PgReplicaMiddleware(app, lb=lb, key=SECRET)               # any ASGI app

Each HTTP request runs in a fresh routing context (``lb.isolated()``) that adopts the
causal token it carries (the ``X-PgReplica-Token`` header, or the signed cookie), and,
with ``sticking`` and ``identify``, the token kept server-side for its user. Requests
with a safe method (GET, HEAD, OPTIONS) may read replicas caught up to that token;
others run on the primary. When the request wrote (through ``lb.write()``, a routing
connection, or a :mod:`pgreplica.contrib.sqlalchemy` session that committed, in this
task or in any thread or task it started), the response carries the advanced token in
the header and the cookie, and the token is stuck for the user. A safe request that
had to read the primary returns the primary's position too (monotonic reads).

The state lives in contextvars: concurrent requests on one event loop, and the worker
threads of sync endpoints, each see their own. The token format and signing are the
Django integration's: a Django and an ASGI service behind one domain, sharing the
signing key, share read-your-writes.

Headers are added when the response starts: writes made after that (a streaming body)
are not reported to the client.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from typing import Any

from pgreplica._balancer_async import AsyncLoadBalancer
from pgreplica.context import Collected, collecting, current_state
from pgreplica.contrib._web import COOKIE, HEADER, Middleware, logger
from pgreplica.errors import HostUnavailable
from pgreplica.lsn import CausalToken

__all__ = ["COOKIE", "HEADER", "PgReplicaMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class PgReplicaMiddleware(Middleware):
    """Pure ASGI middleware. ``lb`` is a :class:`~pgreplica.LoadBalancer` or
    :class:`~pgreplica.AsyncLoadBalancer`; ``key`` signs and verifies tokens;
    ``sticking`` is ``"memory"``, a ``redis://`` URL or an ``AsyncSticking``;
    ``identify(scope)`` (sync or async) returns the user id for sticking, or None.
    Also: ``header``, ``cookie`` (the names) and ``safe_methods``."""

    asynchronous = True

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], **kw: Any) -> None:
        super().__init__(app, **kw)
        self._header = self.exchange.header_lower.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange, lb = self.exchange, self.lb
        header_value = cookie_header = None
        for name, value in scope.get("headers") or ():
            if name == self._header:
                header_value = value.decode("latin-1")
            elif name == b"cookie":
                cookie_header = value.decode("latin-1")
        incoming = exchange.incoming(header_value, cookie_header)
        safe = scope.get("method", "GET").upper() in exchange.safe_methods
        ident = await self._ident(scope)
        async with AsyncExitStack() as stack:
            stack.enter_context(lb.isolated())
            stack.enter_context(lb.causal(incoming))
            if self.sticking is not None and ident is not None:
                await stack.enter_async_context(self.sticking.adopt(ident))
            if not safe:
                stack.enter_context(lb.primary())
            collected = stack.enter_context(collecting())
            base = current_state().token
            started = False

            async def send_wrapper(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start" and not started:
                    started = True
                    token = await self._outgoing(base, collected, safe)
                    if token is not None:
                        secure = scope.get("scheme") in ("https", "wss")
                        extra = [
                            (k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in exchange.outgoing(token, secure=secure)
                        ]
                        message = {**message, "headers": [*message.get("headers", ()), *extra]}
                        who = ident if ident is not None else await self._ident(scope)
                        if self.sticking is not None and who is not None:
                            await self.sticking.try_stick(who, token)
                await send(message)

            await self.app(scope, receive, send_wrapper)

    async def _ident(self, scope: Scope) -> Any:
        if self.identify is None:
            return None
        ident = self.identify(scope)
        if inspect.isawaitable(ident):
            ident = await ident
        return ident

    async def _outgoing(
        self, base: CausalToken, collected: Collected, safe: bool
    ) -> CausalToken | None:
        """The token to return, or None when the request neither wrote nor (for a
        safe request) read a primary."""
        positions = collected.written
        databases = self.exchange.databases_read_on_primary(collected) if safe else []
        if databases:
            try:
                positions = positions | await self._primary_positions(databases)
            except HostUnavailable as exc:  # the primary went away since it was read
                logger.warning("pgreplica_token_not_advanced reason=%s", exc.reason)
        if not positions:
            return None
        return self.exchange.returned(base, positions)

    async def _primary_positions(self, databases: list[str]) -> CausalToken:
        lb = self.lb
        if isinstance(lb, AsyncLoadBalancer):
            with lb.isolated():
                for database in databases:
                    async with lb.write(database):
                        pass
                return lb.token()
        return await asyncio.to_thread(_sync_positions, lb, databases)


def _sync_positions(lb: Any, databases: list[str]) -> CausalToken:
    """The primaries' positions now (an empty write unit reads it, in autocommit)."""
    with lb.isolated():
        for database in databases:
            with lb.write(database):
                pass
        token: CausalToken = lb.token()
        return token
