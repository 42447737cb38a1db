"""``PgReplicaMiddleware``: read-your-writes across requests and app servers.

After a request that wrote, the primary's WAL position (the causal token) goes back to
the client twice: a signed cookie for browsers, and an ``X-PgReplica-Token`` response
header for API clients and single-page apps, which send it back in the same header. The
next request adopts it, so its reads only use replicas that have replayed the write,
even on another app server. For authenticated users that carry neither (webhooks,
services acting for a user), the token is also kept server-side by user id
(``pgreplica.sticking``), when ``PGREPLICA["STICKING"]`` names a store.

Place it after ``AuthenticationMiddleware``.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

from pgreplica import observe
from pgreplica.balancer import LSN_SQL, primary_token
from pgreplica.context import record_write
from pgreplica.contrib._web import (
    COOKIE,
    HEADER,
    TokenExchange,
    sticking_for,
    sticking_secret,
)
from pgreplica.contrib.django.state import (
    REQUEST,
    RequestState,
    configured_aliases,
    integration,
    internal_query,
    track_queries,
)
from pgreplica.lsn import CausalToken, parse_lsn

logger = logging.getLogger("pgreplica.django")


class PgReplicaMiddleware:
    def __init__(self, get_response: Any) -> None:
        from django.conf import settings
        from django.core.exceptions import MiddlewareNotUsed

        from pgreplica.contrib.django.checks import validate_at_startup

        # Once per process, when the app starts: settings errors stop it here (gunicorn
        # and uvicorn run no system checks), warnings are logged.
        for warning in validate_at_startup():
            logger.warning("pgreplica_check id=%s %s", warning.id, warning.msg)
        if not configured_aliases()[1]:
            # The kill switch (no replica alias): this middleware does nothing at all.
            raise MiddlewareNotUsed("pgreplica: no replica alias is configured")
        self.get_response = get_response
        options = dict(getattr(settings, "PGREPLICA", {}) or {})
        self.cookie_name: str = options.get("TOKEN_COOKIE", COOKIE)
        self.header_name: str = options.get("TOKEN_HEADER", HEADER)
        self.key: str = options.get("SIGNING_KEY") or settings.SECRET_KEY
        self.sticking_spec = options.get("STICKING")
        self.usage_log = bool(options.get("USAGE_LOG", False))
        self._exchange: TokenExchange | None = None

    def __call__(self, request: Any) -> Any:
        integ = integration()
        if not integ.alias_of and not any(integ.mirrors_of.values()):
            # PGREPLICA_ENABLED=false: every read is on the primary, no token to keep.
            return self.get_response(request)
        lb = integ.lb
        sticking = _sticking(self.sticking_spec, self.key)
        incoming = self._incoming(request, lb)
        state = RequestState(http=True)
        with ExitStack() as stack:
            if self.usage_log:
                used = stack.enter_context(observe.usage())
                request.pgreplica_usage = used
                stack.callback(_log_usage, request, used)
            stack.enter_context(lb.isolated())
            stack.enter_context(lb.causal(incoming))
            ident = self._ident(request)
            if sticking is not None and ident is not None:
                stack.enter_context(sticking.adopt(ident))
            token = REQUEST.set(state)
            try:
                with track_queries(state):
                    response = self.get_response(request)
            finally:
                REQUEST.reset(token)
            # A write, or a replica-enabled request that had to read the primary: the
            # next request must see at least that (read-your-writes, monotonic reads).
            if state.wrote or state.read_primary:
                self._capture(lb)
                signed = lb.token().sign(self.key)
                response[self.header_name] = signed
                response.set_cookie(
                    self.cookie_name,
                    signed,
                    max_age=int(max(2 * lb.settings.max_lag_seconds, 60)),
                    httponly=True,
                    samesite="Lax",
                    secure=request.is_secure(),
                )
                if sticking is not None and ident is not None:
                    sticking.try_stick(ident)
        return response

    def _incoming(self, request: Any, lb: Any) -> CausalToken:
        """The request's token: header and cookie, verified and merged, each without
        the positions its primary, probed since the token was signed, never reached
        (:meth:`TokenExchange.bounded`), so that a bad position is not signed again."""
        exchange = self._exchange
        if exchange is None or exchange.lb is not lb:
            exchange = self._exchange = TokenExchange(
                lb, self.key, header=self.header_name, cookie=self.cookie_name
            )
        header = exchange.accepted(request.headers.get(self.header_name))
        return header | exchange.accepted(request.COOKIES.get(self.cookie_name))

    def _ident(self, request: Any) -> Any:
        user = getattr(request, "user", None)
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        return user.pk

    def _capture(self, lb: Any) -> None:
        """The primary's WAL position after the request's writes committed."""
        from django.db import connections

        integ = integration()
        connection = connections[integ.primary_alias]
        if connection.in_atomic_block:
            return  # not committed yet: the outer code owns the transaction
        row = internal_query(integ.primary_alias, LSN_SQL)
        if row and row[0]:
            record_write(primary_token(integ.route, parse_lsn(row[0])))


def _log_usage(request: Any, used: observe.Usage) -> None:
    """The request's database usage, as GitLab's request log has it: counts and
    durations per role and db_config_name, as fields of one INFO record."""
    summary = used.summary()
    logger.info(
        "db_usage method=%s path=%s db_count=%d db_primary_count=%d db_replica_count=%d",
        request.method,
        request.path,
        summary.get("db_count", 0),
        summary.get("db_primary_count", 0),
        summary.get("db_replica_count", 0),
        extra={"db_usage": summary},
    )


_stickings: dict[tuple[int, str, str], Any] = {}


def _sticking(spec: Any, signing_key: str) -> Any:
    """``None``, ``"memory"``, a ``redis://`` URL, or a ready ``Sticking`` object. One
    per process and spec: every middleware instance shares the same store. Keys are
    HMACs under a key derived from the signing key."""
    if spec is None or not isinstance(spec, str):
        return spec
    lb = integration().lb
    key = (id(lb), spec, signing_key)
    if key not in _stickings:
        secret = sticking_secret(signing_key)
        _stickings[key] = sticking_for(spec, lb, asynchronous=False, secret=secret)
    return _stickings[key]
