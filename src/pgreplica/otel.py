"""OpenTelemetry: routed statements add their routing to the active span.

With the setting ``opentelemetry = true`` (``PGREPLICA_OPENTELEMETRY=true``) and
``opentelemetry-api`` installed (extra ``pgreplica[opentelemetry]``), every routed
statement sets on the current span, when one is recording:
``pgreplica.db_config_name``, ``pgreplica.host`` (the password-free label),
``pgreplica.role`` and ``pgreplica.reason`` (the last statement's win). Off, nothing
is imported.
"""

from __future__ import annotations

from typing import Any

from pgreplica._extras import require
from pgreplica._fork import ForkSafeLock
from pgreplica.observe import Event, Observed, add_sink

__all__ = ["enable"]

_LOCK = ForkSafeLock()
_TRACE: list[Any] = []


def enable() -> None:
    """Start annotating spans (idempotent)."""
    trace = require(
        "opentelemetry.trace", extra="opentelemetry", feature="opentelemetry", setting=True
    )
    with _LOCK:
        if not _TRACE:
            _TRACE.append(trace)
            add_sink(_sink)


def _sink(event: Observed) -> None:
    if not isinstance(event, Event):
        return
    span = _TRACE[0].get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "pgreplica.db_config_name": event.db_config_name,
                "pgreplica.host": event.host,
                "pgreplica.role": "primary" if event.primary else "replica",
                "pgreplica.reason": event.reason,
            }
        )
