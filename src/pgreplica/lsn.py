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
from collections.abc import Iterable, Iterator, Mapping

from pgreplica.errors import TokenError

_LSN_RE = re.compile(r"\A([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")
_NAME_RE = re.compile(r"\A[A-Za-z0-9_]{1,63}\Z")
_MAX_TOKEN_TEXT = 4096
#: A token from a mapping (a job's headers) names at most this many databases; its
#: text form is bounded by _MAX_TOKEN_TEXT.
_MAX_TOKEN_DATABASES = 256


def _shown(name: object) -> str:
    """A name from untrusted input, for an error message: quoted, at most 40 characters."""
    return repr(str(name)[:40])


#: How long a signed token is accepted after it was signed, by default (seconds).
SIGNED_MAX_AGE = 3600.0
_CLOCK_SKEW = 300.0


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> integer position. Raises :class:`TokenError` if malformed."""
    match = _LSN_RE.match(text)
    if match is None:
        raise TokenError(f"malformed LSN {text[:40]!r}: expected 'X/Y' in hexadecimal")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


#: A WAL page, and the header that starts every page that does not start a segment.
_WAL_PAGE = 8192
_PAGE_HEADER = 24


def replayed_through(position: int) -> int:
    """What a replica whose replay position is ``position`` holds, in the terms tokens
    use. A record that ends exactly at a WAL page boundary leaves the primary's insert
    position (the token) after the next page's header, where no record ends: a replica
    that replayed up to the boundary has all of it, and would otherwise never reach
    the token until some later write. (A segment's first page has a longer header; a
    token there waits for the next write or falls back to the primary, safely.)"""
    if position and position % _WAL_PAGE == 0:
        return position + _PAGE_HEADER
    return position


def format_lsn(position: int) -> str:
    """Integer position -> PostgreSQL's ``'X/Y'`` text form."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


_ORIGIN_RE = re.compile(r"\A([1-9][0-9]{0,9})-([0-9]{1,20})\Z")


def origin_of(timeline: int | None, system_identifier: str | None) -> str | None:
    """The origin a position is bound to: ``"<timeline>-<system identifier>"``, the
    history it belongs to (``None`` when either is unknown)."""
    if not timeline or not system_identifier:
        return None
    return f"{timeline}-{system_identifier}"


def split_origin(origin: str) -> tuple[int, str]:
    """``"2-7312345678901234567"`` -> ``(2, "7312345678901234567")``."""
    timeline, _, system = origin.partition("-")
    return int(timeline), system


def _parse_entry(name: str, text: str) -> tuple[int, str | None]:
    lsn_text, sep, origin = text.partition("@")
    if sep and not _ORIGIN_RE.match(origin):
        raise TokenError(
            f"malformed origin {origin[:40]!r} for {_shown(name)}: expected"
            " '<timeline>-<system identifier>' in decimal"
        )
    return parse_lsn(lsn_text), origin if sep else None


def _wins(position: int, origin: str | None, old: int, old_origin: str | None) -> bool:
    """Whether (``position``, ``origin``) replaces (``old``, ``old_origin``) in a merge.

    In one history (or when either is unbound) the later position wins, a bound one on
    a tie. Across histories the later timeline wins (a failover's new history), then
    the later position, then the larger system identifier: any order is arbitrary
    there, this one is at least the same whichever side is merged into which."""
    if origin == old_origin or origin is None or old_origin is None:
        return position > old or (position == old and old_origin is None and origin is not None)
    timeline, system = split_origin(origin)
    old_timeline, old_system = split_origin(old_origin)
    return (timeline, position, int(system)) > (old_timeline, old, int(old_system))


class CausalToken:
    """An immutable map: logical database -> the LSN a reader must have seen.

    Tokens only grow: ``a | b`` keeps the later position per database. ``str(token)``
    is a compact text safe in a header, a cookie or a message
    (``main=0/16B3748@1-7312345678901234567&ci=0/52A0``); :meth:`sign` adds an
    HMAC-SHA256 for transport through untrusted hands.

    A position may be bound to its *origin*, ``<timeline>-<system identifier>`` of the
    primary that wrote it: the router then knows a token from another cluster, or one
    from a timeline that a failover ended after that position, and sends such reads to
    the primary instead of trusting a replica that cannot have those writes.
    """

    __slots__ = ("_hash", "_lsns", "_origins")

    _lsns: dict[str, int]
    _origins: dict[str, str]
    _hash: int | None

    def __init__(
        self, lsns: Mapping[str, int] | None = None, origins: Mapping[str, str] | None = None
    ) -> None:
        clean: dict[str, int] = {}
        for name, position in (lsns or {}).items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise TokenError(f"invalid database name in token: {_shown(name)}")
            if not isinstance(position, int) or isinstance(position, bool):
                raise TokenError(
                    f"LSN for {_shown(name)} must be an int, got {type(position).__name__}"
                )
            if not 0 <= position < 1 << 64:
                raise TokenError(f"LSN for {_shown(name)} out of range: {str(position)[:40]}")
            if position:
                clean[name] = position
        bound: dict[str, str] = {}
        for name, origin in (origins or {}).items():
            if name not in clean or origin is None:
                continue
            if not isinstance(origin, str) or not _ORIGIN_RE.match(origin):
                raise TokenError(f"malformed origin for {_shown(name)}: {str(origin)[:40]!r}")
            bound[name] = origin
        self._lsns = clean
        self._origins = bound
        self._hash = None

    @classmethod
    def _trusted(cls, lsns: dict[str, int], origins: dict[str, str]) -> CausalToken:
        token = object.__new__(cls)
        token._lsns = lsns
        token._origins = origins
        token._hash = None
        return token

    def get(self, database: str) -> int:
        """The LSN required for ``database`` (0 when the token says nothing about it)."""
        return self._lsns.get(database, 0)

    def origin(self, database: str) -> str | None:
        """The origin of ``database``'s position (``None``: unbound or absent)."""
        return self._origins.get(database)

    def __or__(self, other: CausalToken) -> CausalToken:
        if not isinstance(other, CausalToken):
            return NotImplemented
        if not other._lsns or (other._lsns == self._lsns and other._origins == self._origins):
            return self
        if not self._lsns:
            return other
        merged = dict(self._lsns)
        origins = dict(self._origins)
        for name, position in other._lsns.items():
            origin = other._origins.get(name)
            if name not in merged or _wins(position, origin, merged[name], origins.get(name)):
                merged[name] = position
                if origin is None:
                    origins.pop(name, None)
                else:
                    origins[name] = origin
        return CausalToken._trusted(merged, origins)

    def covers(self, other: CausalToken) -> bool:
        """True when every position of ``other`` is at or below this token's (of the
        same history, when both are bound)."""
        for name, position in other._lsns.items():
            mine = self._lsns.get(name, 0)
            origin, my_origin = other._origins.get(name), self._origins.get(name)
            if origin is None or my_origin is None or origin == my_origin:
                if mine < position:
                    return False
            elif _wins(position, origin, mine, my_origin):
                return False
        return True

    def only(self, databases: Iterable[str]) -> CausalToken:
        """The positions of ``databases`` alone (with their origins)."""
        keep = {n: self._lsns[n] for n in databases if n in self._lsns}
        return CausalToken._trusted(keep, {n: o for n, o in self._origins.items() if n in keep})

    def items(self) -> Iterator[tuple[str, int]]:
        return iter(sorted(self._lsns.items()))

    def _text(self, name: str, position: int) -> str:
        origin = self._origins.get(name)
        return format_lsn(position) if origin is None else f"{format_lsn(position)}@{origin}"

    def as_dict(self) -> dict[str, str]:
        """``{"main": "0/16B3748@1-7312345678901234567"}``: the form job headers and
        message envelopes carry (``@`` and the origin only for a bound position)."""
        return {name: self._text(name, position) for name, position in self.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> CausalToken:
        if not isinstance(data, Mapping):
            raise TokenError(f"token must be a mapping, got {type(data).__name__}")
        if len(data) > _MAX_TOKEN_DATABASES:
            raise TokenError(f"token names {len(data)} databases, at most {_MAX_TOKEN_DATABASES}")
        lsns: dict[str, int] = {}
        origins: dict[str, str] = {}
        for name, text in data.items():
            if not isinstance(text, str):
                raise TokenError(f"LSN for {_shown(name)} must be text like '0/16B3748'")
            lsns[name], origin = _parse_entry(str(name), text)
            if origin is not None:
                origins[name] = origin
        return cls(lsns, origins)

    def __bool__(self) -> bool:
        return bool(self._lsns)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CausalToken)
            and self._lsns == other._lsns
            and self._origins == other._origins
        )

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((frozenset(self._lsns.items()), frozenset(self._origins.items())))
        return self._hash

    def __str__(self) -> str:
        return "&".join(f"{name}={self._text(name, position)}" for name, position in self.items())

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
        origins: dict[str, str] = {}
        for part in text.split("&"):
            name, sep, entry = part.partition("=")
            if not sep:
                raise TokenError(f"malformed token part {part[:40]!r}: expected 'database=X/Y'")
            if name in lsns:
                raise TokenError(f"database {_shown(name)} appears twice in token")
            lsns[name], origin = _parse_entry(name, entry)
            if origin is not None:
                origins[name] = origin
        return cls(lsns, origins)

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
        expected = _mac(key, payload).encode()
        if not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected):
            raise TokenError("token signature does not match")
        body, sep, issued = payload.rpartition(".")
        if not sep or not (issued.isascii() and issued.isdigit()) or len(issued) > 12:
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
    # surrogatepass: text with lone surrogates (surrogateescape, a JSON "\ud800") is
    # signed and checked like any other, not a UnicodeEncodeError; other text as UTF-8.
    digest = hmac.new(raw_key, payload.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


EMPTY_TOKEN = CausalToken()
