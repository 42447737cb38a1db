"""The configuration of the servers: the settings every server shares, the per-server
settings file (port, apply delay) and the apply delays themselves."""

from __future__ import annotations

import math
import re
from pathlib import Path

from pgreplica.localcluster._util import HOST, SUPERUSER, ClusterError
from pgreplica.localcluster.binaries import _chown, _RunAs
from pgreplica.localcluster.files import _write_private

_SERVER_CONF = "pgreplica.conf"  # per-server settings, included from postgresql.conf

_SHARED_SETTINGS = """
# --- settings of the pgreplica local cluster ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 500ms
fsync = off
synchronous_commit = on
full_page_writes = off
shared_buffers = 32MB
max_connections = 100
logging_collector = off
# per-server settings (port, recovery_min_apply_delay), rewritten by pgreplica
include_if_exists = '{server_conf}'
"""


def parse_delay(delay: float | str) -> int:
    """Return an apply delay in milliseconds.

    Accepts seconds as a number (``0.3``) or a duration string with a unit (``"300ms"``,
    ``"2s"``, ``"1min"``, ``"1h"``); a string without a unit must be ``"0"``.
    """
    if isinstance(delay, bool):
        raise ClusterError(f"bad delay {delay!r}: use seconds or a duration such as '300ms'")
    if isinstance(delay, (int, float)):
        if not math.isfinite(delay) or delay < 0:
            raise ClusterError(f"bad delay {delay!r}: must be a finite number of seconds >= 0")
        return round(delay * 1000)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min|h)?\s*", str(delay))
    if match is None:
        raise ClusterError(f"bad delay {delay!r}: use a duration such as '300ms', '2s' or '1min'")
    value, unit = float(match.group(1)), match.group(2)
    if unit is None:
        if value != 0:
            raise ClusterError(f"delay {delay!r} needs a unit: ms, s, min or h (e.g. '300ms')")
        return 0
    return round(value * {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000}[unit])


def format_delay(ms: int) -> str:
    """Format milliseconds the way PostgreSQL accepts them (``"0"``, ``"300ms"``)."""
    return "0" if ms == 0 else f"{ms}ms"


def _add_shared_settings(data_directory: Path) -> None:
    """Append the shared settings to a new primary's postgresql.conf, and let the
    superuser connect for replication in its pg_hba.conf."""
    with open(data_directory / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(_SHARED_SETTINGS.format(server_conf=_SERVER_CONF))
    with open(data_directory / "pg_hba.conf", "a", encoding="utf-8") as hba:
        hba.write(f"host replication {SUPERUSER} {HOST}/32 scram-sha-256\n")


def _write_server_conf_file(
    data_directory: Path,
    port: int,
    user: _RunAs,
    *,
    replica: bool,
    apply_delay_ms: int | None = None,
) -> None:
    """Rewrite the per-server settings of a server, keeping those not given."""
    settings = _read_server_conf_file(data_directory)
    settings["port"] = str(port)
    if apply_delay_ms is not None:
        settings["recovery_min_apply_delay"] = format_delay(apply_delay_ms)
    elif replica:
        settings.setdefault("recovery_min_apply_delay", "0")
    lines = ["# Per-server settings of the pgreplica local cluster; rewritten by pgreplica."]
    lines += [f"{key} = '{value}'" for key, value in settings.items()]
    path = data_directory / _SERVER_CONF
    _write_private(path, "\n".join(lines) + "\n")
    _chown(path, user)


def _read_server_conf_file(data_directory: Path) -> dict[str, str]:
    """The per-server settings of a server ({} if it has none)."""
    settings: dict[str, str] = {}
    try:
        text = (data_directory / _SERVER_CONF).read_text(encoding="utf-8")
    except OSError:
        return settings
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            settings[key.strip()] = value.strip().strip("'")
    return settings
