"""The server processes: a data directory's postmaster, its children, and stopping
(freezing) and continuing them all with signals.

Only Linux is supported: the processes are found in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """Return (state, parent pid) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data.rpartition(")")[2].split()
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None:
                children.setdefault(info[1], []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _read_postmaster_pid(data_directory: Path) -> int | None:
    """The pid of the postmaster running on ``data_directory``; None if none runs."""
    try:
        text = (data_directory / "postmaster.pid").read_text(encoding="utf-8")
        pid = int(text.split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    info = _proc_stat(pid)
    if info is None or info[0] in "ZX":
        return None
    return pid


def _is_stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped by a signal (False for None)."""
    info = None if pid is None else _proc_stat(pid)
    return info is not None and info[0] in "Tt"


def _stop_tree(pid: int) -> list[int]:
    """SIGSTOP a postmaster, then its children; return all their pids, the postmaster's
    first."""
    _signal(pid, signal.SIGSTOP)
    pids = [pid, *_descendants(pid)]
    for child in pids[1:]:
        _signal(child, signal.SIGSTOP)
    return pids


def _tree_stopped(pids: Sequence[int]) -> bool:
    """Whether every process of ``pids`` is stopped (or gone)."""
    # exited children stay zombies until the (stopped) postmaster reaps them
    return all((_proc_stat(p) or ("X", 0))[0] in "TtZX" for p in pids)


def _continue_tree(pid: int) -> None:
    """SIGCONT the children of a postmaster, then the postmaster."""
    for child in _descendants(pid):
        _signal(child, signal.SIGCONT)
    _signal(pid, signal.SIGCONT)
