"""What the ASGI and WSGI middleware share: the causal token in and out of a request.

The token travels as in the Django integration, so services behind one domain share
read-your-writes: an ``X-PgReplica-Token`` request/response header for API clients, and
a signed cookie ``pgreplica_token`` (HttpOnly, SameSite=Lax, Secure over https) for
browsers, signed with the same key (Django's ``PGREPLICA["SIGNING_KEY"]`` or
``SECRET_KEY``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Collection
from http.cookies import SimpleCookie
from typing import Any

from pgreplica.balancer import BalancerBase
from pgreplica.context import Collected
from pgreplica.errors import ConfigError, TokenError
from pgreplica.lsn import _CLOCK_SKEW, EMPTY_TOKEN, CausalToken

logger = logging.getLogger("pgreplica.web")

HEADER = "X-PgReplica-Token"
COOKIE = "pgreplica_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Identify = Callable[[Any], Any]


class TokenExchange:
    """Reads the token a request carries and writes the one its response returns."""

    def __init__(
        self,
        lb: BalancerBase,
        key: bytes | str,
        *,
        header: str = HEADER,
        cookie: str = COOKIE,
        safe_methods: Collection[str] = SAFE_METHODS,
    ) -> None:
        if not isinstance(lb, BalancerBase):
            raise TypeError(f"lb must be a LoadBalancer or AsyncLoadBalancer, got {lb!r}")
        if not key or not isinstance(key, (str, bytes)):
            raise ConfigError("key", "a non-empty signing key (str or bytes) is required")
        self.lb = lb
        self.key = key
        self.header = header
        self.header_lower = header.lower()
        self.cookie = cookie
        self.safe_methods = frozenset(m.upper() for m in safe_methods)
        self.cookie_max_age = int(max(2 * lb.settings.max_lag_seconds, 60))

    def incoming(self, header: str | None, cookie_header: str | None) -> CausalToken:
        """The token of the header and of the cookie, merged; a bad one is logged
        (``pgreplica_token_rejected``) and ignored."""
        token = EMPTY_TOKEN
        for text in (header, cookie_value(cookie_header, self.cookie)):
            token = token | self.accepted(text)
        return token

    def accepted(self, text: str | None) -> CausalToken:
        """One signed token as the client sent it: verified and :meth:`bounded`; empty
        if absent, and if bad (logged as ``pgreplica_token_rejected``)."""
        if not text:
            return EMPTY_TOKEN
        try:
            verified = CausalToken.verify(text, self.key)
        except TokenError as exc:
            logger.info("pgreplica_token_rejected reason=%s", exc)
            return EMPTY_TOKEN
        issued = int(text.rsplit(".", 2)[1])  # verify() checked it is there
        return self.bounded(verified, issued)

    def bounded(self, token: CausalToken, issued: float) -> CausalToken:
        """``token`` without the positions its primary, probed after the token was
        signed (``issued``, Unix seconds, whole), has not reached: a position that was
        never this primary's (a failed position read, another cluster, a forgery)
        would otherwise send every read of the client to the primary. The signer read
        each position after its commit, so a primary probed since then has reached
        every genuine one. "Since then" allows for the signer's clock (another app
        server) being behind this one's by up to the clock skew tokens tolerate."""
        router = self.lb._router
        offset = time.time() - time.monotonic()  # wall clock = monotonic + offset
        dropped = []
        for name, position in token.items():
            route = router.databases.get(name)
            if route is None:
                continue  # another service's database: kept, it is not ours to judge
            primary = route.primary
            if (
                primary.probed_at is not None
                and primary.probe_started_at + offset > issued + 1 + _CLOCK_SKEW
                and position > primary.replay_lsn
                and primary.replay_lsn
            ):
                dropped.append(name)
        if not dropped:
            return token
        logger.info("pgreplica_token_bounded databases=%s", ",".join(dropped))
        return token.only(n for n, _ in token.items() if n not in dropped)

    def outgoing(self, token: CausalToken, *, secure: bool) -> list[tuple[str, str]]:
        """The response headers that return ``token``: the header and the cookie."""
        signed = token.sign(self.key)
        morsel = SimpleCookie()
        morsel[self.cookie] = signed
        item = morsel[self.cookie]
        item["max-age"] = self.cookie_max_age
        item["path"] = "/"
        item["httponly"] = True
        item["samesite"] = "Lax"
        if secure:
            item["secure"] = True
        return [(self.header, signed), ("Set-Cookie", item.OutputString())]

    @staticmethod
    def returned(base: CausalToken, positions: CausalToken) -> CausalToken:
        """The token a response returns: ``positions`` (read after the request's work,
        at or past every genuine position the request came with), and the request's
        own token for the other databases. An incoming position is not signed again
        where a newer one was read: one the primary never reached does not live on."""
        others = [name for name, _ in base.items() if not positions.get(name)]
        return positions | base.only(others)

    def databases_read_on_primary(self, collected: Collected) -> list[str]:
        """Databases the request read on their primary but did not write: the next
        request must not see older data there (monotonic reads)."""
        router = self.lb._router
        names = []
        for database, host in collected.read_from:
            route = router.databases.get(database)
            if (
                route is not None
                and host is route.primary
                and not collected.written.get(database)
                and database not in names
            ):
                names.append(database)
        return names


class Middleware:
    """What the ASGI and WSGI middleware share: the token exchange, the balancer, the
    sticking store and the ``identify`` callable."""

    asynchronous = False

    def __init__(
        self,
        app: Any,
        *,
        lb: BalancerBase,
        key: bytes | str,
        header: str = HEADER,
        cookie: str = COOKIE,
        safe_methods: Collection[str] = SAFE_METHODS,
        sticking: Any = None,
        identify: Identify | None = None,
    ) -> None:
        self.app = app
        self.exchange = TokenExchange(
            lb, key, header=header, cookie=cookie, safe_methods=safe_methods
        )
        self.lb = lb
        self.sticking = sticking_for(
            sticking, lb, asynchronous=self.asynchronous, secret=sticking_secret(key)
        )
        self.identify = identify


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (quotes removed, as the
    cookie Django sets for a token is quoted)."""
    if not cookie_header:
        return None
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def sticking_secret(key: bytes | str) -> bytes:
    """The HMAC key of the sticking store's keys, derived from the token signing key
    (in a domain of its own): a store built from a spec hides small user ids too."""
    raw = key.encode() if isinstance(key, str) else key
    return hmac.new(raw, b"pgreplica sticking keys", hashlib.sha256).digest()


def sticking_for(
    spec: Any, lb: BalancerBase, *, asynchronous: bool, secret: bytes | None = None
) -> Any:
    """``None``, ``"memory"``, a ``redis://`` URL, or a ready ``Sticking`` /
    ``AsyncSticking`` (used as it is); ``secret`` keys the stores built from a spec."""
    if spec is None or not isinstance(spec, str):
        return spec
    from pgreplica import sticking

    if spec == "memory":
        store: Any = sticking.MemoryStickingStore()
    elif spec.startswith(("redis://", "rediss://", "unix://")):
        store = (
            sticking.AsyncRedisStickingStore(spec)
            if asynchronous
            else sticking.RedisStickingStore(spec)
        )
    else:
        raise ConfigError("sticking", "expected 'memory', a redis:// URL or a Sticking object")
    if asynchronous:
        return sticking.AsyncSticking(lb, store, secret=secret)
    return sticking.Sticking(lb, store, secret=secret)
