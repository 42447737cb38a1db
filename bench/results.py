"""One benchmark scenario's results, as ``bench/results/<scenario>.json``.

Every scenario of ``make bench`` builds a :class:`Results` and saves it; ``python -m
bench.report`` turns all of them into ``bench/REPORT.md`` with PNG charts. The JSON
carries what the report needs and nothing else has to know a scenario's internals:

* ``meta``: the machine, the PostgreSQL server version, the git revision, when and how
  long, and the command line;
* ``summary``: a paragraph of Markdown;
* ``tables``: ``{"title", "columns", "rows", "note"}`` (cells are numbers or strings);
* ``charts``: ``{"file", "title", "kind": "bar"|"line", "xlabel", "ylabel", "x",
  "series": {name: [y, ...]}, "logy"}``; ``report`` draws them with matplotlib;
* ``targets``: ``{"target", "measured", "met"}``: each target of the benchmark
  suite stated against its measurement (``met`` is true, false, or null for a figure
  with no target);
* ``data``: the raw figures, for whoever wants to recompute.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Where the JSON files (and the report's charts) go.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
#: Scenarios import this module first: their run time counts from here.
_IMPORTED = (time.time(), time.monotonic())
#: What a run itself rewrites: not a change of the code measured.
_OUTPUTS = (":!bench/results", ":!bench/REPORT.md", ":!README.md")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def postgres_version() -> str | None:
    """The version of the PostgreSQL server binaries the local cluster uses."""
    from pgreplica.localcluster.binaries import find_bindir

    try:
        postgres = Path(find_bindir()) / "postgres"
        out = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "psycopg": _version("psycopg"),
    }


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


class Results:
    """What one scenario measured; :meth:`save` writes it."""

    def __init__(self, scenario: str, title: str) -> None:
        self.scenario = scenario
        self.title = title
        self.summary = ""
        self.tables: list[dict[str, Any]] = []
        self.charts: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {}
        self._started, self._clock = _IMPORTED

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        note: str = "",
    ) -> None:
        self.tables.append(
            {
                "title": title,
                "columns": list(columns),
                "rows": [list(r) for r in rows],
                "note": note,
            }
        )

    def chart(
        self,
        name: str,
        title: str,
        *,
        x: Sequence[Any],
        series: dict[str, Sequence[float | None]],
        kind: str = "line",
        xlabel: str = "",
        ylabel: str = "",
        logy: bool = False,
        logx: bool = False,
    ) -> None:
        """A chart, drawn by the report into ``bench/results/<scenario>-<name>.png``."""
        if kind not in ("line", "bar"):
            raise ValueError(f"chart kind must be 'line' or 'bar', not {kind!r}")
        for label, ys in series.items():
            if len(ys) != len(x):
                raise ValueError(
                    f"chart {name!r}: series {label!r} has {len(ys)} points, x {len(x)}"
                )
        self.charts.append(
            {
                "file": f"{self.scenario}-{name}.png",
                "title": title,
                "kind": kind,
                "xlabel": xlabel,
                "ylabel": ylabel,
                "x": list(x),
                "series": {k: list(v) for k, v in series.items()},
                "logy": logy,
                "logx": logx,
            }
        )

    def target(self, target: str, measured: str, met: bool | None) -> None:
        """A target of the suite stated against what this run measured."""
        self.targets.append({"target": target, "measured": measured, "met": met})

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "title": self.title,
            "meta": {
                "machine": machine(),
                "postgresql": postgres_version(),
                "git_revision": _git("rev-parse", "HEAD"),
                "git_dirty": bool(
                    _git("status", "--porcelain", "--untracked-files=no", "--", ".", *_OUTPUTS)
                ),
                "started": datetime.datetime.fromtimestamp(
                    self._started, datetime.timezone.utc
                ).isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - self._clock, 1),
                "argv": sys.argv[1:],
            },
            "summary": self.summary,
            "tables": self.tables,
            "charts": self.charts,
            "targets": self.targets,
            "data": self.data,
        }

    def save(self, directory: Path | None = None) -> Path:
        """Write ``<directory>/<scenario>.json`` (default ``bench/results``)."""
        directory = RESULTS_DIR if directory is None else directory
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.scenario}.json"
        path.write_text(json.dumps(self.as_dict(), indent=1, default=str) + "\n")
        print(f"results written to {path}", file=sys.stderr)
        return path
