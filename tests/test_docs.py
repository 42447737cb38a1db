"""The documentation site builds without a warning, and every page is reachable.

``mkdocs build --strict`` (mkdocs.yml) fails on a link to a missing page or anchor, a
page left out of the navigation, and a cross-reference in a docstring that names nothing
(docs/_griffe/sphinx_roles.py turns the docstrings' Sphinx roles into references). CI
runs ``make test``, so this test is the check.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"


def guide_pages() -> list[str]:
    """docs/*.md but the index, as paths relative to the repository."""
    return sorted(f"docs/{p.name}" for p in DOCS.glob("*.md") if p.name != "index.md")


def test_mkdocs_builds_strict_without_warnings(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", "mkdocs.yml", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not [line for line in output.splitlines() if "WARNING" in line], output
    # The API reference was generated from the docstrings, cross-references resolved.
    reference = (site / "reference" / "pgreplica" / "index.html").read_text(encoding="utf-8")
    assert 'id="pgreplica.LoadBalancer.read"' in reference
    assert ":class:`" not in reference and ":meth:`" not in reference
    sticking = (site / "reference" / "sticking" / "index.html").read_text(encoding="utf-8")
    assert 'href="#pgreplica.sticking.Sticking.caught_up"' in sticking


def test_the_index_lists_every_page() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([\w./-]+\.md)\)", index))
    missing = [page for page in guide_pages() if page.removeprefix("docs/") not in linked]
    assert not missing, f"docs/index.md does not list {missing}"
    references = sorted(p.name for p in (DOCS / "reference").glob("*.md"))
    listed = set(re.findall(r"\]\(reference/([\w-]+\.md)\)", index))
    assert set(references) - {"index.md"} <= listed, "docs/index.md misses reference pages"


def test_the_readme_more_list_names_every_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    more = readme[readme.index("\nMore ") : readme.index("\n## Benchmarks")]
    missing = [page for page in guide_pages() if f"({page})" not in more]
    assert not missing, f"the README's More list does not link {missing}"
