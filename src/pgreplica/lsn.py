"""WAL positions (LSNs) and the causal token that carries them between contexts.

An LSN is kept as a plain ``int`` (the 64-bit byte position in the WAL) so that the hot
path compares integers. :class:`CausalToken` maps logical database names to the LSN a
reader must see: a replica serves the read only once it has replayed that far.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterator, Mapping

from pgreplica.errors import TokenError

_LSN_RE = re.compile(r"\A([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")
_NAME_RE = re.compile(r"\A[A-Za-z0-9_]{1,63}\Z")
_MAX_TOKEN_TEXT = 4096
#: How long a signed token is accepted after it was signed, by default (seconds).
SIGNED_MAX_AGE = 3600.0
_CLOCK_SKEW = 300.0


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> integer position. Raises :class:`TokenError` if malformed."""
    match = _LSN_RE.match(text)
    if match is None:
        raise TokenError(f"malformed LSN {text[:40]!r}: expected 'X/Y' in hexadecimal")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(position: int) -> str:
    """Integer position -> PostgreSQL's ``'X/Y'`` text form."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


class CausalToken:
    """An immutable map: logical database -> the LSN a reader must have seen.

    Tokens only grow: ``a | b`` keeps the larger LSN per database. ``str(token)`` is a
    compact text safe in a header, a cookie or a message (``main=0/16B3748&ci=0/52A0``);
    :meth:`sign` adds an HMAC-SHA256 for transport through untrusted hands.
    """

    __slots__ = ("_hash", "_lsns")

    _lsns: dict[str, int]
    _hash: int | None

    def __init__(self, lsns: Mapping[str, int] | None = None) -> None:
        clean: dict[str, int] = {}
        for name, position in (lsns or {}).items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise TokenError(f"invalid database name in token: {name!r}")
            if not isinstance(position, int) or isinstance(position, bool):
                raise TokenError(f"LSN for {name!r} must be an int, got {type(position).__name__}")
            if not 0 <= position < 1 << 64:
                raise TokenError(f"LSN for {name!r} out of range: {position}")
            if position:
                clean[name] = position
        self._lsns = clean
        self._hash = None

    @classmethod
    def _trusted(cls, lsns: dict[str, int]) -> CausalToken:
        token = object.__new__(cls)
        token._lsns = lsns
        token._hash = None
        return token

    def get(self, database: str) -> int:
        """The LSN required for ``database`` (0 when the token says nothing about it)."""
        return self._lsns.get(database, 0)

    def __or__(self, other: CausalToken) -> CausalToken:
        if not isinstance(other, CausalToken):
            return NotImplemented
        if not other._lsns or other._lsns == self._lsns:
            return self
        if not self._lsns:
            return other
        merged = dict(self._lsns)
        for name, position in other._lsns.items():
            if position > merged.get(name, 0):
                merged[name] = position
        return CausalToken._trusted(merged)

    def covers(self, other: CausalToken) -> bool:
        """True when every position of ``other`` is at or below this token's."""
        return all(self._lsns.get(n, 0) >= p for n, p in other._lsns.items())

    def items(self) -> Iterator[tuple[str, int]]:
        return iter(sorted(self._lsns.items()))

    def as_dict(self) -> dict[str, str]:
        """``{"main": "0/16B3748"}``: the form job headers and message envelopes carry."""
        return {name: format_lsn(position) for name, position in self.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> CausalToken:
        if not isinstance(data, Mapping):
            raise TokenError(f"token must be a mapping, got {type(data).__name__}")
        lsns: dict[str, int] = {}
        for name, text in data.items():
            if not isinstance(text, str):
                raise TokenError(f"LSN for {name!r} must be text like '0/16B3748'")
            lsns[name] = parse_lsn(text)
        return cls(lsns)

    def __bool__(self) -> bool:
        return bool(self._lsns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CausalToken) and self._lsns == other._lsns

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._lsns.items()))
        return self._hash

    def __str__(self) -> str:
        return "&".join(f"{name}={format_lsn(position)}" for name, position in self.items())

    def __repr__(self) -> str:
        return f"CausalToken({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> CausalToken:
        """Inverse of ``str(token)``. Raises :class:`TokenError` on anything malformed."""
        if not isinstance(text, str):
            raise TokenError(f"token must be text, got {type(text).__name__}")
        if len(text) > _MAX_TOKEN_TEXT:
            raise TokenError(f"token text too long ({len(text)} characters)")
        if not text:
            return cls()
        lsns: dict[str, int] = {}
        for part in text.split("&"):
            name, sep, lsn_text = part.partition("=")
            if not sep:
                raise TokenError(f"malformed token part {part[:40]!r}: expected 'database=X/Y'")
            if name in lsns:
                raise TokenError(f"database {name!r} appears twice in token")
            lsns[name] = parse_lsn(lsn_text)
        return cls(lsns)

    def sign(self, key: bytes | str, *, issued_at: float | None = None) -> str:
        """``str(token)``, ``.`` and the signing time (Unix seconds), then ``.`` and a
        base64url HMAC-SHA256 of both: a token through untrusted hands (a cookie, a
        header) that expires (:meth:`verify`'s ``max_age``)."""
        issued = int(time.time() if issued_at is None else issued_at)
        payload = f"{self}.{issued}"
        return f"{payload}.{_mac(key, payload)}"

    @classmethod
    def verify(
        cls,
        text: str,
        key: bytes | str,
        *,
        max_age: float | None = SIGNED_MAX_AGE,
        now: float | None = None,
    ) -> CausalToken:
        """Parse a signed token. A missing or wrong signature, a token signed more than
        ``max_age`` seconds ago (``None``: no limit) or in the future, or one too large
        raises :class:`TokenError`."""
        if not isinstance(text, str):
            raise TokenError(f"signed token must be text, got {type(text).__name__}")
        if len(text) > _MAX_TOKEN_TEXT + 80:
            raise TokenError(f"token text too long ({len(text)} characters)")
        payload, sep, signature = text.rpartition(".")
        if not sep:
            raise TokenError("token is not signed")
        if not hmac.compare_digest(signature.encode(), _mac(key, payload).encode()):
            raise TokenError("token signature does not match")
        body, sep, issued = payload.rpartition(".")
        if not sep or not issued.isdigit() or len(issued) > 12:
            raise TokenError("signed token has no signing time")
        age = (time.time() if now is None else now) - int(issued)
        if max_age is not None and age > max_age:
            raise TokenError(f"token expired: signed {age:.0f}s ago, max_age is {max_age:g}s")
        if age < -_CLOCK_SKEW:
            raise TokenError(f"token signed {-age:.0f}s in the future")
        return cls.parse(body)


def _mac(key: bytes | str, payload: str) -> str:
    raw_key = key.encode() if isinstance(key, str) else key
    if not raw_key:
        raise TokenError("signing key must not be empty")
    digest = hmac.new(raw_key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


EMPTY_TOKEN = CausalToken()
