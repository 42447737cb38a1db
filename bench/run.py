"""The whole benchmark suite: every scenario, then the report (``make bench``).

Run ``python -m bench.run [--only a,b] [--skip a,b] [--args name="--x 1"]``. Each
scenario runs as ``python -m bench.<name>`` in a subprocess, one after the other, with
its output streamed as it comes. Its ``bench/results/<name>.json`` is removed first, so a
scenario that fails leaves no older figures for the report. A failing scenario does not
stop the others, but makes the exit status 1. At the end ``python -m bench.report``
writes ``bench/REPORT.md``, and a table gives each scenario's time and status.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.report import RESULTS_DIR, ROOT, SCENARIOS

#: The order in which the scenarios run.
ORDER = (
    "overhead",
    "offload",
    "failover",
    "scale",
    "classify",
    "tagging",
    "token_cost",
    "routing",
    "pubsub",
    "sqlalchemy_session",
    "pgbouncer",
    "dump",
    "dump_filters",
    "dump_parallel",
)
assert set(ORDER) == set(SCENARIOS), "bench.run.ORDER and bench.report.SCENARIOS differ"


@dataclass
class Outcome:
    name: str
    seconds: float
    status: str
    ok: bool


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown)} (scenarios: {', '.join(ORDER)})"
        )
    return names


def _passthrough(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    if not sep or name not in ORDER:
        raise argparse.ArgumentTypeError(
            f'expected NAME="ARGS" with NAME one of {", ".join(ORDER)}'
        )
    try:
        return name, shlex.split(args)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--only", type=_names, default=None, help="run only these scenarios (comma-separated)"
    )
    parser.add_argument("--skip", type=_names, default=[], help="skip these (comma-separated)")
    parser.add_argument(
        "--args",
        type=_passthrough,
        action="append",
        default=[],
        metavar='NAME="ARGS"',
        help='extra arguments for one scenario, e.g. --args failover="--trials 3" (repeatable)',
    )
    parser.add_argument("--no-report", action="store_true", help="do not run bench.report")
    return parser.parse_args(argv)


def _run(command: list[str], env: dict[str, str]) -> tuple[float, int | None]:
    """Run ``command`` with its output on ours; its seconds and exit status."""
    started = time.monotonic()
    try:
        # Inherited stdout/stderr: the output streams as it comes. A Ctrl-C reaches the
        # child too (same process group); wait for it to stop before going on.
        with subprocess.Popen(command, cwd=ROOT, env=env) as process:
            try:
                returncode = process.wait()
            except KeyboardInterrupt:
                process.wait()
                raise
    except OSError as e:
        print(f"bench.run: cannot start {command}: {e}", file=sys.stderr)
        return time.monotonic() - started, None
    return time.monotonic() - started, returncode


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "did not start"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"failed (exit {returncode})"


def run_scenario(name: str, extra: list[str], env: dict[str, str]) -> Outcome:
    results = RESULTS_DIR / f"{name}.json"
    if results.exists():
        results.unlink()
        print(f"bench.run: removed the previous {results.relative_to(ROOT)}", file=sys.stderr)
    if importlib.util.find_spec(f"bench.{name}") is None:
        print(f"bench.run: there is no bench/{name}.py", file=sys.stderr)
        return Outcome(name, 0.0, "no such module", ok=False)
    command = [sys.executable, "-m", f"bench.{name}", *extra]
    print(f"\n=== {shlex.join(['python', *command[1:]])}", flush=True)
    seconds, returncode = _run(command, env)
    if returncode != 0:
        return Outcome(name, seconds, _describe(returncode), ok=False)
    if not results.exists():
        return Outcome(name, seconds, "ok, wrote no results JSON", ok=True)
    return Outcome(name, seconds, "ok", ok=True)


def summary(outcomes: list[Outcome], total: float) -> str:
    width = max([len("scenario"), *(len(o.name) for o in outcomes)])
    lines = [f"{'scenario':<{width}}  {'seconds':>8}  status"]
    lines += [f"{o.name:<{width}}  {o.seconds:>8.1f}  {o.status}" for o in outcomes]
    lines.append(f"{'total':<{width}}  {total:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [n for n in ORDER if (args.only is None or n in args.only) and n not in args.skip]
    extra: dict[str, list[str]] = {}
    for name, more in args.args:
        extra.setdefault(name, []).extend(more)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    started = time.monotonic()
    outcomes: list[Outcome] = []
    interrupted = False
    for name in chosen:
        try:
            outcomes.append(run_scenario(name, extra.get(name, []), env))
        except KeyboardInterrupt:
            outcomes.append(Outcome(name, 0.0, "interrupted", ok=False))
            interrupted = True
            break
    if not args.no_report and not interrupted:
        print("\n=== python -m bench.report", flush=True)
        seconds, returncode = _run([sys.executable, "-m", "bench.report"], env)
        status = "ok" if returncode == 0 else _describe(returncode)
        outcomes.append(Outcome("(report)", seconds, status, ok=returncode == 0))
    total = time.monotonic() - started

    print("\n" + summary(outcomes, total), flush=True)
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        print(f"bench.run: failed: {', '.join(failed)}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
