"""The PostgreSQL server binaries, and the user the servers run as.

PostgreSQL refuses to run as root: when this process runs as root the servers run as the
unprivileged system user ``postgres``, which must be able to reach the cluster directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pgreplica.localcluster._util import SUPERUSER, ClusterError

BINDIR_ENV = "PGREPLICA_PG_BINDIR"


def find_bindir(bindir: str | None = None) -> str:
    """Find the directory holding the PostgreSQL server binaries (initdb, pg_ctl, ...).

    Order: ``bindir``, ``$PGREPLICA_PG_BINDIR``, ``pg_config --bindir`` (only if it holds
    initdb), ``initdb`` on PATH, then the newest ``/usr/lib/postgresql/*/bin``.
    """
    if bindir is not None:
        if not _has_initdb(bindir):
            raise ClusterError(f"no initdb in bindir {bindir}")
        return str(Path(bindir).absolute())
    env = os.environ.get(BINDIR_ENV)
    if env:
        if not _has_initdb(env):
            raise ClusterError(f"no initdb in {BINDIR_ENV}={env}")
        return str(Path(env).absolute())
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and _has_initdb(out.stdout.strip()):
            return out.stdout.strip()
    initdb = shutil.which("initdb")
    if initdb is not None:
        return str(Path(initdb).resolve().parent)
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_initdb(d)]
    if candidates:
        return max(candidates, key=_version_key)
    raise ClusterError(
        "PostgreSQL server binaries not found (initdb): install the Debian/Ubuntu package "
        f"'postgresql' or set {BINDIR_ENV}"
    )


def _has_initdb(directory: str) -> bool:
    return os.access(os.path.join(directory, "initdb"), os.X_OK)


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


@dataclass(frozen=True)
class _RunAs:
    """The user the servers run as; uid None means the current user."""

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    home: str | None = None


def _resolve_run_as() -> _RunAs:
    if os.geteuid() != 0:
        try:
            name = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            name = str(os.geteuid())
        return _RunAs(name=name)
    try:
        entry = pwd.getpwnam(SUPERUSER)
    except KeyError:
        entry = None
    if entry is None or entry.pw_uid == 0:
        raise ClusterError(
            "running as root: create an unprivileged user 'postgres' (apt-get install "
            "postgresql creates it) or run as a normal user"
        )
    return _RunAs(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        home=entry.pw_dir,
    )


def _can_traverse(path: Path, user: _RunAs) -> bool:
    if user.uid is None:
        return os.access(path, os.X_OK)
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in user.groups or st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _chown(path: Path, user: _RunAs) -> None:
    """Hand ``path`` over to ``user`` (nothing to do when it is the current user)."""
    if user.uid is not None and user.gid is not None:
        os.chown(path, user.uid, user.gid)
