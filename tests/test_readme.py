"""The README's quickstart runs as written.

The code blocks between ``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->`` in
README.md are run as a user would paste them: the shell block in bash, in a directory
whose ``.pgreplica-cluster`` is the session cluster (so ``pgreplica cluster up`` finds it
running and writes its ``pgreplica.toml``), then the Python blocks, in order, as one
script in that same shell.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgreplica.testing import LocalCluster, make_cluster_directory

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- quickstart:begin -->"
END = "<!-- quickstart:end -->"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the quickstart, in order."""
    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "quickstart markers missing"
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    return FENCE.findall(section)


def test_the_quickstart_has_a_shell_block_then_python() -> None:
    languages = [language for language, _ in quickstart_blocks()]
    assert languages[0] == "sh"
    assert languages.count("python") >= 2
    assert set(languages) == {"sh", "python"}


@pytest.fixture
def work_directory(healthy_cluster: LocalCluster) -> Iterator[Path]:
    """An empty directory whose ``.pgreplica-cluster`` is the session cluster.

    Made like a cluster directory: when the tests run as root the servers run as
    ``postgres``, which must be able to reach the cluster through this path.
    """
    path = make_cluster_directory("pgreplica-readme-")
    (path / ".pgreplica-cluster").symlink_to(healthy_cluster.directory)
    yield path
    shutil.rmtree(path)  # the link only, not the cluster
    healthy_cluster.execute(0, "DROP TABLE IF EXISTS notes")


def test_the_quickstart_runs_as_written(work_directory: Path) -> None:
    blocks = quickstart_blocks()
    shell = "\n".join(code for language, code in blocks if language == "sh")
    script = work_directory / "quickstart.py"
    script.write_text("\n".join(code for language, code in blocks if language == "python"))
    env = {name: value for name, value in os.environ.items() if not name.startswith("PGREPLICA_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    result = subprocess.run(
        ["bash", "-e", "-c", f"{shell}\npython {script.name}\n"],
        cwd=work_directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    # The read after the write saw the write, through the config that cluster up wrote.
    assert "('hello',) read on 127.0.0.1:" in result.stdout
    assert (work_directory / ".pgreplica-cluster" / "pgreplica.toml").exists()
    # lb.status() lists the primary and both replicas of the session cluster.
    assert result.stdout.count("role='replica', state='up'") == 2
    assert "reason='sequence_function'" in result.stdout


DJANGO_DOC = README.parent / "docs" / "django.md"


def test_the_django_example_commands_run_as_written(work_directory: Path, project: None) -> None:
    """docs/django.md's example commands (between ``django-example`` markers), from a
    directory laid out like the repository's root whose ``.pgreplica-cluster`` is the
    session cluster: the cluster, its database, migrate, check, pgreplica_status and
    the example's own DRF suite under Django's test runner."""
    text = DJANGO_DOC.read_text(encoding="utf-8")
    begin, end = "<!-- django-example:begin -->", "<!-- django-example:end -->"
    section = text[text.index(begin) + len(begin) : text.index(end)]
    [(language, shell)] = FENCE.findall(section)
    assert language == "sh"
    (work_directory / "examples").symlink_to(README.parent / "examples")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PGREPLICA_", "READ_REPLICA_", "DJANGO_", "DATABASE_URL"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    result = subprocess.run(
        ["bash", "-e", "-c", shell],
        cwd=work_directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "database 'django_perf'" in output
    assert "System check identified no issues" in output, output[-5000:]
    assert output.count("replica ") >= 2 and "DATABASES alias 'read_replica_2'" in output
    assert "Ran 10 tests" in output and "OK" in output, output[-5000:]
    assert "Traceback" not in output
