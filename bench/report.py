"""``bench/REPORT.md`` (with PNG charts) from the scenarios' ``bench/results/*.json``.

Run ``python -m bench.report`` (``make bench`` runs it after the scenarios). It reads
every ``*.json`` in ``bench/results`` (the contract is in :mod:`bench.results`), draws
each chart with matplotlib into ``bench/results/<file>``, and writes:

* ``bench/REPORT.md``: where the figures come from (machine, PostgreSQL, git revision,
  date), every target of every scenario in one table, then one section per scenario
  (overhead, offload, failover, scale, then the rest alphabetically) with its summary,
  tables and charts; a scenario without results says so;
* the block between ``<!-- bench-headline:begin -->`` and ``<!-- bench-headline:end -->``
  in ``README.md``: the targets of the overhead, offload and failover scenarios.

A malformed results file is named with what is wrong in it; what can be read of it is
still reported, and the exit status is 1. Without matplotlib the report is written
without charts (and says so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
REPORT = BENCH_DIR / "REPORT.md"
README = ROOT / "README.md"

#: Every scenario of ``make bench``; the report has a section for each, in this order
#: first, then the others alphabetically (with any results file of another name).
FIRST = ("overhead", "offload", "failover", "scale")
SCENARIOS = (
    *FIRST,
    "classify",
    "dump",
    "dump_filters",
    "dump_parallel",
    "pgbouncer",
    "pubsub",
    "routing",
    "sqlalchemy_session",
    "tagging",
    "token_cost",
)
#: The scenarios whose targets the README headline shows.
HEADLINE = ("overhead", "offload", "failover")

BEGIN = "<!-- bench-headline:begin -->"
END = "<!-- bench-headline:end -->"

MET = {True: "✅", False: "❌", None: "—"}
_CHART_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


class Malformed(Exception):
    """A part of a results file that is not what :mod:`bench.results` writes."""


# --------------------------------------------------------------------------- reading


@dataclass
class Scenario:
    """One results file, checked; the parts that could not be read are in ``problems``."""

    path: Path
    name: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    tables: list[dict[str, Any]] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Charts drawn by this run of the report (file names).
    drawn: list[str] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(item: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = item.get(key)
    if value is None:
        if required:
            raise Malformed(f"no {key!r}")
        return ""
    if not isinstance(value, str):
        raise Malformed(f"{key!r} is {type(value).__name__}, not a string")
    return value


def _cell_ok(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _check_table(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise Malformed(f"is {type(item).__name__}, not an object")
    title = _text(item, "title")
    columns = item.get("columns")
    if not isinstance(columns, list) or not columns:
        raise Malformed("'columns' is missing or not a non-empty list")
    rows = item.get("rows")
    if not isinstance(rows, list):
        raise Malformed("'rows' is missing or not a list")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise Malformed(f"rows[{i}] is not a list")
        if len(row) != len(columns):
            raise Malformed(f"rows[{i}] has {len(row)} cells for {len(columns)} columns")
        for cell in row:
            if not _cell_ok(cell):
                raise Malformed(f"rows[{i}] has a {type(cell).__name__} cell")
    return {
        "title": title,
        "columns": [str(c) for c in columns],
        "rows": rows,
        "note": _text(item, "note"),
    }


def _check_chart(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise Malformed(f"is {type(item).__name__}, not an object")
    file = _text(item, "file", required=True)
    if not _CHART_FILE.match(file):
        raise Malformed(f"'file' {file!r} is not a plain name ending in .png")
    kind = item.get("kind", "line")
    if kind not in ("line", "bar"):
        raise Malformed(f"'kind' is {kind!r}, not 'line' or 'bar'")
    x = item.get("x")
    if not isinstance(x, list) or not x:
        raise Malformed("'x' is missing or not a non-empty list")
    if not all(isinstance(v, str) or _is_number(v) for v in x):
        raise Malformed("'x' holds something other than numbers and strings")
    series = item.get("series")
    if not isinstance(series, dict) or not series:
        raise Malformed("'series' is missing or not a non-empty object")
    for label, ys in series.items():
        if not isinstance(ys, list):
            raise Malformed(f"series {label!r} is not a list")
        if len(ys) != len(x):
            raise Malformed(f"series {label!r} has {len(ys)} points for {len(x)} x values")
        if not all(y is None or _is_number(y) for y in ys):
            raise Malformed(f"series {label!r} holds something other than numbers and null")
    logx = bool(item.get("logx", False))
    if logx and not all(_is_number(v) and v > 0 for v in x):
        raise Malformed("'logx' is set but the x values are not all positive numbers")
    return {
        "file": file,
        "title": _text(item, "title"),
        "kind": kind,
        "xlabel": _text(item, "xlabel"),
        "ylabel": _text(item, "ylabel"),
        "x": x,
        "series": series,
        "logy": bool(item.get("logy", False)),
        "logx": logx,
    }


def _check_target(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise Malformed(f"is {type(item).__name__}, not an object")
    met = item.get("met")
    if met not in (True, False, None):
        raise Malformed(f"'met' is {met!r}, not true, false or null")
    measured = item.get("measured")
    if measured is None:
        raise Malformed("no 'measured'")
    return {
        "target": _text(item, "target", required=True),
        "measured": measured if isinstance(measured, str) else format_cell(measured),
        "met": met,
    }


def _items(scenario: Scenario, doc: dict[str, Any], key: str, check: Any) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        scenario.problems.append(f"{key!r} is {type(value).__name__}, not a list")
        return []
    out = []
    for i, item in enumerate(value):
        try:
            out.append(check(item))
        except Malformed as e:
            scenario.problems.append(f"{key}[{i}]: {e} (left out)")
    return out


def load(path: Path) -> Scenario:
    """Read one results file; what is wrong with it ends up in ``problems``."""
    scenario = Scenario(path=path, name=path.stem)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        scenario.problems.append(f"cannot be read: {e}")
        return scenario
    except json.JSONDecodeError as e:
        scenario.problems.append(f"is not valid JSON: {e}")
        return scenario
    if not isinstance(doc, dict):
        scenario.problems.append(f"holds a {type(doc).__name__}, not an object")
        return scenario
    named = doc.get("scenario")
    if named != path.stem:
        scenario.problems.append(f"'scenario' is {named!r}, the file name says {path.stem!r}")
    for key in ("title", "summary"):
        try:
            setattr(scenario, key, _text(doc, key))
        except Malformed as e:
            scenario.problems.append(str(e))
    meta = doc.get("meta")
    if isinstance(meta, dict):
        scenario.meta = meta
    else:
        scenario.problems.append("'meta' is missing or not an object")
    scenario.tables = _items(scenario, doc, "tables", _check_table)
    scenario.charts = _items(scenario, doc, "charts", _check_chart)
    scenario.targets = _items(scenario, doc, "targets", _check_target)
    return scenario


def order(names: Iterable[str]) -> list[str]:
    """Overhead, offload, failover, scale, then the others alphabetically."""
    names = set(names)
    return [n for n in FIRST if n in names] + sorted(names - set(FIRST))


# -------------------------------------------------------------------------- formatting


def format_number(value: float) -> str:
    """>= 100: no decimals, >= 10: one, else two (integers as they are)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    size = abs(value)
    decimals = 0 if size >= 100 else 1 if size >= 10 else 2
    return f"{value:.{decimals}f}"


def format_cell(value: Any) -> str:
    """A table cell: numbers as :func:`format_number`, null empty, strings as they are."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format_number(value)
    return str(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table; columns holding only numbers are right-aligned."""
    numeric = [
        any(_is_number(r[i]) for r in rows) and all(r[i] is None or _is_number(r[i]) for r in rows)
        for i in range(len(columns))
    ]
    lines = ["| " + " | ".join(_escape(str(c)) for c in columns) + " |"]
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_escape(format_cell(c)) for c in row) + " |")
    return lines


def _revision(meta: dict[str, Any]) -> str:
    rev = meta.get("git_revision")
    if not isinstance(rev, str) or not rev:
        return "unknown"
    return rev[:12] + (" (dirty)" if meta.get("git_dirty") else "")


def _machine(meta: dict[str, Any]) -> str:
    m = meta.get("machine")
    if not isinstance(m, dict):
        return "unknown"
    parts = []
    if m.get("cpu_model"):
        parts.append(str(m["cpu_model"]))
    if m.get("cpus"):
        parts.append(f"{m['cpus']} CPUs")
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB RAM")
    if m.get("platform"):
        parts.append(str(m["platform"]))
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    if m.get("psycopg"):
        parts.append(f"psycopg {m['psycopg']}")
    return ", ".join(parts) or "unknown"


def _postgres(meta: dict[str, Any]) -> str:
    return str(meta.get("postgresql") or "unknown")


def _date(meta: dict[str, Any]) -> str:
    started = meta.get("started")
    if not isinstance(started, str) or not started:
        return "unknown"
    return started.replace("T", " ").removesuffix("+00:00")


def _common(scenarios: Sequence[Scenario], what: Any) -> str | None:
    """The value of ``what(meta)`` if all scenarios agree, else None."""
    values = {what(s.meta) for s in scenarios}
    return values.pop() if len(values) == 1 else None


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


# ----------------------------------------------------------------------------- charts


def chart_backend() -> tuple[Any, str | None]:
    """The matplotlib ``Figure`` class with the Agg backend, or why it is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as e:
        return None, (
            f"matplotlib is not installed ({e}); install the bench extra: pip install -e '.[bench]'"
        )
    return Figure, None


def _two_five(value: float, _position: Any) -> str:
    """A minor tick's label on a log axis: only 2, 5, 20, 50, 0.2..."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(math.isclose(mantissa, m) for m in (2, 5)) else ""


def draw(figure_class: Any, chart: dict[str, Any], path: Path) -> None:
    """Draw one chart spec into ``path`` (PNG, 800x450)."""
    from matplotlib import ticker

    fig = figure_class(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    x = chart["x"]
    series = chart["series"]
    numeric_x = all(_is_number(v) for v in x)
    categories = [format_cell(v) for v in x]
    many = len(series) > 1
    nan = float("nan")

    if chart["kind"] == "bar":
        positions = list(range(len(x)))
        width = 0.8 / len(series)
        labels = len(x) * len(series) <= 24
        for i, (label, ys) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            heights = [nan if y is None else y for y in ys]
            bars = ax.bar(
                [p + offset for p in positions],
                heights,
                width=width * 0.95,
                label=str(label),
                log=chart["logy"],
            )
            if labels:
                ax.bar_label(
                    bars,
                    labels=["" if y is None else format_number(y) for y in ys],
                    fontsize=8,
                    padding=2,
                )
        ax.set_xticks(positions, categories)
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    else:
        xs: list[Any] = list(x) if numeric_x else list(range(len(x)))
        marker = "o" if len(x) <= 30 else None
        for label, ys in series.items():
            ax.plot(xs, [nan if y is None else y for y in ys], marker=marker, label=str(label))
        if not numeric_x or len(set(x)) == 1:  # a single x: its tick, not -0.04..0.04
            ax.set_xticks(xs, categories)
        if chart["logx"]:
            ax.set_xscale("log")
            if len(x) <= 12:  # a tick at each measured x (1, 2, 4, 8...), not only at 1, 10
                ax.set_xticks(xs, categories)
                ax.minorticks_off()
        if chart["logy"]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)

    if not numeric_x or chart["kind"] == "bar":
        longest = max(len(c) for c in categories)
        if longest * len(categories) > 70:
            for tick in ax.get_xticklabels():
                tick.set_rotation(25)
                tick.set_horizontalalignment("right")
    # Plain numbers (0.5, 10, 1000) on log axes, not powers of ten.
    # Plain numbers (0.5, 10, 1000) on log axes, not powers of ten; over less than three
    # decades the 2s and 5s between them are labelled too.
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if chart["logy"]:
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        if low > 0 and math.log10(high / low) < 3:
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_two_five))
    if chart["logx"]:
        ax.xaxis.set_major_formatter(plain)
    ax.set_title(chart["title"], fontsize=12)
    ax.set_xlabel(chart["xlabel"])
    ax.set_ylabel(chart["ylabel"])
    if many:
        ax.legend(fontsize=9)
    # No software version in the PNG: the same figures give the same file.
    fig.savefig(path, format="png", metadata={"Software": None})


def draw_all(scenarios: Sequence[Scenario], results: Path, figure_class: Any) -> None:
    for s in scenarios:
        for chart in s.charts:
            try:
                draw(figure_class, chart, results / chart["file"])
            except Exception as e:  # matplotlib's own errors have no common base
                s.problems.append(f"chart {chart['file']}: cannot be drawn: {e}")
            else:
                s.drawn.append(chart["file"])


def prune(results: Path, scenarios: Sequence[Scenario], names: Iterable[str]) -> list[Path]:
    """Remove ``<scenario>-*.png`` charts that no results file asks for any more."""
    kept = {f for s in scenarios for f in s.drawn}
    removed = []
    for name in names:
        for png in results.glob(f"{name}-*.png"):
            if png.name not in kept:
                png.unlink()
                removed.append(png)
    return removed


# ----------------------------------------------------------------------------- report


def targets_table(scenarios: Sequence[Scenario]) -> list[str]:
    rows = [
        [s.name, t["target"], t["measured"], MET[t["met"]]] for s in scenarios for t in s.targets
    ]
    return markdown_table(["scenario", "target", "measured", "met"], rows)


def render(
    scenarios: dict[str, Scenario],
    expected: Sequence[str],
    out: Path,
    results: Path,
    no_charts: str | None,
) -> str:
    """The Markdown of the report."""
    found = [scenarios[n] for n in order(scenarios)]
    described = [s for s in found if s.meta]
    lines = [
        "# Benchmark report",
        "",
        "Produced by `make bench` (`python -m bench.run`: every scenario in `bench/`, then "
        "`python -m bench.report`, which writes this file and the charts in "
        "`bench/results/` from the scenarios' `bench/results/*.json`).",
        "",
    ]
    machine = postgres = None
    if not found:
        lines += ["No scenario has results yet: run `make bench`.", ""]
    if described:
        revision = _common(described, _revision)
        machine = _common(described, _machine)
        postgres = _common(described, _postgres)
        dates = sorted(_date(s.meta) for s in described)
        date = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        several = "different ones: see each scenario"
        lines += [
            f"* Machine: {machine or several}",
            f"* PostgreSQL: {postgres or several}",
            f"* Git revision: {revision or several}",
            f"* Run (UTC): {date}",
            "",
        ]
    if no_charts:
        lines += [f"Charts were not drawn: {no_charts}.", ""]

    lines += ["## Targets", ""]
    with_targets = [s for s in found if s.targets]
    if with_targets:
        met = sum(t["met"] is True for s in with_targets for t in s.targets)
        judged = sum(t["met"] is not None for s in with_targets for t in s.targets)
        lines += targets_table(with_targets)
        lines += ["", f"{met} of {judged} targets met; — marks a figure with no target.", ""]
    else:
        lines += ["No scenario stated targets.", ""]

    for name in order([*expected, *scenarios]):
        s = scenarios.get(name)
        if s is None:
            lines += [f"## {name}", "", f"Not run: there is no `{name}.json` results file.", ""]
            continue
        lines += [f"## {name}: {s.title}" if s.title else f"## {name}", ""]
        meta = s.meta
        run = [f"Run {_date(meta)} UTC"]
        if isinstance(meta.get("seconds"), (int, float)):
            run.append(f"{format_number(meta['seconds'])} s")
        run.append(f"revision {_revision(meta)}")
        if machine is None or postgres is None:
            run.append(f"PostgreSQL: {_postgres(meta)}")
            run.append(f"machine: {_machine(meta)}")
        argv = meta.get("argv")
        command = "python -m bench." + name
        if isinstance(argv, list) and argv:
            command += " " + " ".join(str(a) for a in argv)
        run.append(f"`{command}`")
        lines += ["_" + ", ".join(run) + "._", ""]
        if s.problems:
            lines += [f"**This results file is malformed** (`{s.path.name}`):", ""]
            lines += [f"* {_escape(p)}" for p in s.problems]
            lines += [""]
        if s.summary:
            lines += [s.summary.strip(), ""]
        for table in s.tables:
            if table["title"]:
                lines += [f"### {table['title']}", ""]
            lines += markdown_table(table["columns"], table["rows"])
            lines += [""]
            if table["note"]:
                lines += [table["note"].strip(), ""]
        for chart in s.charts:
            if chart["file"] in s.drawn:
                title = chart["title"] or chart["file"]
                link = _relative(results / chart["file"], out.parent)
                lines += [f"![{_escape(title).replace(']', ')')}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"


def headline(scenarios: dict[str, Scenario], readme: Path, out: Path) -> str:
    """The README block: the targets of the headline scenarios and a link to the report."""
    chosen = [scenarios[n] for n in HEADLINE if n in scenarios]
    link = _relative(out, readme.parent)
    lines = [BEGIN]
    with_targets = [s for s in chosen if s.targets]
    if with_targets:
        lines += targets_table(with_targets)
        dates = sorted(_date(s.meta)[:10] for s in with_targets)
        revisions = sorted({_revision(s.meta) for s in with_targets})
        lines += [
            "",
            f"Measured {dates[-1]} at revision {', '.join(revisions)} by `make bench`; "
            f"every scenario, machine and chart: [{link}]({link}).",
        ]
    else:
        lines += [
            f"No results of {', '.join(HEADLINE)} yet: `make bench` runs them and writes "
            f"[{link}]({link}).",
        ]
    lines.append(END)
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> str | None:
    """Replace the headline block in ``readme``; return why not if it could not."""
    try:
        text = readme.read_text()
    except OSError as e:
        return f"{readme}: cannot be read: {e}"
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        return f"{readme}: no {BEGIN} ... {END} block, headline not written"
    new = text[:begin] + block + text[end + len(END) :]
    if new != text:
        readme.write_text(new)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="bench/results")
    parser.add_argument("--out", type=Path, default=REPORT, help="bench/REPORT.md")
    parser.add_argument("--readme", type=Path, default=README, help="README.md to update")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    parser.add_argument("--no-charts", action="store_true", help="do not draw charts")
    args = parser.parse_args(argv)

    results: Path = args.results
    if not results.is_dir():
        print(f"report: {results} is not a directory; no results to report", file=sys.stderr)
        paths = []
    else:
        paths = sorted(results.glob("*.json"))
    scenarios = {p.stem: load(p) for p in paths}

    figure_class, no_charts = (None, "--no-charts was given") if args.no_charts else chart_backend()
    if no_charts:
        print(f"report: no charts: {no_charts}", file=sys.stderr)
    else:
        draw_all(list(scenarios.values()), results, figure_class)
        for png in prune(results, list(scenarios.values()), {*SCENARIOS, *scenarios}):
            print(f"report: removed {png}, which no results file draws", file=sys.stderr)

    status = 0
    for s in scenarios.values():
        for problem in s.problems:
            print(f"report: {s.path}: {problem}", file=sys.stderr)
            status = 1

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(scenarios, SCENARIOS, out, results, no_charts))
    print(f"report: {len(scenarios)} results files -> {out}", file=sys.stderr)
    if not args.no_readme:
        why = update_readme(args.readme, headline(scenarios, args.readme, out))
        if why:
            print(f"report: {why}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
