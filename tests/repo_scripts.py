"""The repository's scripts (``examples/*.py``, ``benchmarks/*.py``) as modules for the tests, loaded from their files:
they are programs, not packages, and no folder of theirs joins the import path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(relative_path: str) -> ModuleType:
    """The script at ``relative_path`` (from the repository root) as a module, executed once per test session
    (registered as ``repo_scripts.<folder>.<name>``, so that its dataclasses and pickles resolve)."""
    path = ROOT / relative_path
    name = "repo_scripts." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
