"""Read-your-writes for message consumers: WAL-location envelopes.

An event published after a write (a live update to websocket subscribers) is consumed
on another node, which then reads the database. The publisher wraps the payload in an
envelope that carries the positions its context wrote or read (the same capture as
:func:`pgreplica.jobs.capture`); the consumer adopts them, so that its reads go to a
replica that has replayed them, after a bounded wait, or else to the primary::

    client.publish("items", pubsub.wrap({"id": 7}, lb))          # after the write

    @pubsub.consumer(lb)
    def on_item(payload):                                        # payload == {"id": 7}
        with lb.read() as conn: ...                              # sees item 7

The envelope is JSON text, readable from any language::

    {"pgreplica":1,"wal":{"main":"0/16B3748@1-7312345678901234567"},"type":"json","data":{"id":7}}

- ``pgreplica``: the format version (1);
- ``wal``: logical database -> position, as in job headers (``X/Y``, optionally
  ``@<timeline>-<system identifier>``); ``{}`` when the publisher could not tell (its
  consumers read the primary);
- ``type``: ``json`` (``data`` is the JSON value), ``text`` (``data`` is the string) or
  ``bytes`` (``data`` is base64);
- ``xid`` (instead of positions, from :func:`notify`): logical database -> the id of
  the transaction that sent the message, which had not committed yet; the consumer
  reads where ``pg_xact_status(xid)`` is ``committed``;
- ``sig`` (optional): base64url HMAC-SHA256, with a shared key, of the envelope's JSON
  without ``sig`` (keys sorted, no spaces), for envelopes that cross a trust boundary.

PostgreSQL LISTEN/NOTIFY: :func:`notify` sends the envelope with ``pg_notify`` inside
the writing transaction, so the notification and the write commit together (or not at
all). A position read there would be before the commit record, so the envelope carries
the transaction id instead: the consumer finds a replica where it has committed (its
replay position then covers the commit), within the wait, or asks the primary.

A message that is not an envelope (an older publisher during a rolling deploy) is
passed through unchanged, and its reads go to the primary. A malformed, oversized,
unsigned (when a key is required) or tampered envelope raises :class:`EnvelopeError`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import inspect
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg

from pgreplica import jobs
from pgreplica.balancer import CHECKOUT_ERRORS, bound_positions, is_connection_error
from pgreplica.errors import TokenError
from pgreplica.lsn import CausalToken, parse_lsn
from pgreplica.lsn import _mac as lsn_mac

__all__ = [
    "MAX_ENVELOPE",
    "Commit",
    "EnvelopeError",
    "anotify",
    "astart",
    "consumer",
    "notify",
    "start",
    "unwrap",
    "wrap",
    "wrap_async",
]

VERSION = 1
#: Envelopes larger than this (bytes of JSON) are refused by :func:`unwrap`.
MAX_ENVELOPE = 1024 * 1024
_TYPES = ("json", "text", "bytes")
F = TypeVar("F", bound=Callable[..., Any])


class EnvelopeError(TokenError):
    """A message that claims to be an envelope but cannot be trusted or read."""


class Commit:
    """What a :func:`notify` envelope depends on: transactions (per logical database)
    that had not committed when it was sent. :func:`start` turns it into positions."""

    __slots__ = ("xids",)

    def __init__(self, xids: Mapping[str, str]) -> None:
        self.xids = dict(xids)

    def __repr__(self) -> str:
        return f"Commit({self.xids!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Commit) and other.xids == self.xids

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.xids.items())))


def wrap(payload: Any, lb: Any, *, key: bytes | str | None = None) -> str:
    """The envelope of ``payload`` (bytes, str, or a JSON-able value) with the positions
    the current context wrote or read (``lb`` a :class:`~pgreplica.LoadBalancer`)."""
    return _envelope(payload, jobs.capture(lb), key)


async def wrap_async(payload: Any, lb: Any, *, key: bytes | str | None = None) -> str:
    """:func:`wrap` for an :class:`~pgreplica.AsyncLoadBalancer`."""
    return _envelope(payload, await jobs.acapture(lb), key)


def _envelope(
    payload: Any,
    wal: Mapping[str, str],
    key: bytes | str | None,
    xid: Mapping[str, str] | None = None,
) -> str:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        kind, data = "bytes", base64.b64encode(bytes(payload)).decode()
    elif isinstance(payload, str):
        kind, data = "text", payload
    else:
        kind, data = "json", payload
    body: dict[str, Any] = {"pgreplica": VERSION, "wal": dict(wal), "type": kind, "data": data}
    if xid:
        body["xid"] = dict(xid)
    try:
        text = _canonical(body)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"payload is not bytes, str or JSON-able: {exc}") from None
    if key is not None:
        body["sig"] = _mac(key, text)
        text = _canonical(body)
    return text


def unwrap(
    message: Any, *, key: bytes | str | None = None, max_bytes: int = MAX_ENVELOPE
) -> tuple[Any, CausalToken | Commit | None]:
    """``(payload, token)`` of a message (a :class:`Commit` for a :func:`notify`
    envelope). A message that is not an envelope comes back
    as it is, with ``None``: nothing says what it depends on, so its reads belong on
    the primary. With ``key``, an envelope must carry a valid signature."""
    raw = message
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if not raw.lstrip().startswith(b"{") or b'"pgreplica"' not in raw[:4096]:
            return message, None
        if len(raw) > max_bytes:
            raise EnvelopeError(f"envelope of {len(raw)} bytes, over the {max_bytes} limit")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise EnvelopeError("envelope is not UTF-8") from None
    elif isinstance(raw, str):
        if not raw.lstrip().startswith("{") or '"pgreplica"' not in raw[:4096]:
            return message, None
        if len(raw) > max_bytes:
            raise EnvelopeError(f"envelope of {len(raw)} characters, over the {max_bytes} limit")
        text = raw
    else:
        return message, None
    try:
        body = json.loads(text)
    except ValueError:
        raise EnvelopeError("envelope is not valid JSON") from None
    except RecursionError:
        raise EnvelopeError("envelope is nested too deeply") from None
    if not isinstance(body, dict) or "pgreplica" not in body:
        return message, None  # JSON that merely mentions the word
    if body.get("pgreplica") != VERSION:
        raise EnvelopeError(f"unknown envelope version {str(body.get('pgreplica'))[:20]!r}")
    signature = body.pop("sig", None)
    if key is not None:
        if not isinstance(signature, str):
            raise EnvelopeError("envelope is not signed")
        expected = _mac(key, _canonical(body)).encode()
        if not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected):
            raise EnvelopeError("envelope signature does not match")
    kind, data, wal = body.get("type"), body.get("data"), body.get("wal")
    if kind not in _TYPES or "data" not in body or not isinstance(wal, dict):
        raise EnvelopeError("envelope needs type (json, text or bytes), data and wal")
    xids = body.get("xid")
    token: CausalToken | Commit
    if xids is not None:
        if not isinstance(xids, dict) or not all(
            isinstance(v, str) and v.isdigit() and len(v) <= 20 for v in xids.values()
        ):
            raise EnvelopeError("envelope xid must map databases to transaction ids")
        token = Commit(xids)
    else:
        try:
            token = CausalToken.from_dict(wal)
        except TokenError as exc:
            raise EnvelopeError(f"envelope positions: {exc}") from None
    if kind == "bytes":
        if not isinstance(data, str):
            raise EnvelopeError("bytes envelope data must be base64 text")
        try:
            return base64.b64decode(data, validate=True), token
        except ValueError:
            raise EnvelopeError("bytes envelope data is not valid base64") from None
    if kind == "text" and not isinstance(data, str):
        raise EnvelopeError("text envelope data must be a string")
    return data, token


def start(
    lb: Any,
    token: CausalToken | Commit | None,
    *,
    name: str = "message",
    wait: jobs.WaitPolicy | tuple[int, float] | None = None,
) -> jobs.Decision:
    """Where a consumer's reads go (the jobs core's STICKY decision, always enabled):
    enter ``decision.scope`` around them. No token: the primary."""
    if isinstance(token, Commit):
        token = _committed(lb, token, jobs.WaitPolicy.of(wait, job=name))
    return jobs.start_job(lb, "sticky", token, job=name, wait=wait, enabled=True)


async def astart(
    lb: Any,
    token: CausalToken | Commit | None,
    *,
    name: str = "message",
    wait: jobs.WaitPolicy | tuple[int, float] | None = None,
) -> jobs.Decision:
    """:func:`start` for an :class:`~pgreplica.AsyncLoadBalancer`."""
    if isinstance(token, Commit):
        token = await _acommitted(lb, token, jobs.WaitPolicy.of(wait, job=name))
    return await jobs.astart_job(lb, "sticky", token, job=name, wait=wait, enabled=True)


def notify(
    conn: Any,
    channel: str,
    payload: Any,
    lb: Any,
    *,
    database: str | None = None,
    key: bytes | str | None = None,
) -> None:
    """``pg_notify(channel, envelope)`` on ``conn``, a connection in the writing
    transaction on the primary (``with lb.write() as conn``, or a routing connection
    in a transaction): the message is delivered only if the transaction commits, and
    its consumers read where that commit has been replayed."""
    row = conn.execute(XID_SQL).fetchone()
    conn.execute(NOTIFY_SQL, (channel, _notify_envelope(payload, lb, database, row, key)))


async def anotify(
    conn: Any,
    channel: str,
    payload: Any,
    lb: Any,
    *,
    database: str | None = None,
    key: bytes | str | None = None,
) -> None:
    """:func:`notify` on an asyncio connection."""
    cur = await conn.execute(XID_SQL)
    row = await cur.fetchone()
    await conn.execute(NOTIFY_SQL, (channel, _notify_envelope(payload, lb, database, row, key)))


XID_SQL = "SELECT pg_current_xact_id()::text"
NOTIFY_SQL = "SELECT pg_notify(%s, %s)"
#: A replica where the transaction has committed, and how far it has replayed.
REPLICA_COMMIT_SQL = "SELECT pg_xact_status(%s::xid8), pg_last_wal_replay_lsn()::text"
PRIMARY_COMMIT_SQL = "SELECT pg_xact_status(%s::xid8), pg_current_wal_insert_lsn()::text"
#: PostgreSQL's limit on a NOTIFY payload.
NOTIFY_MAX = 7999


def _notify_envelope(
    payload: Any, lb: Any, database: str | None, row: Any, key: bytes | str | None
) -> str:
    route = lb._router.route(database)
    xid = str(row[0])
    envelope = _envelope(payload, {}, key, dict.fromkeys(route.shares_primary_with, xid))
    if len(envelope.encode()) > NOTIFY_MAX:
        raise EnvelopeError(
            f"envelope of {len(envelope.encode())} bytes: NOTIFY payloads are limited to"
            f" {NOTIFY_MAX}; publish an id and read the rest"
        )
    return envelope


def _committed(lb: Any, commit: Commit, policy: jobs.WaitPolicy) -> CausalToken | None:
    """Positions at or past each transaction's commit: a replica's replay position
    where it has committed (asked up to ``policy``), else the primary's position. None
    when even the primary cannot say (the reads then go to the primary)."""
    positions: dict[str, int] = {}
    for name, xid in commit.xids.items():
        route = lb._router.databases.get(name)
        if route is None:
            continue  # a database this balancer does not route
        position = 0
        for attempt in range(policy.tries + 1):
            for host in route.read_set:
                position = _ask(lb, host, REPLICA_COMMIT_SQL, xid)
                if position:
                    break
            if position or attempt == policy.tries or not route.read_set:
                break
            time.sleep(policy.interval)
        position = position or _ask(lb, route.primary, PRIMARY_COMMIT_SQL, xid)
        if not position:
            return None
        positions[name] = position
    return bound_positions(lb._router, positions)


async def _acommitted(lb: Any, commit: Commit, policy: jobs.WaitPolicy) -> CausalToken | None:
    """:func:`_committed` for an asyncio balancer."""
    positions: dict[str, int] = {}
    for name, xid in commit.xids.items():
        route = lb._router.databases.get(name)
        if route is None:
            continue
        position = 0
        for attempt in range(policy.tries + 1):
            for host in route.read_set:
                position = await _aask(lb, host, REPLICA_COMMIT_SQL, xid)
                if position:
                    break
            if position or attempt == policy.tries or not route.read_set:
                break
            await asyncio.sleep(policy.interval)
        position = position or await _aask(lb, route.primary, PRIMARY_COMMIT_SQL, xid)
        if not position:
            return None
        positions[name] = position
    return bound_positions(lb._router, positions)


def _position(row: Any) -> int:
    if row and row[0] == "committed" and row[1]:
        return parse_lsn(str(row[1]))
    return 0


def _ask(lb: Any, host: Any, sql: str, xid: str) -> int:
    """The position ``host`` reports if ``xid`` has committed there, else 0."""
    try:
        conn = lb._checkout(host)
    except CHECKOUT_ERRORS:
        return 0
    try:
        return _position(conn.execute(sql, (xid,)).fetchone())
    except psycopg.Error as exc:  # 22023 "in the future": not replayed yet
        if is_connection_error(exc):
            lb._host_failed(host, exc)
        return 0
    finally:
        lb._checkin(host, conn)


async def _aask(lb: Any, host: Any, sql: str, xid: str) -> int:
    try:
        conn = await lb._checkout(host)
    except CHECKOUT_ERRORS:
        return 0
    try:
        cur = await conn.execute(sql, (xid,))
        return _position(await cur.fetchone())
    except psycopg.Error as exc:
        if is_connection_error(exc):
            lb._host_failed(host, exc)
        return 0
    finally:
        await lb._checkin(host, conn)


def consumer(
    lb: Any,
    *,
    key: bytes | str | None = None,
    wait: jobs.WaitPolicy | tuple[int, float] | None = None,
    name: str | None = None,
    on_error: Callable[[Any, EnvelopeError], Any] | None = None,
) -> Callable[[F], F]:
    """Decorate a consumer callback ``f(payload, *args, **kwargs)`` (sync or async):
    it receives the unwrapped payload and runs inside the envelope's scope (a caught-up
    replica within ``wait``, else the primary). A message that cannot be trusted calls
    ``on_error(message, error)`` instead (default: raise :class:`EnvelopeError`),
    so one bad message never stops a consumer loop that catches it."""

    def decorate(func: F) -> F:
        job = name or f"{func.__module__}.{func.__qualname__}"

        def prepare(message: Any) -> tuple[Any, CausalToken | Commit | None] | None:
            try:
                return unwrap(message, key=key)
            except EnvelopeError as exc:
                if on_error is None:
                    raise
                on_error(message, exc)
                return None

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(message: Any, *args: Any, **kwargs: Any) -> Any:
                unwrapped = prepare(message)
                if unwrapped is None:
                    return None
                payload, token = unwrapped
                decision = await astart(lb, token, name=job, wait=wait)
                async with decision.scope:
                    return await func(payload, *args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(message: Any, *args: Any, **kwargs: Any) -> Any:
            unwrapped = prepare(message)
            if unwrapped is None:
                return None
            payload, token = unwrapped
            with start(lb, token, name=job, wait=wait).scope:
                return func(payload, *args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


def _canonical(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _mac(key: bytes | str, text: str) -> str:
    try:
        return lsn_mac(key, text)  # the HMAC signed tokens use
    except TokenError as exc:
        raise EnvelopeError(str(exc)) from None
