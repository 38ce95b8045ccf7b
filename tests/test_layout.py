"""One concept per module: every module of ``hypergrad/`` and ``hf_integration/`` opens with a docstring whose first
line states its concept, stays small enough to read in one sitting, and is listed in CONTRIBUTING.md's layout
tables (so the map a contributor reads does not go stale as modules are added)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for package in ("hypergrad", "hf_integration") for p in (ROOT / package).rglob("*.py"))
MAX_LINES = 520  # "about 500 lines at most"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_states_its_concept_first_and_stays_small(path):
    source = path.read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and len(docstring.splitlines()[0].split()) >= 3, f"{path.name}: no one-line concept first"
    assert len(source.splitlines()) <= MAX_LINES, f"{path.name}: {len(source.splitlines())} lines; split it by concept"


def test_contributing_lists_every_module():
    layout = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(ROOT)) for p in MODULES
               if p.name != "__init__.py" and f"`{p.relative_to(ROOT).as_posix()}`" not in layout]
    assert not missing, f"CONTRIBUTING.md's layout tables lack {missing}"
