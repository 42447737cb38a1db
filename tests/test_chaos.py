"""The chaos run (``make chaos``, bench/chaos.py) for 10 seconds: 32 workers, threads and
asyncio tasks, reading their own writes while faults fire at random on real servers
behind fault proxies. It must end with no stale read, no lost write and no unexpected
error; and with tokens dropped on purpose it must see the stale reads that follow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(
    r"^stale reads: (\d+), lost writes: (\d+), unexpected errors: (\d+), "
    r"worst read latency: ([\d.]+) s$",
    re.MULTILINE,
)


def chaos(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--seconds", "10", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(done.stdout, done.stderr)  # the counts, in the test's output
    return done.returncode, done.stdout


def test_ten_seconds_of_chaos_lose_nothing_and_read_nothing_stale() -> None:
    status, out = chaos()
    found = SUMMARY.search(out)
    assert found, out
    stale, lost, unexpected = (int(found.group(i)) for i in (1, 2, 3))
    assert (stale, lost, unexpected, status) == (0, 0, 0, 0), out
    faults = re.search(r"^faults: (\d+)", out, re.MULTILINE)
    assert faults and int(faults.group(1)) >= 3, out  # faults did fire
    reads = re.search(r"^cycles: \d+, reads: (\d+)", out, re.MULTILINE)
    assert reads and int(reads.group(1)) > 100, out


def test_the_chaos_run_sees_stale_reads_when_tokens_are_dropped() -> None:
    status, out = chaos("--drop-tokens")
    found = SUMMARY.search(out)
    assert found, out
    assert int(found.group(1)) > 0 and status == 1, out
