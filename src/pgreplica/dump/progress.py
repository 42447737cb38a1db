"""Progress and warnings on stderr, and the :class:`DumpResult` a dump ends with."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pgreplica.dump.catalog import _Table


class _Reporter:
    """Progress and warnings on stderr: bars on a terminal, JSON lines otherwise."""

    def __init__(self, stream: TextIO, *, quiet: bool, tty: bool | None = None) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        # name -> [rows, estimate, bytes, done, secs, "8 key ranges" or ""]
        self._tables: dict[str, list[Any]] = {}
        self._drawn = 0
        self._last_draw = 0.0

    def _emit(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, **fields}, sort_keys=False) + "\n")
        self.stream.flush()

    def warning(self, message: str) -> None:
        with self._lock:
            if self.tty:
                self.stream.write(f"pgreplica: warning: {message}\n")
                self.stream.flush()
            else:
                self._emit("warning", message=message)

    def retry(self, message: str, *, attempt: int, attempts: int, wait: float) -> None:
        """The export starts again (attempt ``attempt`` of ``attempts``) in ``wait``
        seconds, for ``message``; shown even with ``quiet``, as warnings are."""
        with self._lock:
            if self.tty:
                self.stream.write(f"pgreplica: warning: {message}\n")
                self.stream.flush()
                self._drawn = 0  # the next attempt's bars go below, not over, the message
            else:
                self._emit("retry", attempt=attempt, attempts=attempts, wait=wait, message=message)
            self._tables.clear()

    def start(self, tables: Sequence[_Table]) -> None:
        with self._lock:
            for t in tables:
                self._tables[t.qualified] = [0, t.estimate, 0, False, 0.0, ""]
            if self.tty and not self.quiet:
                self._draw(force=True)

    def advance(self, table: str, rows: int, nbytes: int) -> None:
        if self.quiet or not self.tty:
            return
        with self._lock:
            state = self._tables[table]
            state[0], state[2] = rows, nbytes
            self._draw()

    def finish(self, table: _Table, *, parts: int = 0, split: str = "") -> None:
        """``table`` is copied; ``parts``: in that many ranges of ``split`` (``"block"``
        or ``"key"``; 0: by one plain ``COPY``)."""
        with self._lock:
            state = self._tables[table.qualified]
            state[:] = [
                table.rows,
                table.estimate,
                table.bytes,
                True,
                table.seconds,
                f"{parts} {split} ranges" if parts > 1 else "",
            ]
            if self.quiet:
                return
            if self.tty:
                self._draw(force=True)
            else:
                extra = {"parts": parts, "split": split} if parts else {}
                self._emit(
                    "table",
                    table=table.qualified,
                    rows=table.rows,
                    bytes=table.bytes,
                    seconds=round(table.seconds, 3),
                    file=table.file,
                    **extra,
                )

    def done(self, result: DumpResult) -> None:
        if self.quiet:
            return
        with self._lock:
            summary = (
                f"{len(result.tables)} tables, {sum(result.tables.values())} rows, "
                f"{result.bytes / 1e6:.1f} MB in {result.seconds:.2f}s -> {result.out}"
            )
            if self.tty:
                self.stream.write(f"pgreplica dump: {summary} (from {result.host})\n")
                self.stream.flush()
            else:
                self._emit(
                    "done",
                    tables=len(result.tables),
                    rows=sum(result.tables.values()),
                    bytes=result.bytes,
                    seconds=round(result.seconds, 3),
                    out=str(result.out),
                    host=result.host,
                    role=result.role,
                )

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        height = max(3, shutil.get_terminal_size((80, 24)).lines - 2)
        items = list(self._tables.items())
        if len(items) > height:
            running = [(n, s) for n, s in items if not s[3] and s[0]]
            finished = sum(1 for _, s in items if s[3])
            items = running[: height - 1]
            lines = [f"  {finished}/{len(self._tables)} tables done"]
        else:
            lines = []
        width = max((len(n) for n, _ in items), default=0)
        for name, (rows, estimate, nbytes, done, secs, parts) in items:
            if done:
                fraction: float | None = 1.0
            elif estimate:
                fraction = min(rows / estimate, 0.99)
            else:
                fraction = None
            bar = (
                "[" + "#" * round(20 * fraction) + "-" * (20 - round(20 * fraction)) + "]"
                f" {fraction:4.0%}"
                if fraction is not None
                else "[" + "?" * 20 + "]     "
            )
            tail = f" {secs:.1f}s" if done else ""
            tail += f" ({parts})" if done and parts else ""
            lines.append(f"  {name:<{width}} {bar} {rows:>12,} rows {nbytes / 1e6:8.1f} MB{tail}")
        out = self.stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F")
        for line in lines:
            out.write(line + "\x1b[K\n")
        self._drawn = len(lines)
        out.flush()


@dataclass(frozen=True)
class DumpResult:
    """What a dump wrote: where, from which host, and the row count of every table."""

    out: Path
    host: str
    role: str
    tables: Mapping[str, int]
    bytes: int
    seconds: float
    metadata: Mapping[str, Any]
    parts: Mapping[str, int] = field(default_factory=dict)
    """The tables big enough to be split, and into how many ranges each was split (1 with
    one worker): ranges of blocks or of the primary key."""
    attempts: int = 1
    """Snapshots it took: more than 1 when WAL replay on the replica cancelled an
    attempt (a recovery conflict) and the export started again."""
