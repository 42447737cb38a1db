"""Routing state held in contextvars: what the current context must read, and scopes.

Every thread and every asyncio task sees its own :class:`RouteState`; a task started
from another starts with a copy of its parent's state, and what it does afterwards
stays its own. Scopes nest and restore on exit, with one exception that protects
read-your-writes: positions this context *wrote* survive the end of any scope (a token
only grows), so leaving ``lb.primary()`` or ``lb.causal(t)`` never forgets the caller's
own writes. :func:`isolated` drops even those, for a worker moving to its next job.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from types import TracebackType

from pgreplica._scope import EitherWith
from pgreplica.lsn import EMPTY_TOKEN, CausalToken

__all__ = ["Collected", "RouteState", "Scope", "collecting", "current_state", "record_write"]


class RouteState:
    """Immutable routing state of one context."""

    __slots__ = ("grown_at", "read_from", "read_only", "token", "use_primary", "written")

    token: CausalToken
    """The positions reads must see: adopted tokens merged with this context's writes."""
    written: CausalToken
    """The positions of this context's own writes."""
    use_primary: bool
    """Everything goes to the primary (``lb.primary()``)."""
    read_only: bool
    """Transactions started by a routing connection are read-only and may be pinned to
    a caught-up replica (``lb.read_only()``)."""
    read_from: frozenset[tuple[str, object]]
    """(database, host) pairs this context has read from: a job enqueued now must see
    at least what those hosts had replayed (:func:`pgreplica.jobs.capture`)."""
    grown_at: float
    """``time.monotonic()`` when the token last grew. A primary probed after this moment
    has reached every legitimate position of the token: one beyond it is not from this
    primary's history (another cluster, a lost timeline, a forgery) and is clamped."""

    def __init__(
        self,
        token: CausalToken,
        written: CausalToken,
        use_primary: bool,
        read_only: bool = False,
        read_from: frozenset[tuple[str, object]] = frozenset(),
        grown_at: float = 0.0,
    ) -> None:
        self.token = token
        self.written = written
        self.use_primary = use_primary
        self.read_only = read_only
        self.read_from = read_from
        self.grown_at = grown_at

    def __repr__(self) -> str:
        return (
            f"RouteState(token={str(self.token)!r}, written={str(self.written)!r}, "
            f"use_primary={self.use_primary}, read_only={self.read_only})"
        )


INITIAL_STATE = RouteState(EMPTY_TOKEN, EMPTY_TOKEN, False)
_STATE: ContextVar[RouteState] = ContextVar("pgreplica_route_state", default=INITIAL_STATE)

current_state = _STATE.get


class Collected:
    """What the contexts of one request wrote and read, its child contexts included
    (threads it hands work to, tasks it starts): their own state changes stay theirs,
    but this object is shared. See :func:`collecting`."""

    __slots__ = ("read_from", "written")

    def __init__(self) -> None:
        self.written: CausalToken = EMPTY_TOKEN
        self.read_from: set[tuple[str, object]] = set()

    def __repr__(self) -> str:
        return f"Collected(written={str(self.written)!r}, read_from={len(self.read_from)})"


_COLLECTED: ContextVar[Collected | None] = ContextVar("pgreplica_collected", default=None)


class collecting:
    """``with collecting() as collected:``: every write committed and every host first
    read from, in this context or any context started inside, is added to
    ``collected`` (for web middleware, whose app may run the request's work in a
    thread pool or in tasks of its own)."""

    __slots__ = ("_collected", "_reset")

    def __init__(self) -> None:
        self._collected = Collected()

    def __enter__(self) -> Collected:
        self._reset = _COLLECTED.set(self._collected)
        return self._collected

    def __exit__(self, *exc: object) -> None:
        try:
            _COLLECTED.reset(self._reset)
        except ValueError:  # left from another context than it was entered in
            _COLLECTED.set(None)


def record_write(positions: CausalToken) -> None:
    """The current context committed a write: its reads must now see ``positions``."""
    collected = _COLLECTED.get()
    if collected is not None:
        collected.written = collected.written | positions
    state = _STATE.get()
    _STATE.set(
        RouteState(
            state.token | positions,
            state.written | positions,
            state.use_primary,
            state.read_only,
            state.read_from,
            time.monotonic(),
        )
    )


def note_read(state: RouteState, database: str, host: object) -> None:
    """The current context (whose state is ``state``) read ``database`` on ``host``."""
    pair = (database, host)
    if pair not in state.read_from:
        collected = _COLLECTED.get()
        if collected is not None:
            collected.read_from.add(pair)
        _STATE.set(
            RouteState(
                state.token,
                state.written,
                state.use_primary,
                state.read_only,
                state.read_from | {pair},
                state.grown_at,
            )
        )


class Scope(EitherWith[RouteState]):
    """A context manager (``with`` or ``async with``) that changes routing state."""

    __slots__ = ("_adopt", "_isolate", "_read_only", "_saved", "_use_primary")

    def __init__(
        self,
        *,
        adopt: CausalToken | None = None,
        use_primary: bool | None = None,
        read_only: bool | None = None,
        isolate: bool = False,
    ) -> None:
        if adopt is not None and not isinstance(adopt, CausalToken):
            raise TypeError(f"expected a CausalToken, got {type(adopt).__name__}")
        self._adopt = adopt
        self._use_primary = use_primary
        self._read_only = read_only
        self._isolate = isolate
        self._saved: list[RouteState] = []

    def __enter__(self) -> RouteState:
        state = _STATE.get()
        self._saved.append(state)
        if self._isolate:
            state = INITIAL_STATE
        token = state.token | self._adopt if self._adopt is not None else state.token
        grown_at = state.grown_at if token is state.token else time.monotonic()
        use_primary = state.use_primary if self._use_primary is None else self._use_primary
        read_only = state.read_only if self._read_only is None else self._read_only
        new = RouteState(token, state.written, use_primary, read_only, state.read_from, grown_at)
        _STATE.set(new)
        return new

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        saved = self._saved.pop()
        if self._isolate:
            _STATE.set(saved)
            return
        inner = _STATE.get()
        written = inner.written
        _STATE.set(
            RouteState(
                saved.token | written,
                saved.written | written,
                saved.use_primary,
                saved.read_only,
                saved.read_from | inner.read_from,  # what was read stays read, as writes
                max(saved.grown_at, inner.grown_at),
            )
        )


def isolated() -> Scope:
    """A fresh state inside (no token, no primary pin); the outer state back on exit."""
    return Scope(isolate=True)
