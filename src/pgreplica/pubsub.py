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
- ``sig`` (optional): base64url HMAC-SHA256, with a shared key, of the envelope's JSON
  without ``sig`` (keys sorted, no spaces), for envelopes that cross a trust boundary.

A message that is not an envelope (an older publisher during a rolling deploy) is
passed through unchanged, and its reads go to the primary. A malformed, oversized,
unsigned (when a key is required) or tampered envelope raises :class:`EnvelopeError`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pgreplica import jobs
from pgreplica.errors import TokenError
from pgreplica.lsn import CausalToken

__all__ = [
    "MAX_ENVELOPE",
    "EnvelopeError",
    "consumer",
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


def wrap(payload: Any, lb: Any, *, key: bytes | str | None = None) -> str:
    """The envelope of ``payload`` (bytes, str, or a JSON-able value) with the positions
    the current context wrote or read (``lb`` a :class:`~pgreplica.LoadBalancer`)."""
    return _envelope(payload, jobs.capture(lb), key)


async def wrap_async(payload: Any, lb: Any, *, key: bytes | str | None = None) -> str:
    """:func:`wrap` for an :class:`~pgreplica.AsyncLoadBalancer`."""
    return _envelope(payload, await jobs.acapture(lb), key)


def _envelope(payload: Any, wal: Mapping[str, str], key: bytes | str | None) -> str:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        kind, data = "bytes", base64.b64encode(bytes(payload)).decode()
    elif isinstance(payload, str):
        kind, data = "text", payload
    else:
        kind, data = "json", payload
    body: dict[str, Any] = {"pgreplica": VERSION, "wal": dict(wal), "type": kind, "data": data}
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
) -> tuple[Any, CausalToken | None]:
    """``(payload, token)`` of a message. A message that is not an envelope comes back
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
    if not isinstance(body, dict) or "pgreplica" not in body:
        return message, None  # JSON that merely mentions the word
    if body.get("pgreplica") != VERSION:
        raise EnvelopeError(f"unknown envelope version {str(body.get('pgreplica'))[:20]!r}")
    signature = body.pop("sig", None)
    if key is not None:
        if not isinstance(signature, str):
            raise EnvelopeError("envelope is not signed")
        if not hmac.compare_digest(signature.encode(), _mac(key, _canonical(body)).encode()):
            raise EnvelopeError("envelope signature does not match")
    kind, data, wal = body.get("type"), body.get("data"), body.get("wal")
    if kind not in _TYPES or "data" not in body or not isinstance(wal, dict):
        raise EnvelopeError("envelope needs type (json, text or bytes), data and wal")
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
    token: CausalToken | None,
    *,
    name: str = "message",
    wait: jobs.WaitPolicy | tuple[int, float] | None = None,
) -> jobs.Decision:
    """Where a consumer's reads go (the jobs core's STICKY decision, always enabled):
    enter ``decision.scope`` around them. No token: the primary."""
    return jobs.start_job(lb, "sticky", token, job=name, wait=wait, enabled=True)


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

        def prepare(message: Any) -> tuple[Any, CausalToken | None] | None:
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
                decision = await jobs.astart_job(
                    lb, "sticky", token, job=job, wait=wait, enabled=True
                )
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
    raw = key.encode() if isinstance(key, str) else key
    if not raw:
        raise EnvelopeError("signing key must not be empty")
    digest = hmac.new(raw, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
