"""WSGI middleware (Flask, any WSGI app): read-your-writes across requests.

::

    app.wsgi_app = PgReplicaMiddleware(app.wsgi_app, lb=lb, key=SECRET)      # Flask

The same behaviour and token format as :mod:`pgreplica.contrib.asgi` (and the Django
integration): each request runs in a fresh routing context that adopts the token it
carries (``X-PgReplica-Token`` header or signed cookie, and the user's stuck token with
``sticking`` and ``identify(environ)``); safe methods may read caught-up replicas,
others run on the primary; a request that wrote returns the advanced token in the
header and the cookie, and sticks it for the user.

Headers are added when the app calls ``start_response``: the routing context ends when
the app returns its response, so a body generated lazily afterwards runs outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

from pgreplica.context import collecting, current_state
from pgreplica.contrib._web import COOKIE, HEADER, Middleware, logger
from pgreplica.errors import HostUnavailable

__all__ = ["COOKIE", "HEADER", "PgReplicaMiddleware"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class PgReplicaMiddleware(Middleware):
    """WSGI middleware. ``lb`` is a :class:`~pgreplica.LoadBalancer`; ``key`` signs and
    verifies tokens; ``sticking`` is ``"memory"``, a ``redis://`` URL or a ``Sticking``;
    ``identify(environ)`` returns the user id for sticking, or None. Also: ``header``,
    ``cookie`` (the names) and ``safe_methods``."""

    app: WSGIApp

    def __init__(self, app: WSGIApp, **kw: Any) -> None:
        super().__init__(app, **kw)
        self._environ_key = "HTTP_" + self.exchange.header.upper().replace("-", "_")

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        exchange, lb = self.exchange, self.lb
        incoming = exchange.incoming(environ.get(self._environ_key), environ.get("HTTP_COOKIE"))
        safe = environ.get("REQUEST_METHOD", "GET").upper() in exchange.safe_methods
        ident = self.identify(environ) if self.identify is not None else None
        with ExitStack() as stack:
            stack.enter_context(lb.isolated())
            stack.enter_context(lb.causal(incoming))
            if self.sticking is not None and ident is not None:
                stack.enter_context(self.sticking.adopt(ident))
            if not safe:
                stack.enter_context(lb.primary())
            collected = stack.enter_context(collecting())
            base = current_state().token

            def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
                positions = collected.written
                databases = exchange.databases_read_on_primary(collected) if safe else []
                if databases:
                    try:
                        with lb.isolated():
                            for database in databases:
                                with lb.write(database):  # type: ignore[attr-defined]
                                    pass
                            positions = positions | lb.token()
                    except HostUnavailable as exc:
                        logger.warning("pgreplica_token_not_advanced reason=%s", exc.reason)
                if positions:
                    token = self.exchange.returned(base, positions)
                    secure = environ.get("wsgi.url_scheme") == "https"
                    headers = [*headers, *exchange.outgoing(token, secure=secure)]
                    who = ident
                    if who is None and self.identify is not None:
                        who = self.identify(environ)
                    if self.sticking is not None and who is not None:
                        self.sticking.try_stick(who, token)
                return start_response(status, headers, *exc_info)

            return self.app(environ, start)
