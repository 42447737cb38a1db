"""Generate the sync balancer from the asyncio one, so that there is one copy to edit.

    python tools/gen_sync.py          # rewrite src/pgreplica/_balancer_sync.py
    python tools/gen_sync.py --check  # exit 1 if the generated file is out of date

Rules: ``async``/``await`` disappear, ``Async`` prefixes and asyncio primitives map to
their sync twins, lines between ``# async-only-begin`` and ``# async-only-end`` are
dropped, as is a line ending in ``# async-only``, and a comment line
``# sync-only: CODE`` becomes ``CODE``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "pgreplica"
#: asyncio source -> generated sync module
FILES = {
    PACKAGE / "_balancer_async.py": PACKAGE / "_balancer_sync.py",
    PACKAGE / "_routing_async.py": PACKAGE / "_routing_sync.py",
    PACKAGE / "_jobs_async.py": PACKAGE / "_jobs_sync.py",
    PACKAGE / "_units_async.py": PACKAGE / "_units_sync.py",
}

HEADER = '''"""GENERATED from ``{source}`` by ``tools/gen_sync.py``: the sync twin of
the asyncio code. Do not edit; edit the asyncio file and regenerate."""
'''

_SYNC_ONLY = re.compile(r"^(\s*)# sync-only: ?(.*)$")
_REPLACEMENTS: list[tuple[str, str]] = [
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\basynccontextmanager\b", "contextmanager"),
    (r"\b_Async(\w+)", r"_\1"),
    (r"\bAsync(\w+)", r"\1"),
    (r"\basync def ", "def "),
    (r"\basync with ", "with "),
    (r"\basync for ", "for "),
    (r"\bawait ", ""),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"__aiter__", "__iter__"),
    (r"\basyncio\.Lock\(\)", "threading.Lock()"),
    (r"\basyncio\.sleep\(", "time.sleep("),
    (r"^import asyncio$", "import threading"),
    (r"\(asyncio\)", "(threads)"),
    (r"_routing_async", "_routing_sync"),
    (r"_balancer_async", "_balancer_sync"),
    (r"_jobs_async", "_jobs_sync"),
    (r"_units_async", "_units_sync"),
]


def convert(text: str, source: str) -> str:
    body = text.split('"""', 2)[2].lstrip("\n")  # drop the module docstring
    out: list[str] = []
    skipping = False
    for line in body.splitlines():
        marker = line.strip()
        if marker in ("# async-only-begin", "# async-only-end"):
            skipping = marker.endswith("begin")
            continue
        if skipping or line.endswith("# async-only"):
            continue
        match = _SYNC_ONLY.match(line)
        if match:
            line = match.group(1) + match.group(2) if match.group(2) else ""
        for pattern, repl in _REPLACEMENTS:
            line = re.sub(pattern, repl, line, flags=re.MULTILINE)
        out.append(line)
    return HEADER.format(source=source) + "\n" + "\n".join(out) + "\n"


def formatted(text: str, target: Path) -> str:
    ruff = Path(sys.executable).parent / "ruff"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / target.name
        path.write_text(text)
        config = ["--config", str(ROOT / "pyproject.toml")]
        subprocess.run(
            [str(ruff), "check", "--fix-only", "--select", "I,F401", "-q", *config, str(path)],
            check=False,
        )
        subprocess.run([str(ruff), "format", "-q", *config, str(path)], check=True)
        return path.read_text()


def main(argv: list[str]) -> int:
    stale = []
    # Twice when writing: import sorting knows a generated module is first-party only
    # once that module exists.
    for _ in range(1 if "--check" in argv else 2):
        for source, target in FILES.items():
            result = formatted(convert(source.read_text(), source.name), target)
            if "--check" in argv:
                if not target.exists() or target.read_text() != result:
                    stale.append(target)
            else:
                target.write_text(result)
    for target in stale:
        print(f"{target.relative_to(ROOT)} is out of date: run python tools/gen_sync.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
