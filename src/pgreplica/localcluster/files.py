"""The files of the cluster directory: ``cluster.json``, the password file, the logs, and
preparing the directory for the user the servers run as."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import cast

from pgreplica.localcluster._util import ClusterError
from pgreplica.localcluster.binaries import _can_traverse, _chown, _RunAs

DEFAULT_DIRECTORY = ".pgreplica-cluster"

_STATE_FILE = "cluster.json"
_PASSWORD_FILE = "pwfile"
_CONFIG_FILE = "pgreplica.toml"
_STATE_FORMAT = 1


def _read_state_file(directory: Path) -> dict[str, object] | None:
    """The contents of ``DIR/cluster.json``; None if there is none."""
    try:
        text = (directory / _STATE_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClusterError(f"cannot read {directory / _STATE_FILE}: {exc.strerror}") from None
    try:
        state = json.loads(text)
    except ValueError:
        raise ClusterError(f"{directory / _STATE_FILE} is not valid JSON") from None
    if not isinstance(state, dict) or "replicas" not in state or "port" not in state:
        raise ClusterError(f"{directory / _STATE_FILE} does not describe a cluster")
    return cast(dict[str, object], state)


def _prepare_directory(directory: Path, user: _RunAs) -> None:
    """Create the cluster directory and its ``logs`` for ``user``.

    Refuses a directory that holds something other than a cluster, and one that ``user``
    cannot reach.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"cannot create {directory}: {exc.strerror}") from None
    if _read_state_file(directory) is None and any(
        p.name not in (_PASSWORD_FILE, "logs") for p in directory.iterdir()
    ):
        raise ClusterError(
            f"{directory} is not empty and holds no {_STATE_FILE}: "
            "use a new or empty directory for the cluster"
        )
    if user.uid is not None:
        for parent in reversed(directory.resolve().parents):
            if not _can_traverse(parent, user):
                mode = stat.S_IMODE(parent.stat().st_mode)
                raise ClusterError(
                    f"user '{user.name}' (the servers run as it because this process runs "
                    f"as root) cannot reach {directory}: {parent} is not traversable "
                    f"(mode {mode:04o}); choose a directory under a world-traversable "
                    "parent such as /tmp (e.g. tempfile.mkdtemp()), or chmod o+x "
                    f"{parent}"
                )
        _chown(directory, user)
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    _chown(logs, user)


def _log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a server log, headed for an error message; "" if none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            tail = handle.readlines()[-lines:]
    except OSError:
        return ""
    if not tail:
        return ""
    return f"\n--- last lines of {path} ---\n" + "".join(tail).rstrip("\n")


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (created or truncated)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(fd, 0o600)
        handle.write(text)
