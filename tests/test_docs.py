"""The front door: a README short enough to read, every docs page reachable from it, and no link that leaves the
repository (a moved or renamed file breaks this test, not a reader's click)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_a_front_door_not_a_notebook():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name}" in readme, page.name


def test_every_link_stays_in_the_repository_and_resolves():
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            assert not re.match(r"^[a-z]+:", target), f"{page.name} links outside the repository: {target}"
            path = target.split("#")[0]
            if path:  # an anchor of the page itself otherwise
                resolved = (page.parent / path).resolve()
                assert resolved.exists() and ROOT in resolved.parents, f"{page.name}: {target} does not resolve"


SCRIPT = re.compile(r"\b((?:examples|benchmarks)/[\w/]+\.py)\b")


def test_every_script_a_page_or_docstring_names_exists():
    """A script renamed or folded into the library leaves no page, docstring or test pointing at it."""
    texts = [*PAGES, *sorted((ROOT / "hf_integration").rglob("*.py")), *sorted((ROOT / "hypergrad").rglob("*.py")),
             *sorted((ROOT / "examples").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
             *sorted((ROOT / "tests").rglob("*.py"))]
    missing = {(text.relative_to(ROOT).as_posix(), name) for text in texts
               for name in SCRIPT.findall(text.read_text(encoding="utf-8")) if not (ROOT / name).is_file()}
    assert not missing, sorted(missing)


RESULT_FILE = re.compile(r"benchmarks/(?:results|device_results)/[\w.{},*-]+")


def _expand_braces(pattern: str) -> list[str]:
    """``a{b,c}d`` -> ``abd``, ``acd`` (nested groups are not used in the pages)."""
    group = re.search(r"\{([^{}]*)\}", pattern)
    if group is None:
        return [pattern]
    return [name for alternative in group.group(1).split(",")
            for name in _expand_braces(pattern[:group.start()] + alternative + pattern[group.end():])]


def test_every_result_file_a_page_cites_is_in_the_repository():
    """A figure a page attributes to a results file can be checked: the file is committed (results folders are
    ignored by git, so a result that was never added with `git add -f` fails here on a fresh clone)."""
    missing = set()
    for page in PAGES:
        for cited in RESULT_FILE.findall(page.read_text(encoding="utf-8")):
            for name in _expand_braces(cited.rstrip(".,")):
                name = name.rstrip(".,")
                found = list(ROOT.glob(name)) if "*" in name else [ROOT / name]
                if not any(path.exists() for path in found):
                    missing.add((page.relative_to(ROOT).as_posix(), name))
    assert not missing, sorted(missing)
